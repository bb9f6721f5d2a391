"""Process-group set-up shared by one-process, torchrun and `deepspeed`-launcher runs.

Launchers describe the process through environment variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Reading them — never `--local_rank` from argv, which belongs to
Hydra — lets one code path serve all three launch styles. A job that Hydra's submitit launcher
started (SLURM, or its local executor) is one task per rank with SLURM's variables instead
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST): submitit's own helper
translates them, with the first node of the job as the master. Without any of these DeepSpeed
would go looking for MPI, so single-process defaults are filled in first.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from bita.errors import ConfigError

_LOCAL_RANK_ARG = re.compile(r"^--local[_-]rank(?:=(\d+))?$")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes shared files and talks to the tracker."""
        return self.rank == 0


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local_rank N` that the `deepspeed` launcher appends.

    Hydra rejects the flag, so `bita.run` calls this on `sys.argv` before Hydra parses it. The
    value is moved into LOCAL_RANK when the launcher did not set it already.
    """
    kept: list[str] = []
    args = iter(argv)
    for arg in args:
        match = _LOCAL_RANK_ARG.match(arg)
        if match is None:
            kept.append(arg)
            continue
        value = match.group(1) if match.group(1) is not None else next(args, None)
        if value is not None:
            os.environ.setdefault("LOCAL_RANK", value)
    return kept


def free_port() -> int:
    """An unused TCP port on the loopback interface for a one-process rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from err


def _pick_device(accelerator: str, local_rank: int) -> torch.device:
    if accelerator not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"hardware.accelerator={accelerator!r}: expected one of auto, cpu, cuda")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "hardware.accelerator=cuda but no CUDA device is visible; use hardware=cpu"
        )
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def adopt_submitit_environment() -> None:
    """In a submitit job (`hydra/launcher=slurm|submitit_local`) without a launcher's RANK,
    export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the job's tasks.

    The port is drawn from the job id, so every task of a job agrees on it. Each task keeps
    the GPUs SLURM gave the node: the device is picked by LOCAL_RANK.
    """
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(accelerator: str = "auto") -> DistInfo:
    """Join (or create) the process group: gloo on CPU, nccl on CUDA.

    `accelerator` is `hardware.accelerator`: `cpu`, `cuda`, or `auto` (CUDA when visible).
    Safe to call twice; the second call only reports the existing group.
    """
    adopt_submitit_environment()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if _env_int("WORLD_SIZE", 1) > 1:
            raise RuntimeError(
                "WORLD_SIZE > 1 but MASTER_PORT is unset: launch with torchrun/deepspeed"
            )
        os.environ["MASTER_PORT"] = str(free_port())
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    device = _pick_device(accelerator, local_rank)
    if device.type == "cpu":
        # DeepSpeed picks its accelerator once, at first use; it must see this before then.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # heavy import, deferred so `import bita` stays fast
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def apply_thread_count(hardware: Mapping) -> None:
    """Set torch's intra-op threads from `hardware.num_threads` (null keeps torch's default).

    On a CPU shared with other jobs, one thread per process can be several times faster than
    two: every parallel region waits for its slowest thread, which the scheduler preempts.
    """
    threads = hardware.get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))
