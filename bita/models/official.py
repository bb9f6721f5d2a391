"""The BITA authors' released checkpoints (LAVIS `.pth`, SPEC §6) ↔ this project's names.

The authors' files hold only trainable parameters under LAVIS names (`Fformer.bert.…`,
`opt_proj.…`; their earlier code named the module `IFformer.`, read the same way). Three
things in them have no counterpart in BITA and are dropped with a logged note: the unused MLM
head `Fformer.cls.…`, BERT's `position_ids` buffer, and the stage-1 `itm_head` (Linear 768 → 2:
their IFT defines an image–text matching head that no loss uses but that is never frozen, so
LAVIS saves it). Any other key that does not map is an error listing it, so a layout change
can never load silently into nothing (the authors' `strict=False` defect).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_MODULE = "Fformer."  # the released files' name of the IFT module
_OLD_MODULE = "IFformer."  # its name in the authors' earlier code
_BERT = _MODULE + "bert."
_DROPPED = (
    re.compile(r"Fformer\.cls\..*"),
    re.compile(r"Fformer\.bert\.embeddings\.position_ids"),
    re.compile(r"itm_head\..*"),
)

# (ours, theirs) name patterns; `{n}` is a layer index, the rest is literal
_TOP = [
    ("query_tokens", "query_tokens"),
    ("temp", "temp"),
    ("ln_vision.", "ln_vision."),
    ("vision_proj.", "vision_proj."),
    ("text_proj.", "text_proj."),
    ("llm_proj.", "opt_proj."),
    ("ift.embeddings.word.", _BERT + "embeddings.word_embeddings."),
    ("ift.embeddings.position.", _BERT + "embeddings.position_embeddings."),
    ("ift.embeddings.norm.", _BERT + "embeddings.LayerNorm."),
]
_LAYER = [
    ("fourier_norm.", "fourier.output.LayerNorm."),
    ("cross_attn.query.", "crossattention.self.query."),
    ("cross_attn.key.", "crossattention.self.key."),
    ("cross_attn.value.", "crossattention.self.value."),
    ("cross_attn.out.", "crossattention.output.dense."),
    ("cross_attn.norm.", "crossattention.output.LayerNorm."),
    ("text_ffn.up.", "intermediate.dense."),
    ("text_ffn.down.", "output.dense."),
    ("text_ffn.norm.", "output.LayerNorm."),
    ("query_ffn.up.", "intermediate_query.dense."),
    ("query_ffn.down.", "output_query.dense."),
    ("query_ffn.norm.", "output_query.LayerNorm."),
]
_OURS_LAYER = re.compile(r"ift\.layers\.(\d+)\.(.*)")
_THEIRS_LAYER = re.compile(re.escape(_BERT) + r"encoder\.layer\.(\d+)\.(.*)")


def _rename(rest: str, table: list[tuple[str, str]], reverse: bool) -> str | None:
    for ours, theirs in table:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if rest == src or (src.endswith(".") and rest.startswith(src)):
            return dst + rest[len(src) :]
    return None


def to_official_name(name: str) -> str | None:
    match = _OURS_LAYER.fullmatch(name)
    if match:
        rest = _rename(match[2], _LAYER, reverse=False)
        return None if rest is None else f"{_BERT}encoder.layer.{match[1]}.{rest}"
    return _rename(name, _TOP, reverse=False)


def from_official_name(name: str) -> str | None:
    match = _THEIRS_LAYER.fullmatch(name)
    if match:
        rest = _rename(match[2], _LAYER, reverse=True)
        return None if rest is None else f"ift.layers.{match[1]}.{rest}"
    return _rename(name, _TOP, reverse=True)


def _current_module_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the earlier `IFformer.` prefix renamed to the released `Fformer.`; a file
    holding both is refused (which of the two IFTs would load is unknowable)."""
    old = [k for k in state if k.startswith(_OLD_MODULE)]
    if old and any(k.startswith(_MODULE) for k in state):
        raise ValueError(
            f"official checkpoint holds both {_MODULE!r} and {_OLD_MODULE!r} keys "
            f"(e.g. {old[0]!r}): expected one IFT module"
        )
    return {(_MODULE + k[len(_OLD_MODULE) :] if k in old else k): v for k, v in state.items()}


def from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Authors' state dict → ours. Keys with no BITA counterpart other than the MLM head,
    `position_ids` and `itm_head` (dropped, with a logged note) are an error."""
    state = _current_module_names(state)
    dropped = sorted(k for k in state if any(p.fullmatch(k) for p in _DROPPED))
    if dropped:
        log.info(
            "official checkpoint: dropped %d tensors BITA does not use (the MLM head, the "
            "unused stage-1 ITM head, position ids): %s",
            len(dropped),
            dropped,
        )
    kept = {k: v for k, v in state.items() if k not in dropped}
    converted = _renamed(
        kept, from_official_name, "official checkpoint keys with no counterpart in BITA"
    )
    if not converted:
        raise ValueError("official checkpoint: no key matched the BITA layout")
    return converted


def to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our checkpoint state dict → the authors' layout (BITA's own parts only: the frozen tower
    and LM are not in their files). Any other key is an error."""
    return _renamed(state, to_official_name, "keys with no counterpart in the official layout")


def _renamed(
    state: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], unknown_message: str
) -> dict[str, torch.Tensor]:
    """`state` under new names; keys `rename` cannot map are an error that lists them all."""
    converted, unknown = {}, []
    for key, value in state.items():
        new_name = rename(key)
        if new_name is None:
            unknown.append(key)
        else:
            converted[new_name] = value
    if unknown:
        raise KeyError(f"{unknown_message}: {sorted(unknown)}")
    return converted


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The `model` state dict of a LAVIS `.pth` (or a bare state dict), read weights-only."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a LAVIS checkpoint with a 'model' state dict")
    return dict(state)
