"""Frozen-feature cache: the image tower's output tokens, stored once as fp16 feature shards.

BITA never trains its image tower, so a tower's tokens for an image seen through a given
transform never change: computing them once (tools/cache_features.py, bita.data.cache_writer)
saves the tower's forward pass on every step of every later epoch and stage.

Layout, mirroring the image shards: ``<root>/<source>/<split>/*.tar`` and
``<root>/<source>/manifest.json``. Samples keep the image shards' keys and ``json`` records
and add ``f<v>.npy``, view ``v`` as a float16 [tokens, width] array. The training split
(``dataset.train_split``) holds ``views`` views made by the train transform (the eval
transform when the run's ``augment`` is false), each with a seed fixed by (key, view); every
other split holds one eval-transform view plus the encoded image (evaluation galleries show
it). Epoch ``e`` of training reads view ``e % views``.

Cut points. A cache holds the tower's tokens (``activations: tokens``, what every BITA stage
reads), or the activations at the cut below the ``encoder.adapt_blocks`` units that
``stage=tower`` trains (``activations: cut``): then only those units run per training step.
The tower stage ends by deriving a tokens cache of the adapted tower from its cut cache
(``derive_features`` in bita.data.cache_writer: only the top units run), which the later
stages read. A cut view is stored as tokens too: a CNN's map [C, H, W] as [H*W, C].

Fingerprint. The manifest stores, and readers recompute, a hash of everything that decides the
stored activations: the encoder config (all of it but ``in_checkpoint``, so the cut point
``adapt_blocks`` too; an option added since this format is left out while it has the value
that gives the old tokens, so older caches stay valid), a digest of the tower's weights (random
towers are fixed only by their weights; a cut cache digests the units below the cut only, a
tokens cache all of them, adapted ones included), the repr of both transforms (size,
interpolation, crop scale, mean, std), ``views``, what is stored (``activations``, recorded
for cut caches) and this format. A cache whose fingerprint differs is refused, naming both
fingerprints and the settings that differ: a tokens cache made before adaptation, or a cut
cache made at another cut.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from bita.data import storage, transforms
from bita.data.shards import MANIFEST, read_json_manifest
from bita.data.stream import ShardSet, Transform
from bita.locations import resolve_location

FORMAT = "bita-features/1"
# Encoder options added after FORMAT, with the value that gives the tokens caches had before.
_ENCODER_DEFAULTS_SINCE_FORMAT = {
    "orientations": ["identity"],
    "adapt_blocks": 0,
    "token_strides": [32],
}
ACTIVATIONS = ("tokens", "cut")  # what a cache stores: the tower's output, or the cut's input
STORAGE_DTYPE = "float16"


def view_member(view: int) -> str:
    """The sample member holding view ``view`` (``<key>.f<view>.npy`` in the tar)."""
    return f"f{view}.npy"


def view_seed(key: str, view: int) -> int:
    """The augmentation seed of one cached training view: fixed by (key, view) alone, so the
    views do not depend on batching, workers, resumption or the run's seed."""
    digest = hashlib.sha256(f"{key}/{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def cache_transforms(preprocess: Any, augment: bool = True) -> dict[str, Transform]:
    """The transforms the uncached stages apply for this tower (SPEC §2; ``augment`` is the
    run's `augment` setting): what the cache must reproduce, and what its fingerprint
    describes."""
    size, mean, std = preprocess.size, preprocess.mean, preprocess.std
    return {
        "train": transforms.training_transform(size, mean, std, augment),
        "eval": transforms.eval_transform(size, mean, std),
    }


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a tower's state (names, dtypes, shapes, bytes), buffers included."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().reshape(-1).cpu().contiguous()
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def deciding_weights(tower: nn.Module, activations: str = "tokens") -> dict[str, torch.Tensor]:
    """The tower's state that decides what a cache stores: all of it for tokens, the units
    below the cut for cut activations."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"features.activations={activations!r}: expected one of {ACTIVATIONS}")
    state = tower.state_dict()
    if activations == "tokens":
        return state
    if not tower.adapt_blocks:
        raise ValueError(
            "features.activations=cut needs a cut: set encoder.adapt_blocks to the number of "
            "tower units stage=tower trains"
        )
    return {name: tensor for name, tensor in state.items() if not tower.is_adapted(name)}


def views_problem(views: int, augment: bool) -> str | None:
    """Why `features.views` cannot go with `augment` (None: it can). Checked when a run's config
    is composed, and again wherever a cache's fingerprint is made."""
    if int(views) < 1:
        return f"features.views={views}: expected at least 1"
    if int(views) > 1 and not augment:
        return (
            f"features.views={views} with augment=false: every view would be the same eval "
            "view; expected features.views=1 (or augment=true)"
        )
    return None


def fingerprint_settings(
    encoder_cfg: Mapping[str, Any],
    tower: nn.Module,
    views: int,
    augment: bool = True,
    activations: str = "tokens",
) -> dict:
    """Everything that decides the cached activations (see the module docstring)."""
    problem = views_problem(views, augment)
    if problem:
        raise ValueError(problem)
    encoder = {
        key: value
        for key, value in _plain(encoder_cfg).items()
        if key != "in_checkpoint" and _ENCODER_DEFAULTS_SINCE_FORMAT.get(key) != value
    }
    settings = {
        "format": FORMAT,
        "storage": STORAGE_DTYPE,
        "encoder": encoder,
        "weights_sha256": weights_digest(deciding_weights(tower, activations)),
        "transforms": {k: repr(t) for k, t in cache_transforms(tower.preprocess, augment).items()},
        "views": int(views),
    }
    return settings | ({"activations": activations} if activations != "tokens" else {})


def fingerprint(settings: Mapping[str, Any]) -> str:
    """Short hash of ``fingerprint_settings``."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_cache_manifest(root: str | Path, source: str) -> dict:
    """The manifest of ``<root>/<source>`` (a folder, URL or ``pipe:`` command: see
    bita.data.storage), with a clear error when the cache is not there."""
    return read_json_manifest(
        storage.join(root, source, MANIFEST),
        FORMAT,
        how_to_build=f"build the feature cache with `python tools/cache_features.py "
        f"features.root={root} ...` (the same encoder/dataset overrides as the run), "
        "or set features.root=null to read images",
    )


def decode_features(key: str, data: bytes, seed: int | None) -> torch.Tensor:
    """One cached view as stored (float16 [tokens, width]); the model casts it on use."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"unreadable cached features ({err})") from err
    if array.dtype != np.float16 or array.ndim != 2:
        raise ValueError(
            f"cached features {array.dtype}{list(array.shape)}, expected float16 [tokens, width]"
        )
    return torch.from_numpy(array)


def encode_features(features: torch.Tensor) -> bytes:
    """The ``.npy`` bytes of one view (float16 [tokens, width])."""
    buffer = io.BytesIO()
    np.save(buffer, features.numpy(), allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class FeatureCache:
    """A feature cache whose fingerprint matched the run's tower, transforms and views."""

    root: str
    fingerprint: str
    views: int
    roles: dict[tuple[str, str], str]  # (source, split) → "train" | "eval"

    def train_shards(self, dataset_cfg: Any, split: str) -> ShardSet:
        """The stream's shard set for training on ``split``: the cached augmented views."""
        self._require(dataset_cfg, split, "train", [s["name"] for s in dataset_cfg["sources"]])
        return _shard_set(self.root, self.views)

    def eval_shards(self, dataset_cfg: Any, split: str) -> ShardSet:
        """The stream's shard set for evaluating ``split``: the cached eval view."""
        self._require(dataset_cfg, split, "eval", [str(dataset_cfg["eval_source"])])
        return _shard_set(self.root, 1)

    def _require(self, dataset_cfg: Any, split: str, role: str, sources: list[str]) -> None:
        for source in sources:
            found = self.roles.get((source, split))
            if found is None:
                raise ValueError(f"feature cache {self.root}/{source}: no split {split!r}")
            if found != role:
                raise ValueError(
                    f"feature cache {self.root}/{source}: split {split!r} holds {found} views, "
                    f"this stream needs {role} views (the cache gives train views to "
                    f"dataset.train_split={dataset_cfg['train_split']!r} only, as the uncached "
                    "stages augment only there)"
                )


def _shard_set(root: str, views: int) -> ShardSet:
    members = tuple((view_member(v),) for v in range(views))
    return ShardSet(root, read_cache_manifest, "features", members, decode_features)


def manifest_shards(features_cfg: Mapping[str, Any] | None) -> ShardSet | None:
    """The configured cache as a shard set for reading its manifests (epoch sizes) without a
    tower at hand; None when ``features.root`` is null. Streams use ``open_cache``."""
    if not features_cfg or not features_cfg.get("root"):
        return None
    return _shard_set(resolve_location(str(features_cfg["root"])), int(features_cfg["views"]))


def open_cache(
    features_cfg: Mapping[str, Any] | None,
    dataset_cfg: Any,
    encoder_cfg: Mapping[str, Any],
    tower: nn.Module,
    augment: bool = True,
    activations: str = "tokens",
) -> FeatureCache | None:
    """The configured cache after checking every source's fingerprint against this run's
    tower, `augment` setting and the `activations` the stage reads; None when
    ``features.root`` is null (the stages then read images)."""
    if not features_cfg or not features_cfg.get("root"):
        return None
    root = resolve_location(str(features_cfg["root"]))
    views = int(features_cfg.get("views", 1))
    expected = fingerprint_settings(encoder_cfg, tower, views, augment, activations)
    sources = {s["name"] for s in dataset_cfg["sources"]} | {str(dataset_cfg["eval_source"])}
    roles = {}
    for source in sorted(sources):
        manifest = read_cache_manifest(root, source)
        check_fingerprint(manifest, expected, storage.join(root, source, MANIFEST))
        roles |= {(source, split): entry["role"] for split, entry in manifest["splits"].items()}
    return FeatureCache(root, fingerprint(expected), int(expected["views"]), roles)


def check_fingerprint(manifest: Mapping[str, Any], expected: Mapping[str, Any], where) -> None:
    """Refuse a cache made by another tower, other preprocessing or another view count."""
    want = fingerprint(expected)
    if manifest.get("fingerprint") == want:
        return
    stored = manifest.get("settings", {})
    differences = [
        f"{key}: cache {_shown(stored_value)} vs run {_shown(run_value)}"
        for key, stored_value, run_value in _differences(stored, expected)
    ]
    raise ValueError(
        f"{where}: the feature cache has fingerprint {manifest.get('fingerprint')} but this "
        f"run's encoder config, weights, transforms, features.views and the activations it "
        f"reads give {want}; they "
        f"differ in: {'; '.join(differences)}. Rebuild the cache with tools/cache_features.py "
        "and the run's overrides, point features.root elsewhere, or set features.root=null."
    )


# Stands for a setting one side of a fingerprint comparison lacks (an older cache, say), so the
# message can say so instead of showing a None that neither side wrote.
_ABSENT = object()


def _shown(value: Any) -> str:
    return "(not recorded)" if value is _ABSENT else repr(value)


def _differences(stored: Any, expected: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(stored, dict) and isinstance(expected, dict):
        return [
            item
            for key in sorted(set(stored) | set(expected))
            for item in _differences(
                stored.get(key, _ABSENT), expected.get(key, _ABSENT), f"{prefix}{key}."
            )
        ]
    return [] if stored == expected else [(prefix.rstrip("."), stored, expected)]


def _plain(cfg: Any) -> Any:
    """A JSON-ready copy of a config section (DictConfig or mapping; tuples become lists)."""
    return OmegaConf.to_container(OmegaConf.create(dict(cfg)), resolve=True)
