"""The run config of a preset, the tokenizers the bench trains for it, and the precision policy
both stacks share."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bita.models.llm import train_caption_tokenizer

from .presets import CAPTIONS, Preset

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def bench_tokenizers(folder: Path) -> dict[str, str]:
    """Tokenizers trained on CAPTIONS, as config overrides.

    Why: the tiny/small caption LMs get theirs from the `lm` stage, and the paper ones come from
    the hub, which a GPU machine may not reach. Random weights need no particular vocabulary;
    what matters for speed is the token count (ITC pads to a fixed length; the LM sees about one
    token per word, as with OPT's BPE) and the embedding sizes, which stay those of the config."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(CAPTIONS, WordPieceTrainer(special_tokens=specials))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(folder / "ift")
    train_caption_tokenizer(CAPTIONS, vocab_size=1024, out_dir=folder / "lm")
    return {"qformer.tokenizer": str(folder / "ift"), "llm.tokenizer": str(folder / "lm")}


def compose_config(preset: Preset, tokenizers: dict[str, str]) -> DictConfig:
    """The run config for `preset`, composed from conf/ the way `python -m bita.run` does."""
    from hydra import compose, initialize_config_dir

    # the presets' own settings: no dataset x stage schedule (the default run's demo_pipeline)
    overrides = ["~schedule", *(f"{group}={option}" for group, option in preset.groups.items())]
    overrides += list(preset.overrides)
    overrides += [f"{key}={value}" for key, value in tokenizers.items()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="bench"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(cfg):
        llm_arch = cfg.llm.setdefault("config", {})
        if not llm_arch.get("vocab_size"):
            # the vocabulary the lm stage would train, so the LM head has its real size
            llm_arch.vocab_size = _lm_vocab_size(cfg)
    return cfg


def _lm_vocab_size(cfg: DictConfig) -> int:
    for key in ("llm.tokenizer_vocab_size", "stage.recipes.lm.tokenizer_vocab_size"):
        value = OmegaConf.select(cfg, key)
        if value:
            return int(value)
    raise ValueError(
        "bench: the LM config has no vocab_size and no tokenizer_vocab_size "
        "(llm.tokenizer_vocab_size or the lm stage's) to size its embeddings"
    )


def stage_patterns(cfg: DictConfig, stage: str) -> list[str]:
    """The trainable fnmatch patterns of conf/stage/<stage>.yaml."""
    patterns = OmegaConf.select(cfg, f"stage.recipes.{stage}.trainable")
    if patterns is None:
        path = CONF_DIR / "stage" / f"{stage}.yaml"
        patterns = OmegaConf.load(path).get("trainable")
        if patterns is None:
            raise ValueError(f"{path}: no `trainable` list")
    return list(patterns)


@dataclass(frozen=True)
class Precision:
    """The trainer's precision policy (`hardware.precision`, `hardware.autocast`)."""

    cast: torch.dtype | None  # every parameter cast to this (DeepSpeed bf16/fp16), or None
    autocast: torch.dtype | None

    @classmethod
    def from_cfg(cls, hardware: DictConfig) -> Precision:
        names = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}
        precision, autocast = hardware.get("precision", "fp32"), hardware.get("autocast")
        if precision not in names or autocast not in names:
            raise ValueError(
                f"hardware.precision={precision!r} / hardware.autocast={autocast!r}: "
                "expected fp32, bf16 or fp16 (autocast may be null)"
            )
        return cls(names[precision], names[autocast])

    def context(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    @property
    def name(self) -> str:
        cast = str(self.cast or torch.float32).removeprefix("torch.")
        return cast + (
            f"+autocast:{str(self.autocast).removeprefix('torch.')}" if self.autocast else ""
        )
