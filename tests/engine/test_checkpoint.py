"""Checkpoint round trips per ZeRO stage, atomic writes, damaged checkpoints, what each
checkpoint holds, safe loading and load_model."""

import json
from pathlib import Path

import pytest
import torch
from engine_toy import ToyModel, logged, run_toy, toy_batches
from omegaconf import OmegaConf
from safetensors.torch import load_file

import bita.engine.checkpoint as ckpt_mod
from bita.engine.checkpoint import load_model, model_state


class _Crash(Exception):
    pass


def _crashing(make, after: int):
    """A batch source that dies after `after` micro-batches, like a killed job."""
    seen = [0]

    def make_batches(epoch, skip):
        for batch in make(epoch, skip):
            if seen[0] == after:
                raise _Crash
            seen[0] += 1
            yield batch

    return make_batches


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "checkpoints" / "last" / "model.safetensors"))


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_resume_matches_uninterrupted_run(zero, dist, tmp_path, monkeypatch):
    hw = {"zero_stage": zero}
    trainer, full = run_toy(tmp_path / "full", dist, hardware=hw)
    assert full.step == 8 and full.epoch == 2
    reference = model_state(trainer.model, zero)

    # Crash mid-epoch 1 (micro-batch 13 of 16; last save at step 6, batch 4 of 8), then resume.
    import engine_toy

    monkeypatch.setattr(engine_toy, "toy_batches", lambda *a: _crashing(toy_batches(*a), 13))
    with pytest.raises(_Crash):
        run_toy(tmp_path / "cut", dist, hardware=hw)
    monkeypatch.undo()
    state = json.loads((tmp_path / "cut/checkpoints/last/trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (6, 1, 4)
    trainer, resumed = run_toy(tmp_path / "cut", dist, hardware=hw)
    assert resumed.step == 8
    for name, value in model_state(trainer.model, zero).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)


def _cut_run(run_dir: Path, dist, monkeypatch, after: int = 13, **kwargs):
    """A toy run that crashes after `after` micro-batches, leaving `last` and `previous`."""
    import engine_toy

    monkeypatch.setattr(engine_toy, "toy_batches", lambda *a: _crashing(toy_batches(*a), after))
    with pytest.raises(_Crash):
        run_toy(run_dir, dist, **kwargs)
    monkeypatch.undo()


def test_files_load_safely_and_config_sits_beside_weights(dist, tmp_path, monkeypatch):
    _cut_run(tmp_path, dist, monkeypatch, hardware={"zero_stage": 2})
    last = tmp_path / "checkpoints" / "last"
    assert sorted(p.name for p in last.iterdir()) == [
        "config.yaml",
        "model.safetensors",
        "optimizer.rank0.pt",
        "rng.rank0.pt",
        "trainer_state.json",
    ]
    weights = load_file(str(last / "model.safetensors"))
    assert "tower.weight" not in weights and "head.0.weight" in weights  # frozen parts left out
    rng = torch.load(last / "rng.rank0.pt", weights_only=True)
    assert isinstance(rng["python"], str) and isinstance(rng["numpy"], str)
    with torch.serialization.safe_globals(ckpt_mod._safe_globals()):
        torch.load(last / "optimizer.rank0.pt", weights_only=True)
    assert OmegaConf.load(last / "config.yaml").hardware.zero_stage == 2


def test_kill_during_write_keeps_previous_checkpoint(dist, tmp_path, monkeypatch):
    """Fault: the process dies while a checkpoint is being written, and between the two
    renames that put a finished write in place."""
    from bita.engine.checkpoint import resume_source

    _cut_run(tmp_path, dist, monkeypatch)  # saves at steps 2, 4 (+ epoch end), 6
    last = tmp_path / "checkpoints" / "last"
    before = _weights(tmp_path)

    def die(*args, **kwargs):
        raise _Crash

    monkeypatch.setattr(ckpt_mod, "_write_main_files", die)
    with pytest.raises(_Crash):
        run_toy(tmp_path, dist)
    monkeypatch.undo()
    assert resume_source(last.parent, "auto") == last
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 6
    for name, value in _weights(tmp_path).items():
        assert torch.equal(value, before[name])
    # A kill after `last` moved to `previous`, before the new one took its place.
    previous = last.parent / "previous"
    previous.rename(last.parent / ".last.old")
    last.rename(previous)
    assert resume_source(last.parent, "auto") == last.parent / "previous"
    _, result = run_toy(tmp_path, dist)
    assert result.step == 8


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "trainer_state.json": lambda last: (last / "trainer_state.json").unlink(),
    "model.safetensors": lambda last: _truncate(last / "model.safetensors"),
    "optimizer.rank0.pt": lambda last: _truncate(last / "optimizer.rank0.pt"),
}


@pytest.mark.parametrize("damaged", sorted(DAMAGE))
def test_damaged_last_is_refused_by_name_and_previous_resumes(damaged, dist, tmp_path, monkeypatch):
    """Fault: `checkpoints/last` loses trainer_state.json, or model.safetensors or
    optimizer.rank0.pt is truncated, after it was written (full disk, bad copy)."""
    _, full = run_toy(tmp_path / "full", dist)
    reference = load_file(str(tmp_path / "full/checkpoints/last/model.safetensors"))
    _cut_run(tmp_path / "cut", dist, monkeypatch)
    last = tmp_path / "cut/checkpoints/last"
    DAMAGE[damaged](last)
    kept = {p.name: p.read_bytes() for p in last.iterdir()}
    with pytest.raises(Exception) as refused:
        run_toy(tmp_path / "cut", dist)
    message = str(refused.value)
    assert str(last / damaged) in message, message
    assert "train.resume=previous" in message and "train.resume=never" in message
    assert {p.name: p.read_bytes() for p in last.iterdir()} == kept  # not overwritten

    _, resumed = run_toy(tmp_path / "cut", dist, resume="previous")
    assert resumed.step == full.step == 8
    for name, value in load_file(str(last / "model.safetensors")).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)


def test_best_and_final_last_are_models_only_and_share_their_bytes(dist, tmp_path):
    """Disk use: `best` carries no optimizer or RNG state, a finished stage's `last` no
    optimizer state, `previous` goes when the stage ends, and a `best` taken at the final
    step is stored once for both folders."""
    _, result = run_toy(
        tmp_path,
        dist,
        on_epoch_end=lambda epoch: {"score": float(epoch)},  # the final epoch is best
        select_metric="score",
    )
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "last"]
    best, last = checkpoints / "best", checkpoints / "last"
    assert sorted(p.name for p in best.iterdir()) == [
        "config.yaml",
        "model.safetensors",
        "trainer_state.json",
    ]
    assert not (last / "optimizer.rank0.pt").exists() and (last / "rng.rank0.pt").exists()
    assert (best / "model.safetensors").stat().st_ino == (last / "model.safetensors").stat().st_ino
    # Running the finished command again trains nothing and keeps the final checkpoint.
    _, again = run_toy(tmp_path, dist, on_epoch_end=lambda epoch: {"score": 0.0})
    assert again.step == result.step == 8 and not (checkpoints / "previous").exists()


def test_kill_during_validation_resumes_at_the_validation(dist, tmp_path, monkeypatch):
    """Fault: the process dies while the epoch's validation runs; the resumed run validates
    that epoch again without retraining it and ends on the uninterrupted run's weights."""
    trainer, _ = run_toy(tmp_path / "full", dist, save_every_steps=0, on_epoch_end=lambda e: {})
    reference = model_state(trainer.model)
    validated: list[int] = []

    def crash_in_second_validation(epoch):
        if epoch == 1 and not validated:
            validated.append(epoch)
            raise _Crash
        return {}

    with pytest.raises(_Crash):
        run_toy(tmp_path / "cut", dist, save_every_steps=0, on_epoch_end=crash_in_second_validation)
    import engine_toy

    events = []
    monkeypatch.setattr(engine_toy, "toy_batches", lambda *a: logged(toy_batches(*a), events))
    trainer, result = run_toy(
        tmp_path / "cut", dist, save_every_steps=0, on_epoch_end=lambda e: events.append(e) or {}
    )
    assert events == [1] and result.step == 8  # validated epoch 1, trained nothing again
    for name, value in model_state(trainer.model).items():
        assert torch.equal(value, reference[name]), name


class _AssetModel(ToyModel):
    """Exports a vocabulary file the saved config must point at."""

    def export_assets(self, folder: Path) -> dict[str, str]:
        folder.mkdir(parents=True)
        (folder / "vocab.txt").write_text("a b c")
        return {"model.vocab": "assets/vocab.txt"}


def test_load_model_builds_from_saved_config(dist, tmp_path, monkeypatch):
    import engine_toy

    monkeypatch.setattr(engine_toy, "ToyModel", _AssetModel)
    trainer, _ = run_toy(tmp_path, dist, epochs=1)
    built = []

    def builder(cfg):
        built.append(cfg)
        torch.manual_seed(123)  # different init: the weights must come from the checkpoint
        return ToyModel()

    model, cfg = load_model(tmp_path / "checkpoints" / "last", builder=builder)
    assert built[0] is cfg and cfg.optim.lr == pytest.approx(1e-2)
    assert Path(cfg.model.vocab).read_text() == "a b c"
    assert not model.training
    for name, value in model_state(trainer.model).items():
        assert torch.equal(model.checkpoint_state_dict()[name], value)
    with pytest.raises(FileNotFoundError, match="not a bita checkpoint"):
        load_model(tmp_path, builder=builder)
