"""Stage 2: teach the queries to prompt the frozen LM (prefix-LM loss, no text prompt)."""

from __future__ import annotations

from functools import partial

from bita.stages.common import (
    build_stage_model,
    captions_per_sample,
    image_caption_batches,
    make_trainer,
    steps_per_epoch,
)
from bita.stages.context import StageContext, StageResult


def lm_objective(model, batch: dict, prompt: str) -> dict:
    return model(batch, objective="lm", prompt=prompt)


def run(ctx: StageContext) -> StageResult:
    model = build_stage_model(ctx)
    trainer = make_trainer(ctx, model, model.flops_per_sample("lm", captions_per_sample(ctx)))
    trainer.fit(
        image_caption_batches(ctx, model, trainer.micro_batch_size),
        partial(lm_objective, prompt=ctx.cfg.stage.prompt),
        steps_per_epoch=steps_per_epoch(ctx),
        epochs=ctx.cfg.train.epochs,
    )
    return StageResult(checkpoint=trainer.last_checkpoint_dir)
