"""Every config group option and every experiment composes, and what it describes builds."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from bita.engine.deepspeed_config import deepspeed_config
from bita.models.build import count_parameters
from bita.stages.pipeline import effective_config, recipe_for, stage_sequence

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("encoder", "qformer", "llm", "dataset", "stage", "hardware", "schedule", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def check_buildable(cfg) -> None:
    """Build the model on the meta device (paper scale costs nothing) and each stage's engine."""
    parts = OmegaConf.to_container(cfg, resolve=True)
    parts["llm"]["config"].setdefault("vocab_size", 1024)
    counts = count_parameters(parts)
    assert all(n > 0 for n in counts.values())
    for stage_cfg in stage_sequence(cfg):
        eff = effective_config(cfg, stage_cfg, {}, None)
        assert callable(recipe_for(eff.stage))
        if "train" in stage_cfg:
            ds = deepspeed_config(eff.hardware, eff.train, world_size=1)
            assert ds["train_batch_size"] == eff.train.global_batch_size


@pytest.mark.parametrize("group", GROUPS)
def test_every_file_starts_with_a_comment_naming_its_command(group):
    for name in options(group):
        first = (CONF / group / f"{name}.yaml").read_text().splitlines()
        line = first[1] if first[0] == "# @package _global_" else first[0]
        names_command = "python" in line or "-m bita.run" in line
        assert line.startswith("# ") and names_command, f"{group}/{name}.yaml: {line!r}"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_builds(experiment):
    cfg = composed(f"experiment={experiment}")
    assert cfg.name == experiment
    check_buildable(cfg)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS[:-1] for o in options(g)])
def test_every_group_option_composes_and_builds(group, option):
    # multi-GPU presets need a batch that their micro-batch divides: use the paper's
    base = "experiment=paper_pretrain1" if group == "hardware" else "experiment=tiny"
    cfg = composed(base, f"{group}={option}")
    check_buildable(cfg)


def test_the_papers_first_command_composes():
    cfg = composed("stage=pretrain1", "dataset=all")
    assert cfg.stage.name == "pretrain1" and [s.name for s in cfg.dataset.sources] == [
        "ucm",
        "rsicd",
        "nwpu",
    ]


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as err:
        composed("encoder=resnet50")
    assert "clip_vit_l14" in str(err.value) and "effnet_lite0" in str(err.value)


def test_offline_rsicd_runs_scst_after_fine_tuning_with_its_trainables():
    stage = composed("experiment=offline_rsicd").stage
    assert list(stage.order[-3:]) == ["finetune", "scst", "evaluate"]
    assert stage.recipes.scst.recipe == "self_critical"
    assert list(stage.recipes.scst.trainable) == list(stage.recipes.finetune.trainable)
    assert "llm.*" in stage.recipes.scst.trainable
