"""Decode and score one split: shared by the evaluate stage and fine-tune validation."""

from __future__ import annotations

from pathlib import Path

import torch

from bita.data import stream
from bita.eval.evaluate import evaluate, results_path
from bita.stages.common import shard_set
from bita.stages.context import StageContext


def split_results(ctx: StageContext, split: str, out_dir: Path) -> Path:
    """The results JSON `score_split(ctx, …, split, …, out_dir)` writes."""
    return results_path(out_dir, ctx.cfg.dataset.eval_source, split)


def score_split(
    ctx: StageContext,
    model: torch.nn.Module,
    split: str,
    checkpoint: str | None,
    out_dir: Path,
    step: int = 0,
    shards: stream.ShardSet | None = None,
) -> dict:
    """Beam-search captions for every image of `split` and return its COCO metrics.

    `shards`: the split's shard set when the caller already has it (fine-tuning scores the
    same split every epoch; opening a feature cache re-reads its manifests and re-hashes the
    tower's weights)."""
    shards = shards or shard_set(ctx, model, split, train=False)
    batches = stream.eval_batches(
        ctx.cfg.dataset,
        split=split,
        batch_size=ctx.cfg.decode.batch_size,
        shards=shards,
        num_workers=ctx.cfg.hardware.num_workers,
        rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
    )
    return evaluate(
        model,
        batches,
        decode=ctx.cfg.decode,
        out_dir=out_dir,
        dataset=ctx.cfg.dataset.eval_source,
        split=split,
        checkpoint=checkpoint,
        gallery_size=ctx.cfg.eval.gallery_size,
        tracker=ctx.tracker,
        spice_dir=ctx.cfg.paths.spice,
        step=step,
    )
