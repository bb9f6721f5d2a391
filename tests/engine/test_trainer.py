"""The training loop: bad steps, logging cadence, best-checkpoint selection, and two ranks
under torchrun (SIGKILL + resume: test_resume.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_toy import kill_when, logged, read_final, run_toy, toy_command, toy_env
from safetensors.torch import load_file

from bita.engine.checkpoint import model_state
from bita.engine.distributed import free_port
from bita.engine.trainer import NonFiniteLossError

TOY = Path(__file__).with_name("engine_toy.py")


class Recorder:
    """Stands in for bita.tracking.Tracker."""

    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, *, step):
        self.calls.append((step, dict(metrics)))


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints/last/trainer_state.json").read_text())


def test_non_finite_loss_skips_step_then_stops(dist, tmp_path):
    # Accumulation 2, 8 micro-batches per epoch; (epoch, index) pairs are poisoned.
    poison = frozenset({(0, 4), (0, 5), (1, 1)})
    _, result = run_toy(tmp_path / "ok", dist, poison=frozenset({(0, 4), (0, 5)}), epochs=2)
    assert result.bad_steps == 2
    assert result.step == 7  # one optimizer step's worth of data skipped, nothing else
    for value in load_file(str(tmp_path / "ok/checkpoints/last/model.safetensors")).values():
        assert torch.isfinite(value).all()

    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses.*max_bad_steps=2"):
        run_toy(tmp_path / "bad", dist, poison=poison, epochs=2, save_every_steps=1)
    state = _state(tmp_path / "bad")
    assert (state["step"], state["epoch"], state["bad_steps"]) == (3, 1, 2)  # last good save
    for value in load_file(str(tmp_path / "bad/checkpoints/last/model.safetensors")).values():
        assert torch.isfinite(value).all()


def test_logs_metrics_and_keeps_best_epoch(dist, tmp_path):
    tracker = Recorder()
    scores = {
        0: {"val/CIDEr": 0.5, "val/Bleu_4": 0.2},
        1: {"val/CIDEr": 0.3, "val/Bleu_4": 0.1},
        2: {"val/CIDEr": 0.9, "val/Bleu_4": 0.1},
    }
    best_seen = []

    def on_epoch_end(epoch):
        best_seen.append(epoch)
        return scores[epoch]

    _, result = run_toy(
        tmp_path,
        dist,
        tracker=tracker,
        on_epoch_end=on_epoch_end,
        select_metric="val/CIDEr+val/Bleu_4",
        epochs=3,
        log_every=3,
    )
    train_steps = [step for step, m in tracker.calls if "train/loss" in m]
    assert train_steps == [3, 6, 9, 12]
    first = next(m for _, m in tracker.calls if "train/loss" in m)
    assert {"train/loss", "train/mae", "train/lr", "train/samples_per_s", "train/bad_steps"} <= set(
        first
    )
    assert "train/mfu" not in first  # CPU: no peak FLOPs
    assert result.best_metric == pytest.approx(1.0)
    best = json.loads((result.best / "trainer_state.json").read_text())
    assert (best["step"], best["epoch"]) == (12, 3)
    assert best_seen == [0, 1, 2]


def test_max_steps_overrides_epochs(dist, tmp_path):
    _, result = run_toy(tmp_path, dist, epochs=1, max_steps=6)
    assert (result.step, result.epoch) == (6, 1)
    assert _state(tmp_path)["batch_in_epoch"] == 4
    assert _state(tmp_path)["scheduler"]["lr_lambdas"][0]["total"] == 6


def test_sigkill_during_validation_resumes_at_that_validation(dist, tmp_path, monkeypatch):
    """Fault: SIGKILL while an epoch's validation runs. The resumed run validates that epoch
    first, trains none of it again, and ends on the uninterrupted run's weights."""
    cut_dir = tmp_path / "cut"
    command = toy_command(cut_dir, "--validate-sleep", "60")
    state = kill_when(command, toy_env(), cut_dir, lambda state: state.get("epoch_end_pending"))
    assert (state["step"], state["epoch"]) == (4, 1)
    import engine_toy

    events = []
    original = engine_toy.toy_batches
    monkeypatch.setattr(engine_toy, "toy_batches", lambda *a: logged(original(*a), events))
    resumed, result = run_toy(
        cut_dir, dist, epochs=3, save_every_steps=1, on_epoch_end=lambda e: events.append(e) or {}
    )
    monkeypatch.undo()
    reference, _ = run_toy(
        tmp_path / "full", dist, epochs=3, save_every_steps=1, on_epoch_end=lambda e: {}
    )
    assert events[0] == 0 and ("batch", 0) not in events and result.step == 12
    expected = model_state(reference.model)
    for name, value in model_state(resumed.model).items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("max_steps", [0, -5, 2.7, "abc"])
def test_max_steps_must_be_a_positive_integer(max_steps, dist, tmp_path):
    """Fault: train.max_steps=0, -5, 2.7 or abc, once read by truthiness (0 trained a whole
    epoch, -5 trained nothing and saved the untrained weights as last, 2.7 became 2)."""
    with pytest.raises(ValueError, match=r"train\.max_steps=.*expected an integer >= 1"):
        run_toy(tmp_path, dist, max_steps=max_steps)
    assert not (tmp_path / "checkpoints").exists()


def test_two_processes_on_gloo_agree(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(TOY),
        str(tmp_path),
        "--zero",
        "2",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
    ]
    subprocess.run(cmd, env=toy_env(), check=True, stderr=subprocess.DEVNULL, timeout=180)
    ranks = [read_final(tmp_path, r) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["step"] == ranks[1]["step"] == 2
    assert ranks[0]["weights"] == ranks[1]["weights"]
    last = tmp_path / "checkpoints/last"
    assert (last / "rng.rank0.pt").exists() and (last / "rng.rank1.pt").exists()
