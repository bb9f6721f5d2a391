"""Fine-tune captioning on one dataset; validate every epoch and keep the best checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bita.engine.checkpoint import gathered_parameters, load_model
from bita.engine.trainer import FitResult, Trainer
from bita.stages.common import (
    build_stage_model,
    captions_per_sample,
    image_caption_batches,
    make_trainer,
    shard_set,
    steps_per_epoch,
)
from bita.stages.context import StageContext, StageResult
from bita.stages.pretrain2 import lm_objective
from bita.stages.scoring import score_split, split_results

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> StageResult:
    model = build_stage_model(ctx)
    trainer = make_trainer(ctx, model, model.flops_per_sample("lm", captions_per_sample(ctx)))
    return fit_and_select(
        ctx,
        model,
        trainer,
        image_caption_batches(ctx, model, trainer.micro_batch_size),
        partial(lm_objective, prompt=ctx.cfg.stage.prompt),
        steps_per_epoch(ctx),
    )


def fit_and_select(
    ctx: StageContext,
    model: torch.nn.Module,
    trainer: Trainer,
    make_batches: Callable[[int, int], Iterable[dict]],
    loss_fn: Callable[[torch.nn.Module, dict], dict],
    epoch_steps: int,
) -> StageResult:
    """Train, decode and score the val split after every epoch, keep the best checkpoint by
    `stage.select_metric`, then score `stage.final_eval_split` with it (fine-tuning with any
    objective selects the same way, SPEC §2)."""
    val_split = ctx.cfg.dataset.val_split
    val_shards = shard_set(ctx, model, val_split, train=False)  # once: the tower is frozen

    def validate(epoch: int) -> dict[str, float]:
        out_dir = ctx.stage_dir / "validation" / f"epoch_{epoch:03d}"
        with gathered_parameters(model, trainer.zero_stage):
            return score_split(ctx, model, val_split, None, out_dir, step=epoch, shards=val_shards)

    fit = trainer.fit(
        make_batches,
        loss_fn,
        steps_per_epoch=epoch_steps,
        epochs=ctx.cfg.train.epochs,
        on_epoch_end=validate,
        select_metric=ctx.cfg.stage.select_metric,
    )
    chosen, selection = selected_checkpoint(ctx, fit, epoch_steps)
    metrics, final_split = {}, ctx.cfg.stage.final_eval_split
    if final_split:
        best_model, _ = load_model(chosen, device=ctx.dist.device)
        metrics = score_split(
            ctx, best_model, final_split, str(chosen), ctx.stage_dir, selection=selection
        )
    return StageResult(
        checkpoint=chosen,
        metrics=metrics,
        scored_split=final_split,
        results=split_results(ctx, final_split, ctx.stage_dir) if final_split else None,
        selection=selection,
        selection_score=fit.best_metric,
        captioner=chosen,
    )


def selected_checkpoint(
    ctx: StageContext, fit: FitResult, epoch_steps: int
) -> tuple[Path, dict[str, Any]]:
    """`checkpoints/best`, or `last` when no epoch was validated (training stopped inside
    the first epoch), said in the log, in MLflow and in the results of what scores it."""
    metric = str(ctx.cfg.stage.select_metric)
    if fit.best is not None:
        log.info("stage %s: checkpoints/best selected (%s %.4f)", ctx.name, metric, fit.best_metric)
        return fit.best, {"checkpoint": "best", "select_metric": metric, "score": fit.best_metric}
    reason = (
        f"no epoch was validated: training stopped at step {fit.step}, before the first "
        f"epoch ended at step {epoch_steps} (train.max_steps)"
    )
    log.warning("stage %s: %s, so checkpoints/last is scored and handed on", ctx.name, reason)
    if ctx.tracker is not None:
        ctx.tracker.set_tags({f"{ctx.name}/selected_checkpoint": "last"})
    return fit.last, {"checkpoint": "last", "reason": reason}
