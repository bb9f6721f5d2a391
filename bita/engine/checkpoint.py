"""Self-describing, atomic checkpoints that resume bit-exactly, and one-call model loading.

Layout of `<stage_dir>/checkpoints/{last,previous,best}/`:
  config.yaml            the run's composed config (asset paths point into assets/)
  model.safetensors      `model.checkpoint_state_dict()`: trainable + in_checkpoint weights only
  trainer_state.json     step, epoch, batch in epoch, best metric, bad steps, scheduler, assets,
                         and the size of every other file (written last: its presence means
                         the folder is complete)
  optimizer.rank{R}.pt   this rank's (possibly ZeRO-partitioned) optimizer state  } `last` and
  rng.rank{R}.pt         torch/cuda generator tensors + python/numpy states       } `previous`
  assets/                files the config needs that are not public weights (e.g. a tokenizer)

`last` is what a run resumes from; each new `last` moves the one it replaces to `previous`,
so a `last` damaged after it was written (a full disk, a bad copy) still leaves a checkpoint
to resume from. `best` is only ever loaded as a model, so it holds no optimizer or RNG state.

DeepSpeed's own checkpointing is not used: it handles frozen parameters inconsistently across
versions (DESIGN.md), and its files need unpickling. Everything here loads with safetensors or
`torch.load(weights_only=True)` plus an allowlist of DeepSpeed's plain state classes.
"""

from __future__ import annotations

import contextlib
import filecmp
import inspect
import json
import os
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
from bita.errors import MissingFileError, UserError

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
STATE = "trainer_state.json"
ASSETS = "assets"
LAST, PREVIOUS = "last", "previous"


class DamagedCheckpointError(UserError):
    """A checkpoint file that is missing, truncated or unreadable; the message names it."""


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
    epoch_end_pending: bool = False  # the epoch before `epoch` ended; its validation has not run
    finished: bool = False  # the stage's final checkpoint: no optimizer state, nothing to resume
    files: dict[str, int] = field(default_factory=dict)  # bytes of every other file, as written


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


def read_weights(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `<ckpt_dir>/model.safetensors`; a truncated or garbled file is named."""
    from safetensors.torch import load_file

    return _read(Path(ckpt_dir) / WEIGHTS, lambda path: load_file(str(path)))


def load_weights(model: nn.Module, ckpt_dir: str | Path, zero_stage: int = 0) -> Any:
    """Load `<ckpt_dir>/model.safetensors` into `model` (e.g. `train.init_from`)."""
    return load_model_state(model, read_weights(ckpt_dir), zero_stage)


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    """`reader(path)`; a missing file, or bytes its decoder rejects, is damage naming the file."""
    if not path.is_file():
        raise DamagedCheckpointError(f"{path} is missing")
    try:
        return reader(path)
    except Exception as err:  # every decoder has its own errors; all mean the same here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DamagedCheckpointError(f"{path} cannot be read ({reason})") from err


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
        optimizer.load_state_dict(_read(src / f"optimizer.rank{dist.rank}.pt", _torch_load))
        return
    states = [_read(src / f"optimizer.rank{r}.pt", _torch_load) for r in range(dist.world_size)]
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
    if not ckpt.is_dir():
        raise MissingFileError(f"{ckpt}: no such checkpoint folder")
    if not (ckpt / STATE).is_file() and not (ckpt / CONFIG).is_file():
        raise MissingFileError(
            f"{ckpt}: not a bita checkpoint folder (no {STATE} or {CONFIG}; expected a folder "
            "such as runs/NAME/finetune/checkpoints/best)"
        )
    cfg = _read(ckpt / CONFIG, OmegaConf.load)
    assets = _read_state(ckpt).get("assets", {})
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
    state.files = {
        str(path.relative_to(tmp)): path.stat().st_size
        for path in sorted(tmp.rglob("*"))
        if path.is_file() and path.name != STATE
    }
    # Written last: a folder with trainer_state.json is complete.
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=1))


def _share_identical_files(new: Path, folder: Path) -> None:
    """Hard-link each file of `new` that a sibling checkpoint in `folder` holds byte for byte
    (a `best` taken at the final step is the final `last`): one copy on disk, two complete
    folders. Checkpoint files are never modified in place, only replaced or deleted, so a
    link stays right whichever folder is rewritten later."""
    siblings = [p for p in folder.iterdir() if p != new and (p / STATE).is_file()]
    for path in sorted(p for p in new.rglob("*") if p.is_file()):
        twins = (sibling / path.relative_to(new) for sibling in siblings)
        twin = next((t for t in twins if _same_bytes(t, path)), None)
        if twin is None:
            continue
        link = path.with_name(f"{path.name}.link")
        try:
            os.link(twin, link)
        except OSError:  # a filesystem without hard links keeps the copy
            return
        os.replace(link, path)


def _same_bytes(a: Path, b: Path) -> bool:
    return a.is_file() and a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, False)


def _replace(dest: Path, new: Path, previous: Path | None) -> None:
    """Rename the complete folder `new` to `dest`. The folder it replaces becomes `previous`
    when it is intact (an intact `previous` is never traded for a damaged one), else it is
    deleted. Every step is a rename, so a kill between two leaves `dest` or `previous`."""
    trash = dest.parent / f".{dest.name}.old"
    shutil.rmtree(trash, ignore_errors=True)
    if dest.exists():
        if previous is not None and find_damage(dest) is None:
            if previous.exists():
                previous.rename(trash)
            dest.rename(previous)
        else:
            dest.rename(trash)
    new.rename(dest)
    shutil.rmtree(trash, ignore_errors=True)


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
    with_optimizer: bool = True,
    with_rng: bool = True,
    previous: str | Path | None = None,
) -> Path:
    """Write a checkpoint into `dest` atomically; every rank must call it (collective).

    Files go to `.<name>.tmp` first and the folder is renamed into place once complete.
    `with_optimizer` / `with_rng`: whether the optimizer and RNG states are written (a
    checkpoint only ever loaded as a model needs neither). With `previous`, the checkpoint
    `dest` replaces moves there.
    """
    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.tmp"
    weights = model_state(model, zero_stage)
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if with_optimizer:
        torch.save(optimizer.state_dict(), tmp / f"optimizer.rank{dist.rank}.pt")
    if with_rng:
        torch.save(_rng_state(), tmp / f"rng.rank{dist.rank}.pt")
    _barrier()
    if dist.is_main:
        state.scheduler = scheduler.state_dict()
        state.world_size = dist.world_size
        _write_main_files(tmp, model, weights, state, config)
        _share_identical_files(tmp, dest.parent)
        _replace(dest, tmp, None if previous is None else Path(previous))
    _barrier()
    return dest


# ---------------------------------------------------------------- damage and resume


def _read_state(ckpt: Path) -> dict[str, Any]:
    return _read(ckpt / STATE, lambda path: json.loads(path.read_text()))


def find_damage(ckpt: str | Path) -> str | None:
    """What is wrong with checkpoint folder `ckpt` (None: nothing found), checked without
    loading it: `trainer_state.json` present and readable, and every file it lists there
    with the size it was written with. Writes are atomic, so a folder that fails this was
    damaged after it was written (a full disk, an interrupted copy, a stray edit)."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE).is_file():
        return f"{ckpt / STATE} is missing (a complete checkpoint always has it)"
    try:
        state = _read_state(ckpt)
    except DamagedCheckpointError as err:
        return str(err)
    for name, size in state.get("files", {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} holds {path.stat().st_size:,} bytes, {size:,} were written (truncated?)"
    return None


def latest_intact(checkpoint_dir: str | Path) -> Path | None:
    """`checkpoints/last`, or `checkpoints/previous` when `last` is absent or damaged."""
    for name in (LAST, PREVIOUS):
        candidate = Path(checkpoint_dir) / name
        if candidate.exists() and find_damage(candidate) is None:
            return candidate
    return None


def ways_on(checkpoint_dir: str | Path) -> str:
    """What a user whose `last` is damaged can do, for the end of an error message."""
    previous = Path(checkpoint_dir) / PREVIOUS
    if previous.exists() and find_damage(previous) is None:
        step = _read_state(previous)["step"]
        return (
            f"Resume from the previous checkpoint ({previous}, step {step}) with "
            "train.resume=previous, or start over with train.resume=never."
        )
    return "There is no intact previous checkpoint: start over with train.resume=never."


def resume_source(checkpoint_dir: str | Path, mode: str) -> Path | None:
    """The checkpoint `train.resume=mode` continues from (None: start fresh).

    `auto`: `last`, or `previous` when a kill between the two renames of a save left no
    `last`; `previous`: `previous`, in place of a damaged `last`; `never`: none. A damaged
    checkpoint is an error naming the file, never a silent fresh start over it.
    """
    checkpoint_dir = Path(checkpoint_dir)
    last, previous = checkpoint_dir / LAST, checkpoint_dir / PREVIOUS
    if mode == "never":
        return None
    if mode == "previous":
        if last.exists() and find_damage(last) is None:
            raise UserError(
                f"train.resume=previous: {last} is intact, so resume from it with "
                "train.resume=auto (previous stands in for a damaged last only)"
            )
        damage = find_damage(previous) if previous.exists() else f"{previous} does not exist"
        if damage:
            raise DamagedCheckpointError(
                f"train.resume=previous: {damage}; start over with train.resume=never"
            )
        return previous
    for candidate in (last, previous):
        if candidate.exists():
            damage = find_damage(candidate)
            if damage:
                raise DamagedCheckpointError(
                    f"{damage}: the run cannot resume from {candidate}. {ways_on(checkpoint_dir)}"
                )
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
    src = Path(src)
    state = TrainState(**_read_state(src))
    if state.world_size != dist.world_size:
        raise UserError(
            f"{src} was written by {state.world_size} processes, this run has {dist.world_size}: "
            "resume with the same process count, or start fresh with train.resume=never "
            "(init_from can still take its weights)"
        )
    load_model_state(model, read_weights(src), zero_stage)
    if not state.finished:  # a finished stage's final checkpoint has no optimizer state
        _load_optimizer(optimizer, src, dist)
    scheduler.load_state_dict(state.scheduler)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    _set_rng_state(_read(src / f"rng.rank{dist.rank}.pt", _torch_load))
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
