"""Warm-up + cosine by optimizer step, and the weight-decay / lr-scale grouping."""

import math

import pytest
import torch
from torch import nn

from bita.engine.schedule import WarmupCosine, build_optimizer, build_scheduler, param_groups

OPTIM = {"lr": 1e-4, "end_lr": 1e-5, "weight_decay": 0.05, "betas": [0.9, 0.999], "warmup_steps": 4}


def test_warmup_cosine_values():
    fn = WarmupCosine(warmup=4, total=14, end_ratio=0.1)
    assert [fn(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert fn(4) == pytest.approx(1.0)
    assert fn(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert fn(14) == pytest.approx(0.1)
    assert fn(20) == pytest.approx(0.1)  # past the end: stays at end_lr


def test_scheduler_steps_lr_from_peak_to_end():
    model = nn.Linear(3, 3)
    opt = build_optimizer(model, OPTIM)
    sched = build_scheduler(opt, OPTIM, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.5e-5)
    assert lrs[3] == pytest.approx(1e-4)
    assert max(lrs) == pytest.approx(1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))


def test_weight_decay_only_on_matrices_and_lr_scales():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    model[2].requires_grad_(False)
    groups = param_groups(model, {**OPTIM, "lr_scales": {"1.*": 10.0}})
    by_names = {tuple(g["names"]): (g["weight_decay"], g["lr"]) for g in groups}
    assert by_names == {
        ("0.weight",): (0.05, 1e-4),
        ("0.bias",): (0.0, 1e-4),
        ("1.weight", "1.bias"): (0.0, 1e-3),
    }


def test_bad_settings_name_the_option():
    with pytest.raises(ValueError, match="optim.end_lr"):
        build_scheduler(
            torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1), {**OPTIM, "end_lr": 1}, 5
        )
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, OPTIM)
