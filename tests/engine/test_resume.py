"""Resuming is not restarting: a resumed process runs exactly the remaining optimizer steps, with
the uninterrupted run's losses, on the samples the uninterrupted run saw after that point.

Final weights alone cannot tell the two apart: seeds, batches and dropout are all fixed, so a
process that ignored `checkpoints/last` and trained again from step 0 ends on the same weights.
Each test therefore also runs that fault — a process that ignores `checkpoints/last`
(`train.resume=never` on a copy of the interrupted run) — and checks that the comparison
rejects it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import engine_toy
import pytest
import torch
from engine_toy import kill_after_step, run_toy, toy_command, toy_env
from hydra import compose, initialize_config_dir
from torch.optim.optimizer import register_optimizer_step_post_hook

from bita.engine.checkpoint import model_state

CONF = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class Record:
    """What one process did: optimizer steps it executed, the loss logged at each step, and
    the sample keys of each micro-batch its loss saw, in order."""

    optimizer_steps: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    keys: list[list[str]] = field(default_factory=list)
    run_id = None  # the tracker stand-in has no MLflow run (stages then log no dataset inputs)

    def log_metrics(self, metrics, *, step):  # the tracker the trainer logs to
        loss = next((v for k, v in metrics.items() if k.endswith("train/loss")), None)
        if loss is not None:
            self.losses[step] = loss


def recorded(record: Record, loss_fn, key: str):
    """`loss_fn` that also keeps the batch's sample keys (`batch[key]`)."""

    def wrapped(model, batch):
        record.keys.append(list(batch[key]))
        return loss_fn(model, batch)

    return wrapped


def counting_optimizer_steps(record: Record):
    """Counts every torch optimizer step this process takes (DeepSpeed's included)."""
    return register_optimizer_step_post_hook(
        lambda *_: setattr(record, "optimizer_steps", record.optimizer_steps + 1)
    )


def check_resumed(resumed: Record, whole: Record, k: int, n: int, micro_per_step: int) -> None:
    assert resumed.optimizer_steps == n - k, "optimizer steps executed after resuming"
    assert resumed.losses == {s: whole.losses[s] for s in range(k + 1, n + 1)}
    assert resumed.keys == whole.keys[k * micro_per_step :]


def test_toy_run_killed_then_resumed_runs_exactly_the_remaining_steps(dist, tmp_path, monkeypatch):
    """SIGKILL a toy run after checkpoint k (of 12 steps, 2 micro-batches each), resume it in
    this process. Injected fault checked to fail: a resume that ignores checkpoints/last."""

    def toy_run(run_dir: Path, **train) -> tuple[Record, dict]:
        record = Record()
        monkeypatch.setattr(engine_toy, "toy_loss", recorded(record, toy_loss, "id"))
        hook = counting_optimizer_steps(record)
        try:
            trainer, _ = run_toy(
                run_dir, dist, epochs=3, save_every_steps=1, log_every=1, tracker=record, **train
            )
        finally:
            hook.remove()
        return record, model_state(trainer.model)

    toy_loss = engine_toy.toy_loss
    cut = tmp_path / "cut"
    k = kill_after_step(toy_command(cut, "--sleep", "0.05"), toy_env(), cut, 3)
    shutil.copytree(cut, tmp_path / "ignored")
    resumed, weights = toy_run(cut)
    whole, expected = toy_run(tmp_path / "whole")
    assert 3 <= k < 12
    check_resumed(resumed, whole, k, 12, micro_per_step=2)
    assert all(torch.equal(weights[name], expected[name]) for name in expected)

    restarted, restarted_weights = toy_run(tmp_path / "ignored", resume="never")
    with pytest.raises(AssertionError, match="optimizer steps executed after resuming"):
        check_resumed(restarted, whole, k, 12, micro_per_step=2)
    # the fault the final weights alone cannot see
    assert all(torch.equal(restarted_weights[name], expected[name]) for name in expected)


class _Interrupted(Exception):
    """Stands for a crash after a checkpoint: the process dies, checkpoints/last remains."""


def test_stage1_interrupted_then_resumed_sees_the_same_samples(dist, tmp_path, monkeypatch):
    """The real stack in one process: tiny BITA, ITC on the bundled demo shards (stream position,
    augmentation RNG, DeepSpeed engine), 6 steps, interrupted after checkpoint 3, then run
    again. Injected fault checked to fail: a resume that ignores checkpoints/last."""
    from bita.run import seed_everything
    from bita.stages import pretrain1
    from bita.stages.pipeline import run_stages

    itc = pretrain1.itc_objective
    n, k = 6, 3

    def stage1(run_dir: Path, crash_at: int | None = None, *overrides: str) -> Record:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    "experiment=tiny",
                    "stage=pretrain1",
                    "dataset=demo_mini",
                    f"train.max_steps={n}",
                    "train.save_every_steps=1",
                    "train.log_every=1",
                    "hardware.num_workers=0",
                    "tracking.enabled=false",
                    *overrides,
                ],
            )
        record = Record()
        objective = recorded(record, itc, "image_id")

        def maybe_crash(model, batch):
            if crash_at is not None and len(record.keys) == crash_at:
                raise _Interrupted
            return objective(model, batch)

        monkeypatch.setattr(pretrain1, "itc_objective", maybe_crash)
        seed_everything(int(cfg.seed), dist.rank)
        hook = counting_optimizer_steps(record)
        try:
            run_stages(cfg, run_dir, dist, record)
        finally:
            hook.remove()
        return record

    whole = stage1(tmp_path / "whole")
    micro_per_step = len(whole.keys) // n
    with pytest.raises(_Interrupted):
        stage1(tmp_path / "cut", crash_at=k * micro_per_step)
    shutil.copytree(tmp_path / "cut", tmp_path / "ignored")
    resumed = stage1(tmp_path / "cut")
    assert len(set(whole.keys[0])) > 1  # real sample keys, not a constant
    check_resumed(resumed, whole, k, n, micro_per_step)

    restarted = stage1(tmp_path / "ignored", None, "train.resume=never")
    with pytest.raises(AssertionError, match="optimizer steps executed after resuming"):
        check_resumed(restarted, whole, k, n, micro_per_step)
