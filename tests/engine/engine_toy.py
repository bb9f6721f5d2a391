"""A tiny model, loss and deterministic batch source for engine tests; also a CLI that trains
it (for the SIGKILL and torchrun tests, which need separate processes)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bita.engine.checkpoint import model_state
from bita.engine.distributed import DistInfo, init_distributed
from bita.engine.trainer import FitResult, Trainer

WIDTH = 8


class ToyModel(nn.Module):
    """Frozen 'tower' + trainable head with dropout, like BITA's split of frozen/trainable."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.tower = nn.Linear(4, width)
        self.tower.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(0.1))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 1)
        # 0-dim parameters, like BITA's temperature and CLIP's logit scale.
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.frozen_scale = nn.Parameter(torch.tensor(2.0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.head(self.tower(x))) * self.scale
        return self.out(hidden).squeeze(-1) / self.frozen_scale

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> list[str]:
        own = self.checkpoint_state_dict()
        unexpected = sorted(set(state) - set(own))
        if unexpected or not set(state) & set(own):
            raise KeyError(f"unexpected or no matching keys: {unexpected}")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
        return sorted(set(own) - set(state))


def toy_loss(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    pred = model(batch["x"])
    loss = (pred - batch["y"]).pow(2).mean()
    if batch["poison"]:
        loss = loss * float("nan")
    return {"loss": loss, "mae": (pred - batch["y"]).abs().mean()}


def toy_batches(micro: int, rank: int = 0, poison: frozenset = frozenset(), sleep: float = 0.0):
    """`make_batches(epoch, skip)`: batch i of an epoch depends only on (epoch, rank, i)."""

    def make(epoch: int, skip: int):
        i = skip
        while True:
            gen = torch.Generator().manual_seed(epoch * 100_003 + rank * 1009 + i)
            x = torch.randn(micro, 4, generator=gen)
            time.sleep(sleep)
            ids = [f"{epoch}.{rank}.{i}.{j}" for j in range(micro)]  # epoch, rank, batch, row
            yield {"x": x, "y": x.sum(-1), "poison": (epoch, i) in poison, "id": ids}
            i += 1

    return make


def logged(make, events: list):
    """`make` (a `make_batches`) that appends ("batch", epoch) to `events` per batch."""

    def make_batches(epoch: int, skip: int):
        for batch in make(epoch, skip):
            events.append(("batch", epoch))
            yield batch

    return make_batches


def toy_config(**train) -> dict:
    return {
        "hardware": {
            "accelerator": "cpu",
            "zero_stage": 0,
            "precision": "fp32",
            "micro_batch_size": 2,
            "gradient_clipping": 1.0,
            "num_workers": 0,
        },
        "optim": {
            "lr": 1e-2,
            "end_lr": 1e-3,
            "weight_decay": 0.05,
            "betas": [0.9, 0.999],
            "warmup_steps": 2,
        },
        "train": {
            "epochs": 2,
            "max_steps": None,
            "global_batch_size": 4,
            "resume": "auto",
            "log_every": 2,
            "save_every_steps": 2,
            "max_bad_steps": 2,
            **train,
        },
    }


def run_toy(
    run_dir: Path,
    dist: DistInfo,
    *,
    steps_per_epoch: int = 4,
    poison=frozenset(),
    sleep: float = 0.0,
    tracker=None,
    on_epoch_end=None,
    select_metric=None,
    hardware: dict | None = None,
    **train,
) -> tuple[Trainer, FitResult]:
    """Seeded model + Trainer + fit over the toy batches."""
    cfg = toy_config(**train)
    cfg["hardware"].update(hardware or {})
    torch.manual_seed(0)
    model = ToyModel()
    trainer = Trainer(
        model,
        hardware=cfg["hardware"],
        optim=cfg["optim"],
        train=cfg["train"],
        run_dir=run_dir,
        tracker=tracker,
        dist=dist,
        config=cfg,
    )
    batches = toy_batches(trainer.micro_batch_size, dist.rank, poison, sleep)
    result = trainer.fit(
        batches,
        toy_loss,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg["train"]["epochs"],
        on_epoch_end=on_epoch_end,
        select_metric=select_metric,
    )
    return trainer, result


def toy_command(run_dir: Path, *extra: str) -> list[str]:
    """This file as a CLI training the toy into `run_dir` (3 epochs unless `extra` says)."""
    return [sys.executable, __file__, str(run_dir), "--epochs", "3", *extra]


def toy_env(accelerator: str = "cpu") -> dict[str, str]:
    """The environment of a fresh single-process run on `accelerator` (no inherited ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": accelerator}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def read_final(run_dir: Path, rank: int = 0) -> dict:
    """What `main` wrote at the end of a run: step, world size, pid and trainable weights."""
    return json.loads((run_dir / f"final.rank{rank}.json").read_text())


def saved_state(run_dir: Path) -> dict:
    """The trainer state a resume of `run_dir` would start from ({} before the first save)."""
    for name in ("last", "previous"):  # `previous` alone: a kill between a save's renames
        state_file = run_dir / "checkpoints" / name / "trainer_state.json"
        if state_file.is_file():
            return json.loads(state_file.read_text())
    return {}


def kill_when(command: list[str], env: dict[str, str], run_dir: Path, ready) -> dict:
    """Run `command` (a toy run into `run_dir`), SIGKILL it once `ready(saved state)` holds,
    and return the state it resumes from: a crash at an arbitrary point (a kill may even fall
    between the two renames of a save, leaving only `previous`)."""
    victim = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        try:
            if ready(saved_state(run_dir)):
                break
        except (OSError, ValueError):  # a folder renamed while it was read
            pass
        time.sleep(0.02)
    if victim.poll() is not None:
        raise AssertionError(f"the run ended (exit {victim.returncode}) before it was killed")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    return saved_state(run_dir)


def kill_after_step(command: list[str], env: dict[str, str], run_dir: Path, step: int) -> int:
    """`kill_when` the saved step reaches `step`; returns the step it resumes from."""
    return kill_when(command, env, run_dir, lambda state: state.get("step", 0) >= step)["step"]


def slow_validation(seconds: float):
    """An `on_epoch_end` that takes `seconds`, so a test can kill a run while it validates."""

    def validate(epoch: int) -> dict:
        time.sleep(seconds)
        return {}

    return validate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--validate-sleep", type=float, help="validate each epoch, this slowly")
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--autocast", choices=("bf16", "fp16"), help="default: none")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist = init_distributed(args.accelerator)
    trainer, result = run_toy(
        args.run_dir,
        dist,
        steps_per_epoch=args.steps_per_epoch,
        sleep=args.sleep,
        epochs=args.epochs,
        on_epoch_end=None if args.validate_sleep is None else slow_validation(args.validate_sleep),
        save_every_steps=1,
        hardware={
            "zero_stage": args.zero,
            "accelerator": args.accelerator,
            "autocast": args.autocast,
        },
    )
    weights = {k: v.tolist() for k, v in model_state(trainer.model, args.zero).items()}
    out = args.run_dir / f"final.rank{dist.rank}.json"
    out.write_text(
        json.dumps(
            {"step": result.step, "world": dist.world_size, "pid": os.getpid(), "weights": weights}
        )
    )


if __name__ == "__main__":
    main()
