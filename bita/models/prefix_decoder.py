"""The OPT caption LM run token by token for beam search, with one visual-prefix cache per image.

Why not the LM's own forward with a transformers cache: beam search then keeps a copy of the
whole key/value cache, 32 visual queries and prompt included, for each of the K beams, runs the
prefix K times and copies the entire cache at every reorder of the beams; on an H200 those
copies took a quarter of the GPU time of paper-scale captioning (experiments/RESULTS.md). Here
the K beams of an image share one prefix cache, their K queries attending to it as the rows of
one matrix product, and only the generated tokens' cache is reordered, from one buffer into
another rather than in place. The shapes of the step for the n-th new token are the same for
every batch, so on CUDA each is captured once in a CUDA graph (`GraphedSteps`) and replayed
without the ~1,000 kernel launches from Python that bound captioning before.

The weights are the transformers OPT modules' own; this module only wires them (the same
operations as `OPTDecoderLayer.forward` in eval mode), which tests check against the LM's
logits and against `generate`.

Prefixes of different lengths (each image's retrieved captions, `model.retrieval`) come padded
with an attention mask: a padded decoder masks the padding in the prefix cache and counts each
row's positions over its real tokens, as OPT does from the attention mask, so a row decodes as
it would alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bita.models.precision import in_own_precision


class PrefixDecoder:
    """Prefill and per-token steps of an `OPTForCausalLM` for B images x K beams.

    Buffers, allocated once per shape and reused by every batch of that shape so that captured
    graphs stay valid: the prefix keys/values [layers, 2, B, heads, P, head_dim], and two of
    [layers, 2, B*K, heads, T, head_dim] for the T new tokens' (the step for token n reads
    tokens 0..n-1 from one, in the beams' new order, and writes them and token n to the other).
    A `padded` decoder also keeps, written by `prefill`, which prefix positions are real [B, P]
    and where each row's new tokens start [B*K].
    """

    def __init__(
        self,
        lm: nn.Module,
        batch: int,
        beams: int,
        prefix_len: int,
        new_tokens: int,
        padded: bool = False,
    ):
        decoder = lm.model.decoder
        self.lm, self.decoder, self.layers = lm, decoder, list(decoder.layers)
        self.batch, self.beams = batch, beams
        self.prefix_len, self.new_tokens, self.padded = prefix_len, new_tokens, padded
        attn = self.layers[0].self_attn
        self.heads, self.head_dim, self.scaling = attn.num_heads, attn.head_dim, attn.scaling
        weight = decoder.embed_tokens.weight
        buffer = {"dtype": weight.dtype, "device": weight.device}
        layers = len(self.layers)
        self.prefix_cache = torch.zeros(
            layers, 2, batch, self.heads, prefix_len, self.head_dim, **buffer
        )
        self.token_caches = tuple(
            torch.zeros(layers, 2, batch * beams, self.heads, new_tokens, self.head_dim, **buffer)
            for _ in range(2)
        )
        device = weight.device
        self.prefix_real = torch.ones(batch, prefix_len, dtype=torch.bool, device=device)
        self.first_new_position = torch.full((batch * beams,), prefix_len, device=device)
        self._prefill_mask: torch.Tensor | None = None

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prefix [B, P, hidden] once per image, fill the prefix cache, return the
        next-token logits [B, vocab] at its last position, which must be real. `mask` [B, P]
        (1 = real, 0 = padding) is required by a padded decoder and refused by another."""
        if (mask is not None) != self.padded:
            raise ValueError(f"a decoder built with padded={self.padded} got mask={mask}")
        positions = slice(0, self.prefix_len)
        if mask is not None:
            positions = self._take_padding(mask.bool())
        with self._precision():
            hidden = self._input(embeds.to(self.prefix_cache.dtype), positions)
            for index, layer in enumerate(self.layers):
                hidden = self._layer(
                    layer, hidden, lambda q, k, v, i=index: self._prefill_attn(i, q, k, v)
                )
            return self._logits(hidden[:, -1])

    def _take_padding(self, real: torch.Tensor) -> torch.Tensor:
        """Record which prefix positions are real and where each row's new tokens start (in
        place: captured steps read these buffers), set the prefill's attention mask (causal,
        real keys only; a padding query attends to itself, so no row is empty), and return
        each position's index [B, P] counted over real tokens."""
        self.prefix_real.copy_(real)
        self.first_new_position.copy_(real.sum(dim=1).repeat_interleave(self.beams))
        size = self.prefix_len
        causal = torch.ones(size, size, dtype=torch.bool, device=real.device).tril()
        itself = torch.eye(size, dtype=torch.bool, device=real.device)
        self._prefill_mask = (causal & (real[:, None, :] | itself))[:, None]
        return (real.long().cumsum(dim=1) - 1).clamp(min=0)

    @torch.no_grad()
    def step(
        self, tokens: torch.Tensor, source: torch.Tensor | None, position: int
    ) -> torch.Tensor:
        """New token number `position` for every beam: row r continues beam `source[r]` (its
        earlier tokens' cache is gathered accordingly) with `tokens[r]`; returns the logits
        [B*K, vocab] of the token after it. `source=None`: rows keep their places (samples),
        so one buffer holds every token and nothing is copied; a search passes None at every
        step or at none."""
        if source is None:
            cache = self.token_caches[0]
        else:
            earlier = self.token_caches[position % 2]
            cache = self.token_caches[(position + 1) % 2]
            if position:
                used = (..., slice(0, position), slice(None))
                torch.index_select(earlier[used], 2, source, out=cache[used])
        cache = cache[..., : position + 1, :]
        with self._precision():
            embeds = self.decoder.embed_tokens(tokens)[:, None]
            if self.padded:
                hidden = self._input(embeds, self.first_new_position[:, None] + position)
            else:
                hidden = self._input(embeds, self.prefix_len + position)
            for index, layer in enumerate(self.layers):
                hidden = self._layer(
                    layer, hidden, lambda q, k, v, i=index: self._step_attn(cache[i], i, q, k, v)
                )
            return self._logits(hidden[:, -1])

    def _precision(self):
        return in_own_precision(self.prefix_cache.dtype, self.prefix_cache.device.type)

    def _input(self, embeds: torch.Tensor, positions: int | slice | torch.Tensor) -> torch.Tensor:
        """Token embeddings plus OPT's learned position embeddings (offset by 2, as in OPT), at
        the same positions for every row or at each row's own (`positions` [rows, length])."""
        if self.decoder.project_in is not None:
            embeds = self.decoder.project_in(embeds)
        table = self.decoder.embed_positions
        if isinstance(positions, torch.Tensor):
            return embeds + table.weight[positions + table.offset]
        if isinstance(positions, int):
            positions = slice(positions, positions + 1)
        return embeds + table.weight[positions.start + table.offset : positions.stop + table.offset]

    def _layer(self, layer: nn.Module, hidden: torch.Tensor, attend: Callable) -> torch.Tensor:
        """`OPTDecoderLayer.forward` in eval mode, with `attend(q, k, v)` for the attention."""
        attn = layer.self_attn
        normed = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        q, k, v = (self._heads(proj(normed)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        hidden = hidden + attn.out_proj(attend(q * self.scaling, k, v))
        if not layer.do_layer_norm_before:
            hidden = layer.self_attn_layer_norm(hidden)
        normed = layer.final_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(normed)))
        if not layer.do_layer_norm_before:
            hidden = layer.final_layer_norm(hidden)
        return hidden

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, hidden] -> [N, heads, L, head_dim]."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """[N, heads, L, head_dim] -> [N, L, hidden]."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.heads * self.head_dim)

    def _prefill_attn(self, layer: int, q, k, v) -> torch.Tensor:
        self.prefix_cache[layer, 0].copy_(k)
        self.prefix_cache[layer, 1].copy_(v)
        attention = nn.functional.scaled_dot_product_attention
        if self.padded:
            return self._merge(attention(q, k, v, attn_mask=self._prefill_mask, scale=1.0))
        return self._merge(attention(q, k, v, is_causal=True, scale=1.0))

    def _step_attn(self, cache: torch.Tensor, layer: int, q, k, v) -> torch.Tensor:
        """Attention of each beam's new token [B*K, heads, 1, d] to its image's prefix and to
        its own new tokens so far, `cache` [2, B*K, heads, n, d] (this one last), softmaxed
        jointly."""
        keys, values = cache
        keys[:, :, -1:].copy_(k)
        values[:, :, -1:].copy_(v)
        prefix_keys, prefix_values = self.prefix_cache[layer]
        b, k_beams, heads = self.batch, self.beams, self.heads
        q_by_image = q.view(b, k_beams, heads, self.head_dim).transpose(1, 2)  # [B, H, K, d]
        to_prefix = q_by_image @ prefix_keys.transpose(-1, -2)  # [B, H, K, P]
        if self.padded:
            to_prefix = to_prefix.masked_fill(~self.prefix_real[:, None, None], float("-inf"))
        to_prefix = to_prefix.transpose(1, 2).reshape(b * k_beams, heads, 1, self.prefix_len)
        to_tokens = q @ keys.transpose(-1, -2)  # [B*K, H, 1, n]
        weights = torch.cat([to_prefix, to_tokens], dim=-1).softmax(-1)  # accumulates in fp32
        on_prefix, on_tokens = weights.split([self.prefix_len, keys.shape[-2]], dim=-1)
        on_prefix = on_prefix.reshape(b, k_beams, heads, self.prefix_len).transpose(1, 2)
        out = (on_prefix @ prefix_values).transpose(1, 2).reshape(b * k_beams, heads, 1, -1)
        return self._merge(out + on_tokens @ values)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.decoder.final_layer_norm is not None:
            hidden = self.decoder.final_layer_norm(hidden)
        if self.decoder.project_out is not None:
            hidden = self.decoder.project_out(hidden)
        return self.lm.lm_head(hidden).float()


Step = Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]


@dataclass(frozen=True)
class SearchRules:
    """What every search over a `PrefixDecoder` needs from the `decode` settings (the
    `generate` keywords), with the LM's end and padding token ids."""

    max_new_tokens: int
    min_new_tokens: int
    end_id: int
    pad_id: int

    @staticmethod
    def shared(decode: Mapping[str, Any], end_id: int, pad_id: int) -> dict[str, Any]:
        """These fields' values from `decode`, for a subclass's `from_decode`."""
        return {
            "max_new_tokens": decode["max_new_tokens"],
            "min_new_tokens": decode.get("min_new_tokens", 0),
            "end_id": end_id,
            "pad_id": pad_id,
        }


class GraphedSteps:
    """`PrefixDecoder.step` for each new-token position, captured in a CUDA graph apiece and
    replayed for every batch of the decoder's shape.

    Inputs are copied into static buffers before each replay; each position's logits come back
    in a static buffer that the next batch's replay overwrites, so callers consume them first.
    Autocast (if on) is entered with its weight cache off, as graph capture requires.
    """

    def __init__(self, decoder: PrefixDecoder):
        rows = decoder.batch * decoder.beams
        device = decoder.prefix_cache.device
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.rows = torch.arange(rows, device=device)
        self.source = self.rows.clone()
        positions = range(decoder.new_tokens)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), _graph_autocast(device):  # warm-up: kernels, workspaces
            for position in positions:
                decoder.step(self.tokens, self.source, position)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graphs = [torch.cuda.CUDAGraph() for _ in positions]
        self.logits = []
        for position, graph in zip(positions, self.graphs, strict=True):
            with _graph_autocast(device), torch.cuda.graph(graph):
                self.logits.append(decoder.step(self.tokens, self.source, position))

    def __call__(
        self, tokens: torch.Tensor, source: torch.Tensor | None, position: int
    ) -> torch.Tensor:
        """The captured step; `source=None` (rows keep their places) replays it with rows
        gathered from themselves."""
        self.tokens.copy_(tokens)
        self.source.copy_(self.rows if source is None else source)
        self.graphs[position].replay()
        return self.logits[position]


def _graph_autocast(device: torch.device):
    """The caller's autocast state for `device`, with the cast cache off."""
    enabled = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled, cache_enabled=False)


class DecoderCache:
    """The `PrefixDecoder` and step (graphed on CUDA when asked) of the last `size` batch
    shapes: buffers and graphs are built once per shape, not per batch. A deep copy of the
    model starts with an empty cache (graphs and buffers belong to the original)."""

    def __init__(self, size: int = 2):
        self.size = size
        self.entries: dict[tuple, tuple[PrefixDecoder, Step]] = {}

    def get(
        self,
        lm: nn.Module,
        embeds: torch.Tensor,
        beams: int,
        new_tokens: int,
        cuda_graph: bool,
        mask: torch.Tensor | None = None,
    ) -> tuple[PrefixDecoder, Step]:
        """The decoder (and step) for prefixes `embeds` [B, P, hidden], padded when `mask`."""
        device = embeds.device.type
        graph = cuda_graph and device == "cuda"
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        # the weights' address too: a graph reads weights where they were at capture, and
        # `.to(...)` or loading with assign=True moves them
        weights = lm.get_input_embeddings().weight.data_ptr()
        key = (
            id(lm),
            weights,
            *embeds.shape[:2],
            beams,
            new_tokens,
            embeds.device,
            autocast,
            graph,
            mask is not None,
        )
        if key not in self.entries:
            while len(self.entries) >= self.size:
                del self.entries[next(iter(self.entries))]
            batch, prefix_len = embeds.shape[:2]
            decoder = PrefixDecoder(lm, batch, beams, prefix_len, new_tokens, mask is not None)
            self.entries[key] = (decoder, GraphedSteps(decoder) if graph else decoder.step)
        return self.entries[key]

    def __deepcopy__(self, memo: dict) -> DecoderCache:
        return DecoderCache(self.size)
