"""How the pipeline orders stages and merges root overrides into each stage's config."""

import pytest
from omegaconf import OmegaConf

from bita.engine.distributed import strip_launcher_args
from bita.stages.pipeline import effective_config, recipe_for, stage_sequence


def _cfg(**root):
    base = {
        "init_from": None,
        "optim": {"lr": None, "end_lr": None, "weight_decay": 0.05},
        "train": {"epochs": None, "resume": "auto"},
        "stage": {
            "name": "pipeline",
            "order": ["a", "b"],
            "recipes": {
                "a": {
                    "name": "a",
                    "recipe": "pretrain1",
                    "optim": {"lr": 1e-4, "end_lr": 1e-5},
                    "train": {"epochs": 5},
                },
                "b": {
                    "name": "b",
                    "recipe": "pretrain2",
                    "optim": {"lr": 1e-5, "end_lr": 0.0},
                    "train": {"epochs": 50},
                },
            },
        },
    }
    return OmegaConf.merge(base, root)


def test_order_follows_stage_order():
    assert [s.name for s in stage_sequence(_cfg())] == ["a", "b"]


def test_single_stage_runs_itself():
    cfg = _cfg()
    cfg.stage = cfg.stage.recipes.a
    assert [s.name for s in stage_sequence(cfg)] == ["a"]


def test_unknown_stage_in_order_is_named():
    cfg = _cfg(stage={"order": ["a", "zzz"]})
    with pytest.raises(ValueError, match="zzz"):
        stage_sequence(cfg)


def test_stage_values_apply_unless_root_sets_them():
    cfg = _cfg(optim={"lr": 3e-4})
    eff_a = effective_config(cfg, cfg.stage.recipes.a, {}, None)
    eff_b = effective_config(cfg, cfg.stage.recipes.b, {"llm.pretrained": "/x"}, "/ckpt")
    assert (
        eff_a.optim.lr == 3e-4 and eff_a.optim.end_lr == 1e-5 and eff_a.optim.weight_decay == 0.05
    )
    assert eff_b.optim.lr == 3e-4 and eff_b.optim.end_lr == 0.0 and eff_b.train.epochs == 50
    assert eff_b.llm.pretrained == "/x" and eff_b.init_from == "/ckpt" and eff_b.stage.name == "b"


def test_root_lr_scales_reach_every_stage():
    unset = effective_config(_cfg(optim={"lr_scales": None}), _cfg().stage.recipes.a, {}, None)
    assert "lr_scales" not in unset.optim
    cfg = _cfg(optim={"lr_scales": {"llm.*": 0.25}})
    for name in ("a", "b"):
        eff = effective_config(cfg, cfg.stage.recipes[name], {}, None)
        assert dict(eff.optim.lr_scales) == {"llm.*": 0.25}


def test_recipe_module_is_found_by_name():
    cfg = _cfg()
    assert callable(recipe_for(cfg.stage.recipes.a))
    with pytest.raises(ValueError, match="no module bita.stages.nothing"):
        recipe_for(OmegaConf.create({"name": "x", "recipe": "nothing"}))


def test_deepspeed_local_rank_is_stripped(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # recorded, so teardown restores the original
    monkeypatch.delenv("LOCAL_RANK")  # unset, so stripping moves the flag's value into it
    argv = ["bita.run", "--local_rank=1", "stage=pretrain1", "--local_rank", "2", "dataset=all"]
    assert strip_launcher_args(argv) == ["bita.run", "stage=pretrain1", "dataset=all"]
