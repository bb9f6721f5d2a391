"""Build the retrieval datastore (bita/models/retrieval.py) from a dataset's training split.

One pass over the split in shard order: each image's eval-view tower tokens (from the feature
cache when its training views are eval views, else the image shards through the tower's eval
transform), mean-pooled and L2-normalised as keys (mapped into the captions' sentence space for
caption-aligned keys, the map fitted here on all of each image's captions), and one of its
usable captions (what the LM reads): the first, or the most central one, whose CIDEr-D against the
image's other captions (idf of the whole split) is highest, a consensus caption rather than one
annotator's aside; and all of them, which `decode.rerank=mbr` weighs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from bita.data.captions import usable_captions
from bita.data.shards import read_manifest
from bita.data.skips import SkipLog
from bita.data.stream import ShardSet, split_records
from bita.eval.cider_reward import CiderReward
from bita.locations import resolve_location
from bita.models.caption_keys import KeyProjection, fit_key_projection_with
from bita.models.encoders import FrozenImageEncoder
from bita.models.retrieval import Datastore, retrieval_keys

log = logging.getLogger(__name__)


def training_data_settings(dataset_cfg: Any) -> dict:
    """The training split a datastore indexes: dataset, split and, per source, the sha256 of
    the split's entry in the image shards' manifest (shards, counts, skipped images)."""
    split = str(dataset_cfg["train_split"])
    root = resolve_location(str(dataset_cfg["root"]))
    digests = {}
    for source in dataset_cfg["sources"]:
        name = str(source["name"])
        entry = read_manifest(root, name)["splits"].get(split)
        if entry is None:
            raise ValueError(f"{root}/{name}/manifest.json: no split {split!r} to retrieve from")
        text = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        digests[name] = hashlib.sha256(text.encode()).hexdigest()
    return {"dataset": str(dataset_cfg["name"]), "split": split, "manifest_sha256": digests}


def build_datastore(
    dataset_cfg: Any,
    shard_set: ShardSet,
    tower: FrozenImageEncoder,
    caption: str,
    settings: Mapping[str, Any],
    batch_size: int = 64,
) -> Datastore:
    """The datastore of `dataset_cfg`'s training split read from `shard_set` (view 0 of a
    feature cache holding eval views, or image shards decoded with the eval transform, which
    then run through `tower`), one `caption` ("central" or "first") per image; `settings`
    (`datastore_settings`) is what its fingerprint covers, and says which keys to make."""
    keys, ids, groups = [], [], []
    device = next(tower.parameters()).device
    for batch_ids, batch_groups, inputs in _batches(dataset_cfg, shard_set, batch_size):
        tokens = inputs if shard_set.field == "features" else tower(inputs.to(device))
        keys.append(retrieval_keys(tokens).cpu())
        ids += batch_ids
        groups += batch_groups
    if not ids:
        raise ValueError(f"dataset {dataset_cfg['name']!r}: no training image with a caption")
    chosen = central_captions(groups) if caption == "central" else [g[0] for g in groups]
    log.info("retrieval datastore: %d training images, %s captions", len(ids), caption)
    keys, projection = _stored_keys(torch.cat(keys), groups, settings["key"])
    return Datastore(keys.half(), ids, chosen, dict(settings), projection, groups)


def _stored_keys(
    tower_keys: torch.Tensor, groups: Sequence[Sequence[str]], key: Mapping[str, Any]
) -> tuple[torch.Tensor, KeyProjection | None]:
    """The training images' keys as the datastore stores them, and the projection that made
    them (caption-aligned keys) or None (tower keys)."""
    if key["kind"] != "caption_aligned":
        return tower_keys, None
    projection = fit_key_projection_with(str(key["text_encoder"]), tower_keys, groups)
    return projection(tower_keys), projection


def central_captions(groups: Sequence[Sequence[str]]) -> list[str]:
    """Each image's caption with the highest CIDEr-D against its other captions (the first on
    ties; an image's only caption otherwise), idf from all `groups`."""
    reward = CiderReward(groups)
    pairs = [(i, j) for i, group in enumerate(groups) if len(group) > 1 for j in range(len(group))]
    captions = [groups[i][j] for i, j in pairs]
    others = [[c for n, c in enumerate(groups[i]) if n != j] for i, j in pairs]
    scores = reward(captions, others).tolist() if pairs else []
    best = {i: (float("-inf"), groups[i][0]) for i in range(len(groups))}
    for (i, _), text, score in zip(pairs, captions, scores, strict=True):
        if score > best[i][0]:
            best[i] = (score, text)
    return [best[i][1] for i in range(len(groups))]


def _batches(
    dataset_cfg: Any, shard_set: ShardSet, batch_size: int
) -> Iterator[tuple[list[str], list[list[str]], torch.Tensor]]:
    """(ids, usable captions, decoded inputs) of the training split's images with a usable
    caption, in shard order, `batch_size` at a time; unreadable samples are logged with their
    key and shard, left out and counted."""
    skips = SkipLog()
    batch: list[tuple[str, list[str], torch.Tensor]] = []
    for raw, captions in _samples(dataset_cfg, shard_set, skips):
        try:
            batch.append((raw.key, captions, shard_set.decode(raw.key, raw.payload, None)))
        except ValueError as err:
            skips.sample(raw.shard, raw.key, str(err))
        if len(batch) == batch_size:
            yield _stacked(batch)
            batch = []
    if batch:
        yield _stacked(batch)
    totals = skips.totals()
    if totals["skipped_samples"] or totals["bad_shards"]:
        log.warning(
            "retrieval datastore: %d unreadable sample(s) and %d bad shard(s) left out",
            totals["skipped_samples"],
            totals["bad_shards"],
        )


def _stacked(batch: list[tuple[str, list[str], torch.Tensor]]) -> tuple:
    ids, groups, inputs = zip(*batch, strict=True)
    return list(ids), list(groups), torch.stack(inputs)


def _samples(
    dataset_cfg: Any, shard_set: ShardSet, skips: SkipLog
) -> Iterator[tuple[Any, list[str]]]:
    """(sample as read, its usable captions) of every training image with a usable caption
    (how many have none is logged)."""
    split = str(dataset_cfg["train_split"])
    without_caption = 0
    for raw in split_records(dataset_cfg, shard_set, split=split, skips=skips):
        captions = usable_captions(raw.record["captions"])
        if captions:
            yield raw, captions
        else:
            without_caption += 1
    if without_caption:
        log.info("retrieval datastore: %d image(s) without a usable caption", without_caption)
