"""Runs one stage or a chain of them, each started from the checkpoint of the one before."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bita import options
from bita.data.features import views_problem
from bita.errors import ConfigError
from bita.eval.decoding import DecodeSettings
from bita.stages.context import StageContext, StageResult

log = logging.getLogger(__name__)


def stage_sequence(cfg: DictConfig) -> list[DictConfig]:
    """The stage configs to run in order: `stage.order` over `stage.recipes`, or `stage` itself."""
    return [stage_cfg for _, stage_cfg in stage_locations(cfg)]


def stage_locations(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(where in the run config, stage config) of each stage to run, in order."""
    if "order" not in cfg.stage:
        return [("stage", cfg.stage)]
    missing = [name for name in cfg.stage.order if name not in cfg.stage.recipes]
    if missing:
        raise ConfigError(
            f"stage.order names {missing}, which stage.recipes does not define "
            f"(defined: {sorted(cfg.stage.recipes)})"
        )
    return [(f"stage.recipes.{name}", cfg.stage.recipes[name]) for name in cfg.stage.order]


def check_config(cfg: DictConfig) -> None:
    """Types and ranges of the root options and of every stage's own values, and the schedule
    each training stage ends up with: all problems in one error, before any stage runs."""
    found = options.problems(cfg, {**options.ROOT, **options.SCHEDULE})
    if not found and (views := views_problem(cfg.features.views, cfg.augment)):
        found.append(views)  # a check across options, made once their types are right
    try:
        DecodeSettings.from_config(cfg.decode)
    except ConfigError as err:
        found.append(str(err))
    for where, stage_cfg in stage_locations(cfg):
        found += options.problems(stage_cfg, options.STAGE, f"{where}.")
        if "train" in stage_cfg:
            merged = effective_config(cfg, stage_cfg, {}, None)
            found += options.missing_required(merged, str(stage_cfg.name))
    if found:
        raise ConfigError("; ".join(found))


def effective_config(
    cfg: DictConfig, stage_cfg: DictConfig, carried: dict[str, Any], init_from: str | None
) -> DictConfig:
    """The config one stage sees: root `optim`/`train` values that are set override the stage's."""
    eff = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(eff):
        eff.stage = OmegaConf.create(OmegaConf.to_container(stage_cfg, resolve=True))
        for section in ("optim", "train"):
            overrides = {k: v for k, v in cfg[section].items() if v is not None}
            own = stage_cfg.get(section) or OmegaConf.create({})
            eff[section] = OmegaConf.merge(OmegaConf.to_container(own, resolve=True), overrides)
        for key, value in carried.items():
            OmegaConf.update(eff, key, value, force_add=True)
        eff.init_from = init_from
    return eff


def recipe_for(stage_cfg: DictConfig):
    """The `run` function of module `bita.stages.<recipe>` named by the stage config."""
    try:
        module = importlib.import_module(f"bita.stages.{stage_cfg.recipe}")
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"stage {stage_cfg.name!r}: recipe {stage_cfg.recipe!r} has no module bita.stages."
            f"{stage_cfg.recipe}"
        ) from err
    return module.run


def run_stages(
    cfg: DictConfig, run_dir: Path, dist: Any, tracker: Any
) -> list[tuple[str, StageResult]]:
    """Run every stage in order; a stage's checkpoint and carried config feed the next one."""
    results: list[tuple[str, StageResult]] = []
    carried: dict[str, Any] = {}
    init_from, handed_over = cfg.init_from, None
    for stage_cfg in stage_sequence(cfg):
        eff = effective_config(cfg, stage_cfg, carried, init_from)
        stage_dir = run_dir / stage_cfg.name
        ctx = StageContext(eff, stage_dir, dist, tracker, handed_over=handed_over)
        log.info("stage %s: starting in %s", stage_cfg.name, ctx.stage_dir)
        result = recipe_for(stage_cfg)(ctx)
        report_skips(ctx)
        results.append((str(stage_cfg.name), result))
        carried.update(result.config_overrides)
        if result.checkpoint is not None:
            init_from, handed_over = str(result.checkpoint), result.selection
    return results


def report_skips(ctx: StageContext) -> dict[str, int]:
    """End a stage with its totals of skipped samples and bad shards, summed over ranks (a
    sample skipped on two ranks counts twice): logged, and sent to the tracker as
    ``<stage>/skipped_samples``, ``<stage>/distinct_skipped_samples``, ``<stage>/bad_shards``."""
    totals = ctx.skips.totals()
    if ctx.dist.world_size > 1:
        import torch.distributed as tdist

        summed = torch.tensor(list(totals.values()), dtype=torch.int64, device=ctx.dist.device)
        tdist.all_reduce(summed)
        totals = dict(zip(totals, summed.tolist(), strict=True))
    if ctx.dist.is_main:
        bad = totals["skipped_samples"] or totals["bad_shards"]
        log.log(
            logging.WARNING if bad else logging.INFO,
            "stage %s: %d samples skipped (%d distinct), %d bad shards%s",
            ctx.name,
            totals["skipped_samples"],
            totals["distinct_skipped_samples"],
            totals["bad_shards"],
            " (each named in a warning above)" if bad else "",
        )
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({f"{ctx.name}/{k}": v for k, v in totals.items()}, step=0)
    return totals
