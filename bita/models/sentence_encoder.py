"""A frozen sentence encoder (all-MiniLM-L6-v2 by default): the caption side of `stage=tower`'s
contrastive loss and the target space of caption-aligned retrieval keys
(bita/models/caption_keys.py). Mean pooling over the caption's tokens is how
sentence-transformers pools this family of encoders."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bita.models.llm import load_pretrained_model, load_tokenizer, to_device


class SentenceEncoder(nn.Module):
    """A frozen Hugging Face text encoder; a caption's embedding is its last hidden state
    mean-pooled over the caption's tokens. Embeddings of captions seen before are reused."""

    chunk = 512  # captions per forward pass

    def __init__(self, model: nn.Module, tokenizer: Any, max_tokens: int) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._seen: dict[str, torch.Tensor] = {}

    @classmethod
    def from_location(cls, spec: str, max_tokens: int, field: str) -> SentenceEncoder:
        """The encoder and tokenizer of a hub name, folder or location spec (`pip:...`) given
        by the config option `field` (named when it cannot be loaded)."""
        model = load_pretrained_model(
            spec,
            field,
            "a text encoder",
            "A hub name needs network access once; offline, give a local folder.",
        )
        return cls(model, load_tokenizer(spec, field), max_tokens)

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> SentenceEncoder:
        """Stay in eval mode: the encoder is frozen, and its remembered embeddings must not
        depend on dropout."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        """Embeddings [B, width] (float32) of `captions`."""
        new = sorted(set(captions) - set(self._seen))
        for start in range(0, len(new), self.chunk):  # bounded memory for a split's captions
            chunk = new[start : start + self.chunk]
            self._seen.update(zip(chunk, self._encode(chunk), strict=True))
        return torch.stack([self._seen[caption] for caption in captions])

    def _encode(self, captions: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        text = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        mask = to_device(text.attention_mask, device)
        hidden = self.model(
            input_ids=to_device(text.input_ids, device), attention_mask=mask
        ).last_hidden_state
        weights = mask[..., None].to(hidden.dtype)
        return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).float()
