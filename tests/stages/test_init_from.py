"""`init_from`: a stage builds the checkpoint's model (not the composed defaults), a command
value that changes it is named with both values, and a trainable tensor the checkpoint lacks
is an error unless allowed."""

import logging
import shutil
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from safetensors.torch import load_file, save_file

from bita.engine.checkpoint import read_checkpoint_config
from bita.stages.common import build_stage_model
from bita.stages.context import StageContext
from bita.stages.pipeline import effective_config, stage_sequence

CONF = Path(__file__).resolve().parents[2] / "conf"
MODEL_SECTIONS = ("encoder", "qformer", "llm", "model")


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _without(checkpoint: Path, folder: Path, pattern: str) -> Path:
    """A copy of `checkpoint` whose weights lack the tensors matching `pattern`."""
    copy = shutil.copytree(checkpoint, folder / "checkpoint")
    weights = load_file(str(copy / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not fnmatchcase(k, pattern)}
    assert len(kept) < len(weights)
    save_file(kept, str(copy / "model.safetensors"))
    return copy


def _stage(checkpoint: Path, stage: str, stage_dir: Path, **root) -> StageContext:
    """The stage's context as a run from `checkpoint` sees it: the checkpoint's model sections
    (taken here by hand, so the loading rules are tested on their own)."""
    cfg = composed(f"stage={stage}", f"init_from={checkpoint}")
    saved = read_checkpoint_config(checkpoint)
    with open_dict(cfg):
        for section in MODEL_SECTIONS:
            cfg[section] = saved[section]
        cfg.update(root)
    eff = effective_config(cfg, stage_sequence(cfg)[0], {}, str(checkpoint))
    return StageContext(eff, stage_dir, None, None)


def test_trainable_tensors_the_checkpoint_lacks_are_named_unless_allowed(
    tiny_checkpoint, tmp_path, caplog
):
    """Fault: an init_from checkpoint without some of the stage's trainable tensors (layer 0's
    cross-attention), which started them from scratch with an INFO count only."""
    lacking = _without(tiny_checkpoint, tmp_path, "ift.layers.0.cross_attn.*")
    with pytest.raises(ValueError, match=r"lacks 10 tensors.*ift\.layers\.0\.cross_attn\.key"):
        build_stage_model(_stage(lacking, "finetune", tmp_path / "strict"))
    with caplog.at_level(logging.WARNING):
        build_stage_model(_stage(lacking, "finetune", tmp_path / "lax", init_from_strict=False))
    assert "ift.layers.0.cross_attn.key.weight" in caplog.text


def test_stage_two_starts_the_lm_projection_a_stage_one_model_never_had(
    tiny_checkpoint, tmp_path, caplog
):
    """The stage-1 -> stage-2 hand-over: stage 1 builds no LM, so its checkpoint has no
    `llm_proj` (nor LM weights, which come from the LM's own folder)."""
    stage_one = _without(tiny_checkpoint, tmp_path, "llm*")
    with caplog.at_level(logging.INFO):
        build_stage_model(_stage(stage_one, "pretrain2", tmp_path / "stage2"))
    assert "['llm_proj'] start fresh" in caplog.text


def test_the_checkpoints_model_replaces_the_composed_one(tiny_checkpoint):
    """A stage started by hand from a checkpoint builds the checkpoint's model and its
    trained LM, whatever the command's experiment composes; run-time settings may differ."""
    from bita.stages.init_from import model_from_checkpoint

    overrides = [
        "experiment=tiny",
        "stage=scst",
        f"init_from={tiny_checkpoint}",
        "llm.trainable=true",
    ]
    cfg = model_from_checkpoint(composed(*overrides), overrides)
    saved = read_checkpoint_config(tiny_checkpoint)
    assert composed(*overrides).model.embed_dim == 32 and cfg.model.embed_dim == 256
    assert cfg.llm.tokenizer == saved.llm.tokenizer == str(tiny_checkpoint / "assets/llm")
    assert cfg.llm.trainable is True and saved.llm.trainable is False


def test_a_command_value_that_changes_the_checkpoints_model_names_both(tiny_checkpoint):
    from bita.errors import ConfigError
    from bita.stages.init_from import model_from_checkpoint

    overrides = ["stage=scst", f"init_from={tiny_checkpoint}", "qformer.num_queries=4"]
    with pytest.raises(ConfigError, match="qformer.num_queries=4 on the command, 8 in the"):
        model_from_checkpoint(composed(*overrides), overrides)
