"""Decode and score one split: shared by the evaluate stage and fine-tune validation."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bita.data import stream
from bita.eval.evaluate import ExpectedImages, evaluate, results_path
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
    selection: Mapping[str, Any] | None = None,
) -> dict:
    """Beam-search captions for every image of `split` and return its COCO metrics; the
    results record how many images the split holds and which were not scored (a shortfall
    fails unless `eval.allow_missing`), and `selection` (which checkpoint, and why).

    `shards`: the split's shard set when the caller already has it (fine-tuning scores the
    same split every epoch; opening a feature cache re-reads its manifests and re-hashes the
    tower's weights)."""
    shards = shards or shard_set(ctx, model, split, train=False)
    where = {"split": split, "shards": shards}
    expected = ExpectedImages(
        stream.eval_image_count(ctx.cfg.dataset, **where),
        partial(stream.eval_image_keys, ctx.cfg.dataset, **where),
    )
    batches = stream.eval_batches(
        ctx.cfg.dataset,
        split=split,
        batch_size=ctx.cfg.decode.batch_size,
        shards=shards,
        num_workers=ctx.cfg.hardware.num_workers,
        rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
        skips=ctx.skips,
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
        expected=expected,
        allow_missing=bool(ctx.cfg.eval.get("allow_missing", False)),
        selection=selection,
    )
