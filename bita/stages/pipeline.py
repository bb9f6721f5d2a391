"""Runs one stage or a chain of them, each started from the checkpoint of the one before."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bita.stages.context import StageContext, StageResult

log = logging.getLogger(__name__)


def stage_sequence(cfg: DictConfig) -> list[DictConfig]:
    """The stage configs to run in order: `stage.order` over `stage.recipes`, or `stage` itself."""
    if "order" not in cfg.stage:
        return [cfg.stage]
    missing = [name for name in cfg.stage.order if name not in cfg.stage.recipes]
    if missing:
        raise ValueError(
            f"stage.order names {missing}, which stage.recipes does not define "
            f"(defined: {sorted(cfg.stage.recipes)})"
        )
    return [cfg.stage.recipes[name] for name in cfg.stage.order]


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
        raise ValueError(
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
    init_from = cfg.init_from
    for stage_cfg in stage_sequence(cfg):
        eff = effective_config(cfg, stage_cfg, carried, init_from)
        ctx = StageContext(cfg=eff, stage_dir=run_dir / stage_cfg.name, dist=dist, tracker=tracker)
        log.info("stage %s: starting in %s", stage_cfg.name, ctx.stage_dir)
        result = recipe_for(stage_cfg)(ctx)
        report_skips(ctx)
        results.append((str(stage_cfg.name), result))
        carried.update(result.config_overrides)
        if result.checkpoint is not None:
            init_from = str(result.checkpoint)
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
