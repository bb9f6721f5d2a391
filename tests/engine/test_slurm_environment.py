"""A job of Hydra's submitit launcher gets its torch.distributed ranks from SLURM's variables."""

import os

from bita.engine.distributed import adopt_submitit_environment

LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _slurm_task(monkeypatch, procid: int, localid: int) -> dict[str, str]:
    for name in LAUNCHER_VARS:  # recorded, so the test leaves the environment as it found it
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "16",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NODEID": str(procid // 8),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
    }
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    adopt_submitit_environment()
    return {name: os.environ[name] for name in LAUNCHER_VARS}


def test_ranks_and_master_come_from_slurm(monkeypatch):
    first = _slurm_task(monkeypatch, procid=9, localid=1)
    assert first["RANK"] == "9" and first["LOCAL_RANK"] == "1" and first["WORLD_SIZE"] == "16"
    assert first["MASTER_ADDR"] == "gpu07"  # the job's first node runs rank 0
    assert first["LOCAL_WORLD_SIZE"] == "8" and 20000 <= int(first["MASTER_PORT"]) <= 60000
    other = _slurm_task(monkeypatch, procid=0, localid=0)
    assert other["MASTER_PORT"] == first["MASTER_PORT"]  # every task of the job agrees


def test_a_launchers_rank_wins(monkeypatch):
    """torchrun inside a SLURM allocation sets RANK itself: nothing is overwritten."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    adopt_submitit_environment()
    assert os.environ["RANK"] == "3" and os.environ["WORLD_SIZE"] == "4"
