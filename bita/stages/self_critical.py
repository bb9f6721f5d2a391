"""Self-critical fine-tuning: after cross-entropy fine-tuning, optimise CIDEr-D directly.

Each step samples captions for a batch of training images and rewards them with CIDEr-D
against the image's references (idf from the whole training split), then validates and selects
checkpoints exactly like cross-entropy fine-tuning.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import torch

from bita.data import stream
from bita.errors import ConfigError
from bita.eval.cider_reward import CiderReward
from bita.models.self_critical import SelfCritical
from bita.stages.common import (
    batch_by_image,
    build_stage_model,
    image_caption_batches,
    make_trainer,
    steps_per_epoch,
)
from bita.stages.context import StageContext, StageResult
from bita.stages.finetune import fit_and_select

log = logging.getLogger(__name__)


def scst_objective(
    model: torch.nn.Module, batch: dict, prompt: str, settings: SelfCritical
) -> dict:
    return model(batch, objective="scst", prompt=prompt, self_critical=settings)


def run(ctx: StageContext) -> StageResult:
    if not batch_by_image(ctx):
        raise ConfigError(
            f"stage {ctx.name}: stage.batch_by_image must be true (self-critical training "
            "rewards each image's samples against all its references)"
        )
    model = build_stage_model(ctx)
    settings = self_critical_settings(ctx)
    flops = model.flops_per_sample("lm", settings.samples_per_image)  # sampling left out
    trainer = make_trainer(ctx, model, flops)
    return fit_and_select(
        ctx,
        model,
        trainer,
        image_caption_batches(ctx, model, trainer.micro_batch_size),
        partial(scst_objective, prompt=ctx.cfg.stage.prompt, settings=settings),
        steps_per_epoch(ctx),
    )


def self_critical_settings(ctx: StageContext) -> SelfCritical:
    """`stage.self_critical` with a CIDEr-D reward whose idf comes from the training split."""
    corpus = stream.caption_groups(ctx.cfg.dataset, split=ctx.cfg.stage.split, skips=ctx.skips)
    log.info("stage %s: CIDEr-D reward over %d training images", ctx.name, len(corpus))
    options = dict(ctx.cfg.stage.self_critical)
    known = {f.name for f in dataclasses.fields(SelfCritical)} - {"reward", "beam_loop"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"stage.self_critical: unknown keys {unknown}; known: {sorted(known)}")
    beam_loop = ctx.cfg.decode.get("beam_loop", "bita")  # decode decides, as for evaluation
    return SelfCritical(reward=CiderReward(corpus), beam_loop=beam_loop, **options)
