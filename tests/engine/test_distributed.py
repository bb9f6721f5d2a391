"""Launcher-agnostic process set-up."""

import os

import torch

from bita.engine.distributed import strip_launcher_args


def test_strip_launcher_args_keeps_hydra_argv(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # recorded, so teardown restores the original
    monkeypatch.delenv("LOCAL_RANK")
    argv = ["bita.run", "--local_rank=3", "stage=pretrain1", "--local-rank", "3", "x=1"]
    assert strip_launcher_args(argv) == ["bita.run", "stage=pretrain1", "x=1"]
    assert os.environ["LOCAL_RANK"] == "3"


def test_single_process_defaults(dist):
    assert (dist.rank, dist.local_rank, dist.world_size) == (0, 0, 1)
    assert dist.device == torch.device("cpu") and dist.is_main
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    assert torch.distributed.get_backend() == "gloo"
