"""Translate the `hardware` and `train` config sections into a DeepSpeed config dict.

Users think in global batch size (SPEC §2 gives it per stage); DeepSpeed needs micro-batch and
accumulation. Deriving the accumulation here keeps the global batch — and so the recipe — the
same on one CPU and on many GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bita.errors import ConfigError

_PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST = {None: None, "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is split over ranks and accumulation."""

    global_batch_size: int
    micro_batch_size: int
    grad_accum: int
    world_size: int


def batch_layout(hardware: Mapping, train: Mapping, world_size: int) -> BatchLayout:
    """Micro-batch and accumulation from `train.global_batch_size` and `hardware.micro_batch_size`.

    `hardware.micro_batch_size: null` means one micro-batch per rank per step (no accumulation).
    """
    global_bs = int(train["global_batch_size"])
    micro = hardware.get("micro_batch_size")
    if global_bs <= 0 or global_bs % world_size:
        raise ConfigError(
            f"train.global_batch_size={global_bs} must be a positive multiple of the world size "
            f"({world_size} processes)"
        )
    micro = global_bs // world_size if micro is None else int(micro)
    if micro <= 0 or global_bs % (micro * world_size):
        raise ConfigError(
            f"train.global_batch_size={global_bs} is not divisible by hardware.micro_batch_size="
            f"{micro} x world size {world_size}; change one of them (or set "
            "hardware.micro_batch_size=null for no gradient accumulation)"
        )
    return BatchLayout(global_bs, micro, global_bs // (micro * world_size), world_size)


def _precision_section(hardware: Mapping) -> dict[str, Any]:
    precision = hardware.get("precision", "fp32")
    if precision not in _PRECISIONS:
        raise ConfigError(
            f"hardware.precision={precision!r}: expected one of {', '.join(_PRECISIONS)}"
        )
    autocast = hardware.get("autocast")
    if autocast not in _AUTOCAST:
        raise ConfigError(f"hardware.autocast={autocast!r}: expected null, bf16 or fp16")
    section: dict[str, Any] = {}
    if precision == "bf16":
        section["bf16"] = {"enabled": True}
    if precision == "fp16":
        section["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    if autocast is not None:
        # Parameters keep the dtype each component was built with (frozen towers in half,
        # trainable parts in fp32); matmuls run in the autocast dtype.
        section["torch_autocast"] = {"enabled": True, "dtype": _AUTOCAST[autocast]}
    return section


def deepspeed_config(hardware: Mapping, train: Mapping, world_size: int) -> dict[str, Any]:
    """The dict handed to `deepspeed.initialize(config=...)`.

    `hardware.deepspeed` (a mapping) is merged last, for options this builder does not model
    (offload, bucket sizes, ...).
    """
    layout = batch_layout(hardware, train, world_size)
    stage = int(hardware.get("zero_stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"hardware.zero_stage={stage}: expected 0, 1, 2 or 3")
    config: dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        # Always explicit: DeepSpeed clips at 1.0 when the key is missing.
        "gradient_clipping": float(hardware.get("gradient_clipping") or 0.0),
        "zero_optimization": {"stage": stage},
        # The client optimizer is torch.optim.AdamW: no JIT-built DeepSpeed Adam.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        **_precision_section(hardware),
    }
    for key, value in dict(hardware.get("deepspeed") or {}).items():
        if isinstance(value, Mapping) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **dict(value)}
        else:
            config[key] = value
    return config
