"""Stage 1: align query outputs with caption embeddings by image–text contrast (ITC)."""

from __future__ import annotations

from bita.errors import ConfigError
from bita.stages.common import (
    batch_by_image,
    build_stage_model,
    image_caption_batches,
    make_trainer,
    steps_per_epoch,
)
from bita.stages.context import StageContext, StageResult


def itc_objective(model, batch: dict) -> dict:
    return model(batch, objective="itc")


def run(ctx: StageContext) -> StageResult:
    if batch_by_image(ctx):
        raise ConfigError(
            f"stage {ctx.name}: stage.batch_by_image must be false (contrastive pairs need one "
            "caption per image; an image's other captions would be false negatives)"
        )
    model = build_stage_model(ctx)
    trainer = make_trainer(ctx, model, model.flops_per_sample("itc"))
    trainer.fit(
        image_caption_batches(ctx, model, trainer.micro_batch_size),
        itc_objective,
        steps_per_epoch=steps_per_epoch(ctx),
        epochs=ctx.cfg.train.epochs,
    )
    return StageResult(checkpoint=trainer.last_checkpoint_dir)
