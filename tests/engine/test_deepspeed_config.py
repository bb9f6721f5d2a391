"""hardware/train → DeepSpeed config: accumulation from the global batch, precision, merges."""

from pathlib import Path

import pytest

from bita.engine.deepspeed_config import batch_layout, deepspeed_config

HW = {"zero_stage": 2, "precision": "fp32", "micro_batch_size": 4, "gradient_clipping": 1.0}


def test_accumulation_derived_from_global_batch():
    cfg = deepspeed_config(HW, {"global_batch_size": 32}, world_size=2)
    assert cfg["train_batch_size"] == 32
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["gradient_clipping"] == 1.0
    assert "bf16" not in cfg and "fp16" not in cfg


def test_null_micro_batch_means_no_accumulation():
    layout = batch_layout({**HW, "micro_batch_size": None}, {"global_batch_size": 16}, 2)
    assert (layout.micro_batch_size, layout.grad_accum) == (8, 1)


def test_indivisible_batch_names_the_options():
    with pytest.raises(
        ValueError, match=r"train.global_batch_size=30.*hardware.micro_batch_size=4"
    ):
        batch_layout(HW, {"global_batch_size": 30}, 2)


def test_precision_autocast_and_passthrough():
    hw = {
        **HW,
        "precision": "bf16",
        "autocast": "bf16",
        "deepspeed": {"zero_optimization": {"overlap_comm": True}, "seed": 3},
    }
    cfg = deepspeed_config(hw, {"global_batch_size": 8}, 1)
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert cfg["seed"] == 3
    with pytest.raises(ValueError, match="hardware.precision"):
        deepspeed_config({**HW, "precision": "fp8"}, {"global_batch_size": 8}, 1)
    with pytest.raises(ValueError, match="hardware.zero_stage"):
        deepspeed_config({**HW, "zero_stage": 4}, {"global_batch_size": 8}, 1)


@pytest.mark.parametrize("preset", ["cpu", "gpu", "gpu_zero2", "gpu_zero3", "multinode"])
def test_hardware_presets_compose_into_deepspeed_configs(preset, tmp_path):
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[2] / "conf"
    (tmp_path / "root.yaml").write_text("defaults:\n  - hardware: cpu\n  - _self_\n")
    (tmp_path / "hardware").symlink_to(conf / "hardware")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        hardware = compose("root", overrides=[f"hardware={preset}"]).hardware
    assert hardware.accelerator in ("cpu", "cuda")
    for world in (1, 4):
        cfg = deepspeed_config(hardware, {"global_batch_size": 384}, world)
        assert cfg["train_batch_size"] == 384
