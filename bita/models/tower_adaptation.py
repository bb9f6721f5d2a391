"""Tower adaptation (`stage=tower`, not in the paper): contrastive image–caption training of the
top of the image tower, before the BITA stages.

BITA keeps its image tower frozen. CLIP ViT-L/14 saw aerial images among its 400 M pairs; the
small preset's ImageNet EfficientNet-Lite0 did not, and on RSICD a linear probe on its frozen
tokens names the scene of about 87.5 % of val images, which bounds the captioner
(experiments/RESULTS.md). Remote-sensing CLIPs (RemoteCLIP, GeoRSCLIP) gain most by adapting
the image tower to aerial captions. Here the captions are the only supervision:

- image embedding: the tower's tokens, from the `encoder.adapt_blocks` units above the cut,
  mean-pooled and projected (`tower_head.image_proj`);
- text embedding: a frozen sentence encoder (`stage.text_encoder`, all-MiniLM-L6-v2 by
  default), mean-pooled over its tokens as sentence-transformers does, and projected
  (`tower_head.text_proj`). Each distinct caption is encoded once and remembered: RSICD's
  43.7 k training captions hold 13.0 k distinct ones;
- loss: the project's ITC (`contrastive_loss`: negatives gathered across ranks, label
  smoothing) with one embedding per image.

Only the units above the cut and the head train. The head is used by this stage alone: BITA
takes the adapted units from its checkpoints and leaves the head out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bita.models.bita import ModelSettings
from bita.models.encoders import FrozenImageEncoder, ImagePreprocess, build_image_encoder
from bita.models.losses import contrastive_loss
from bita.models.sentence_encoder import SentenceEncoder


class TowerHead(nn.Module):
    """The contrastive head of `stage=tower`: image and text projections and a temperature."""

    def __init__(self, image_width: int, text_width: int, settings: ModelSettings) -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_width, settings.embed_dim)
        self.text_proj = nn.Linear(text_width, settings.embed_dim)
        self.temp = nn.Parameter(torch.tensor(settings.temp_init))
        self.temp_range = settings.temp_range

    def forward(
        self, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit-length image and text embeddings and the clamped temperature (one call, so
        that ZeRO-3 gathers all of the head's parameters, `temp` included)."""
        return (
            F.normalize(self.image_proj(image), dim=-1),
            F.normalize(self.text_proj(text), dim=-1),
            self.temp.clamp(*self.temp_range),
        )


class TowerAdaptation(nn.Module):
    """What `stage=tower` trains: the image tower (its top units), the contrastive head, and
    the frozen sentence encoder that embeds the captions.

    Its checkpoints hold the adapted units under BITA's own names (`encoder.…`; the whole tower
    when it travels in checkpoints, `encoder.in_checkpoint`) and the head (`tower_head.…`), so
    a BITA stage can start from them (`init_from`)."""

    def __init__(
        self,
        encoder: FrozenImageEncoder,
        text_encoder: SentenceEncoder,
        settings: ModelSettings,
        *,
        encoder_in_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if not encoder.adapt_blocks:
            raise ValueError(
                "stage=tower trains the top of the image tower: set encoder.adapt_blocks to the "
                "number of units above the cut (e.g. 1: EfficientNet's head, 4: the last four "
                "ViT blocks)"
            )
        self.settings = settings
        self.encoder = encoder
        self.tower_head = TowerHead(encoder.width, text_encoder.width, settings)
        self.text_encoder = text_encoder
        self.encoder_in_checkpoint = encoder_in_checkpoint

    @property
    def preprocess(self) -> ImagePreprocess:
        return self.encoder.preprocess

    def adapted_names(self) -> list[str]:
        """The parameters of the units above the cut: what the stage trains besides the head."""
        return [f"encoder.{n}" for n, _ in self.encoder.named_parameters() if self._adapted(n)]

    def _adapted(self, name: str) -> bool:
        return self.encoder.is_adapted(name)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """ITC between each image (cached activations at the cut, or pixels) and its caption;
        returns `loss` and `acc`."""
        features = batch.get("features")
        if features is None:
            tokens = self.encoder.tokens_of_one_orientation(batch["image"])
        else:
            tokens = self.encoder.top_of_one_orientation(features)
        image, text, temp = self.tower_head(tokens.mean(1), self.text_encoder(batch["caption"]))
        return contrastive_loss(image[:, None], text, temp, self.settings.label_smoothing)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapted units (every tower weight when the tower travels in checkpoints) under
        BITA's names, and the head."""
        keep = (lambda name: True) if self.encoder_in_checkpoint else self._adapted
        tower = {f"encoder.{n}": t for n, t in self.encoder.state_dict().items() if keep(n)}
        head = {f"tower_head.{n}": t for n, t in self.tower_head.state_dict().items()}
        return {name: tensor.detach() for name, tensor in (tower | head).items()}

    def load_checkpoint_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what `checkpoint_state_dict` wrote (resuming this stage): exactly those keys."""
        expected = set(self.checkpoint_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(
                f"stage=tower checkpoint does not match this tower and cut: missing {missing[:3]}"
                f" ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})"
            )
        self.load_state_dict(dict(state), strict=False)

    def flops_per_sample(self) -> float:
        """Rough training FLOPs per pair: forward and backward (3x) of the adapted units at
        2 x parameters x tokens, as BITA counts its tower, and of the head; the sentence
        encoder runs once per distinct caption and is left out."""
        adapted = sum(p.numel() for n, p in self.encoder.named_parameters() if self._adapted(n))
        head = sum(p.numel() for p in self.tower_head.parameters())
        return 3 * 2 * (adapted * self.encoder.num_tokens + head)


def build_tower_adaptation(cfg: Mapping[str, Any]) -> TowerAdaptation:
    """The tower stage's model from a run config: `encoder`, `model` (embedding width, text
    length, temperature, label smoothing) and `stage.text_encoder`."""
    settings = ModelSettings.from_cfg(cfg["model"])
    text = SentenceEncoder.from_location(
        cfg["stage"]["text_encoder"], settings.max_text_tokens, "stage.text_encoder"
    )
    return TowerAdaptation(
        build_image_encoder(cfg["encoder"]),
        text,
        settings,
        encoder_in_checkpoint=bool(cfg["encoder"].get("in_checkpoint", False)),
    )


def load_tower_weights(
    tower: FrozenImageEncoder, state: Mapping[str, torch.Tensor], in_checkpoint: bool
) -> None:
    """Load a BITA or tower-stage checkpoint's `encoder.*` tensors into a bare tower (as the
    feature cache tools need it): every weight of a tower that travels in checkpoints, else its
    adapted units, checked as BITA's loader checks them."""
    own = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    tower.check_checkpoint_names(set(own), in_checkpoint)
    tower.load_state_dict(own, strict=in_checkpoint and bool(own))
