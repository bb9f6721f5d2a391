"""AdamW with BITA's weight-decay rule and a step-based warm-up + cosine schedule.

SPEC §2: weight decay 0.05 only on tensors with ndim >= 2 (not biases, norms, temperature).
SPEC §5: the authors scheduled warm-up by epoch and the lr jumped; here it is by optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fnmatch import fnmatchcase

import torch
from torch import nn

from bita.errors import ConfigError


class WarmupCosine:
    """lr factor: linear warm-up to 1 over `warmup` steps, then cosine 1 → `end_ratio` at `total`.

    Step s (0-based optimizer step) gets (s + 1) / warmup during warm-up, so no step runs at lr 0.

    A class rather than a closure so LambdaLR's state_dict keeps its fields (JSON-friendly).
    """

    def __init__(self, warmup: int, total: int, end_ratio: float) -> None:
        self.warmup = int(warmup)
        self.total = int(total)
        self.end_ratio = float(end_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.end_ratio + (1.0 - self.end_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _lr_scale(name: str, scales: Mapping[str, float]) -> float:
    for pattern, scale in scales.items():
        if fnmatchcase(name, pattern):
            return float(scale)
    return 1.0


def param_groups(model: nn.Module, optim: Mapping) -> list[dict]:
    """Trainable parameters grouped by (decay?, lr scale).

    `optim.lr_scales` (optional) maps fnmatch patterns over parameter names to lr multipliers;
    the first matching pattern wins.
    """
    scales = dict(optim.get("lr_scales") or {})
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2
        scale = _lr_scale(name, scales)
        group = groups.setdefault(
            (decay, scale),
            {
                "params": [],
                "names": [],
                "weight_decay": float(optim["weight_decay"]) if decay else 0.0,
                "lr": float(optim["lr"]) * scale,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ConfigError(
            "the model has no trainable parameters: check the stage's trainable patterns"
        )
    return list(groups.values())


def build_optimizer(model: nn.Module, optim: Mapping) -> torch.optim.AdamW:
    """Plain torch AdamW (no DeepSpeed JIT build) over `param_groups(model, optim)`."""
    groups = param_groups(model, optim)
    for group in groups:
        del group["names"]
    betas = tuple(float(b) for b in optim.get("betas", (0.9, 0.999)))
    return torch.optim.AdamW(
        groups, lr=float(optim["lr"]), betas=betas, eps=float(optim.get("eps", 1e-8))
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: Mapping, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR: `optim.lr` → `optim.end_lr` over `total_steps`, `optim.warmup_steps` of warm-up."""
    lr, end_lr = float(optim["lr"]), float(optim["end_lr"])
    if lr <= 0 or end_lr < 0 or end_lr > lr:
        raise ConfigError(
            f"optim.lr={lr}, optim.end_lr={end_lr}: expected 0 <= end_lr <= lr, lr > 0"
        )
    fn = WarmupCosine(int(optim.get("warmup_steps", 0)), total_steps, end_lr / lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
