"""Which parameters train is declared by each stage's config as fnmatch patterns; `eval_mode`
runs a module without dropout mid-training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase

from torch import nn

from bita.errors import ConfigError


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode for the duration and its previous mode restored, so validation,
    decoding and sampling can run in the middle of training."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def set_trainable(model: nn.Module, patterns: list[str]) -> list[str]:
    """Make exactly the parameters matching any pattern trainable and freeze all others.

    A pattern that matches nothing is an error: it is almost always a typo or a renamed
    module, and silently training less than declared would go unnoticed. Returns the sorted
    names of the trainable parameters."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [pat for pat in patterns if not any(fnmatchcase(n, pat) for n in names)]
    if unmatched:
        raise ConfigError(f"trainable patterns match no parameter: {unmatched}")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatchcase(name, pat) for pat in patterns))
        if param.requires_grad:
            trainable.append(name)
    return sorted(trainable)
