"""Caption-aligned retrieval keys (`model.retrieval.key: caption_aligned`, not in the paper).

The frozen tower's mean token finds neighbours that look alike, which in aerial images is often
not the same scene: a school and a dense residential area share roofs and trees. The training
captions say which images belong together. This key maps the mean token linearly into a
sentence encoder's space, fitted so that each training image lands on the mean embedding of its
own captions; neighbours are then found among the training images' mapped keys.

The map is ridge regression (scikit-learn's `RidgeCV`), its strength chosen by efficient
leave-one-out error on the training images alone, so nothing is tuned on the split that is
scored. It has a closed form: fitting it on RSICD-sized splits takes seconds beside the minutes
of embedding their captions. On the demo sample's val images the consensus caption of the 25
nearest training images scores CIDEr .700 with the tower's keys and .753 with these
(experiments/RESULTS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bita.models.sentence_encoder import SentenceEncoder

log = logging.getLogger(__name__)

# Ridge strengths RidgeCV chooses among (unit-length inputs and targets).
ALPHAS = tuple(float(a) for a in np.logspace(-3, 1, 9))
CAPTION_TOKENS = 32  # sentence-encoder tokens per caption (RSICD captions: under 30 words)


@dataclass(frozen=True)
class KeyProjection:
    """key = normalise(tower key @ weight + bias): weight [tower width, text width]."""

    weight: torch.Tensor
    bias: torch.Tensor
    alpha: float

    def __call__(self, tower_keys: torch.Tensor) -> torch.Tensor:
        """Unit-length caption-aligned keys [B, text width] (float32) of tower keys [B, width]."""
        weight = self.weight.to(tower_keys.device, torch.float32)
        bias = self.bias.to(tower_keys.device, torch.float32)
        return F.normalize(tower_keys.float() @ weight + bias, dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a datastore's key file holds of the projection."""
        return {
            "projection.weight": self.weight.contiguous(),
            "projection.bias": self.bias.contiguous(),
            "projection.alpha": torch.tensor(self.alpha, dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> KeyProjection | None:
        """The projection stored by `tensors`, or None when there is none (tower keys)."""
        if "projection.weight" not in tensors:
            return None
        return cls(
            tensors["projection.weight"],
            tensors["projection.bias"],
            float(tensors["projection.alpha"]),
        )


def fit_key_projection(
    tower_keys: torch.Tensor, caption_groups: Sequence[Sequence[str]], text: SentenceEncoder
) -> KeyProjection:
    """The ridge map from training images' tower keys [N, width] to the unit-length mean
    sentence embedding of each image's captions (`caption_groups[i]`, one list per image)."""
    from sklearn.linear_model import RidgeCV

    if len(tower_keys) != len(caption_groups):
        raise ValueError(f"{len(tower_keys)} tower keys but {len(caption_groups)} caption lists")
    if len(tower_keys) < 3:
        raise ValueError(
            f"caption-aligned keys need at least 3 training images, got {len(tower_keys)}"
        )
    targets = caption_targets(caption_groups, text)
    ridge = RidgeCV(alphas=ALPHAS).fit(tower_keys.float().numpy(), targets.numpy())
    return KeyProjection(
        torch.from_numpy(np.ascontiguousarray(ridge.coef_.T)).float(),
        torch.from_numpy(np.asarray(ridge.intercept_)).float(),
        float(ridge.alpha_),
    )


def fit_key_projection_with(
    text_encoder: str, tower_keys: torch.Tensor, caption_groups: Sequence[Sequence[str]]
) -> KeyProjection:
    """`fit_key_projection` with the sentence encoder at `text_encoder` (the location that
    `model.retrieval.text_encoder` names), as a datastore fits it."""
    text = SentenceEncoder.from_location(
        text_encoder, CAPTION_TOKENS, "model.retrieval.text_encoder"
    )
    projection = fit_key_projection(tower_keys, caption_groups, text)
    log.info("caption-aligned keys: ridge alpha %.3g", projection.alpha)
    return projection


def caption_targets(caption_groups: Sequence[Sequence[str]], text: SentenceEncoder) -> torch.Tensor:
    """Per image, the unit-length mean of its captions' sentence embeddings [N, text width]."""
    flat = [caption for group in caption_groups for caption in group]
    owner = torch.tensor([i for i, group in enumerate(caption_groups) for _ in group])
    embeddings = F.normalize(text(flat), dim=-1)
    sums = torch.zeros(len(caption_groups), embeddings.shape[1]).index_add_(0, owner, embeddings)
    return F.normalize(sums, dim=-1)
