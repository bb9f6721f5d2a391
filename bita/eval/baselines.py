"""Reference floors for caption quality on a split: what a captioner must beat to have learned
more than retrieval or the scene class.

- kNN caption retrieval (Devlin et al., "Exploring Nearest Neighbor Approaches for Image
  Captioning", 2015): the ``k`` train images nearest to the query by cosine similarity of their
  mean-pooled frozen-tower tokens give ``5k`` candidate captions; the query gets the consensus
  caption, the candidate with the highest mean CIDEr-D against the other candidates.
- Class oracle: told the query's true scene class, give it that class's consensus caption over
  all train captions of the class (one caption per class).

Consensus uses CIDEr-D with the train split's document frequencies (`CiderReward`); the
chosen captions are verbatim train captions, scored like any model's (`score_captions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bita.eval.cider_reward import CiderReward


@dataclass(frozen=True)
class SplitFeatures:
    """One split's images: ids, L2-normalised mean tower tokens [N, D], references, classes."""

    image_ids: list[str]
    features: torch.Tensor
    references: list[list[str]]
    scenes: list[str | None]

    def __post_init__(self) -> None:
        sizes = {len(self.image_ids), len(self.features), len(self.references), len(self.scenes)}
        if len(sizes) != 1:
            raise ValueError(f"SplitFeatures: fields of different lengths {sorted(sizes)}")


def mean_token_features(tokens: torch.Tensor) -> torch.Tensor:
    """[B, T, D] tower tokens → [B, D] unit vectors (mean over tokens), in float32."""
    return torch.nn.functional.normalize(tokens.float().mean(dim=1), dim=-1)


def consensus_caption(captions: Sequence[str], reward: CiderReward) -> str:
    """The caption with the highest mean CIDEr-D against all the others (first on ties)."""
    if not captions:
        raise ValueError("consensus_caption: no candidate captions")
    return captions[int(np.argmax(reward.consensus(captions)))]


def knn_captions(
    train: SplitFeatures, query: SplitFeatures, reward: CiderReward, k: int
) -> dict[str, str]:
    """Each query image's consensus caption among its ``k`` nearest train images' captions."""
    if not 1 <= k <= len(train.image_ids):
        raise ValueError(f"k={k}: expected 1..{len(train.image_ids)} (the train images)")
    nearest = (query.features @ train.features.T).topk(k, dim=1).indices
    return {
        image_id: consensus_caption(
            [caption for j in row.tolist() for caption in train.references[j]], reward
        )
        for image_id, row in zip(query.image_ids, nearest, strict=True)
    }


def class_oracle_captions(
    train: SplitFeatures, query: SplitFeatures, reward: CiderReward
) -> dict[str, str]:
    """Each query image gets the consensus caption of its true scene class's train captions."""
    unknown = sorted({str(s) for s in query.scenes if s is None or s not in train.scenes})
    if unknown:
        raise ValueError(
            f"class oracle: scene classes {unknown[:5]} of the query split have no train "
            "images (or the records carry no scene class)"
        )
    by_class: dict[str, list[str]] = {}
    for scene, references in zip(train.scenes, train.references, strict=True):
        by_class.setdefault(scene, []).extend(references)
    caption = {scene: consensus_caption(by_class[scene], reward) for scene in set(query.scenes)}
    return {
        image_id: caption[scene]
        for image_id, scene in zip(query.image_ids, query.scenes, strict=True)
    }
