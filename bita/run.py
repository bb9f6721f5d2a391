"""`python -m bita.run [group=option ...] [key=value ...]`: compose, seed, run the stage(s).

The only module that uses Hydra's app machinery; everything it calls takes plain config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bita.engine.distributed import apply_thread_count, init_distributed, strip_launcher_args
from bita.errors import reports_user_errors
from bita.eval.tables import caption_examples, metrics_table
from bita.run_names import register_resolver, run_name
from bita.stages.init_from import model_from_checkpoint
from bita.stages.pipeline import check_config, run_stages
from bita.tracking import Tracker

log = logging.getLogger("bita.run")
register_resolver()  # hydra.run.dir uses it; before @hydra.main composes
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    """The root config as `python -m bita.run OVERRIDES` composes and checks it (with
    `init_from`, the model is that checkpoint's), for tools and tests."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = model_from_checkpoint(compose("config", overrides=overrides), overrides)
    check_config(cfg)
    return cfg


def seed_everything(seed: int, rank: int) -> None:
    """Seed every RNG, offset by rank so processes draw different augmentations."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def format_results(results: list, examples: int) -> str:
    """The end of a run's output: a few captions of the last scored split beside a reference
    each, the final metrics of every stage that scored captions, and where the gallery is."""
    rows = {f"{name}: {r.scored_split}": r.metrics for name, r in results if r.metrics}
    if not rows:
        return ""
    lines = []
    last = next((r for _, r in reversed(results) if r.results), None)
    if last is not None:
        files = json.loads(last.results.read_text(encoding="utf-8"))["files"]
        captions = last.results.parent / files["captions"]
        shown = caption_examples(json.loads(captions.read_text(encoding="utf-8")), examples)
        if shown:
            lines += [f"{last.scored_split} captions (generated | a reference), all in {captions}:"]
            lines += [shown, ""]
    lines.append(metrics_table(rows))
    if last is not None and "gallery" in files:
        lines.append(f"gallery: {last.results.parent / files['gallery']}")
    return "\n".join(lines)


@contextlib.contextmanager
def console_to_log_file() -> Iterator[None]:
    """Send this process's stdout and stderr, at the file-descriptor level, to the run's log
    file while the block runs: DeepSpeed's start-up probes compilers (gcc lines), warns that
    no CUDA runtime is found on a CPU machine and, on its first start, compiles an op with
    ninja in subprocesses. None of it is an error; the log keeps it. No log file: unchanged."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not files:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(files[0].baseFilename, "ab") as log_file:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def objective(results: list) -> float | None:
    """What a sweeper optimises: the selection score (`stage.select_metric` on val, at the
    selected checkpoint) of the last stage that selects one; None when no stage does."""
    scores = [r.selection_score for _, r in results if r.selection_score is not None]
    return scores[-1] if scores else None


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return reports_user_errors(run)(cfg)


def run(cfg: DictConfig) -> float | None:
    """One job: settle and check the config, then run its stages (user errors: one line);
    returns the objective a sweeper optimises."""
    hydra_cfg = HydraConfig.get()
    cfg = model_from_checkpoint(cfg, hydra_cfg.overrides.task)
    check_config(cfg)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode.name == "MULTIRUN" else None
    with console_to_log_file():
        dist = init_distributed(cfg.hardware.accelerator)
    apply_thread_count(cfg.hardware)
    seed_everything(int(cfg.seed), dist.rank)
    tracker = Tracker.start(
        cfg,
        run_dir=run_dir,
        run_name=run_name(run_dir, cfg.paths.runs),
        overrides=list(hydra_cfg.overrides.task),
        sweep_dir=sweep_dir,
        sweep_name=run_name(sweep_dir, cfg.paths.runs) if sweep_dir else None,
        enabled=dist.rank == 0,
    )
    with tracker:  # a failing stage marks the MLflow run FAILED
        results = run_stages(cfg, run_dir, dist, tracker)
        captioners = [r.captioner for _, r in results if r.captioner is not None]
        if captioners and cfg.tracking.log_model:
            tracker.log_captioner(captioners[-1], register_as=cfg.tracking.register_model)
        score = objective(results)
        if score is not None:
            tracker.log_metrics({"objective": score}, step=0)
    if dist.rank == 0:
        summary = format_results(results, int(cfg.eval.examples))
        if summary:
            print(summary)
        print(f"run folder: {run_dir}")
        print(tracker.where_to_look())
    return score


if __name__ == "__main__":
    sys.argv = strip_launcher_args(sys.argv)
    main()
