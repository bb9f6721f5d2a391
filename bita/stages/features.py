"""Write the frozen-feature cache of the run's dataset as a pipeline step, so the stages after
it read the tower's cached tokens instead of decoding and encoding images every epoch.

The cache goes to `features.root` when that is set, else into this stage's own folder, and the
later stages of the pipeline are pointed at it. An up-to-date cache is left as is (resuming a
run does not redo it). tools/cache_features.py writes the same cache outside a run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as tdist
from omegaconf import DictConfig

from bita.data.cache_writer import CacheOptions, cache_features
from bita.engine.checkpoint import read_weights
from bita.locations import resolve_location
from bita.models.encoders import FrozenImageEncoder, build_image_encoder
from bita.models.tower_adaptation import load_tower_weights
from bita.stages.context import StageContext, StageResult

log = logging.getLogger(__name__)


def build_tower(cfg: DictConfig) -> FrozenImageEncoder:
    """The configured tower, with its weights from `init_from` when that checkpoint has them
    (a random tower's, or an adapted tower's units above the cut)."""
    torch.manual_seed(int(cfg.seed))
    tower = build_image_encoder(cfg.encoder)
    if cfg.get("init_from"):
        in_checkpoint = bool(cfg.encoder.get("in_checkpoint", False))
        load_tower_weights(tower, read_weights(cfg.init_from), in_checkpoint)
    return tower


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    if cfg.encoder.get("in_checkpoint") and not cfg.init_from:
        raise ValueError(
            f"stage {ctx.name}: encoder.kind={cfg.encoder.kind} has weights only a checkpoint "
            "holds (encoder.in_checkpoint=true), so a cache of a freshly built tower would "
            "match no later stage; pass init_from=CHECKPOINT or leave this stage out"
        )
    root = Path(resolve_location(str(cfg.features.root))) if cfg.features.root else ctx.stage_dir
    if ctx.dist.rank == 0:
        options = CacheOptions.from_run_config(cfg, str(ctx.dist.device))
        manifests = cache_features(cfg.dataset, cfg.encoder, build_tower(cfg), root, options)
        log.info("stage %s: cache of %s in %s", ctx.name, sorted(manifests), root)
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()  # the other ranks read the cache only once it is complete
    return StageResult(config_overrides={"features.root": str(root)})
