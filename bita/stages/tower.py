"""Tower adaptation (optional, before stage 1; not in the paper): train the units of the image
tower above its cut (`encoder.adapt_blocks`) on the training captions, contrastively
(bita/models/tower_adaptation.py), then cache the adapted tower's tokens for the later stages.

With a feature cache of the activations at the cut (`tools/cache_features.py
features.activations=cut`), each step runs only the units above the cut. The stage ends by
deriving the adapted tower's tokens cache from it (`<stage dir>/features`: only the top units
run) and hands `features.root` to the stages after it, as `lm` hands over `llm.pretrained`.
Later stages start from this stage's checkpoint, freeze the tower again, and keep the adapted
units in every checkpoint they write.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from bita.data.cache_writer import CacheOptions, derive_features
from bita.engine.checkpoint import read_weights
from bita.locations import resolve_location
from bita.models.encoders import build_image_encoder
from bita.models.tower_adaptation import build_tower_adaptation, load_tower_weights
from bita.models.trainable import set_trainable
from bita.stages.common import (
    batch_by_image,
    image_caption_batches,
    make_trainer,
    model_config,
    steps_per_epoch,
)
from bita.stages.context import StageContext, StageResult

log = logging.getLogger(__name__)


def tower_objective(model: torch.nn.Module, batch: dict) -> dict:
    return model(batch)


def run(ctx: StageContext) -> StageResult:
    if batch_by_image(ctx):
        raise ValueError(
            f"stage {ctx.name}: stage.batch_by_image must be false (contrastive pairs need one "
            "caption per image; an image's other captions would be false negatives)"
        )
    if ctx.cfg.init_from:
        raise ValueError(
            f"stage {ctx.name} adapts the tower from its public weights: init_from must be null "
            f"(got {ctx.cfg.init_from}); the stages after it start from its checkpoint"
        )
    model = build_tower_adaptation(model_config(ctx))
    names = set_trainable(model, model.adapted_names() + list(ctx.cfg.stage.trainable))
    log.info(
        "stage %s: %d trainable tensors (%d tower units above the cut)",
        ctx.name,
        len(names),
        model.encoder.adapt_blocks,
    )
    trainer = make_trainer(ctx, model, model.flops_per_sample())
    trainer.fit(
        image_caption_batches(ctx, model, trainer.micro_batch_size),
        tower_objective,
        steps_per_epoch=steps_per_epoch(ctx),
        epochs=ctx.cfg.train.epochs,
    )
    checkpoint = trainer.last_checkpoint_dir
    features = adapted_features(ctx, checkpoint)
    handed_over = {"features.root": str(features)} if features else {}
    return StageResult(checkpoint=checkpoint, config_overrides=handed_over)


def adapted_features(ctx: StageContext, checkpoint: Path) -> Path | None:
    """`<stage dir>/features`: the adapted tower's tokens, derived from the cut cache the stage
    trained on, with the tower rebuilt from `checkpoint` exactly as the later stages rebuild
    it (so their fingerprints match). None when the stage read images."""
    features_cfg = ctx.cfg.get("features")
    if not features_cfg or not features_cfg.get("root"):
        return None
    out = ctx.stage_dir / "features"
    if ctx.dist.is_main:
        tower = build_image_encoder(ctx.cfg.encoder)
        in_checkpoint = bool(ctx.cfg.encoder.get("in_checkpoint", False))
        load_tower_weights(tower, read_weights(checkpoint), in_checkpoint)
        derive_features(
            ctx.cfg.dataset,
            ctx.cfg.encoder,
            tower,
            resolve_location(str(features_cfg.root)),
            out,
            CacheOptions.from_run_config(ctx.cfg, str(ctx.dist.device)),
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out
