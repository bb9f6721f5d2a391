"""Checkpoint round trips per ZeRO stage, atomic writes, safe loading and load_model."""

import json
from pathlib import Path

import pytest
import torch
from engine_toy import ToyModel, run_toy, toy_batches
from omegaconf import OmegaConf
from safetensors.torch import load_file

import bita.engine.checkpoint as ckpt_mod
from bita.engine.checkpoint import load_model, model_state, resume_path


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


def test_files_load_safely_and_config_sits_beside_weights(dist, tmp_path):
    run_toy(tmp_path, dist, hardware={"zero_stage": 2}, epochs=1)
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
    run_toy(tmp_path, dist, epochs=1)
    last = tmp_path / "checkpoints" / "last"
    before = _weights(tmp_path)

    def die(*args, **kwargs):
        raise _Crash

    monkeypatch.setattr(ckpt_mod, "_write_main_files", die)
    with pytest.raises(_Crash):
        run_toy(tmp_path, dist, epochs=2)
    assert resume_path(last) == last
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 4
    for name, value in _weights(tmp_path).items():
        assert torch.equal(value, before[name])
    # A half-finished rename (old moved away, new not yet in place) falls back to `.last.old`.
    last.rename(last.parent / ".last.old")
    assert resume_path(last) == last.parent / ".last.old"


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
