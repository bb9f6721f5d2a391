"""Train the caption-domain LM that small and tiny presets use in place of OPT.

BITA keeps a public LM (OPT-2.7B) frozen. Offline presets have no public LM weights, so this
stage trains a byte-level BPE tokenizer and a small OPT-architecture LM on the training
captions once; later stages then keep it frozen exactly as BITA keeps OPT frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from omegaconf import OmegaConf, open_dict

from bita.data import stream
from bita.models.llm import PrefixLM, train_caption_tokenizer
from bita.models.trainable import set_trainable
from bita.stages.common import log_dataset_inputs, make_trainer
from bita.stages.context import StageContext, StageResult

log = logging.getLogger(__name__)


def caption_batches(
    captions: list[str],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    skip_batches: int,
    rank: int,
    world_size: int,
) -> Iterator[dict]:
    """This rank's caption batches for one epoch, in an order fixed by (seed, epoch)."""
    order = torch.randperm(
        len(captions), generator=torch.Generator().manual_seed(seed * 1009 + epoch)
    )
    mine = order[rank::world_size].tolist()
    for start in range(skip_batches * batch_size, len(mine) - batch_size + 1, batch_size):
        yield {"caption": [captions[i] for i in mine[start : start + batch_size]]}


def caption_objective(model, batch: dict) -> dict:
    return model(batch["caption"])


def run(ctx: StageContext) -> StageResult:
    llm_cfg = ctx.cfg.llm
    if llm_cfg.pretrained:
        log.info("stage lm: llm.pretrained=%s is set, nothing to train", llm_cfg.pretrained)
        return StageResult()
    export_dir = (ctx.stage_dir / "hf").resolve()  # later checkpoints' configs name it
    carried = {"llm.pretrained": str(export_dir), "llm.tokenizer": str(export_dir)}
    if (export_dir / "config.json").is_file():
        log.info("stage lm: %s already holds the trained LM", export_dir)
        return StageResult(config_overrides=carried)

    captions = stream.caption_texts(ctx.cfg.dataset, split=ctx.cfg.stage.split, skips=ctx.skips)
    log_dataset_inputs(ctx, stream.image_shards(ctx.cfg.dataset, None), ctx.cfg.stage.split)
    tokenizer_dir = ctx.stage_dir / "tokenizer"
    train_caption_tokenizer(captions, llm_cfg.tokenizer_vocab_size, tokenizer_dir)
    lm_cfg = OmegaConf.create(OmegaConf.to_container(llm_cfg, resolve=True))
    with open_dict(lm_cfg):
        lm_cfg.tokenizer = str(tokenizer_dir)
        lm_cfg.trainable = True
    model = PrefixLM.from_config(lm_cfg)
    set_trainable(model, list(ctx.cfg.stage.trainable))

    train, dist = ctx.cfg.train, ctx.dist
    trainer = make_trainer(ctx, model, model.flops_per_sample())

    def make_batches(epoch: int, skip_batches: int) -> Iterator[dict]:
        return caption_batches(
            captions,
            batch_size=trainer.micro_batch_size,
            seed=ctx.cfg.seed,
            epoch=epoch,
            skip_batches=skip_batches,
            rank=dist.rank,
            world_size=dist.world_size,
        )

    trainer.fit(
        make_batches,
        caption_objective,
        steps_per_epoch=len(captions) // train.global_batch_size,
        epochs=train.epochs,
    )
    if dist.rank == 0:
        model.save_pretrained(export_dir)
    return StageResult(config_overrides=carried)
