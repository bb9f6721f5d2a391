"""The engine on one CUDA GPU (run by tools/gpu_check.sh): DeepSpeed with bf16 autocast, as
`hardware=gpu` trains, stopped and resumed from its last checkpoint, must end where an
uninterrupted run ends, so the GPU's RNG, the optimizer state and the schedule round-trip."""

import subprocess

import pytest
import torch
from engine_toy import kill_after_step, read_final, toy_command, toy_env

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _command(run_dir, zero: int, *extra: str) -> list[str]:
    args = ("--accelerator", "cuda", "--autocast", "bf16", "--zero", str(zero), *extra)
    return toy_command(run_dir, *args)


@pytest.mark.parametrize("zero", [0, 2])
def test_bf16_run_killed_and_resumed_on_cuda_ends_like_an_uninterrupted_one(tmp_path, zero):
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    env = toy_env("cuda")
    killed_at = kill_after_step(_command(cut, zero, "--sleep", "0.05"), env, cut, 3)
    for run_dir in (cut, whole):
        subprocess.run(_command(run_dir, zero), env=env, check=True, timeout=120)
    resumed, expected = read_final(cut), read_final(whole)
    assert 3 <= killed_at < resumed["step"] == expected["step"] == 12
    for name, want in expected["weights"].items():
        got = torch.tensor(resumed["weights"][name])
        assert torch.allclose(got, torch.tensor(want), rtol=0, atol=1e-6), name
