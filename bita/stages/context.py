"""What every stage recipe receives and returns, so the pipeline can chain them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


@dataclass
class StageContext:
    """One stage's view of the run: its effective config, folder, processes and tracker.

    `cfg.stage` is this stage's config and `cfg.optim` / `cfg.train` are already merged (the
    stage's own values, overridden by any root value that is set), so recipes read one place.
    """

    cfg: DictConfig
    stage_dir: Path
    dist: Any
    tracker: Any

    @property
    def name(self) -> str:
        return str(self.cfg.stage.name)


@dataclass
class StageResult:
    """What a stage hands to the next: a checkpoint to start from, config to carry, metrics."""

    checkpoint: Path | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    scored_split: str | None = None  # the split `metrics` were measured on
    results: Path | None = None  # the results JSON of that split (bita.eval.evaluate)
