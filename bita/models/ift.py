"""The Interactive Fourier Transformer (IFT) and its BLIP-2-style self-attention twin.

Queries and text never share a sequence in BITA's training (ITC encodes them separately and
the LM stages use the queries alone), so the module offers two entry points:
`encode_queries` (Fourier mixing → cross-attention to the image → query FFN, per layer) and
`encode_text` (Fourier mixing → text FFN). The `blip2` mixer swaps the Fourier sublayer for
BERT self-attention and cross-attends every `cross_attention_every` layers, for ablations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class IFTConfig:
    vocab_size: int
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    encoder_width: int = 1024
    num_queries: int = 32
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    mixer: str = "fourier"  # "fourier" (IFT) or "attention" (BLIP-2 style)
    cross_attention_every: int = 1

    def __post_init__(self) -> None:
        if self.mixer not in ("fourier", "attention"):
            raise ValueError(f"qformer mixer {self.mixer!r}: expected 'fourier' or 'attention'")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"qformer.hidden_size={self.hidden_size} is not divisible by "
                f"qformer.num_heads={self.num_heads}"
            )
        if self.cross_attention_every < 1:
            raise ValueError("qformer.cross_attention_every must be >= 1")

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any], **overrides: Any) -> IFTConfig:
        """Pick the architecture keys out of a `qformer` config section."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in dict(cfg).items() if k in names and v is not None}
        return cls(**{**values, **overrides})


def fourier_mix(x: torch.Tensor) -> torch.Tensor:
    """`x + Re(fft2(x))` over (sequence, hidden), unnormalised, computed in fp32.

    cuFFT has no bf16 kernels and half-precision FFT sums lose the small components, so the
    transform leaves autocast and runs in fp32 whatever the surrounding precision."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x32 = x.float()
        return x32 + torch.fft.fft2(x32, dim=(-2, -1)).real


class _CastCopy(torch.autograd.Function):
    """`cast` (a copy of `source` in another dtype) in the forward; the gradient goes to `source`
    in its own dtype, as autocast's own cast would send it."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.dtype = source.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype), None


def cast_once_for_autocast(image: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A function giving the image tokens for each cross-attention layer, cast once.

    Under autocast every layer's key and value projections would cast the same fp32 tokens
    [B, N, encoder_width] to the autocast dtype again (autocast caches the casts of leaf tensors
    that require grad, i.e. parameters, not of activations). The copy is made once here; each
    layer's gradient is cast back to `image`'s dtype and the layers' gradients are summed
    there, as with autocast's own casts. Outside autocast (fp32 on CPU) the tokens pass
    unchanged."""
    device = image.device.type
    dtype = torch.get_autocast_dtype(device)
    if not torch.is_autocast_enabled(device) or image.dtype in (dtype, torch.float64):
        return lambda: image
    cast = image.detach().to(dtype)
    return lambda: _CastCopy.apply(image, cast)


class Attention(nn.Module):
    """Multi-head attention with BERT's post-LayerNorm residual: norm(x + out(attn(x, kv)))."""

    def __init__(self, cfg: IFTConfig, kv_width: int):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(kv_width, h)
        self.value = nn.Linear(kv_width, h)
        self.out = nn.Linear(h, h)
        self.out_dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """kv_mask: bool [B, Nkv], True where the key may be attended to."""
        mask = None if kv_mask is None else kv_mask[:, None, None, :]
        q, k, v = self._heads(self.query(x)), self._heads(self.key(kv)), self._heads(self.value(kv))
        p = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        attended = attended.transpose(1, 2).reshape(x.shape)
        return self.norm(x + self.out_dropout(self.out(attended)))


class FeedForward(nn.Module):
    """BERT intermediate + output: norm(x + down(gelu(up(x))))."""

    def __init__(self, cfg: IFTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.down(F.gelu(self.up(x)))))


class IFTLayer(nn.Module):
    """One layer: token mixing shared by both paths, cross-attention and FFN per path."""

    def __init__(self, cfg: IFTConfig, cross_attention: bool):
        super().__init__()
        if cfg.mixer == "fourier":
            self.fourier_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        else:
            self.self_attn = Attention(cfg, cfg.hidden_size)
        self.cross_attn = Attention(cfg, cfg.encoder_width) if cross_attention else None
        self.query_ffn = FeedForward(cfg)
        self.text_ffn = FeedForward(cfg)

    def _mix(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if hasattr(self, "fourier_norm"):
            return self.fourier_norm(fourier_mix(x)).to(x.dtype)
        return self.self_attn(x, x, mask)

    def forward_queries(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self._mix(x, None)
        if self.cross_attn is not None:
            x = self.cross_attn(x, image)
        return self.query_ffn(x)

    def forward_text(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_ffn(self._mix(x, mask))


class Embeddings(nn.Module):
    """BERT word + absolute position embeddings for text; queries enter as they are.
    Both pass the embedding LayerNorm and dropout."""

    def __init__(self, cfg: IFTConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def text(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.dropout(self.norm(self.word(input_ids) + self.position(positions)))

    def queries(self, queries: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(queries))


class IFT(nn.Module):
    """Stack of `IFTLayer`s with shared embeddings (see the module docstring)."""

    def __init__(self, cfg: IFTConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(
            IFTLayer(cfg, cross_attention=i % cfg.cross_attention_every == 0)
            for i in range(cfg.num_layers)
        )
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation: N(0, init_std) weights, zero biases, unit LayerNorms."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode_queries(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """queries [B, Q, H], image tokens [B, N, encoder_width] → [B, Q, H]."""
        x = self.embeddings.queries(queries)
        image_for_layer = cast_once_for_autocast(image)
        for layer in self.layers:
            x = layer.forward_queries(x, image_for_layer())
        return x

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] (padded to a fixed length: the Fourier mix sees every position)
        → [B, L, H]. The mask only matters for the self-attention variant."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"text of {input_ids.shape[1]} tokens exceeds "
                f"qformer.max_position_embeddings={self.config.max_position_embeddings}"
            )
        x = self.embeddings.text(input_ids)
        mask = attention_mask.bool()
        for layer in self.layers:
            x = layer.forward_text(x, mask)
        return x


def bert_key_map(cfg: IFTConfig) -> dict[str, str]:
    """Our IFT parameter names → BERT (`BertModel`) names, for initialisation.

    Query FFNs are not listed here: they are copied from the text FFNs after loading."""
    names = {
        "embeddings.word.weight": "embeddings.word_embeddings.weight",
        "embeddings.position.weight": "embeddings.position_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
    }
    ffn = {"up": "intermediate.dense", "down": "output.dense", "norm": "output.LayerNorm"}
    attn = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "out": "attention.output.dense",
        "norm": "attention.output.LayerNorm",
    }
    for n in range(cfg.num_layers):
        modules = {f"text_ffn.{ours}": theirs for ours, theirs in ffn.items()}
        if cfg.mixer == "attention":
            modules |= {f"self_attn.{ours}": theirs for ours, theirs in attn.items()}
        for ours, theirs in modules.items():
            for p in ("weight", "bias"):
                names[f"layers.{n}.{ours}.{p}"] = f"encoder.layer.{n}.{theirs}.{p}"
    return names


def init_from_bert(ift: IFT, bert_state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy embeddings and text FFNs (and self-attention for the BLIP-2 variant) from a BERT
    state dict, then copy each text FFN into the query FFN. Embedding tables may be larger in
    the IFT (the added [DEC] token, more positions are not allowed): the extra rows keep their
    random init."""
    own = ift.state_dict()
    with torch.no_grad():
        for ours, theirs in bert_key_map(ift.config).items():
            if theirs not in bert_state:
                raise KeyError(f"qformer.init_from={source!r}: checkpoint lacks {theirs!r}")
            src, dst = bert_state[theirs], own[ours]
            if ours.startswith("embeddings.word") and src.shape[0] <= dst.shape[0]:
                dst[: src.shape[0]].copy_(src)
            elif ours.startswith("embeddings.position") and src.shape[0] >= dst.shape[0]:
                dst.copy_(src[: dst.shape[0]])
            elif src.shape == dst.shape:
                dst.copy_(src)
            else:
                raise ValueError(
                    f"qformer.init_from={source!r}: {theirs} has shape {tuple(src.shape)}, "
                    f"the IFT's {ours} needs {tuple(dst.shape)} (check qformer sizes)"
                )
        for layer in ift.layers:
            layer.query_ffn.load_state_dict(layer.text_ffn.state_dict())
