"""Our model as the stages build it, and transformers' BLIP-2 built at the same sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from omegaconf import DictConfig, open_dict
from torch import nn

from bita.models.build import build_model

from .config import Precision


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
