"""`init_from=CHECKPOINT`: the model a checkpoint describes, and a stage started from it.

A checkpoint folder describes its model (`config.yaml`, the trained tokenizer and LM in
`assets/`), so a stage started from one by hand builds that model, whatever the composed
defaults say: `python -m bita.run stage=scst dataset=rsicd init_from=.../checkpoints/best`
needs no `experiment=` or `llm.tokenizer=`. What the command itself sets wins where it does
not change what the weights mean (dtypes, dropout, trainability); a setting that does, and
differs from the checkpoint's, is an error naming both values.

Loading is strict: a trainable tensor the checkpoint lacks would silently start from scratch,
so it is an error naming it (`init_from_strict=false` allows it, with a warning), except for
parts the checkpoint's model did not have at all (the LM projection that stage 2 adds to a
stage-1 model).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from bita.engine.checkpoint import read_checkpoint_config, read_weights
from bita.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_SECTIONS = ("encoder", "qformer", "llm", "model")
# Settings that change how the checkpoint's model runs or trains, not what its weights mean.
FREE_KEYS = (
    "*.dtype",
    "*.dropout",
    "*.in_checkpoint",
    "llm.trainable",
    "encoder.orientations",
    "qformer.init_from",
    "model.*label_smoothing",
    "model.temp_*",
)
SHOWN = 20  # missing tensors named in a message


def model_from_checkpoint(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """`cfg` with its model sections taken from the `init_from` checkpoint's config.

    `overrides` are the command's own (Hydra's task overrides, e.g. `llm.trainable=true` or
    `qformer=ift_small`); values an experiment or a default brings do not count. A command
    value of null leaves the checkpoint's value in place."""
    if not cfg.get("init_from"):
        return cfg
    source = Path(str(cfg.init_from))
    saved = read_checkpoint_config(source)
    commanded = _command_leaves(cfg, overrides)
    merged = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    conflicts: list[str] = []
    with open_dict(merged):
        for section in (s for s in MODEL_SECTIONS if saved.get(s) is not None):
            own = OmegaConf.create(OmegaConf.to_container(saved[section], resolve=True))
            for key in sorted(k for k in commanded if k.split(".")[0] == section):
                conflicts += _apply_command_value(own, key, _value(cfg, key), saved)
            merged[section] = own
    if conflicts:
        raise ConfigError(
            f"init_from={source}: the command's model differs from the checkpoint's: "
            f"{'; '.join(conflicts)}. Drop those overrides to use the checkpoint's model"
        )
    log.info("init_from=%s: %s taken from its config.yaml", source, "/".join(MODEL_SECTIONS))
    return merged


def _apply_command_value(own: DictConfig, key: str, value: Any, saved: DictConfig) -> list[str]:
    """Put the command's `value` for `key` into the checkpoint's section `own`, or return the
    conflict it makes."""
    relative = key.split(".", 1)[1]
    found, theirs = _lookup(saved, key)
    if value is None or (found and value == theirs):
        return []
    if found and not any(fnmatchcase(key, pattern) for pattern in FREE_KEYS):
        return [f"{key}={_shown(value)} on the command, {_shown(theirs)} in the checkpoint"]
    OmegaConf.update(own, relative, value, force_add=True)
    return []


def _command_leaves(cfg: DictConfig, overrides: Sequence[str]) -> set[str]:
    """Dotted keys of the model-section values the command sets (a group choice such as
    `llm=small` sets every value of its section)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    leaves: set[str] = set()
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.split(".")[0] in MODEL_SECTIONS and not override.is_delete():
            leaves.update(_leaves(cfg, key))
    return leaves


def _leaves(cfg: DictConfig, key: str) -> Iterable[str]:
    node = OmegaConf.select(cfg, key)
    if not isinstance(node, DictConfig):
        return [key]
    return [leaf for child in node for leaf in _leaves(cfg, f"{key}.{child}")]


def _lookup(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    sentinel = object()
    value = OmegaConf.select(cfg, key, default=sentinel)
    return (False, None) if value is sentinel else (True, _plain(value))


def _value(cfg: DictConfig, key: str) -> Any:
    return _plain(OmegaConf.select(cfg, key))


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)


def load_init_weights(
    model: nn.Module, source: str | Path, trainable: Iterable[str], *, strict: bool, stage: str
) -> None:
    """Load `source`'s weights into `model`, whose trainable tensors are `trainable`.

    A trainable tensor the checkpoint lacks is an error naming it, unless `strict` is false
    or the checkpoint holds nothing of its part (a part its model did not have)."""
    report = model.load_checkpoint_state_dict(read_weights(source))
    parts = {name.split(".")[0] for name in report.loaded}
    missing = sorted(set(report.missing) & set(trainable))
    new_parts = sorted({n.split(".")[0] for n in missing} - parts)
    lacking = [n for n in missing if n.split(".")[0] in parts]
    if new_parts:
        log.info("stage %s: %s start fresh (init_from=%s had none)", stage, new_parts, source)
    if lacking:
        more = f" and {len(lacking) - SHOWN} more" if len(lacking) > SHOWN else ""
        shown = ", ".join(lacking[:SHOWN]) + more
        message = (
            f"init_from={source} lacks {len(lacking)} tensors that stage {stage} trains, which "
            f"would start from scratch: {shown}"
        )
        if strict:
            raise ConfigError(f"{message} (init_from_strict=false allows it)")
        log.warning("%s (init_from_strict=false)", message)
    log.info("stage %s: started from %s (%d tensors loaded)", stage, source, len(report.loaded))
