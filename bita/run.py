"""`python -m bita.run [group=option ...] [key=value ...]`: compose, seed, run the stage(s).

The only module that uses Hydra's app machinery; everything it calls takes plain config.
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bita.engine.distributed import apply_thread_count, init_distributed, strip_launcher_args
from bita.errors import reports_user_errors
from bita.eval.tables import metrics_table
from bita.stages.init_from import model_from_checkpoint
from bita.stages.pipeline import check_config, run_stages
from bita.tracking import Tracker

log = logging.getLogger("bita.run")


def seed_everything(seed: int, rank: int) -> None:
    """Seed every RNG, offset by rank so processes draw different augmentations."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def format_results(results: list) -> str:
    """The final metrics of every stage that scored captions, as one table."""
    rows = {f"{name}: {r.scored_split}": r.metrics for name, r in results if r.metrics}
    return metrics_table(rows) if rows else ""


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    reports_user_errors(run)(cfg)


def run(cfg: DictConfig) -> None:
    """One job: settle and check the config, then run its stages (user errors: one line)."""
    hydra_cfg = HydraConfig.get()
    cfg = model_from_checkpoint(cfg, hydra_cfg.overrides.task)
    check_config(cfg)
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
        table = format_results(results)
        if table:
            print(table)
        print(f"run folder: {run_dir}")
        print(tracker.where_to_look())


if __name__ == "__main__":
    sys.argv = strip_launcher_args(sys.argv)
    main()
