"""The prefix language model: a causal LM that reads the IFT queries as a soft visual prefix.

Sequence layout (training and decoding alike):
`[prefix (Q query vectors)] [bos] [context] [prompt tokens] [caption tokens] ["\n"]`.
The prompt and the caption are tokenised separately and the caption is given a leading space
when a prompt precedes it, so "a photo of " + "many cars" is never glued into "ofmany" and the
prompt tokens are the same at training and decoding time. "\n" ends a caption (BLIP-2/OPT
convention), so decoding stops on it. The context is empty unless the model retrieves captions
(`model.retrieval`): then it is each image's retrieved captions, each ended by "\n" as the LM
stage taught it, and differs in length per image. Training pads rows on the right; decoding
pads each row's text on its left (after the visual prefix), so every row's prompt ends at the
last position; pads are masked and positions count real tokens only, so a token sits at the
same position in both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from bita.locations import resolve_location
from bita.models.beam_search import BeamRules, beam_search
from bita.models.encoders import parse_dtype
from bita.models.prefix_decoder import DecoderCache
from bita.models.sampling import SampleRules, sample_search

CAPTION_END = "\n"
BEAM_LOOPS = ("bita", "transformers")  # decode.beam_loop: whose loop writes captions
# the searches the project's loop runs: (settings type, search), the first that applies wins
SEARCHES = ((BeamRules, beam_search), (SampleRules, sample_search))
IGNORE_INDEX = -100
STAND_IN = "standin"  # llm.tokenizer value: `stand_in_tokenizer()`, for random-weight builds
# each row's retrieved captions as LM token ids (`PrefixLM.context_ids`); None: no retrieval
Contexts = Sequence[Sequence[int]] | None
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "</s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


def train_caption_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE tokenizer on captions and save it where
    `AutoTokenizer.from_pretrained(out_dir)` finds it.

    Byte-level: every byte (so "\n") is a token and no caption is out of vocabulary. Special
    tokens follow OPT's convention (`</s>` is bos and eos, `<pad>` pads)."""
    out = Path(out_dir)
    _byte_level_bpe(texts, vocab_size).save_pretrained(out)
    return out


def stand_in_tokenizer():
    """`llm.tokenizer: standin`: a byte-level tokenizer built on the spot, one token per byte
    plus OPT's special tokens, no merges and no download. It lets an LM with random weights be
    built offline at full size (its embedding table keeps `llm.config.vocab_size`), for sizes,
    memory and speed; its ids are nobody's, so captions from it carry no meaning."""
    return _byte_level_bpe([], vocab_size=0)


def _byte_level_bpe(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys(SPECIAL_TOKENS.values()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((t + CAPTION_END for t in texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def load_pretrained_model(spec: str, field: str, what: str, offline_hint: str) -> nn.Module:
    """transformers' AutoModel of the `field` option's `spec` (hub name, folder or location);
    a failed load names the option, what it is for and how to get it offline."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(resolve_location(spec))
    except OSError as err:
        raise OSError(f"{field}={spec!r}: cannot load {what} ({err}). {offline_hint}") from err


def load_tokenizer(spec: str, field: str):
    """AutoTokenizer from a hub name, a folder or a location spec, with a clear offline error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_location(spec))
    except OSError as err:
        raise OSError(
            f"{field}={spec!r}: cannot load a tokenizer ({err}). A hub name needs network access "
            "once (or a local copy in the Hugging Face cache); otherwise give a folder."
        ) from err


@dataclass(frozen=True)
class SampledCaptions:
    """What `PrefixLM.sample` drew: each sample's token ids (up to and including its end token,
    or every token when it was cut at max_new_tokens) and its caption text."""

    token_ids: list[list[int]]
    texts: list[str]


class PrefixLM(nn.Module):
    """A transformers causal LM + its tokenizer, fed `inputs_embeds` with a visual prefix."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self._decoders = DecoderCache()
        ids = tokenizer(CAPTION_END, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"LM tokenizer encodes '\\n' as {ids}; a single token is needed")
        self.caption_end_id = ids[0]
        if tokenizer.bos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("LM tokenizer needs bos and pad tokens")
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"LM tokenizer has {len(tokenizer)} tokens, the LM embeds only "
                f"{model.get_input_embeddings().num_embeddings}"
            )

    def train(self, mode: bool = True) -> PrefixLM:
        """Back to training (after fine-tune validation, say), the decoding buffers and CUDA
        graphs of the beam loop are freed: at paper scale they hold gigabytes."""
        if mode:
            self._decoders = DecoderCache()
        return super().train(mode)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PrefixLM:
        """Same as `build_prefix_lm(cfg)` (used by the caption-LM stage)."""
        return build_prefix_lm(cfg)

    def forward(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The caption-LM stage's objective: `caption_loss` as a loss dict."""
        return {"loss": self.caption_loss(captions)}

    def flops_per_sample(self, tokens: int = 32) -> float:
        """Approximate training FLOPs per caption (6 per parameter per token) for MFU."""
        return 6.0 * sum(p.numel() for p in self.model.parameters()) * tokens

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def _heads(self, prompt: str, contexts: Contexts, rows: int) -> list[list[int]]:
        """`[bos] context prompt` of each of `rows` rows (the same for all without contexts)."""
        body = self.tokenizer(prompt.rstrip(), add_special_tokens=False).input_ids if prompt else []
        bos = self.tokenizer.bos_token_id
        if contexts is None:
            return [[bos, *body]] * rows
        if len(contexts) != rows:
            raise ValueError(f"{len(contexts)} retrieved contexts for {rows} rows")
        return [[bos, *context, *body] for context in contexts]

    def context_ids(self, captions: Sequence[Sequence[str]], max_tokens: int) -> list[list[int]]:
        """Each image's retrieved `captions` as the LM reads them after bos: each caption with a
        leading space (as captions are tokenised everywhere), cut to `max_tokens` tokens, then
        the caption-end token."""
        flat = [" " + text for group in captions for text in group]
        tokens = iter(self.tokenizer(flat, add_special_tokens=False).input_ids if flat else [])
        end = self.caption_end_id
        return [[t for _ in group for t in (*next(tokens)[:max_tokens], end)] for group in captions]

    def tokenize_captions(
        self, captions: list[str], prompt: str, max_tokens: int, contexts: Contexts = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, attention mask and labels for `[bos] context prompt caption "\n"`.

        At most `max_tokens` caption tokens (including "\n") are kept; labels are -100 on bos,
        context, prompt and padding."""
        # every caption starts with a space, with or without a prompt, so its first word is the
        # same token in the lm stage, stage 2 and fine-tuning (byte-level BPE marks the space)
        bodies = self.tokenizer([" " + c for c in captions], add_special_tokens=False).input_ids
        rows = [body[: max_tokens - 1] + [self.caption_end_id] for body in bodies]
        return self._labelled_rows(rows, self._heads(prompt, contexts, len(rows)))

    def _labelled_rows(
        self, rows: list[list[int]], heads: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`head row` for each row of token ids and its head (`_heads`), right-padded: ids,
        attention mask and labels (-100 on the head and padding)."""
        sequences = [head + row for head, row in zip(heads, rows, strict=True)]
        pad = self.tokenizer.pad_token_id
        ids = pad_sequence(
            [torch.tensor(r) for r in sequences], batch_first=True, padding_value=pad
        )
        positions = torch.arange(ids.shape[1])
        lengths = torch.tensor([len(r) for r in sequences])
        mask = (positions < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        head_lengths = torch.tensor([len(head) for head in heads])
        labels[positions < head_lengths[:, None]] = IGNORE_INDEX
        return ids, mask, labels

    def _check_length(self, tokens: int, what: str) -> None:
        """OPT's learned positions end at `max_position_embeddings`; past it, a clear error
        instead of an index error deep in the LM."""
        limit = self.model.config.max_position_embeddings
        if tokens > limit:
            raise ValueError(
                f"{what} needs {tokens} LM positions, llm.config.max_position_embeddings is "
                f"{limit}: shorten the retrieved context (model.retrieval.k, "
                "model.retrieval.max_tokens), model.max_lm_tokens or decode.max_new_tokens"
            )

    def prefix_loss(
        self,
        prefix: torch.Tensor,
        captions: list[str],
        prompt: str = "",
        max_tokens: int = 32,
        *,
        contexts: Contexts = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over caption tokens, the prefix [B, Q, hidden] first,
        each row's retrieved `contexts` (token ids, `context_ids`) after bos
        (`label_smoothing` as in `F.cross_entropy`)."""
        logits, targets, _ = self._prefixed_logits(prefix, captions, prompt, max_tokens, contexts)
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    def token_log_probs(
        self,
        prefix: torch.Tensor,
        rows: list[list[int]],
        prompt: str = "",
        contexts: Contexts = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of every token of each row of ids after its prefix, retrieved
        `contexts` and prompt, and the index of the row each token belongs to: what a
        sequence-level reward weights in self-critical training. The rows are the ids as drawn
        (`SampledCaptions.token_ids`), not their text tokenised again, which could give another
        split of the same text or add an end token a sample cut at `max_new_tokens` never drew."""
        ids, mask, labels = self._labelled_rows(rows, self._heads(prompt, contexts, len(rows)))
        logits, targets, row_index = self._logits_after_prefix(prefix, ids, mask, labels)
        log_probs = -F.cross_entropy(logits, targets, reduction="none")
        return log_probs, to_device(row_index, log_probs.device)

    def _prefixed_logits(
        self,
        prefix: torch.Tensor,
        captions: list[str],
        prompt: str,
        max_tokens: int,
        contexts: Contexts = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask, labels = self.tokenize_captions(captions, prompt, max_tokens, contexts)
        return self._logits_after_prefix(prefix, ids, mask, labels)

    def _logits_after_prefix(
        self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check_length(prefix.shape[1] + ids.shape[1], "a training sequence")
        ids, mask = to_device(ids, prefix.device), to_device(mask, prefix.device)
        embeds = self._embed(ids)
        inputs = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
        prefix_mask = torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device)
        return self._labelled_logits(inputs, torch.cat([prefix_mask, mask], dim=1), labels)

    def caption_loss(self, captions: list[str], max_tokens: int = 32) -> torch.Tensor:
        """LM-only loss on captions (no prefix, no prompt): trains the caption-domain LM."""
        ids, mask, labels = self.tokenize_captions(captions, "", max_tokens)
        device = self.model.get_input_embeddings().weight.device
        ids, mask = to_device(ids, device), to_device(mask, device)
        logits, targets, _ = self._labelled_logits(self._embed(ids), mask, labels)
        return F.cross_entropy(logits, targets)

    def _labelled_logits(
        self, inputs: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 logits [N, vocab] of the N labelled tokens (`labels` [B, L] on the host covers
        the last L positions of `inputs`), each predicted from the position before it, their
        targets [N] and, on the host, the row of `labels` each came from [N] (only
        self-critical training needs it on the device, so the loss path does not copy it).

        The vocabulary projection runs only on the positions that predict a label: the prefix,
        bos, prompt and padding would make [B, Q + L, vocab] logits for nothing. The positions
        are picked on the host, so the device never waits for a data-dependent size."""
        width = labels.shape[1] - 1
        targets = labels[:, 1:].flatten()
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        owners = rows // width
        rows, targets = to_device(rows, inputs.device), to_device(targets[rows], inputs.device)
        hidden = self.model.get_decoder()(
            inputs_embeds=inputs, attention_mask=mask, use_cache=False
        ).last_hidden_state
        before = hidden[:, hidden.shape[1] - labels.shape[1] : -1].flatten(0, 1)
        logits = self.model.get_output_embeddings()(before.index_select(0, rows))
        return logits.float(), targets, owners

    @torch.no_grad()
    def generate(
        self,
        prefix: torch.Tensor,
        prompt: str = "",
        beam_loop: str = "bita",
        cuda_graph: bool = True,
        contexts: Contexts = None,
        context_width: int = 0,
        **decode: Any,
    ) -> list[str]:
        """Decode captions for each prefix, after its retrieved `contexts` if given (padded to
        at least `context_width` tokens, so that every batch has the same shape and reuses one
        decoder and its CUDA graphs); stops at "\n" and returns stripped strings without the
        prompt. `decode` holds transformers `generate` keywords. Beam search
        (`bita.models.beam_search`) and sampling from the full distribution
        (`bita.models.sampling`) run on the project's shared-prefix decoder, with a CUDA graph
        per step when `cuda_graph`, unless `beam_loop="transformers"`; greedy search, top-k or
        top-p sampling and a repetition penalty always use transformers' `generate`."""
        ids = self._generate_ids(
            prefix, prompt, beam_loop, cuda_graph, contexts, context_width, **decode
        )
        return self._texts(ids)

    def _generate_ids(
        self,
        prefix: torch.Tensor,
        prompt: str,
        beam_loop: str,
        cuda_graph: bool,
        contexts: Contexts,
        context_width: int,
        **decode: Any,
    ) -> torch.Tensor:
        """The new token ids [rows, <= max_new_tokens] of `generate`, each row padded after its
        end token."""
        if beam_loop not in BEAM_LOOPS:
            raise ValueError(f"decode.beam_loop={beam_loop!r}: expected one of {BEAM_LOOPS}")
        inputs, mask = self._decoding_inputs(
            prefix, prompt, contexts, context_width, decode.get("max_new_tokens", 0)
        )
        search = None
        if beam_loop == "bita":
            search = next((s for s in SEARCHES if s[0].apply_to(decode)), None)
        if search is not None:
            rules_type, run_search = search
            rules = rules_type.from_decode(decode, self.caption_end_id, self.tokenizer.pad_token_id)
            decoder, step = self._decoders.get(
                self.model, inputs, rules.rows_per_image, rules.max_new_tokens, cuda_graph, mask
            )
            return run_search(decoder, step, inputs, rules, mask)
        if mask is None:
            mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=prefix.device)
        return self.model.generate(
            inputs_embeds=inputs,
            attention_mask=mask,
            eos_token_id=self.caption_end_id,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            **decode,
        )

    def _texts(self, ids: torch.Tensor) -> list[str]:
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [t.split(CAPTION_END)[0].strip() for t in texts]

    def _drawn_tokens(self, row: list[int]) -> list[int]:
        """A sampled row up to and including its end token; all of it when the sample was cut
        at max_new_tokens (it has no end token, and no padding)."""
        if self.caption_end_id in row:
            return row[: row.index(self.caption_end_id) + 1]
        return row

    def _decoding_inputs(
        self,
        prefix: torch.Tensor,
        prompt: str,
        contexts: Contexts,
        context_width: int,
        new_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embedded `[prefix] [bos] context prompt` [B, P, hidden] decoding continues, and
        its attention mask (None without contexts: nothing is padded). Each row's text is
        padded on its left, after the visual prefix, to the longest row or to a context of
        `context_width` tokens, so that every row ends at the last position."""
        heads = self._heads(prompt, contexts, prefix.shape[0])
        no_context = len(self._heads(prompt, None, 1)[0])
        longest = max(no_context + context_width, *(len(head) for head in heads))
        self._check_length(prefix.shape[1] + longest + new_tokens, "decoding a caption")
        pads = torch.tensor([longest - len(head) for head in heads])
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (longest - len(head)) + head for head in heads])
        embeds = self._embed(to_device(ids, prefix.device))
        inputs = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
        if contexts is None:
            return inputs, None
        text_mask = (torch.arange(longest) >= pads[:, None]).long()
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), text_mask], dim=1)
        return inputs, to_device(mask, prefix.device)

    @torch.no_grad()
    def sample(
        self,
        prefix: torch.Tensor,
        prompt: str,
        *,
        num_samples: int,
        max_new_tokens: int,
        min_new_tokens: int = 1,
        temperature: float = 1.0,
        beam_loop: str = "bita",
        contexts: Contexts = None,
        context_width: int = 0,
    ) -> SampledCaptions:
        """`num_samples` captions per prefix (after its retrieved `contexts`, if given, padded
        as `generate` pads them to `context_width`) drawn from the full next-token distribution
        (no top-k or top-p cut, which would bias a policy gradient), the samples of a prefix
        consecutive, as token ids and text. Runs eagerly: `scst` puts the LM back in training
        after every draw, which frees the decoder, so CUDA graphs would be captured again at
        every step."""
        ids = self._generate_ids(
            prefix,
            prompt,
            beam_loop,
            False,
            contexts,
            context_width,
            do_sample=True,
            num_beams=1,
            top_k=0,
            top_p=1.0,
            temperature=temperature,
            num_return_sequences=num_samples,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
        )
        rows = [self._drawn_tokens(row) for row in ids.tolist()]
        return SampledCaptions(token_ids=rows, texts=self._texts(ids))

    def save_pretrained(self, folder: str | Path, weights: bool = True) -> None:
        """Write the tokenizer and the LM config (and weights unless `weights=False`, used when
        the weights travel in the BITA checkpoint instead) for `build_prefix_lm`."""
        folder = Path(folder)
        if weights:
            self.model.save_pretrained(folder)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.model.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor (token ids, masks, labels) to `device` without a device sync.

    A blocking `.to("cuda")` makes the host wait until the copy, queued behind every kernel
    already launched (the image tower, the IFT), is done, so the GPU runs dry while the host
    catches up; a non-blocking copy from pinned memory only queues."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def build_prefix_lm(cfg: Mapping[str, Any]) -> PrefixLM:
    """Build the `llm` config group's LM: `pretrained` hub name / folder, or random init from
    `config` (OPTConfig kwargs; vocab size from the tokenizer unless given). A `pretrained`
    folder without weight files is allowed only with `in_checkpoint: true`: the architecture
    comes from the folder and the weights from the BITA checkpoint. Frozen unless `trainable`."""
    from transformers import OPTConfig, OPTForCausalLM

    if cfg.get("kind") != "opt":
        raise ValueError(f"llm.kind={cfg.get('kind')!r}: expected 'opt'")
    if not cfg.get("tokenizer"):
        raise ValueError(
            "llm.tokenizer is null: this LM has no public tokenizer. Train one with the caption "
            "LM stage (python -m bita.run stage=lm) or set llm.tokenizer to a folder"
        )
    spec = cfg.get("pretrained")
    tokenizer = _lm_tokenizer(cfg["tokenizer"], spec)
    dtype = parse_dtype(cfg.get("dtype", "fp32"), "llm.dtype")
    source = Path(resolve_location(spec)) if spec else None
    if source is not None and source.is_dir() and not _has_weights(source):
        if not cfg.get("in_checkpoint"):
            raise ValueError(
                f"llm.pretrained={spec!r} holds no weights and llm.in_checkpoint "
                "is false: nothing would provide the LM weights"
            )
        model = OPTForCausalLM(OPTConfig.from_pretrained(source))
    elif spec:
        model = _load_opt(str(source), dtype, spec)
    else:
        arch = dict(cfg.get("config") or {})
        arch.setdefault("vocab_size", len(tokenizer))
        ids = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        # built in its own dtype: OPT-2.7B initialised in fp32 first would take 11 GB
        model = OPTForCausalLM._from_config(OPTConfig(**{**ids, **arch}), dtype=dtype)
    model.to(dtype)
    model.requires_grad_(bool(cfg.get("trainable", False)))
    return PrefixLM(model, tokenizer)


def _lm_tokenizer(spec: str, pretrained: str | None):
    """`llm.tokenizer`: a hub name, folder or location, or `standin` for random weights."""
    if spec != STAND_IN:
        return load_tokenizer(spec, "llm.tokenizer")
    if pretrained:
        raise ValueError(
            f"llm.tokenizer={STAND_IN} goes only with random weights (llm.pretrained=null): its "
            f"ids are not those llm.pretrained={pretrained!r} was trained on, so every caption "
            "would be noise. Give that LM's own tokenizer."
        )
    return stand_in_tokenizer()


def _load_opt(path: str, dtype: torch.dtype, spec: str) -> nn.Module:
    from transformers import OPTForCausalLM

    try:
        return OPTForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise OSError(
            f"llm.pretrained={spec!r}: cannot load the LM weights ({err}). A hub name needs "
            "network access once (or a local copy in the Hugging Face cache)."
        ) from err
