"""Which parameters train is declared by each stage's config as fnmatch patterns."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn


def set_trainable(model: nn.Module, patterns: list[str]) -> list[str]:
    """Make exactly the parameters matching any pattern trainable and freeze all others.

    A pattern that matches nothing is an error: it is almost always a typo or a renamed
    module, and silently training less than declared would go unnoticed. Returns the sorted
    names of the trainable parameters."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [pat for pat in patterns if not any(fnmatchcase(n, pat) for n in names)]
    if unmatched:
        raise ValueError(f"trainable patterns match no parameter: {unmatched}")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatchcase(name, pat) for pat in patterns))
        if param.requires_grad:
            trainable.append(name)
    return sorted(trainable)
