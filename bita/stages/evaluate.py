"""Score a checkpoint on one split of the configured dataset (results, captions, gallery)."""

from __future__ import annotations

from bita.engine.checkpoint import load_model
from bita.errors import ConfigError
from bita.stages.context import StageContext, StageResult
from bita.stages.scoring import score_split, split_results


def run(ctx: StageContext) -> StageResult:
    if not ctx.cfg.init_from:
        raise ConfigError(
            "stage=evaluate needs the checkpoint to score: init_from=RUN_DIR/STAGE/checkpoints/best"
        )
    model, _ = load_model(ctx.cfg.init_from, device=ctx.dist.device)
    split = ctx.cfg.eval.split
    checkpoint = str(ctx.cfg.init_from)
    metrics = score_split(ctx, model, split, checkpoint, ctx.stage_dir, selection=ctx.handed_over)
    return StageResult(
        metrics=metrics, scored_split=split, results=split_results(ctx, split, ctx.stage_dir)
    )
