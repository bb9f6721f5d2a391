"""Training and captioning throughput of BITA beside transformers' BLIP-2 at the same sizes.

Users ask how fast it trains before anything else (issue 6), and a number alone says little:
so one process builds our model from the Hydra config groups and transformers'
`Blip2ForConditionalGeneration` at the same sizes (image tower width/depth, query-module
width/depth/queries, the same OPT), feeds both the same random images and captions, and times
them the same way: warm-up iterations, then the median of timed ones (synchronised on CUDA).

Phases (images/s):
  pretrain1  our stage-1 step (ITC): forward + backward + AdamW on the stage's trainable params
  pretrain2  our stage-2 step (prefix LM) and BLIP-2's (frozen tower and LM, Q-Former trains)
  pretrain2_cached  our stage-2 step reading the frozen tower's fp16 output as the feature
             cache (tools/cache_features.py) serves it, so the tower does not run; beside
             BLIP-2's stage-2 step again (it has no such cache): what a user of each gets
  caption    beam 5, exactly `--new-tokens` new tokens (min = max), from pixels to text: our
             beam loop (decode.beam_loop=bita: beams share the visual-prefix cache; on CUDA each
             token's step replays a CUDA graph) beside BLIP-2's `generate`
  caption_eager  ours, the same loop with decode.cuda_graph=false (CUDA only)
  caption_transformers  ours through transformers' beam search (decode.beam_loop=transformers):
             what the loop itself gains, same model, same captions

    python tools/bench.py --preset tiny                                   # seconds, CPU
    python tools/bench.py --preset small                                  # EfficientNet-Lite0, CPU
    python tools/bench.py --preset paper --device cuda --json bench.json  # ViT-L/14, OPT-2.7B
    python tools/bench.py --preset small --profile profile.txt            # where the time goes

Weights are random at paper scale (no downloads) and tokenizers are trained on the bench's own
captions, so it runs offline anywhere. Precision follows the `hardware` config group the trainer
uses (parameter dtypes per component, autocast), applied to both stacks alike. The last line of
stdout is one JSON object with every figure (also written to `--json`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from bita.models.build import build_model
from bita.models.llm import train_caption_tokenizer
from bita.models.trainable import set_trainable

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PHASES = (
    "pretrain1",
    "pretrain2",
    "pretrain2_cached",
    "caption",
    "caption_eager",
    "caption_transformers",
)
# our captioning phases besides "caption", and the decode settings that make each
CAPTION_LOOPS = {
    "caption_eager": {"beam_loop": "bita", "cuda_graph": False},
    "caption_transformers": {"beam_loop": "transformers"},
}
IGNORE_INDEX = -100
BEAMS = 5
Step = Callable[[], None]

# Remote-sensing-like captions, as long as the longer RSICD ones: the padded LM text is then
# about 30 tokens, the length gpu_reference.py feeds its stacks.
CAPTIONS = (
    "many buildings and some green trees are around a playground with a red track and a green "
    "football field in the middle of a dense residential area",
    "several large white storage tanks stand in rows beside a wide road next to some factory "
    "buildings with grey roofs and a few green trees",
    "a long bridge crosses a wide river with dark green water and many cars are on the bridge "
    "while some boats are parked near the bank",
    "an airport with two long runways and several planes parked near the terminal building "
    "surrounded by bare land and some roads",
    "dense green trees surround a small pond with dark water and a narrow road passes near it "
    "with several houses on the other side",
    "many cars are parked in neat rows in a large parking lot beside a commercial building with "
    "a flat white roof and some trees",
    "a baseball field with a brown diamond is located next to several tennis courts and a "
    "parking lot surrounded by green trees and houses",
    "a harbour with many white boats moored along the piers is next to a road lined with "
    "buildings and a few green trees",
    "a church with a tall tower and a grey roof stands in a square surrounded by old buildings "
    "and several narrow streets with some cars",
    "the farmland is divided into many rectangular fields of different colours with a few "
    "houses and a small road crossing them",
    "a railway station with several parallel tracks and long platforms lies beside a large "
    "building and a road with many cars",
    "some sparse trees and bushes are scattered over the yellow bare desert with a few dunes "
    "and a narrow path winding through the sand",
    "a large stadium with a green football field and red seats is surrounded by parking lots "
    "roads and many tall buildings in a city",
    "white waves break on a long sandy beach next to the blue sea and a row of buildings with "
    "a road runs along the coast",
    "an industrial area with many large factories with blue and white roofs is crossed by "
    "roads and has some bare land and trees",
    "a meandering river flows through a green forest with dense trees and a small bridge "
    "crosses the river near a few houses",
)


@dataclass(frozen=True)
class Preset:
    """One benchmark size: config groups, per-phase batch sizes, iteration counts, targets.

    `targets` maps a figure's key in the JSON (`ours.<phase>` in images/s or
    `ratio.<phase>` = ours/theirs) to the minimum the issue asks for."""

    groups: dict[str, str]
    overrides: tuple[str, ...]
    device: str
    batch: dict[str, int]
    warmup: int
    iters: int
    targets: dict[str, float]
    reference: dict[str, float] = field(default_factory=dict)


def caption_batches(size: int) -> dict[str, int]:
    return {"caption": size, **dict.fromkeys(CAPTION_LOOPS, size)}


def cpu_preset(**groups: str) -> Preset:
    """A CPU preset at equal sizes for both stacks; target: stage 2 at 1.5x BLIP-2's speed."""
    return Preset(
        groups={**groups, "hardware": "cpu"},
        overrides=(),
        device="cpu",
        batch={"pretrain1": 16, "pretrain2": 16, "pretrain2_cached": 16, **caption_batches(8)},
        warmup=1,
        iters=3,
        targets={"ratio.pretrain2": 1.5},
    )


PRESETS = {
    "tiny": cpu_preset(encoder="tiny", qformer="tiny", llm="tiny"),
    "small": cpu_preset(encoder="effnet_lite0", qformer="ift_small", llm="small"),
    "paper": Preset(
        groups={
            "encoder": "clip_vit_l14",
            "qformer": "ift_base",
            "llm": "opt_2.7b",
            "hardware": "gpu",
        },
        # random weights: nothing to download, and the GPU machine is offline
        overrides=("encoder.pretrained=null", "qformer.init_from=null", "llm.pretrained=null"),
        device="cuda",
        batch={"pretrain1": 256, "pretrain2": 64, "pretrain2_cached": 64, **caption_batches(32)},
        warmup=2,
        iters=5,
        targets={"ours.pretrain1": 2000.0, "ours.pretrain2": 700.0, "ours.caption": 250.0},
        # transformers' stacks on one H100, bf16 (../shared/bench/gpu_reference.py)
        reference={"pretrain2": 423.0, "caption": 72.5},
    ),
}


# ---------------------------------------------------------------- configuration and tokenizers


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

    overrides = [f"{group}={option}" for group, option in preset.groups.items()]
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


# ---------------------------------------------------------------- precision


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


# ---------------------------------------------------------------- models


def build_ours(
    cfg: DictConfig, device: torch.device, precision: Precision, with_llm: bool
) -> nn.Module:
    """Our model as the stage builds it (stage 1 without the LM), created on `device`."""
    model_cfg = cfg.copy()
    if not with_llm:
        with open_dict(model_cfg):
            model_cfg.llm = None
    with torch.device(device):
        model = build_model(model_cfg)
    model.to(device)
    if precision.cast is not None:
        model.to(precision.cast)
    return model


@dataclass(frozen=True)
class TheirSpec:
    """What BLIP-2 needs to match our sizes, read off our built model."""

    vision: dict[str, Any] | None  # Blip2VisionConfig kwargs, or None: share our (non-ViT) tower
    tower: nn.Module | None
    tower_dtype: torch.dtype
    qformer: dict[str, Any]
    num_queries: int
    text: dict[str, Any]
    lm_dtype: torch.dtype
    image_token: int


def their_spec(ours: nn.Module) -> TheirSpec:
    ift = ours.ift.config
    vit = _open_clip_vit(ours.encoder)
    lm_config = ours.llm.model.config.to_dict()
    vocab = lm_config["vocab_size"]
    image_token = len(ours.llm.tokenizer)  # an id no caption token uses
    if image_token >= vocab:
        lm_config["vocab_size"] = image_token + 1
    return TheirSpec(
        vision=None if vit is None else _vision_config(vit),
        tower=ours.encoder if vit is None else None,
        tower_dtype=ours.encoder.dtype,
        qformer={
            "hidden_size": ift.hidden_size,
            "num_hidden_layers": ift.num_layers,
            "num_attention_heads": ift.num_heads,
            "intermediate_size": ift.intermediate_size,
            "encoder_hidden_size": ours.encoder.width,
            "max_position_embeddings": ift.max_position_embeddings,
            "hidden_dropout_prob": ift.dropout,
            "attention_probs_dropout_prob": ift.dropout,
            "layer_norm_eps": ift.layer_norm_eps,
        },
        num_queries=ift.num_queries,
        text=lm_config,
        lm_dtype=next(ours.llm.parameters()).dtype,
        image_token=image_token,
    )


def _open_clip_vit(encoder: nn.Module) -> nn.Module | None:
    from open_clip.transformer import VisionTransformer

    return next((m for m in encoder.modules() if isinstance(m, VisionTransformer)), None)


def _vision_config(vit: nn.Module) -> dict[str, Any]:
    block = vit.transformer.resblocks[0]
    return {
        "hidden_size": vit.transformer.width,
        "intermediate_size": block.mlp.c_fc.out_features,
        "num_hidden_layers": len(vit.transformer.resblocks),
        "num_attention_heads": block.attn.num_heads,
        "patch_size": vit.patch_size[0],
        "image_size": vit.image_size[0],
    }


class SharedTower(nn.Module):
    """Our frozen tower behind BLIP-2's vision-model interface, for towers that are no ViT
    (EfficientNet): BLIP-2 has no such tower, and sharing ours keeps the image work equal."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        tokens = self.tower(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens[:, 0])


def _placeholder_vision(width: int) -> dict[str, Any]:
    """The smallest ViT BLIP-2 accepts at our tower's width (BLIP-2 takes the Q-Former's
    cross-attention width from it); built only to be replaced by a SharedTower."""
    return {
        "hidden_size": width,
        "intermediate_size": 1,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "patch_size": 14,
        "image_size": 14,
    }


def build_theirs(spec: TheirSpec, device: torch.device, precision: Precision) -> nn.Module:
    """`Blip2ForConditionalGeneration` at our sizes, with the same precision policy: frozen tower
    and LM in our components' dtypes, the Q-Former in fp32 (BLIP-2's own `_keep_in_fp32`)."""
    config = transformers.Blip2Config(
        vision_config=spec.vision or _placeholder_vision(spec.qformer["encoder_hidden_size"]),
        qformer_config=spec.qformer,
        text_config=spec.text,
        num_query_tokens=spec.num_queries,
        image_token_index=spec.image_token,
    )
    config.image_token_id = spec.image_token
    with torch.device(device):
        blip = transformers.Blip2ForConditionalGeneration(config)
    if spec.vision is None:
        blip.vision_model = SharedTower(spec.tower)
    blip.to(device)
    blip.vision_model.to(spec.tower_dtype).requires_grad_(False)
    blip.language_model.to(spec.lm_dtype).requires_grad_(False)
    if precision.cast is not None:
        blip.to(precision.cast)
    return blip


# ---------------------------------------------------------------- the timed work


@dataclass
class Inputs:
    images: torch.Tensor
    captions: list[str]


def make_inputs(batch: int, size: int, device: torch.device, seed: int = 0) -> Inputs:
    """Random normalised images of the tower's size and captions drawn from CAPTIONS."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    rng = random.Random(seed)
    return Inputs(images, [rng.choice(CAPTIONS) for _ in range(batch)])


def train_step(
    loss_fn: Callable[[], torch.Tensor],
    params: list[nn.Parameter],
    device: torch.device,
    precision: Precision,
) -> Step:
    """Forward + backward + AdamW step on `params` (the only trainable ones)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with precision.context(device):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def our_train_step(
    model: nn.Module,
    objective: str,
    inputs: Inputs,
    device: torch.device,
    precision: Precision,
    *,
    cached: bool = False,
) -> Step:
    """`cached`: the step reads the tower's output stored as fp16, as from the feature cache."""
    batch = {
        "caption": inputs.captions,
        "image_id": [f"bench_{i}" for i in range(len(inputs.captions))],
    }
    if cached:
        with torch.no_grad(), precision.context(device):
            batch["features"] = model.encode_images(inputs.images).half()
    else:
        batch["image"] = inputs.images
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return train_step(lambda: model(batch, objective=objective)["loss"], params, device, precision)


def their_train_step(
    blip: nn.Module,
    lm_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    inputs: Inputs,
    spec: TheirSpec,
    device: torch.device,
    precision: Precision,
) -> Step:
    """BLIP-2's stage-2 step on the same captions, tokenised by our LM tokenizer beforehand
    (BLIP-2's processor does that in the data loader; ours tokenises inside forward)."""
    ids, mask, labels = lm_batch
    rows, queries = ids.shape[0], spec.num_queries
    input_ids = torch.cat([torch.full((rows, queries), spec.image_token), ids], 1).to(device)
    attention = torch.cat([torch.ones(rows, queries, dtype=mask.dtype), mask], 1).to(device)
    targets = torch.cat([torch.full((rows, queries), IGNORE_INDEX), labels], 1).to(device)
    blip.train()
    params = [p for p in blip.parameters() if p.requires_grad]

    def loss() -> torch.Tensor:
        out = blip(
            pixel_values=inputs.images,
            input_ids=input_ids,
            attention_mask=attention,
            labels=targets,
        )
        return out.loss

    return train_step(loss, params, device, precision)


def our_caption(
    model: nn.Module,
    inputs: Inputs,
    new_tokens: int,
    device: torch.device,
    precision: Precision,
    **loop: Any,
) -> Step:
    """Our captioning; `loop` = `decode.beam_loop` / `decode.cuda_graph` (default: the config's)."""
    model.eval()

    def run() -> None:
        with torch.no_grad(), precision.context(device):
            model.generate(
                model.image_tokens(images=inputs.images),
                prompt="",
                num_beams=BEAMS,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                length_penalty=1.0,
                repetition_penalty=1.0,
                do_sample=False,
                top_p=1.0,
                temperature=1.0,
                **loop,
            )

    return run


def their_caption(
    blip: nn.Module, inputs: Inputs, new_tokens: int, device: torch.device, precision: Precision
) -> Step:
    blip.eval()

    def run() -> None:
        with torch.no_grad(), precision.context(device):
            blip.generate(
                pixel_values=inputs.images,
                num_beams=BEAMS,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )

    return run


# ---------------------------------------------------------------- FLOPs (MFU)


@dataclass(frozen=True)
class FlopShape:
    """Parameter counts and token counts the FLOPs estimate needs, read off a built model.

    The estimate is `BITA.flops_per_sample`'s: 2 FLOPs per multiply-add of the dense layers,
    backward = 2 x forward, frozen tower forward only, frozen LM forward + backward to its
    inputs (4 x), attention scores and FFTs left out."""

    tower: int
    image_tokens: int
    per_query: int
    per_image_token: int
    queries: int
    proj: int
    lm: int
    lm_tokens: int


def _count(module: nn.Module, pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(p.numel() for n, p in module.named_parameters() if regex.search(n))


def our_flop_shape(model: nn.Module) -> FlopShape:
    cfg = model.ift.config
    return FlopShape(
        tower=sum(p.numel() for p in model.encoder.parameters()),
        image_tokens=model.encoder.num_tokens,
        per_query=_count(model.ift, r"\.(query_ffn|self_attn)\.|\.cross_attn\.(query|out)\."),
        per_image_token=_count(model.ift, r"\.cross_attn\.(key|value)\."),
        queries=cfg.num_queries,
        proj=model.llm_proj.weight.numel(),
        lm=sum(p.numel() for p in model.llm.parameters()),
        lm_tokens=cfg.num_queries + model.settings.max_lm_tokens,
    )


def their_flop_shape(blip: nn.Module, ours: FlopShape) -> FlopShape:
    """The same counts for BLIP-2: its Q-Former self-attention and query FFNs run per query,
    cross-attention (every second layer) keys/values per image token; text FFNs stay idle."""
    qformer = blip.qformer
    return FlopShape(
        tower=sum(p.numel() for p in blip.vision_model.parameters()),
        image_tokens=ours.image_tokens,
        per_query=_count(
            qformer,
            r"\.layer\.\d+\.(attention|intermediate_query|output_query)\."
            r"|\.crossattention\.(attention\.query|output)\.",
        ),
        per_image_token=_count(qformer, r"\.crossattention\.attention\.(key|value)\."),
        queries=ours.queries,
        proj=blip.language_projection.weight.numel(),
        lm=sum(p.numel() for p in blip.language_model.parameters()),
        lm_tokens=ours.lm_tokens,
    )


def _query_path_flops(s: FlopShape) -> float:
    return (
        2 * (s.per_query * s.queries + s.per_image_token * s.image_tokens) + 2 * s.proj * s.queries
    )


def lm_step_flops(s: FlopShape, *, tower: bool = True) -> float:
    """Training FLOPs per image of a stage-2 step (frozen LM, not trainable); `tower=False`
    for a step reading cached tower features."""
    tower_flops = 2 * s.tower * s.image_tokens if tower else 0
    return tower_flops + 3 * _query_path_flops(s) + 4 * s.lm * s.lm_tokens


def caption_flops(s: FlopShape, beams: int, new_tokens: int) -> float:
    """Forward FLOPs per captioned image: tower, queries, the prefix and bos once, then one
    token per beam per step."""
    return (
        2 * s.tower * s.image_tokens
        + _query_path_flops(s)
        + 2 * s.lm * (s.queries + 1 + beams * new_tokens)
    )


# ---------------------------------------------------------------- running and reporting


class Bench:
    """Times phases, the stacks interleaved call by call (ours, theirs, ours, ...) so that load
    from other processes on a shared CPU falls on both alike. A failure is recorded and the
    rest still runs, so limited GPU time still yields every figure it can. With `profile`, one
    more call per side and phase runs under torch.profiler, and its busiest operators are
    appended to that file: where the time of a step goes. On CUDA the profiler stays attached
    after it ends (pytorch/pytorch#144455): on the H200, captioning timed after a profile ran
    10 and 21 % slower than in a run without one, so figures come from runs without it."""

    def __init__(self, device: torch.device, warmup: int, iters: int, profile: Path | None = None):
        self.device, self.warmup, self.iters, self.profile = device, warmup, iters, profile
        self.rates: dict[str, dict[str, float]] = {"ours": {}, "theirs": {}}
        self.errors: dict[str, str] = {}

    def measure(self, phase: str, batch: int, makers: dict[str, Callable[[], Step]]) -> None:
        """Images/s of each side's step: `warmup` untimed calls, then the median of `iters`."""
        calls = {}
        for side, make in makers.items():
            try:
                calls[side] = make()
            except Exception as err:  # noqa: BLE001 - recorded in the report, run continues
                self._fail(side, phase, err)
        times: dict[str, list[float]] = {side: [] for side in calls}
        for i in range(self.warmup + self.iters):
            for side in list(calls):
                try:
                    seconds = self._seconds(calls[side])
                except Exception as err:  # noqa: BLE001
                    self._fail(side, phase, err)
                    del calls[side]
                    continue
                if i >= self.warmup:
                    times[side].append(seconds)
        for side in calls:
            self.rates[side][phase] = batch / statistics.median(times[side])
            print(f"  {side:6s} {phase:9s} {self.rates[side][phase]:10.1f} img/s", file=sys.stderr)
            if self.profile:
                self._profile(side, phase, calls[side])

    def _profile(self, side: str, phase: str, step: Step) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        try:
            with profile(activities=activities) as prof:
                self._seconds(step)
            sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
        except Exception as err:  # noqa: BLE001 - a profile is extra; the figures stand
            self._fail(side, f"{phase}.profile", err)
            return
        with self.profile.open("a") as out:
            out.write(f"## {side} {phase}\n{table}\n")

    def _seconds(self, step: Step) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _fail(self, side: str, phase: str, err: Exception) -> None:
        traceback.print_exc()
        self.errors[f"{side}.{phase}"] = repr(err)[:300]


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Settings:
    """One benchmark run as asked on the command line."""

    preset_name: str
    device: torch.device
    batch: dict[str, int]
    warmup: int
    iters: int
    new_tokens: int
    peak_tflops: float
    profile: Path | None = None

    @property
    def preset(self) -> Preset:
        return PRESETS[self.preset_name]


def run(settings: Settings) -> dict[str, Any]:
    """Build, time and report every phase; see the module docstring."""
    device, batch, new_tokens = settings.device, settings.batch, settings.new_tokens
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    load_before = os.getloadavg()[0]
    bench = Bench(device, settings.warmup, settings.iters, settings.profile)
    flops: dict[str, dict[str, float]] = {"ours": {}, "theirs": {}}
    with tempfile.TemporaryDirectory(prefix="bita-bench-") as tmp:
        cfg = compose_config(settings.preset, bench_tokenizers(Path(tmp)))
        precision = Precision.from_cfg(cfg.hardware)

        ours = build_ours(cfg, device, precision, with_llm=False)
        set_trainable(ours, stage_patterns(cfg, "pretrain1"))
        size = ours.preprocess.size
        flops["ours"]["pretrain1"] = ours.flops_per_sample("itc")
        itc = make_inputs(batch["pretrain1"], size, device)
        bench.measure(
            "pretrain1",
            batch["pretrain1"],
            {"ours": partial(our_train_step, ours, "itc", itc, device, precision)},
        )
        del ours
        release(device)

        ours = build_ours(cfg, device, precision, with_llm=True)
        set_trainable(ours, stage_patterns(cfg, "pretrain2"))
        spec = their_spec(ours)
        theirs = build_theirs(spec, device, precision)
        shape = our_flop_shape(ours)
        their_shape = their_flop_shape(theirs, shape)
        flops["ours"]["pretrain2"] = ours.flops_per_sample("lm")
        flops["theirs"]["pretrain2"] = lm_step_flops(their_shape)
        flops["ours"]["pretrain2_cached"] = lm_step_flops(shape, tower=False)
        flops["theirs"]["pretrain2_cached"] = flops["theirs"]["pretrain2"]
        for side, s in (("ours", shape), ("theirs", their_shape)):
            flops[side]["caption"] = caption_flops(s, BEAMS, new_tokens)
        for phase in CAPTION_LOOPS:
            flops["ours"][phase] = flops["ours"]["caption"]

        lm = make_inputs(batch["pretrain2"], size, device)
        lm_batch = ours.llm.tokenize_captions(lm.captions, "", ours.settings.max_lm_tokens)
        bench.measure(
            "pretrain2",
            batch["pretrain2"],
            {
                "ours": partial(our_train_step, ours, "lm", lm, device, precision),
                "theirs": partial(their_train_step, theirs, lm_batch, lm, spec, device, precision),
            },
        )
        bench.measure(
            "pretrain2_cached",
            batch["pretrain2_cached"],
            {
                "ours": partial(our_train_step, ours, "lm", lm, device, precision, cached=True),
                "theirs": partial(their_train_step, theirs, lm_batch, lm, spec, device, precision),
            },
        )
        captions = make_inputs(batch["caption"], size, device)
        bench.measure(
            "caption",
            batch["caption"],
            {
                "ours": partial(our_caption, ours, captions, new_tokens, device, precision),
                "theirs": partial(their_caption, theirs, captions, new_tokens, device, precision),
            },
        )
        for phase, loop in CAPTION_LOOPS.items():
            if loop.get("cuda_graph") is False and device.type != "cuda":
                continue  # without CUDA there is no graph to leave out: "caption" measured it
            step = partial(our_caption, ours, captions, new_tokens, device, precision, **loop)
            bench.measure(phase, batch[phase], {"ours": step})
        del ours, theirs
        release(device)

    result = report(settings, precision, bench, flops, lm_tokens=lm_batch[0].shape[1])
    result["cpu_load_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def report(
    settings: Settings,
    precision: Precision,
    bench: Bench,
    flops: dict[str, dict[str, float]],
    lm_tokens: int,
) -> dict[str, Any]:
    """The JSON result: images/s per side and phase, ratios, FLOPs, MFU on CUDA, targets."""
    device, preset = settings.device, settings.preset
    ours, theirs = bench.rates["ours"], bench.rates["theirs"]
    ratio = {p: ours[p] / theirs[p] for p in PHASES if p in ours and p in theirs}
    result: dict[str, Any] = {
        "bench": "bita",
        "preset": settings.preset_name,
        "device": device.type,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "precision": precision.name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "warmup": settings.warmup,
        "iters": settings.iters,
        "batch": settings.batch,
        "new_tokens": settings.new_tokens,
        "lm_text_tokens": lm_tokens,
        "ours": _rounded(ours),
        "theirs": _rounded(theirs),
        "ratio": _rounded(ratio, 3),
        "gflops_per_image": {
            side: {k: float(f"{v / 1e9:.4g}") for k, v in f.items()} for side, f in flops.items()
        },
    }
    if device.type == "cuda":
        peak = settings.peak_tflops * 1e12
        result["peak_tflops"] = settings.peak_tflops
        result["mfu"] = {
            side: _rounded({p: flops[side][p] * rate / peak for p, rate in rates.items()}, 4)
            for side, rates in bench.rates.items()
        }
    figures = {
        **{f"ours.{k}": v for k, v in ours.items()},
        **{f"ratio.{k}": v for k, v in ratio.items()},
    }
    result["targets"] = preset.targets
    result["met"] = {
        key: key in figures and figures[key] >= goal for key, goal in preset.targets.items()
    }
    if preset.reference:
        result["reference"] = preset.reference
    if bench.errors:
        result["errors"] = bench.errors
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else []
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def _rounded(values: dict[str, float], digits: int = 1) -> dict[str, float]:
    return {k: round(v, digits) for k, v in values.items()}


def table(result: dict[str, Any]) -> str:
    """A Markdown table of images/s per phase, ours beside theirs, with the targets."""
    mfu = result.get("mfu")
    head = "| phase | batch | ours img/s | BLIP-2 img/s | ours/theirs | target |"
    rule = "|---|---|---|---|---|---|"
    if mfu:
        head += " MFU ours | MFU theirs |"
        rule += "---|---|"
    lines = [head, rule]
    for phase in PHASES:
        cells = [
            phase,
            str(result["batch"][phase]),
            _cell(result["ours"].get(phase)),
            _cell(result["theirs"].get(phase)),
            _cell(result["ratio"].get(phase), "{:.2f}x"),
            _target_cell(result, phase),
        ]
        if mfu:
            cells += [
                _cell(mfu["ours"].get(phase), "{:.1%}"),
                _cell(mfu["theirs"].get(phase), "{:.1%}"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def _target_cell(result: dict[str, Any], phase: str) -> str:
    parts = []
    for key, goal in result["targets"].items():
        kind, _, target_phase = key.partition(".")
        if target_phase != phase:
            continue
        mark = "met" if result["met"][key] else "NOT met"
        text = f">= {goal:g}x theirs" if kind == "ratio" else f">= {goal:,.0f} img/s"
        parts.append(f"{text} ({mark})")
    if phase in result.get("reference", {}):
        parts.append(f"reference stack {result['reference'][phase]:g} img/s")
    return "; ".join(parts) or "—"


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: the preset's")
    parser.add_argument(
        "--batch", type=int, help="one batch size for every phase (default: the preset's)"
    )
    parser.add_argument(
        "--iters", type=int, help="timed iterations per phase (default: the preset's)"
    )
    parser.add_argument(
        "--warmup", type=int, help="untimed iterations first (default: the preset's)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's; 1 is steadier on a CPU shared with others)",
    )
    parser.add_argument("--new-tokens", type=int, default=20, help="caption length (min = max)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="device peak for MFU (default: H100 SXM bf16 dense)",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON result to this file")
    parser.add_argument(
        "--profile",
        type=Path,
        help="append each side's busiest operators per phase (torch.profiler) to this file; "
        "on CUDA the profiler slows the launch-bound phases timed after it, so take figures "
        "from a run without it",
    )
    args = parser.parse_args(argv)
    for name in ("batch", "iters", "threads", "new_tokens", "peak_tflops"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    device = torch.device(args.device or preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        preset_name=args.preset,
        device=device,
        batch={p: args.batch or preset.batch[p] for p in PHASES},
        warmup=preset.warmup if args.warmup is None else args.warmup,
        iters=args.iters or preset.iters,
        new_tokens=args.new_tokens,
        peak_tflops=args.peak_tflops,
        profile=args.profile,
    )
    result = run(settings)
    print(table(result))
    line = json.dumps(result, sort_keys=False)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    print(line, flush=True)
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
