"""Pieces every training recipe shares: building the model, its data stream, its trainer."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from functools import partial

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bita.data import features, stream
from bita.data.shards import MANIFEST
from bita.engine.trainer import Trainer
from bita.models.build import build_model
from bita.models.trainable import set_trainable
from bita.stages.context import StageContext
from bita.stages.datastore import attach_datastore
from bita.stages.init_from import load_init_weights

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
    """Build the model for this stage, set what trains, start it from `init_from` and give it
    its retrieval datastore (`model.retrieval`), which is keyed by the tower it started from."""
    model = build_model(model_config(ctx))
    names = set_trainable(model, trainable_patterns(ctx.cfg))
    if ctx.cfg.init_from:
        strict = bool(ctx.cfg.get("init_from_strict", True))
        load_init_weights(model, ctx.cfg.init_from, names, strict=strict, stage=ctx.name)
    log.info("stage %s: %d trainable tensors", ctx.name, len(names))
    if not ctx.cfg.init_from:
        require_adapted_weights(ctx, model)
    attach_datastore(ctx, model)
    return model


def require_adapted_weights(ctx: StageContext, model: torch.nn.Module) -> None:
    """A stage built without `init_from` has the tower's public weights: with
    `encoder.adapt_blocks` set, that silently drops the adaptation unless the stage trains the
    adapted units itself."""
    encoder = model.encoder
    adapted = [p for n, p in encoder.named_parameters() if encoder.is_adapted(n)]
    if adapted and not any(p.requires_grad for p in adapted):
        raise ValueError(
            f"stage {ctx.name}: encoder.adapt_blocks={encoder.adapt_blocks} but no init_from: "
            "the adapted tower comes from a checkpoint of stage=tower or later (init_from=...), "
            "or run tower before this stage in stage.order"
        )


def feature_cache(ctx: StageContext, model: torch.nn.Module) -> features.FeatureCache | None:
    """The configured frozen-feature cache, checked against this model's tower and the
    activations the stage reads (`stage.cached_activations`: tokens, or the cut's for
    `stage=tower`); None: images."""
    return features.open_cache(
        ctx.cfg.get("features"),
        ctx.cfg.dataset,
        ctx.cfg.encoder,
        model.encoder,
        augment=bool(ctx.cfg.augment),
        activations=str(ctx.cfg.stage.get("cached_activations", "tokens")),
    )


def shard_set(
    ctx: StageContext, model: torch.nn.Module, split: str, *, train: bool
) -> stream.ShardSet:
    """Where a split's samples come from: the feature cache when one is configured, else the
    image shards decoded with the tower's training transform (see `augment`) or eval
    transform, taken from `features.cache_transforms` so both paths see the same images."""
    cache = feature_cache(ctx, model)
    if cache:
        shards = (
            cache.train_shards(ctx.cfg.dataset, split)
            if train
            else cache.eval_shards(ctx.cfg.dataset, split)
        )
    else:
        pair = features.cache_transforms(model.preprocess, bool(ctx.cfg.augment))
        shards = stream.image_shards(ctx.cfg.dataset, pair["train" if train else "eval"])
    log_dataset_inputs(ctx, shards, split)
    return shards


def log_dataset_inputs(ctx: StageContext, shards: stream.ShardSet, split: str) -> None:
    """Record each source's `split` that the stage reads as an MLflow dataset input: its
    name, the split, a digest of the split's manifest entry (which shards, how many images and
    captions) and the manifest's location."""
    if ctx.tracker is None or ctx.tracker.run_id is None:
        return
    for source in ctx.cfg.dataset.sources:
        manifest = shards.read_manifest(shards.root, source["name"])
        entry = manifest["splits"][split]
        canonical = json.dumps(entry, sort_keys=True).encode()
        ctx.tracker.log_dataset(
            name=f"{source['name']}-{split}",
            split=split,
            digest=hashlib.sha256(canonical).hexdigest()[:16],
            location=f"{str(shards.root).rstrip('/')}/{source['name']}/{MANIFEST}",
            profile={
                "reads": shards.field,
                "images": entry.get("images"),
                "captions": entry.get("captions"),
                "shards": len(entry.get("shards", [])),
            },
        )


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
            skips=ctx.skips,
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
