"""The type and valid range of every option that has one, checked when a run's config is
composed, before any model is built or any tracking run is opened.

Hydra checks the shape of the config (which options exist); it cannot know that
`train.max_steps` must be a whole number of at least 1 or that `optim.lr` must be positive.
Without these checks `train.max_steps=0` trained a whole epoch, `-5` trained nothing and
saved untrained weights, `2.7` became 2, and `optim.lr=abc` failed deep inside the optimizer
with a traceback naming no option. Every problem found is reported at once, by its key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from bita.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What one option accepts: a kind (`int`, `float`, `bool`, `choice`, `pair`, `scales`),
    bounds (`low` inclusive, `above` exclusive, `high` inclusive, `below` exclusive), the
    `choices` of a `choice`, and whether null is allowed."""

    kind: str
    low: float | None = None
    above: float | None = None
    high: float | None = None
    below: float | None = None
    choices: tuple = ()
    null: bool = False

    def expected(self) -> str:
        """The accepted values in words, for the error message."""
        if self.kind == "choice":
            words = "one of " + ", ".join("null" if c is None else str(c) for c in self.choices)
        elif self.kind == "bool":
            words = "true or false"
        elif self.kind == "pair":
            words = "two numbers in [0, 1), e.g. [0.9,0.999]"
        elif self.kind == "scales":
            words = "a mapping of parameter-name patterns to multipliers >= 0"
        else:
            words = ("an integer" if self.kind == "int" else "a number") + self._bounds()
        return words + (" or null" if self.null and self.kind != "choice" else "")

    def _bounds(self) -> str:
        bounds = ((">=", self.low), (">", self.above), ("<=", self.high), ("<", self.below))
        parts = [f"{sign} {bound:g}" for sign, bound in bounds if bound is not None]
        return " " + " and ".join(parts) if parts else ""

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.null or (self.kind == "choice" and None in self.choices)
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "pair":
            return _is_list(value) and len(value) == 2 and all(_in_unit(v) for v in value)
        if self.kind == "scales":
            return _is_mapping(value) and all(_is_number(v) and v >= 0 for v in value.values())
        if not (_is_number(value) if self.kind == "float" else _is_int(value)):
            return False
        return (
            (self.low is None or value >= self.low)
            and (self.above is None or value > self.above)
            and (self.high is None or value <= self.high)
            and (self.below is None or value < self.below)
        )


def integer(low: int | None = None, high: int | None = None, *, null: bool = False) -> Rule:
    return Rule("int", low=low, high=high, null=null)


def number(
    low: float | None = None,
    *,
    above: float | None = None,
    high: float | None = None,
    below: float | None = None,
    null: bool = False,
) -> Rule:
    return Rule("float", low=low, above=above, high=high, below=below, null=null)


def one_of(*choices: Any) -> Rule:
    return Rule("choice", choices=choices)


FLAG = Rule("bool")

# Options of the root config (and of the sections every run has; `decode` is checked by
# bita.eval.decoding.DecodeSettings, which the caption command shares).
ROOT = {
    "seed": integer(),
    "augment": FLAG,
    "init_from_strict": FLAG,
    "features.views": integer(1),
    "features.batch_size": integer(1),
    "features.max_shard_images": integer(1),
    "features.max_shard_mb": number(above=0),
    "features.activations": one_of("tokens", "cut"),
    "encoder.adapt_blocks": integer(0),
    "model.embed_dim": integer(1),
    "model.max_text_tokens": integer(1),
    "model.max_lm_tokens": integer(1),
    "model.label_smoothing": number(0, below=1),
    "model.lm_label_smoothing": number(0, below=1),
    "model.temp_init": number(above=0),
    "model.retrieval.key": one_of("tower_mean", "caption_aligned"),
    "eval.gallery_size": integer(0),
    "eval.allow_missing": FLAG,
    "hardware.accelerator": one_of("auto", "cpu", "cuda"),
    "hardware.zero_stage": integer(0, 3),
    "hardware.precision": one_of("fp32", "bf16", "fp16"),
    "hardware.autocast": one_of(None, "bf16", "fp16"),
    "hardware.micro_batch_size": integer(1, null=True),
    "hardware.gradient_clipping": number(above=0, null=True),
    "hardware.num_workers": integer(0),
    "hardware.num_threads": integer(1, null=True),
    "hardware.peak_tflops": number(above=0, null=True),
    "llm.tokenizer_vocab_size": integer(1),
    "qformer.num_queries": integer(1),
    "qformer.num_layers": integer(1),
    "qformer.cross_attention_every": integer(1),
    "qformer.dropout": number(0, below=1),
    "tracking.enabled": FLAG,
}

# A stage's schedule: its own `train`/`optim` values, or root values that override them all
# (null at the root means "the stage decides").
SCHEDULE = {
    "train.epochs": integer(1, null=True),
    "train.max_steps": integer(1, null=True),
    "train.global_batch_size": integer(1, null=True),
    "train.resume": one_of("auto", "never", "previous"),
    "train.log_every": integer(1),
    "train.save_every_steps": integer(0),
    "train.max_bad_steps": integer(0),
    "optim.lr": number(above=0, null=True),
    "optim.end_lr": number(0, null=True),
    "optim.warmup_steps": integer(0, null=True),
    "optim.weight_decay": number(0),
    "optim.betas": Rule("pair"),
    "optim.lr_scales": Rule("scales", null=True),
}

# Options inside one stage config (`stage.*` or `stage.recipes.NAME.*`).
STAGE = {
    **SCHEDULE,
    "batch_by_image": FLAG,
    "uses_llm": FLAG,
    "cached_activations": one_of("tokens", "cut"),
    "tokenizer_vocab_size": integer(1),
    "self_critical.samples_per_image": integer(2),
    "self_critical.max_new_tokens": integer(1),
    "self_critical.min_new_tokens": integer(0),
    "self_critical.temperature": number(above=0),
}

# What a training stage cannot run without, once root and stage values are merged.
REQUIRED = (
    "train.epochs",
    "train.global_batch_size",
    "optim.lr",
    "optim.end_lr",
    "optim.warmup_steps",
)


def problems(cfg: Any, rules: Mapping[str, Rule], prefix: str = "") -> list[str]:
    """`key=value: expected ...` for every option of `cfg` that breaks its rule (absent
    options are left to their defaults); `prefix` is where `cfg` sits in the run config."""
    found = []
    for key, rule in rules.items():
        present, value = _lookup(cfg, key)
        if present and not rule.accepts(value):
            found.append(f"{prefix}{key}={_shown(value)}: expected {rule.expected()}")
    return found


def missing_required(cfg: Any, where: str) -> list[str]:
    """The schedule options a training stage needs that neither the stage nor the root sets."""
    return [
        f"{key} is not set for stage {where} (set it in the stage config or as {key}=...)"
        for key in REQUIRED
        if _lookup(cfg, key)[1] is None
    ]


def check_schedule(train: Mapping, optim: Mapping) -> None:
    """The `train` and `optim` sections one trainer runs with (library entry, no Hydra)."""
    found = problems({"train": train, "optim": optim}, SCHEDULE)
    found += missing_required({"train": train, "optim": optim}, "being trained")
    if found:
        raise ConfigError("; ".join(found))


def _lookup(cfg: Any, key: str) -> tuple[bool, Any]:
    node = cfg
    for part in key.split("."):
        if not _is_mapping(node) or part not in node:
            return False, None
        node = node[part]
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=True)
    return True, node


def _shown(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def _is_mapping(value: Any) -> bool:
    return isinstance(value, Mapping | DictConfig)


def _is_list(value: Any) -> bool:
    return isinstance(value, list | tuple | ListConfig)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _in_unit(value: Any) -> bool:
    return _is_number(value) and 0 <= value < 1
