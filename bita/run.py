"""`python -m bita.run [group=option ...] [key=value ...]`: compose, seed, run the stage(s).

The only module that uses Hydra's app machinery; everything it calls takes plain config.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bita.engine.distributed import apply_thread_count, init_distributed, strip_launcher_args
from bita.eval.tables import caption_examples, metrics_table
from bita.stages.pipeline import run_stages
from bita.tracking import Tracker

log = logging.getLogger("bita.run")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    """The root config as `python -m bita.run OVERRIDES` composes it, for tools and tests."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


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


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    dist = init_distributed(cfg.hardware.accelerator)
    apply_thread_count(cfg.hardware)
    seed_everything(int(cfg.seed), dist.rank)
    tracker = Tracker.start(
        cfg,
        run_dir=run_dir,
        overrides=list(hydra_cfg.overrides.task),
        sweep_dir=Path(hydra_cfg.sweep.dir) if hydra_cfg.mode.name == "MULTIRUN" else None,
        enabled=dist.rank == 0,
    )
    with tracker:  # a failing stage marks the MLflow run FAILED
        results = run_stages(cfg, run_dir, dist, tracker)
    if dist.rank == 0:
        summary = format_results(results, int(cfg.eval.examples))
        if summary:
            print(summary)
        print(f"run folder: {run_dir}")
        print(tracker.where_to_look())


if __name__ == "__main__":
    sys.argv = strip_launcher_args(sys.argv)
    main()
