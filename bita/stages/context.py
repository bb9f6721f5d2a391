"""What every stage recipe receives and returns, so the pipeline can chain them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bita.data.skips import SkipLog


@dataclass
class StageContext:
    """One stage's view of the run: its effective config, folder, processes, tracker and the
    log of bad data its streams met.

    `cfg.stage` is this stage's config and `cfg.optim` / `cfg.train` are already merged (the
    stage's own values, overridden by any root value that is set), so recipes read one place.
    """

    cfg: DictConfig
    stage_dir: Path
    dist: Any
    tracker: Any
    skips: SkipLog = field(default_factory=SkipLog)  # every stream of the stage reports here
    handed_over: dict[str, Any] | None = None  # the previous stage's `selection` of init_from

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
    selection_score: float | None = None  # `stage.select_metric` of the selected checkpoint
    captioner: Path | None = None  # the checkpoint to hand to users (logged as an MLflow model)
    selection: dict[str, Any] | None = None  # which of its checkpoints `checkpoint` is, and why
    results: Path | None = None  # the results JSON of that split (bita.eval.evaluate)
