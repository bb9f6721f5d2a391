"""Self-describing, atomic checkpoints that resume bit-exactly, and one-call model loading.

Layout of `<stage_dir>/checkpoints/{last,best}/`:
  config.yaml            the run's composed config (asset paths point into assets/)
  model.safetensors      `model.checkpoint_state_dict()`: trainable + in_checkpoint weights only
  trainer_state.json     step, epoch, batch in epoch, best metric, bad steps, scheduler, assets
  optimizer.rank{R}.pt   this rank's (possibly ZeRO-partitioned) optimizer state
  rng.rank{R}.pt         torch/cuda generator tensors + python/numpy states as JSON strings
  assets/                files the config needs that are not public weights (e.g. a tokenizer)

DeepSpeed's own checkpointing is not used: it handles frozen parameters inconsistently across
versions (DESIGN.md), and its files need unpickling. Everything here loads with safetensors or
`torch.load(weights_only=True)` plus an allowlist of DeepSpeed's plain state classes.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bita.engine.distributed import DistInfo

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
STATE = "trainer_state.json"
ASSETS = "assets"


@dataclass
class TrainState:
    """Where training stands; saved as JSON so it can be read without torch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    bad_steps: int = 0
    world_size: int = 1
    scheduler: dict[str, Any] = field(default_factory=dict)
    assets: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- model weights


def gathered_parameters(model: nn.Module, zero_stage: int, modifier_rank: int | None = None):
    """ZeRO-3 partitions parameters; gather them around whole-model reads, writes and decoding."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank)


def model_state(model: nn.Module, zero_stage: int = 0) -> dict[str, torch.Tensor]:
    """CPU copies of what the model says belongs in a checkpoint (collective under ZeRO-3)."""
    with gathered_parameters(model, zero_stage, None):
        if hasattr(model, "checkpoint_state_dict"):
            state = model.checkpoint_state_dict()
        else:
            state = model.state_dict()
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def load_model_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], zero_stage: int = 0
) -> Any:
    """Load weights through the model's own checked loader (strict `load_state_dict` otherwise)."""
    scalars: list[nn.Parameter] = []
    with gathered_parameters(model, zero_stage, 0):
        if hasattr(model, "load_checkpoint_state_dict"):
            report = model.load_checkpoint_state_dict(dict(state))
        else:
            report = model.load_state_dict(dict(state), strict=True)
        if zero_stage == 3:
            # Leaving the context broadcasts rank 0's values through a uint8 view, which 0-dim
            # tensors cannot take; give them shape [1] until it is done.
            scalars = [p for p in model.parameters() if p.ndim == 0]
            for param in scalars:
                param.data = param.data.reshape(1)
    for param in scalars:
        if param.data.numel() == 1:  # ZeRO-3 leaves partitioned parameters empty
            param.data = param.data.reshape(())
    return report


def load_weights(model: nn.Module, ckpt_dir: str | Path, zero_stage: int = 0) -> Any:
    """Load `<ckpt_dir>/model.safetensors` into `model` (e.g. `train.init_from`)."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS} in checkpoint folder {ckpt_dir}")
    return load_model_state(model, load_file(str(path)), zero_stage)


# ---------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np_name, np_keys.tolist(), np_pos, np_has_gauss, np_gauss]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = json.loads(state["numpy"])
    np.random.set_state(
        (np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- optimizer


def _safe_globals() -> list:
    """DeepSpeed's ZeRO optimizer state holds a few plain state classes; allow exactly those."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_optimizer(optimizer: Any, src: Path, dist: DistInfo) -> None:
    """Plain torch optimizers take their own state; ZeRO wrappers take every rank's list."""
    params = inspect.signature(optimizer.load_state_dict).parameters
    if "state_dict_list" not in params:
        optimizer.load_state_dict(_torch_load(src / f"optimizer.rank{dist.rank}.pt"))
        return
    states = [_torch_load(src / f"optimizer.rank{r}.pt") for r in range(dist.world_size)]
    optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)


# ---------------------------------------------------------------- config


def _config_with_assets(config: Any, assets: Mapping[str, str]) -> DictConfig:
    cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(config), resolve=True))
    for key, rel in assets.items():
        OmegaConf.update(cfg, key, rel, force_add=True)
    return cfg


def read_checkpoint_config(ckpt_dir: str | Path) -> DictConfig:
    """The saved config with asset paths made absolute (they are stored relative to the folder)."""
    ckpt = Path(ckpt_dir)
    for name in (CONFIG, STATE):
        if not (ckpt / name).is_file():
            raise FileNotFoundError(f"{ckpt / name}: not a bita checkpoint folder (missing {name})")
    cfg = OmegaConf.load(ckpt / CONFIG)
    assets = json.loads((ckpt / STATE).read_text()).get("assets", {})
    for key, rel in assets.items():
        OmegaConf.update(cfg, key, str((ckpt / rel).resolve()), force_add=True)
    return cfg


# ---------------------------------------------------------------- save / load


def _barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def _relative_asset(ckpt: Path, path: Path) -> str:
    """Asset path relative to the checkpoint folder, whichever base `export_assets` used."""
    candidates = [path] if path.is_absolute() else [ckpt / path, ckpt / ASSETS / path]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate.resolve().relative_to(ckpt.resolve()))
    raise FileNotFoundError(f"export_assets returned {path}, which is not under {ckpt}")


def _write_main_files(
    tmp: Path, model: nn.Module, weights: dict, state: TrainState, config
) -> None:
    from safetensors.torch import save_file

    save_file(weights, str(tmp / WEIGHTS))
    assets: dict[str, str] = {}
    if hasattr(model, "export_assets"):
        overrides = model.export_assets(tmp / ASSETS)
        assets = {key: _relative_asset(tmp, Path(path)) for key, path in overrides.items()}
    state.assets = assets
    OmegaConf.save(_config_with_assets(config if config is not None else {}, assets), tmp / CONFIG)
    # Written last: a folder with trainer_state.json is complete.
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=1))


def save_checkpoint(
    dest: str | Path,
    *,
    model: nn.Module,
    optimizer: Any,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    config: Any,
    dist: DistInfo,
    zero_stage: int = 0,
) -> Path:
    """Write a checkpoint into `dest` atomically; every rank must call it (collective).

    Files go to `.<name>.tmp` first; the old folder is renamed away only once the new one is
    complete, so a kill at any point leaves a complete `dest` or `.<name>.old` (which
    `resume_path` falls back to).
    """
    dest = Path(dest)
    tmp, old = dest.parent / f".{dest.name}.tmp", dest.parent / f".{dest.name}.old"
    weights = model_state(model, zero_stage)
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(optimizer.state_dict(), tmp / f"optimizer.rank{dist.rank}.pt")
    torch.save(_rng_state(), tmp / f"rng.rank{dist.rank}.pt")
    _barrier()
    if dist.is_main:
        state.scheduler = scheduler.state_dict()
        state.world_size = dist.world_size
        _write_main_files(tmp, model, weights, state, config)
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return dest


def resume_path(dest: str | Path) -> Path | None:
    """`dest` if complete, else the `.old` copy a kill between two renames left behind."""
    dest = Path(dest)
    for candidate in (dest, dest.parent / f".{dest.name}.old"):
        if (candidate / STATE).is_file():
            return candidate
    return None


def load_checkpoint(
    src: str | Path,
    *,
    model: nn.Module,
    optimizer: Any,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    dist: DistInfo,
    zero_stage: int = 0,
) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG saved by `save_checkpoint`."""
    from safetensors.torch import load_file

    src = Path(src)
    raw = json.loads((src / STATE).read_text())
    state = TrainState(**raw)
    if state.world_size != dist.world_size:
        raise RuntimeError(
            f"{src} was written by {state.world_size} processes, this run has {dist.world_size}: "
            "resume with the same process count, or start fresh with train.resume=never "
            "(train.init_from can still take its weights)"
        )
    load_model_state(model, load_file(str(src / WEIGHTS)), zero_stage)
    _load_optimizer(optimizer, src, dist)
    scheduler.load_state_dict(state.scheduler)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    _set_rng_state(_torch_load(src / f"rng.rank{dist.rank}.pt"))
    return state


def _default_builder() -> Callable[[DictConfig], nn.Module]:
    from bita.models.build import build_model

    return build_model


def load_model(
    ckpt_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    builder: Callable[[DictConfig], nn.Module] | None = None,
) -> tuple[nn.Module, DictConfig]:
    """Build the model a checkpoint describes and load its weights; returns (model, config).

    Frozen public weights come from their own sources (hub, pip packages) via the saved
    config; only trainable / in_checkpoint weights come from the folder; assets that must
    match the loaded weights (a retrieval datastore) are attached after them
    (`model.load_assets`). `builder` defaults to `bita.models.build.build_model`.
    """
    cfg = read_checkpoint_config(ckpt_dir)
    model = (builder or _default_builder())(cfg)
    load_weights(model, ckpt_dir)
    if hasattr(model, "load_assets"):
        model.load_assets(cfg)
    return model.to(device).eval(), cfg
