"""Pieces every training recipe shares: building the model, its data stream, its trainer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import load_file

from bita.data import features, stream
from bita.engine.trainer import Trainer
from bita.models.build import build_model
from bita.models.trainable import set_trainable
from bita.stages.context import StageContext
from bita.stages.datastore import attach_datastore

log = logging.getLogger(__name__)


def model_config(ctx: StageContext) -> DictConfig:
    """The config the model is built from: without the LM when the stage does not use it."""
    cfg = OmegaConf.create(OmegaConf.to_container(ctx.cfg, resolve=True))
    if not ctx.cfg.stage.get("uses_llm", True):
        with open_dict(cfg):
            cfg.llm = None
    return cfg


def trainable_patterns(cfg: DictConfig) -> list[str]:
    """The stage's `trainable` patterns, plus the whole LM where the stage uses it and the llm
    group says `trainable: true`: whether the LM is frozen belongs to the LM's config, not to
    every stage that reads it (a small caption LM learns to read the visual prefix much faster
    when it trains too; the paper's OPT-2.7B stays frozen)."""
    patterns = list(cfg.stage.trainable)
    if cfg.stage.get("uses_llm", True) and cfg.get("llm") and cfg.llm.get("trainable", False):
        patterns.append("llm.*")
    return patterns


def build_stage_model(ctx: StageContext) -> torch.nn.Module:
    """Build the model for this stage, start it from `init_from`, give it its retrieval
    datastore (`model.retrieval`) and set what trains."""
    model = build_model(model_config(ctx))
    if ctx.cfg.init_from:
        weights = Path(ctx.cfg.init_from) / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(
                f"init_from={ctx.cfg.init_from}: no model.safetensors there "
                "(expected a checkpoint folder such as runs/NAME/pretrain1/checkpoints/last)"
            )
        report = model.load_checkpoint_state_dict(load_file(str(weights)))
        log.info(
            "stage %s: started from %s (%d tensors loaded, %d left as built)",
            ctx.name,
            ctx.cfg.init_from,
            len(report.loaded),
            len(report.missing),
        )
    attach_datastore(ctx, model)
    names = set_trainable(model, trainable_patterns(ctx.cfg))
    log.info("stage %s: %d trainable tensors", ctx.name, len(names))
    return model


def feature_cache(ctx: StageContext, model: torch.nn.Module) -> features.FeatureCache | None:
    """The configured frozen-feature cache, checked against this model's tower (None: images)."""
    return features.open_cache(
        ctx.cfg.get("features"),
        ctx.cfg.dataset,
        ctx.cfg.encoder,
        model.encoder,
        augment=bool(ctx.cfg.augment),
    )


def shard_set(
    ctx: StageContext, model: torch.nn.Module, split: str, *, train: bool
) -> stream.ShardSet:
    """Where a split's samples come from: the feature cache when one is configured, else the
    image shards decoded with the tower's training transform (see `augment`) or eval
    transform, taken from `features.cache_transforms` so both paths see the same images."""
    cache = feature_cache(ctx, model)
    if cache:
        return (
            cache.train_shards(ctx.cfg.dataset, split)
            if train
            else cache.eval_shards(ctx.cfg.dataset, split)
        )
    pair = features.cache_transforms(model.preprocess, bool(ctx.cfg.augment))
    return stream.image_shards(ctx.cfg.dataset, pair["train" if train else "eval"])


def batch_by_image(ctx: StageContext) -> bool:
    """`stage.batch_by_image`: a sample is one image with all its usable captions as
    `references` (the batch size counts images), not one (image, caption) pair."""
    return bool(ctx.cfg.stage.get("batch_by_image", False))


def image_caption_batches(
    ctx: StageContext, model: torch.nn.Module, micro_batch_size: int
) -> Callable[[int, int], Iterable[dict]]:
    """This rank's (augmented image or cached features, caption) micro-batches of one epoch,
    after a skip; with `stage.batch_by_image`, one sample per image with all its
    `references`."""
    shards = shard_set(ctx, model, ctx.cfg.stage.split, train=True)
    per_image = batch_by_image(ctx)

    def make(epoch: int, skip_batches: int) -> Iterable[dict]:
        return stream.train_batches(
            ctx.cfg.dataset,
            split=ctx.cfg.stage.split,
            batch_size=micro_batch_size,
            shards=shards,
            num_workers=ctx.cfg.hardware.num_workers,
            seed=ctx.cfg.seed,
            epoch=epoch,
            skip_batches=skip_batches,
            rank=ctx.dist.rank,
            world_size=ctx.dist.world_size,
            per_image=per_image,
        )

    return make


def make_trainer(ctx: StageContext, model: torch.nn.Module, flops_per_sample: float) -> Trainer:
    """The DeepSpeed trainer for this stage, writing checkpoints under the stage folder."""
    return Trainer(
        model,
        hardware=ctx.cfg.hardware,
        optim=ctx.cfg.optim,
        train=ctx.cfg.train,
        run_dir=ctx.stage_dir,
        tracker=ctx.tracker,
        dist=ctx.dist,
        config=ctx.cfg,
        flops_per_sample=flops_per_sample,
        metric_prefix=f"{ctx.name}/",
    )


def steps_per_epoch(ctx: StageContext) -> int:
    """Optimizer steps in one epoch: every caption (image, with `stage.batch_by_image`) once,
    `train.global_batch_size` per step."""
    return stream.steps_per_epoch(
        ctx.cfg.dataset,
        split=ctx.cfg.stage.split,
        global_batch_size=ctx.cfg.train.global_batch_size,
        shards=features.manifest_shards(ctx.cfg.get("features")),
        per_image=batch_by_image(ctx),
    )


def captions_per_sample(ctx: StageContext) -> float:
    """Mean captions a training sample carries: 1 for pairs, the split's usable captions per
    image with `stage.batch_by_image` (what the throughput log's FLOPs per sample scale by)."""
    if not batch_by_image(ctx):
        return 1.0
    shards = features.manifest_shards(ctx.cfg.get("features"))
    count = partial(stream.split_size, ctx.cfg.dataset, split=ctx.cfg.stage.split, shards=shards)
    return count(unit="captions") / count(unit="images")
