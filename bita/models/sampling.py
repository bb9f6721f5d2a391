"""Sampling over a `PrefixDecoder`: several captions per image, as `scst` draws them.

transformers' sampling loop runs the visual prefix once per sample and keeps a cache copy per
sample; here the samples of an image share the prefix cache as beams do. The draws follow
transformers' loop step for step (the same probabilities, one `torch.multinomial` call over all
rows per token, finished rows padded), so under the same random state they are the captions
`generate(do_sample=True, ...)` draws (tests compare them), up to float rounding: the two
compute the same logits in a different order, and a draw that lands within rounding of the
boundary between two tokens can go either way (2 of 160 samples in one measured `scst` step).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bita.models.prefix_decoder import PrefixDecoder, SearchRules, Step


@dataclass(frozen=True)
class SampleRules(SearchRules):
    """Plain sampling's `decode` settings."""

    num_samples: int
    temperature: float

    @property
    def rows_per_image(self) -> int:
        return self.num_samples

    @staticmethod
    def apply_to(decode: Mapping[str, Any]) -> bool:
        """Whether `decode` (the `generate` keywords) asks for sampling from the full
        distribution, as `PrefixLM.sample` does: no top-k or top-p cut, no repetition
        penalty, one beam."""
        return (
            decode.get("do_sample", False)
            and "max_new_tokens" in decode
            and decode.get("num_beams", 1) == 1
            and decode.get("top_k") == 0
            and decode.get("top_p", 1.0) == 1.0
            and decode.get("repetition_penalty", 1.0) == 1.0
        )

    @classmethod
    def from_decode(cls, decode: Mapping[str, Any], end_id: int, pad_id: int) -> SampleRules:
        return cls(
            num_samples=decode.get("num_return_sequences", 1),
            temperature=decode.get("temperature", 1.0),
            **cls.shared(decode, end_id, pad_id),
        )


@torch.no_grad()
def sample_search(
    decoder: PrefixDecoder,
    step: Step,
    embeds: torch.Tensor,
    rules: SampleRules,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token ids [B * num_samples, max_new_tokens] for the prefixes `embeds` [B, P, hidden]
    (padded where `mask` [B, P] is 0), the samples of a prefix consecutive, each padded with
    `rules.pad_id` after its end token."""
    rows = decoder.batch * decoder.beams
    device = embeds.device
    tokens = torch.full((rows, rules.max_new_tokens), rules.pad_id, dtype=torch.long, device=device)
    running = torch.ones(rows, dtype=torch.bool, device=device)
    logits = decoder.prefill(embeds, mask).repeat_interleave(decoder.beams, dim=0)
    for position in range(rules.max_new_tokens):
        if position < rules.min_new_tokens:
            logits[:, rules.end_id] = float("-inf")
        if rules.temperature != 1.0:
            logits = logits / rules.temperature
        drawn = torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)
        tokens[:, position] = torch.where(running, drawn, rules.pad_id)
        running &= tokens[:, position] != rules.end_id
        if position + 1 == rules.max_new_tokens or not bool(running.any()):
            break
        logits = step(tokens[:, position], None, position)  # samples never change places
    return tokens
