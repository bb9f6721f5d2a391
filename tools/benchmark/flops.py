"""Model FLOPs per image (for model-FLOPs utilisation), the same estimate for both stacks."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FlopShape:
    """Parameter counts and token counts the FLOPs estimate needs, read off a built model.

    The estimate is `BITA.flops_per_sample`'s: 2 FLOPs per multiply-add of the dense layers,
    backward = 2 x forward, frozen tower forward only, frozen LM forward + backward to its
    inputs (4 x), attention scores and FFTs left out."""

    tower: int
    image_tokens: int
    per_query: int
    per_image_token: int
    queries: int
    proj: int
    lm: int
    lm_tokens: int


def _count(module: nn.Module, pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(p.numel() for n, p in module.named_parameters() if regex.search(n))


def our_flop_shape(model: nn.Module) -> FlopShape:
    cfg = model.ift.config
    return FlopShape(
        tower=sum(p.numel() for p in model.encoder.parameters()),
        image_tokens=model.encoder.num_tokens,
        per_query=_count(model.ift, r"\.(query_ffn|self_attn)\.|\.cross_attn\.(query|out)\."),
        per_image_token=_count(model.ift, r"\.cross_attn\.(key|value)\."),
        queries=cfg.num_queries,
        proj=model.llm_proj.weight.numel(),
        lm=sum(p.numel() for p in model.llm.parameters()),
        lm_tokens=cfg.num_queries + model.settings.max_lm_tokens,
    )


def their_flop_shape(blip: nn.Module, ours: FlopShape) -> FlopShape:
    """The same counts for BLIP-2: its Q-Former self-attention and query FFNs run per query,
    cross-attention (every second layer) keys/values per image token; text FFNs stay idle."""
    qformer = blip.qformer
    return FlopShape(
        tower=sum(p.numel() for p in blip.vision_model.parameters()),
        image_tokens=ours.image_tokens,
        per_query=_count(
            qformer,
            r"\.layer\.\d+\.(attention|intermediate_query|output_query)\."
            r"|\.crossattention\.(attention\.query|output)\.",
        ),
        per_image_token=_count(qformer, r"\.crossattention\.attention\.(key|value)\."),
        queries=ours.queries,
        proj=blip.language_projection.weight.numel(),
        lm=sum(p.numel() for p in blip.language_model.parameters()),
        lm_tokens=ours.lm_tokens,
    )


def _query_path_flops(s: FlopShape) -> float:
    return (
        2 * (s.per_query * s.queries + s.per_image_token * s.image_tokens) + 2 * s.proj * s.queries
    )


def lm_step_flops(s: FlopShape, *, tower: bool = True) -> float:
    """Training FLOPs per image of a stage-2 step (frozen LM, not trainable); `tower=False`
    for a step reading cached tower features."""
    tower_flops = 2 * s.tower * s.image_tokens if tower else 0
    return tower_flops + 3 * _query_path_flops(s) + 4 * s.lm * s.lm_tokens


def caption_flops(s: FlopShape, beams: int, new_tokens: int) -> float:
    """Forward FLOPs per captioned image: tower, queries, the prefix and bos once, then one
    token per beam per step."""
    return (
        2 * s.tower * s.image_tokens
        + _query_path_flops(s)
        + 2 * s.lm * (s.queries + 1 + beams * new_tokens)
    )
