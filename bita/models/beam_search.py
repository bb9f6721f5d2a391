"""Beam search over a `PrefixDecoder`, by transformers' rules, for an image's best captions.

The rules are those of transformers' `generate` beam search with its defaults
(`early_stopping=False`, one end token), step for step, so the captions are the ones `generate`
writes (tests compare them): keep the 2K best continuations of the K beams, let the K best that
do not end run on, add the finished ones among the first K to the image's K best finished
captions (score / length ** length_penalty), and stop an image once its best running beam can no
longer beat its worst finished caption. What differs is only where the work runs: the LM step is
`PrefixDecoder`'s (shared prefix cache, CUDA-graph-capturable), and the bookkeeping is a few
batched tensor operations per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bita.models.prefix_decoder import PrefixDecoder, SearchRules, Step

NEVER = -1.0e9  # transformers' score for a slot that must not be chosen


@dataclass(frozen=True)
class BeamRules(SearchRules):
    """Beam search's `decode` settings."""

    num_beams: int
    length_penalty: float
    num_return: int = 1  # the best finished captions returned per image, best first

    @property
    def rows_per_image(self) -> int:
        return self.num_beams

    @staticmethod
    def apply_to(decode: Mapping[str, Any]) -> bool:
        """Whether these rules are the search `decode` (the `generate` keywords) asks for: beam
        search of 2+ beams for up to as many captions each, without sampling or a repetition
        penalty; anything else is left to transformers' `generate`."""
        return (
            decode.get("num_beams", 1) > 1
            and "max_new_tokens" in decode
            and not decode.get("do_sample", False)
            and decode.get("repetition_penalty", 1.0) == 1.0
            and 1 <= decode.get("num_return_sequences", 1) <= decode.get("num_beams", 1)
        )

    @classmethod
    def from_decode(cls, decode: Mapping[str, Any], end_id: int, pad_id: int) -> BeamRules:
        return cls(
            num_beams=decode["num_beams"],
            length_penalty=decode.get("length_penalty", 1.0),
            num_return=decode.get("num_return_sequences", 1),
            **cls.shared(decode, end_id, pad_id),
        )


@dataclass
class _Beams:
    """Per image: the K running beams and the K best finished captions so far."""

    running: torch.Tensor  # [B, K, T] token ids
    running_scores: torch.Tensor  # [B, K] summed log-probabilities
    finished: torch.Tensor  # [B, K, T]
    finished_scores: torch.Tensor  # [B, K] length-normalised
    is_finished: torch.Tensor  # [B, K] bool: slot holds a finished caption
    improvable: torch.Tensor  # [B, 1] bool: a running beam may still beat the finished ones

    @classmethod
    def start(
        cls, batch: int, beams: int, length: int, pad_id: int, device: torch.device
    ) -> _Beams:
        running = torch.full((batch, beams, length), pad_id, dtype=torch.long, device=device)
        scores = torch.zeros(batch, beams, device=device)
        scores[:, 1:] = NEVER  # the K beams start identical: expand only the first
        return cls(
            running=running,
            running_scores=scores,
            finished=running.clone(),
            finished_scores=torch.full((batch, beams), NEVER, device=device),
            is_finished=torch.zeros(batch, beams, dtype=torch.bool, device=device),
            improvable=torch.ones(batch, 1, dtype=torch.bool, device=device),
        )


@torch.no_grad()
def beam_search(
    decoder: PrefixDecoder,
    step: Step,
    embeds: torch.Tensor,
    rules: BeamRules,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token ids [B * rules.num_return, max_new_tokens] of the best captions of each prefix in
    `embeds` [B, P, hidden] (padded where `mask` [B, P] is 0), best first per prefix, padded with
    `rules.pad_id` after their end token. `step` is `decoder.step` or its graph."""
    batch, beams, length = decoder.batch, decoder.beams, rules.max_new_tokens
    device = embeds.device
    state = _Beams.start(batch, beams, length, rules.pad_id, device)
    may_finish = torch.arange(2 * beams, device=device) < beams  # of the 2K candidates
    offsets = torch.arange(batch, device=device)[:, None] * beams
    logits = decoder.prefill(embeds, mask).repeat_interleave(beams, dim=0)
    for position in range(length):
        log_probs = torch.log_softmax(logits, dim=-1)
        if position < rules.min_new_tokens:
            log_probs[:, rules.end_id] = float("-inf")
        ends, source = _advance(state, log_probs, position, rules, may_finish)
        if bool(~state.improvable.any() | ends.all()):  # one device sync per token
            break
        tokens = state.running[:, :, position].flatten()
        logits = step(tokens, (source + offsets).flatten(), position)
    return state.finished[:, : rules.num_return].flatten(0, 1)


def _advance(
    state: _Beams,
    log_probs: torch.Tensor,
    position: int,
    rules: BeamRules,
    may_finish: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for every beam: update `state` in place; return which of the 2K candidates
    ended and, per image, the beam [B, K] each new running beam continues."""
    batch, beams, length = state.running.shape
    vocab = log_probs.shape[-1]
    totals = (log_probs.view(batch, beams, vocab) + state.running_scores[:, :, None]).view(
        batch, -1
    )
    top_scores, top_index = totals.topk(2 * beams)
    top_beam, top_token = top_index // vocab, top_index % vocab
    top_seqs = _take(state.running, top_beam)
    top_seqs[:, :, position] = top_token
    ends = top_token == rules.end_id
    if position + 1 >= length:
        ends = torch.ones_like(ends)

    running_scores = top_scores + ends.float() * NEVER
    keep = running_scores.topk(beams).indices
    state.running = _take(top_seqs, keep)
    state.running_scores = _take(running_scores, keep)
    source = _take(top_beam, keep)

    just_finished = ends & may_finish[None, :]
    done_scores = top_scores / ((position + 1) ** rules.length_penalty)
    done_scores += (~state.improvable).float() * NEVER
    done_scores += (~just_finished).float() * NEVER
    merged_scores = torch.cat([state.finished_scores, done_scores], dim=1)
    best = merged_scores.topk(beams).indices
    state.finished = _take(torch.cat([state.finished, top_seqs], dim=1), best)
    state.finished_scores = _take(merged_scores, best)
    state.is_finished = _take(torch.cat([state.is_finished, just_finished], dim=1), best)

    best_running = state.running_scores[:, :1] / ((position + 1) ** rules.length_penalty)
    worst_finished = torch.where(
        state.is_finished, state.finished_scores.min(dim=1, keepdim=True).values, NEVER
    )
    state.improvable = state.improvable & (best_running > worst_finished).any(-1, keepdim=True)
    return ends, source


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` [B, n] of each image's beams in `tensor` [B, K, ...]."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)
