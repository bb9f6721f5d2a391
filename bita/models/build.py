"""Build BITA (or its parts) from the `encoder`, `qformer`, `llm` and `model` config sections."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bita.models.bita import BITA, LMAssets, ModelSettings
from bita.models.encoders import build_image_encoder
from bita.models.ift import IFT, IFTConfig, init_from_bert
from bita.models.llm import build_prefix_lm, load_pretrained_model, load_tokenizer

DECODER_BOS = "[DEC]"
_MIXERS = {"ift": "fourier", "blip2": "attention"}


def ift_config(cfg: Mapping[str, Any], encoder_width: int) -> IFTConfig:
    """IFT architecture from the `qformer` section; the vocabulary is the base tokenizer's
    `vocab_size` plus the `[DEC]` token."""
    kind = cfg.get("kind")
    if kind not in _MIXERS:
        raise ValueError(f"qformer.kind={kind!r}: expected one of {sorted(_MIXERS)}")
    if not cfg.get("vocab_size"):
        raise ValueError("qformer.vocab_size is required (the tokenizer's base vocabulary)")
    derived = {"mixer", "encoder_width"}  # from `kind` and from the image tower
    allowed = {f.name for f in fields(IFTConfig)} - derived | {"kind", "init_from", "tokenizer"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"qformer: unknown keys {unknown}; expected some of {sorted(allowed)}")
    return IFTConfig.from_cfg(
        cfg,
        vocab_size=int(cfg["vocab_size"]) + 1,
        encoder_width=encoder_width,
        mixer=_MIXERS[kind],
    )


def build_qformer(cfg: Mapping[str, Any], encoder_width: int) -> tuple[IFT, Any]:
    """The IFT (weights from `init_from` when set) and its WordPiece tokenizer plus `[DEC]`."""
    config = ift_config(cfg, encoder_width)
    tokenizer = load_tokenizer(cfg["tokenizer"], "qformer.tokenizer")
    tokenizer.add_special_tokens({"bos_token": DECODER_BOS})
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"qformer.tokenizer={cfg['tokenizer']!r} has {len(tokenizer)} tokens with [DEC]; "
            f"qformer.vocab_size={cfg['vocab_size']} (+1 for [DEC]) is too small"
        )
    bert = _bert_state(cfg["init_from"]) if cfg.get("init_from") else None
    ift = IFT(config)
    if bert is not None:
        init_from_bert(ift, bert, cfg["init_from"])
    return ift, tokenizer


def _bert_state(spec: str) -> dict[str, torch.Tensor]:
    bert = load_pretrained_model(
        spec,
        "qformer.init_from",
        "BERT weights",
        "A hub name such as bert-base-uncased needs network access once (or a copy in the "
        "Hugging Face cache); offline, point init_from at a local BERT-family folder.",
    )
    return bert.state_dict()


def _is_project_trained(spec: str | None) -> bool:
    """Random init or a plain local folder: nothing a later machine could re-fetch by name."""
    if not spec:
        return True
    return ":" not in spec.split("/")[0] and Path(spec).is_dir()


def build_model(cfg: Mapping[str, Any], *, with_llm: bool = True) -> BITA:
    """BITA from a config with sections `encoder`, `qformer`, `llm`, `model`. Stages that never
    touch the LM (stage 1) skip building it with `with_llm=False` or `llm: null`."""
    encoder = build_image_encoder(cfg["encoder"])
    ift, tokenizer = build_qformer(cfg["qformer"], encoder.width)
    llm_cfg = cfg.get("llm") or {}
    llm = build_prefix_lm(llm_cfg) if with_llm and llm_cfg else None
    return BITA(
        encoder,
        ift,
        tokenizer,
        llm,
        ModelSettings.from_cfg(cfg["model"]),
        encoder_in_checkpoint=bool(cfg["encoder"].get("in_checkpoint", False)),
        lm_assets=LMAssets(
            export=_is_project_trained(llm_cfg.get("pretrained")),
            in_checkpoint=bool(llm_cfg.get("in_checkpoint", False)),
        ),
    )


def count_parameters(cfg: Mapping[str, Any]) -> dict[str, int]:
    """Parameter counts of the parts, built with random weights on the meta device (no
    memory, no downloads): lets paper-scale sizes be checked on any machine."""
    from transformers import OPTConfig, OPTForCausalLM

    with torch.device("meta"):
        encoder = build_image_encoder({**cfg["encoder"], "pretrained": None, "weights": None})
        ift = IFT(ift_config(cfg["qformer"], encoder.width))
        llm = OPTForCausalLM(OPTConfig(**cfg["llm"]["config"]))
    query_path = ("embeddings.norm.", ".fourier_norm.", ".cross_attn.", ".query_ffn.")
    hidden = ift.config.hidden_size
    return {
        "encoder": _numel(encoder),
        "ift_query_path": ift.config.num_queries * hidden
        + sum(p.numel() for n, p in ift.named_parameters() if any(k in n for k in query_path)),
        "ift_total": _numel(ift) + ift.config.num_queries * hidden,
        "llm": _numel(llm),
    }


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
