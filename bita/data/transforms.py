"""Image transforms of SPEC §2 (train: random resized crop + flip; eval: plain resize)."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

_BICUBIC = T.InterpolationMode.BICUBIC


def train_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.5, 1.0),
) -> T.Compose:
    """RandomResizedCrop(size, scale, bicubic) + horizontal flip, then normalisation."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=tuple(scale), interpolation=_BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def training_transform(
    size: int, mean: Sequence[float], std: Sequence[float], augment: bool
) -> T.Compose:
    """What training images go through: the augmenting train transform, or (``augment``
    false) the eval view, so that a model is trained on exactly what it is evaluated on."""
    if augment:
        return train_transform(size, mean, std)
    return eval_transform(size, mean, std)


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize to size×size (bicubic, no crop: aerial scenes have no centre), then normalise."""
    return T.Compose(
        [T.Resize((size, size), interpolation=_BICUBIC), T.ToTensor(), T.Normalize(mean, std)]
    )
