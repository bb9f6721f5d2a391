"""Autocast for frozen half-precision modules: off.

Their weights already are in the half dtype, so autocast's casts only add work: under it each
LayerNorm round-trips activations through fp32, and each linear layer casts its input back.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def in_own_precision(dtype: torch.dtype, device_type: str) -> AbstractContextManager:
    """Autocast off for modules whose weights are `dtype`, when that is half precision (fp32
    modules keep the caller's autocast)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type, enabled=False)
