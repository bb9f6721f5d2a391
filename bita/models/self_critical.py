"""Self-critical sequence training (SCST): optimise a caption metric instead of the next token.

Cross-entropy fine-tuning teaches the LM to continue reference captions token by token; the
captions are then scored as whole sentences (CIDEr-D). SCST (Rennie et al., CVPR 2017) samples
captions from the model itself and raises the log-probability of those that score above a
baseline. The baseline here is the mean reward of the image's other samples (Luo, "A better
variant of self-critical sequence training", 2020), which needs no extra greedy decode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bita.models.llm import Contexts
from bita.models.trainable import eval_mode

Reward = Callable[[Sequence[str], Sequence[Sequence[str]]], torch.Tensor]


@dataclass(frozen=True)
class SelfCritical:
    """How captions are sampled (the `stage.self_critical` config section) and rewarded."""

    reward: Reward
    samples_per_image: int = 5
    max_new_tokens: int = 22
    min_new_tokens: int = 1
    temperature: float = 1.0
    beam_loop: str = "bita"  # decode.beam_loop: whose decoding loop draws the samples

    def __post_init__(self) -> None:
        if self.samples_per_image < 2:
            raise ValueError(
                f"self_critical.samples_per_image={self.samples_per_image}: at least 2 are "
                "needed (each sample's baseline is the mean reward of the image's others)"
            )
        if self.temperature <= 0:
            raise ValueError(f"self_critical.temperature={self.temperature}: expected > 0")


def self_critical_loss(
    model: nn.Module,
    image_tokens: torch.Tensor,
    references: Sequence[Sequence[str]],
    prompt: str,
    settings: SelfCritical,
    contexts: Contexts = None,
) -> dict[str, torch.Tensor]:
    """Policy-gradient loss of one batch: per-token log-probability of each sampled caption (of
    the token ids drawn), weighted by its reward (of its text) minus the mean reward of the same
    image's other samples. Samples are drawn and scored after the same retrieved `contexts`
    (one per image), if any.

    Returns `loss`, the samples' mean `reward` and `reward_best` (mean over images of the best
    sample's reward), both detached, for the training log."""
    k = settings.samples_per_image
    prefix = model.lm_prefix(image_tokens)
    with eval_mode(model.llm):  # sample the policy being trained, not a dropout of it
        drawn = model.llm.sample(
            prefix.detach(),
            prompt,
            num_samples=k,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens,
            temperature=settings.temperature,
            beam_loop=settings.beam_loop,
            contexts=contexts,
            context_width=model.context_width,
        )
    per_sample_refs = [refs for refs in references for _ in range(k)]
    rewards = settings.reward(drawn.texts, per_sample_refs).to(prefix.device).view(-1, k)
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    advantage = (rewards - baseline).flatten()
    if contexts is not None:
        contexts = [context for context in contexts for _ in range(k)]
    # the gradient of the token sequences drawn, not of their text tokenised again
    log_probs, owner = model.llm.token_log_probs(
        prefix.repeat_interleave(k, dim=0), drawn.token_ids, prompt, contexts
    )
    loss = -(advantage[owner] * log_probs).mean()
    return {
        "loss": loss,
        "reward": rewards.mean().detach(),
        "reward_best": rewards.amax(1).mean().detach(),
    }
