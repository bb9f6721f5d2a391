"""BITA: frozen image tower → ln_vision → IFT with learnable queries → (ITC heads | LM prefix).

Stage 1 trains the IFT with the image–text contrastive loss (`itc_loss`); stage 2 and
fine-tuning feed the query outputs through `llm_proj` as a soft prefix to the frozen LM
(`lm_loss`, `generate`). Which parameters train is decided by `set_trainable` from the stage
config, not here. With `model.retrieval` the LM also reads, after the prefix, the captions of
the image's nearest training images from an attached datastore (bita/models/retrieval.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bita.models.encoders import FrozenImageEncoder, ImagePreprocess
from bita.models.ift import IFT
from bita.models.llm import Contexts, PrefixLM, to_device
from bita.models.losses import contrastive_loss
from bita.models.retrieval import (
    Datastore,
    RetrievalSettings,
    check_datastore,
    datastore_settings,
    tower_key_settings,
)
from bita.models.self_critical import SelfCritical, self_critical_loss

RERANKS = ("none", "consensus", "mbr")  # decode.rerank: how an image's caption is chosen

# BITA's own parts: always in its checkpoint (small, trained by this project)
OWN_PARTS = ("query_tokens", "ln_vision", "ift", "vision_proj", "text_proj", "temp", "llm_proj")
# Parts of `stage=tower`'s checkpoints that only that stage uses (its contrastive head): a BITA
# started from such a checkpoint takes the adapted tower and leaves these out.
TOWER_STAGE_PARTS = ("tower_head",)


@dataclass(frozen=True)
class ModelSettings:
    """The root config's `model:` section."""

    embed_dim: int = 256
    max_text_tokens: int = 32
    max_lm_tokens: int = 32
    label_smoothing: float = 0.1
    lm_label_smoothing: float = 0.0
    temp_init: float = 0.07
    temp_range: tuple[float, float] = (0.001, 0.5)
    retrieval: RetrievalSettings = RetrievalSettings()

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> ModelSettings:
        values = dict(cfg)
        if "temp_range" in values:
            values["temp_range"] = tuple(values["temp_range"])
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model: unknown keys {sorted(unknown)}")
        if "retrieval" in values:
            retrieval = dict(values["retrieval"] or {})
            unknown = set(retrieval) - set(RetrievalSettings.__dataclass_fields__)
            if unknown:
                raise ValueError(f"model.retrieval: unknown keys {sorted(unknown)}")
            values["retrieval"] = RetrievalSettings(**retrieval)
        return cls(**values)


@dataclass(frozen=True)
class LoadReport:
    loaded: list[str]
    missing: list[str]


@dataclass(frozen=True)
class LMAssets:
    """How the LM is rebuilt from a checkpoint: `export` when it was trained by this project
    (random init or a local folder), `in_checkpoint` when its weights are in model.safetensors."""

    export: bool
    in_checkpoint: bool


class BITA(nn.Module):
    def __init__(
        self,
        encoder: FrozenImageEncoder,
        ift: IFT,
        ift_tokenizer: Any,
        llm: PrefixLM | None,
        settings: ModelSettings,
        *,
        encoder_in_checkpoint: bool = False,
        lm_assets: LMAssets = LMAssets(export=False, in_checkpoint=False),
    ):
        super().__init__()
        hidden = ift.config.hidden_size
        self.settings = settings
        self.encoder = encoder
        self.ln_vision = nn.LayerNorm(encoder.width)
        self.query_tokens = nn.Parameter(
            torch.randn(1, ift.config.num_queries, hidden) * ift.config.init_std
        )
        self.ift = ift
        self.ift_tokenizer = ift_tokenizer
        self.vision_proj = nn.Linear(hidden, settings.embed_dim)
        self.text_proj = nn.Linear(hidden, settings.embed_dim)
        self.temp = nn.Parameter(torch.tensor(settings.temp_init))
        self.llm = llm
        self.llm_proj = nn.Linear(hidden, llm.hidden_size) if llm is not None else None
        self.lm_assets = lm_assets
        self.datastore: Datastore | None = None  # model.retrieval's, attached by use_datastore
        self._checkpointed = set(OWN_PARTS)
        if encoder_in_checkpoint:
            self._checkpointed.add("encoder")
        self._checkpointed.update(f"encoder.{prefix}" for prefix in encoder.adapted_prefixes)
        if lm_assets.in_checkpoint:
            self._checkpointed.add("llm")

    @property
    def preprocess(self) -> ImagePreprocess:
        return self.encoder.preprocess

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen tower output (what a feature cache stores)."""
        return self.encoder(images)

    def tower_tokens(
        self, images: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tower's output: cached `features` as they are, or `images` through the tower."""
        if features is None:
            if images is None:
                raise ValueError("image_tokens needs images or features")
            features = self.encode_images(images)
        return features

    def image_tokens(
        self, images: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tower output (or cached `features`) through the trainable fp32 `ln_vision`."""
        return self.ln_vision(self.tower_tokens(images, features).float())

    def use_datastore(self, datastore: Datastore, expected: Mapping[str, Any]) -> None:
        """Attach the datastore `model.retrieval` reads, after checking it was built for what
        `expected` (`datastore_settings`) describes: this model's tower and training data."""
        check_datastore(datastore, expected, "model.retrieval.datastore")
        self.datastore = datastore

    def retrieved_contexts(
        self, tower_tokens: torch.Tensor, image_ids: list[str] | None = None
    ) -> Contexts:
        """The LM token ids of the captions of each image's `model.retrieval.k` nearest
        training images (None when retrieval is off); an image never retrieves its own entry
        (`image_ids`), which is what keeps training honest."""
        settings = self.settings.retrieval
        if not settings.enabled:
            return None
        if self.datastore is None:
            raise RuntimeError(
                "model.retrieval.enabled but no datastore is attached: the training stages "
                "build one, and checkpoints trained with retrieval carry it in assets/retrieval"
            )
        keys = self.datastore.query_keys(tower_tokens)
        captions = self.datastore.neighbour_captions(keys, settings.k, image_ids, settings.pool)
        return self.llm.context_ids(captions, settings.max_tokens)

    @property
    def context_width(self) -> int:
        """The longest retrieved context in LM tokens (k captions, each at most max_tokens and
        its end token); 0 without retrieval. Decoding pads every batch to it."""
        settings = self.settings.retrieval
        return settings.k * (settings.max_tokens + 1) if settings.enabled else 0

    def query_outputs(self, image_tokens: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        return self.ift.encode_queries(queries, image_tokens)

    def itc_loss(self, image_tokens: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        """Stage-1 image–text contrastive loss (SPEC §2); returns `loss` and `acc`."""
        queries = self.vision_proj(self.query_outputs(image_tokens))
        image_feats = F.normalize(queries.float(), dim=-1)  # fp32 features for fp32 similarities
        text = self.ift_tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=self.settings.max_text_tokens,
            return_tensors="pt",
        )
        device = image_tokens.device
        ids, mask = to_device(text.input_ids, device), to_device(text.attention_mask, device)
        cls = self.ift.encode_text(ids, mask)[:, 0]
        text_feats = F.normalize(self.text_proj(cls).float(), dim=-1)
        self.clamp_temperature_()
        return contrastive_loss(image_feats, text_feats, self.temp, self.settings.label_smoothing)

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp the temperature parameter itself into `model.temp_range`, as BLIP-2 does at
        the start of each ITC forward, i.e. after every optimizer step. Clamping only the value
        used (`temp.clamp(...)`) would leave a parameter that drifted out of range with no
        gradient, so it could never come back."""
        self.temp.clamp_(*self.settings.temp_range)

    def forward(
        self,
        batch: Mapping[str, Any],
        objective: str,
        prompt: str = "",
        self_critical: SelfCritical | None = None,
    ) -> dict:
        """A training loss on a batch: `objective` "itc" (stage 1), "lm" (stage 2, fine-tune)
        or "scst" (self-critical fine-tuning on `batch["references"]`, sampled and rewarded as
        `self_critical` says).

        Training goes through `forward` so that DeepSpeed ZeRO-3 gathers this module's own
        parameters (`query_tokens`, `temp`) before they are used. With `model.retrieval` the
        LM objectives read the captions retrieved for each image, never its own
        (`batch["image_id"]`).
        """
        tower = self.tower_tokens(images=batch.get("image"), features=batch.get("features"))
        tokens = self.ln_vision(tower.float())
        if objective == "itc":
            return self.itc_loss(tokens, batch["caption"])
        contexts = self.retrieved_contexts(tower, batch.get("image_id"))
        if objective == "lm" and "references" in batch:
            return self.lm_loss_per_image(tokens, batch["references"], prompt, contexts)
        if objective == "lm":
            return self.lm_loss(tokens, batch["caption"], prompt, contexts)
        if objective == "scst":
            if self_critical is None:
                raise ValueError("objective 'scst' needs self_critical settings and a reward")
            return self_critical_loss(
                self, tokens, batch["references"], prompt, self_critical, contexts
            )
        raise ValueError(f"objective must be 'itc', 'lm' or 'scst', got {objective!r}")

    def lm_prefix(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """The soft visual prefix [B, Q, LM hidden] the LM reads before its text."""
        if self.llm is None:
            raise RuntimeError("this BITA was built without its LM (with_llm=False)")
        return self.llm_proj(self.query_outputs(image_tokens))

    def lm_loss(
        self,
        image_tokens: torch.Tensor,
        captions: list[str],
        prompt: str = "",
        contexts: Contexts = None,
    ) -> dict[str, torch.Tensor]:
        """Prefix-LM loss on `[prefix][bos][context][prompt] caption "\n"` (labels only on the
        caption), `contexts` being each row's retrieved captions (`retrieved_contexts`)."""
        prefix = self.lm_prefix(image_tokens)
        return {"loss": self._prefix_loss(prefix, captions, prompt, contexts)}

    def lm_loss_per_image(
        self,
        image_tokens: torch.Tensor,
        references: list[list[str]],
        prompt: str = "",
        contexts: Contexts = None,
    ) -> dict[str, torch.Tensor]:
        """Prefix-LM loss on every reference of every image, the query path run once per image
        (rather than once per caption, which costs ~30 % of a small-preset fine-tune step)."""
        counts = torch.tensor([len(refs) for refs in references], device=image_tokens.device)
        prefix = self.lm_prefix(image_tokens).repeat_interleave(counts, dim=0)
        captions = [caption for refs in references for caption in refs]
        if contexts is not None:
            contexts = [c for c, refs in zip(contexts, references, strict=True) for _ in refs]
        return {"loss": self._prefix_loss(prefix, captions, prompt, contexts)}

    def _prefix_loss(
        self, prefix: torch.Tensor, captions: list[str], prompt: str, contexts: Contexts
    ) -> torch.Tensor:
        return self.llm.prefix_loss(
            prefix,
            captions,
            prompt,
            self.settings.max_lm_tokens,
            contexts=contexts,
            label_smoothing=self.settings.lm_label_smoothing,
        )

    @torch.no_grad()
    def caption(
        self,
        images: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        image_ids: list[str] | None = None,
        rerank: str = "none",
        rerank_neighbours: int = 40,
        rerank_sharpness: float = 0.0,
        **decode: Any,
    ) -> list[str]:
        """One caption per image (or cached tower `features`), `generate`'s `decode` settings;
        with `model.retrieval`, after the captions retrieved for it (never those of the
        datastore entry whose id is in `image_ids`). `rerank="consensus"` returns, of each
        image's beams, the one that agrees most with its neighbours' captions
        (`consensus_beams`); `rerank="mbr"` lets the captions of its `rerank_neighbours`
        nearest training images, weighed by `rerank_sharpness`, compete with the beams
        (`mbr_captions`)."""
        tower = self.tower_tokens(images, features)
        contexts = self.retrieved_contexts(tower, image_ids)
        tokens = self.ln_vision(tower.float())
        if rerank == "consensus":
            return self.consensus_beams(tower, tokens, contexts, image_ids, **decode)
        if rerank == "mbr":
            return self.mbr_captions(
                tower, tokens, contexts, image_ids, rerank_neighbours, rerank_sharpness, **decode
            )
        if rerank != "none":
            raise ValueError(f"decode.rerank={rerank!r}: expected one of {RERANKS}")
        return self.generate(tokens, contexts=contexts, **decode)

    def consensus_beams(
        self,
        tower: torch.Tensor,
        image_tokens: torch.Tensor,
        contexts: Contexts,
        image_ids: list[str] | None,
        num_beams: int = 5,  # generate's default: the candidates are split by this count
        **decode: Any,
    ) -> list[str]:
        """Of each image's `num_beams` finished beams, the one with the highest CIDEr-D against
        the captions of its `max(k, pool)` nearest training images (never its own entry):
        consensus reranking (Devlin et al. 2015) of generated captions only. The LM alone
        reads two retrieved captions; the reranker weighs the whole pool's."""
        beams = self._beams_per_image(image_tokens, contexts, "consensus", num_beams, **decode)
        settings = self.settings.retrieval
        keys = self.datastore.query_keys(tower)
        neighbours = self.datastore.neighbour_captions(
            keys, max(settings.k, settings.pool), image_ids
        )
        return [
            self.datastore.most_agreed(candidates, references)
            for candidates, references in zip(beams, neighbours, strict=True)
        ]

    def mbr_captions(
        self,
        tower: torch.Tensor,
        image_tokens: torch.Tensor,
        contexts: Contexts,
        image_ids: list[str] | None,
        neighbours: int,
        sharpness: float,
        num_beams: int = 5,
        **decode: Any,
    ) -> list[str]:
        """Minimum Bayes risk over each image's `num_beams` beams and every caption of its
        `neighbours` nearest training images (never its own entry), against those captions,
        nearer ones weighing more by `sharpness` (`Datastore.mbr_choice`). The generated
        captions compete with what retrieval would say, so the captioner keeps whichever the
        neighbours support more."""
        beams = self._beams_per_image(image_tokens, contexts, "mbr", num_beams, **decode)
        rows, similarities = self.datastore.nearest(
            self.datastore.query_keys(tower), neighbours, image_ids
        )
        return [
            self.datastore.mbr_choice(candidates, nearest, cosines, sharpness)
            for candidates, nearest, cosines in zip(beams, rows, similarities, strict=True)
        ]

    def _beams_per_image(
        self,
        image_tokens: torch.Tensor,
        contexts: Contexts,
        rerank: str,
        num_beams: int,
        **decode: Any,
    ) -> list[list[str]]:
        """Each image's `num_beams` finished beams, best first, for a reranker that needs the
        datastore."""
        if self.datastore is None:
            raise ValueError(
                f"decode.rerank={rerank} ranks beams against the retrieved neighbours' "
                "captions: the model needs model.retrieval and its datastore"
            )
        flat = self.generate(
            image_tokens,
            contexts=contexts,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            **decode,
        )
        return [flat[i : i + num_beams] for i in range(0, len(flat), num_beams)]

    @torch.no_grad()
    def generate(
        self,
        image_tokens: torch.Tensor,
        *,
        contexts: Contexts = None,
        prompt: str = "a photo of ",
        num_beams: int = 5,
        max_new_tokens: int = 22,
        min_new_tokens: int = 5,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        do_sample: bool = False,
        top_p: float = 0.9,
        temperature: float = 1.0,
        beam_loop: str = "bita",
        cuda_graph: bool = True,
        num_return_sequences: int = 1,
    ) -> list[str]:
        """`num_return_sequences` captions per image, best first (SPEC §3 defaults: one, by
        beam search), each stopped at "\n" and stripped;
        `beam_loop` and `cuda_graph` choose how it runs (`PrefixLM.generate`), not what it
        writes. A model with `model.retrieval` needs the `contexts` (`retrieved_contexts`;
        `caption` does it all)."""
        if self.settings.retrieval.enabled and contexts is None:
            raise ValueError(
                "this model reads retrieved captions (model.retrieval.enabled): pass contexts "
                "from retrieved_contexts, or caption the images with BITA.caption"
            )
        sampling = {"top_p": top_p, "temperature": temperature} if do_sample else {}
        prefix = self.lm_prefix(image_tokens)
        return self.llm.generate(
            prefix,
            prompt,
            contexts=contexts,
            context_width=self.context_width,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            do_sample=do_sample,
            beam_loop=beam_loop,
            cuda_graph=cuda_graph,
            num_return_sequences=num_return_sequences,
            **sampling,
        )

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters, BITA's own parts, and every weight of components configured
        `in_checkpoint` (random or project-trained ones that cannot be re-fetched). Tied
        weights appear once, so the dict can be written with safetensors."""
        tensors = dict(self.named_parameters()) | dict(self.named_buffers())
        keep = {
            name
            for name in self.state_dict()
            if name in tensors and (_under(name, self._checkpointed) or tensors[name].requires_grad)
        }
        return {name: tensors[name].detach() for name in sorted(keep)}

    def load_checkpoint_state_dict(self, state: Mapping[str, torch.Tensor]) -> LoadReport:
        """Load what `checkpoint_state_dict` wrote. Keys the model lacks, shape mismatches and
        an empty match are errors (the authors' `strict=False` silently loaded nothing)."""
        state = {k: v for k, v in state.items() if not _under(k, TOWER_STAGE_PARTS)}
        own = self.state_dict()
        unexpected = sorted(k for k in state if k not in own)
        if unexpected:
            raise KeyError(f"checkpoint keys not in the model: {unexpected}")
        if not state:
            raise ValueError("checkpoint matched no key of the model")
        wrong = sorted(
            f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state.items()
            if v.shape != own[k].shape
        )
        if wrong:
            raise ValueError(f"checkpoint shapes differ from the model: {wrong}")
        tower = {k.removeprefix("encoder.") for k in state if k.startswith("encoder.")}
        self.encoder.check_checkpoint_names(tower, "encoder" in self._checkpointed)
        kept = set(self.checkpoint_state_dict())
        self.load_state_dict(dict(state), strict=False)
        return LoadReport(loaded=sorted(state), missing=sorted(kept - set(state)))

    def export_assets(self, folder: str | Path) -> dict[str, str]:
        """Copy what rebuilding this model needs besides weights (the project-trained LM's
        tokenizer and config, its weights too unless they are in the checkpoint; the retrieval
        datastore) into `folder`.

        Returns config overrides whose paths are relative to `folder`'s parent (the checkpoint
        directory)."""
        folder = Path(folder)
        overrides = {}
        if self.llm is not None and self.lm_assets.export:
            self.llm.save_pretrained(folder / "llm", weights=not self.lm_assets.in_checkpoint)
            relative = f"{folder.name}/llm"
            overrides |= {"llm.pretrained": relative, "llm.tokenizer": relative}
        if self.datastore is not None:
            self.datastore.save(folder / "retrieval")
            overrides["model.retrieval.datastore"] = f"{folder.name}/retrieval"
        return overrides

    def load_assets(self, cfg: Mapping[str, Any]) -> None:
        """Attach the retrieval datastore of a checkpoint trained with `model.retrieval`, once
        its weights are loaded (an adapted tower comes with them): refused unless it is the one
        the checkpoint records (`model.retrieval.fingerprint`) and was built with this tower."""
        settings = self.settings.retrieval
        if not settings.enabled:
            return
        if not settings.datastore:
            raise ValueError(
                "model.retrieval.enabled but model.retrieval.datastore is not set: a checkpoint "
                "trained with retrieval carries its datastore in assets/retrieval"
            )
        store = Datastore.load(settings.datastore)
        if store.fingerprint != settings.fingerprint:
            raise ValueError(
                f"{settings.datastore}: the retrieval datastore has fingerprint "
                f"{store.fingerprint}, but the model was trained with {settings.fingerprint} "
                "(model.retrieval.fingerprint): it was built for another checkpoint"
            )
        tower = tower_key_settings(cfg["encoder"], self.encoder)
        data = store.settings["data"]  # the recorded fingerprint vouches for it
        self.use_datastore(store, datastore_settings(tower, settings, data))

    def _count(self, module: nn.Module, *patterns: str) -> int:
        return sum(
            p.numel()
            for n, p in module.named_parameters()
            if any(fnmatchcase(n, pat) for pat in patterns)
        )

    def flops_per_sample(self, kind: str, captions_per_image: float = 1.0) -> float:
        """Approximate training FLOPs per sample (2 per multiply-add of the dense layers; a
        backward costs twice a forward; frozen parts run forward, and the LM also backward to
        its inputs), the LM counted `captions_per_image` times per image. The tower counts
        2 × parameters × tokens (exact for a ViT, rough for a CNN) for each orientation it
        averages over. Attention scores and the FFTs are left out: they are small here."""
        if kind not in ("itc", "lm"):
            raise ValueError(f"flops_per_sample kind={kind!r}: expected 'itc' or 'lm'")
        cfg = self.ift.config
        n_image = self.encoder.num_tokens
        tower_params = sum(p.numel() for p in self.encoder.parameters())
        tower = 2 * tower_params * n_image * len(self.encoder.orientations)
        per_query = self._count(
            self.ift, "*.query_ffn.*", "*.cross_attn.query.*", "*.cross_attn.out.*", "*.self_attn.*"
        )
        per_image_token = self._count(self.ift, "*.cross_attn.key.*", "*.cross_attn.value.*")
        queries = 2 * (per_query * cfg.num_queries + per_image_token * n_image)
        if kind == "itc":
            text = 2 * self._count(self.ift, "*.text_ffn.*", "*.self_attn.*")
            heads = 2 * self.settings.embed_dim * cfg.hidden_size * (cfg.num_queries + 1)
            text_tokens = self.settings.max_text_tokens
            return tower + 3 * (queries + text * text_tokens + heads)
        if self.llm is None:
            raise RuntimeError("this BITA was built without its LM: no 'lm' FLOPs")
        lm_params = sum(p.numel() for p in self.llm.parameters())
        lm_factor = 6 if any(p.requires_grad for p in self.llm.parameters()) else 4
        tokens = cfg.num_queries + self.settings.max_lm_tokens + self.context_width
        proj = 2 * self.llm_proj.weight.numel() * cfg.num_queries
        return tower + 3 * (queries + proj) + lm_factor * lm_params * tokens * captions_per_image


def _under(name: str, prefixes) -> bool:
    """Whether `name` is one of `prefixes` or lies inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)
