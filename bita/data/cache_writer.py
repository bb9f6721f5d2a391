"""Write the frozen-feature cache (layout and fingerprint: bita.data.features).

One unit of work is one image shard: DataLoader workers decode and transform its images (each
training view under its own (key, view) seed), the main process runs the tower in batches under
``torch.inference_mode`` and writes the tokens (or, with ``activations="cut"``, the activations
at the cut) as float16 into feature shards of at most ``max_shard_images`` samples and
``max_shard_mb`` MB, so ViT-L/14 tokens (~0.5 MB a view) stay in shards of bounded size and are
never gathered in memory. ``derive_features`` makes a tokens cache from a cut cache the same
way, one cut shard per unit, running only the units above the cut (the adapted tower's cache
at the end of ``stage=tower``).

Runs are atomic and resumable: units go to ``<root>/.<source>.partial-<hash>/`` (the hash
covers the fingerprint, the image manifest and ``dataset.train_split``), each finished unit
leaves a ``.done.json`` record, a rerun skips finished units, and the folder replaces
``<root>/<source>`` only when every split is complete. A cache whose fingerprint, image
manifest and training split match is left as is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from bita.data import storage
from bita.data.captions import usable_captions
from bita.data.features import (
    FORMAT,
    cache_transforms,
    check_fingerprint,
    decode_features,
    encode_features,
    fingerprint,
    fingerprint_settings,
    read_cache_manifest,
    view_member,
    view_seed,
)
from bita.data.images import ImageError, load_image
from bita.data.shards import MANIFEST, TAR_META, read_manifest, replace_folder
from bita.data.skips import SkipLog
from bita.data.stream import IMAGE_EXTENSIONS, with_cpu_seed
from bita.locations import resolve_location
from bita.models.encoders import FrozenImageEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheOptions:
    """How a cache is written (``views`` and ``augment`` decide the tokens and are
    fingerprinted; the rest does not)."""

    views: int = 1
    augment: bool = True  # the run's `augment`: train views through the train transform
    activations: str = "tokens"  # what is stored: the tower's tokens, or "cut" activations
    batch_size: int = 64  # tower inputs (images × views) per forward pass
    num_workers: int = 0
    max_shard_images: int = 1000
    max_shard_mb: float = 512.0
    device: str = "cpu"
    progress: bool = True

    @classmethod
    def from_run_config(cls, cfg: Any, device: str) -> CacheOptions:
        """The options a run config gives (`features`, `augment`, `hardware.num_workers`)."""
        features = cfg["features"]
        return cls(
            views=int(features["views"]),
            augment=bool(cfg["augment"]),
            activations=str(features.get("activations") or "tokens"),
            batch_size=int(features["batch_size"]),
            num_workers=int(cfg["hardware"]["num_workers"]),
            max_shard_images=int(features["max_shard_images"]),
            max_shard_mb=float(features["max_shard_mb"]),
            device=device,
        )


@dataclass(frozen=True)
class _Unit:
    """One image shard of a split and where its feature shards go."""

    split: str
    role: str  # "train": `views` augmented views; "eval": one eval view + the encoded image
    path: str  # the image shard (or cut-cache shard)
    file: str  # its name in that manifest: "<split>/<name>.tar"

    @property
    def stem(self) -> str:
        return self.file.removesuffix(".tar")


@dataclass(frozen=True)
class _Input:
    """What one source's cache is made from: its image shards through the tower, or a cut
    cache's shards through the units above the cut."""

    root: str  # the manifest's shard files are <root>/<source>/<file> (a folder, URL or pipe:)
    manifest: dict
    made_from: dict  # provenance, stored in the new manifest and compared by reruns
    roles: dict[str, str]  # split → "train" | "eval"
    batches: Callable[[list[_Unit]], IterableDataset]  # the units' decoded inputs, in batches
    encode: Callable[[torch.Tensor], torch.Tensor]  # a batch of inputs → stored activations


def cache_features(
    dataset_cfg: Any,
    encoder_cfg: Mapping[str, Any],
    tower: FrozenImageEncoder,
    out_root: str | Path,
    options: CacheOptions,
) -> dict[str, dict]:
    """Cache every split of every source of ``dataset_cfg``; returns the manifests by source."""
    settings = fingerprint_settings(
        encoder_cfg, tower, options.views, options.augment, options.activations
    )
    image_root = resolve_location(str(dataset_cfg["root"]))  # a folder, URL or pipe: command
    transforms = cache_transforms(tower.preprocess, options.augment)
    encode = tower.bottom if options.activations == "cut" else tower
    tower.to(options.device)

    def source_input(source: str) -> _Input:
        manifest = read_manifest(image_root, source)
        manifest_bytes = storage.read_bytes(storage.join(image_root, source, MANIFEST))
        source_sha = hashlib.sha256(manifest_bytes).hexdigest()
        return _Input(
            root=image_root,
            manifest=manifest,
            made_from={"source_manifest_sha256": source_sha, "train_split": train_split},
            roles={split: _role(dataset_cfg, split) for split in manifest["splits"]},
            batches=lambda units: _ViewImages(units, transforms, options.views, options.batch_size),
            encode=encode,
        )

    train_split = str(dataset_cfg["train_split"])
    return {
        source: _cache_source(source_input(source), source, settings, Path(out_root), options)
        for source in _sources(dataset_cfg)
    }


def derive_features(
    dataset_cfg: Any,
    encoder_cfg: Mapping[str, Any],
    tower: FrozenImageEncoder,
    cut_root: str | Path,
    out_root: str | Path,
    options: CacheOptions,
) -> dict[str, dict]:
    """The tokens cache of `tower` (adapted: `encoder.adapt_blocks` > 0) made from its cut
    cache at ``cut_root``: every split, view and role of it, through the units above the cut
    only. The cut cache must match the tower below the cut (its fingerprint is checked)."""
    args = (encoder_cfg, tower, options.views, options.augment)
    settings = fingerprint_settings(*args, "tokens")
    cut_settings = fingerprint_settings(*args, "cut")
    tower.to(options.device)

    def source_input(source: str) -> _Input:
        manifest = read_cache_manifest(cut_root, source)
        check_fingerprint(manifest, cut_settings, storage.join(cut_root, source, MANIFEST))
        made_from = {key: manifest[key] for key in ("source_manifest_sha256", "train_split")}
        return _Input(
            root=str(cut_root),
            manifest=manifest,
            made_from=made_from | {"derived_from": manifest["fingerprint"]},
            roles={split: entry["role"] for split, entry in manifest["splits"].items()},
            batches=lambda units: _CachedViews(units, options.views, options.batch_size),
            encode=tower.top,
        )

    return {
        source: _cache_source(source_input(source), source, settings, Path(out_root), options)
        for source in _sources(dataset_cfg)
    }


def _sources(dataset_cfg: Any) -> list[str]:
    return sorted({s["name"] for s in dataset_cfg["sources"]} | {str(dataset_cfg["eval_source"])})


def _cache_source(
    made_of: _Input, source: str, settings: dict, out_root: Path, options: CacheOptions
) -> dict:
    final = out_root / source
    current = _existing_manifest(final)
    key, made_from = fingerprint(settings), made_of.made_from
    if current.get("fingerprint") == key and all(current.get(k) == v for k, v in made_from.items()):
        log.info("%s: up to date (fingerprint %s)", final, key)
        return current
    staging = out_root / f".{source}.partial-{_hash(key, *made_from.values())}"
    splits = made_of.manifest["splits"]
    units = [
        _Unit(split, made_of.roles[split], storage.join(made_of.root, source, s["file"]), s["file"])
        for split, entry in splits.items()
        for s in entry["shards"]
    ]
    for split in splits:
        (staging / split).mkdir(parents=True, exist_ok=True)
    pending = [u for u in units if not _done_path(staging, u).is_file()]
    if len(pending) < len(units):
        log.info(
            "%s: resuming, %d of %d image shards done",
            staging,
            len(units) - len(pending),
            len(units),
        )
    _run_units(pending, made_of, source, staging, options)
    manifest = {
        "format": FORMAT,
        "dataset": source,
        "fingerprint": key,
        "settings": settings,
        **made_from,
        "max_shard_images": options.max_shard_images,
        "max_shard_mb": options.max_shard_mb,
        "splits": {
            split: _split_entry(staging, [u for u in units if u.split == split], options.views)
            for split in splits
        },
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    replace_folder(staging, final)
    return manifest


def _role(dataset_cfg: Any, split: str) -> str:
    return "train" if split == dataset_cfg["train_split"] else "eval"


def _hash(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def _existing_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _done_path(staging: Path, unit: _Unit) -> Path:
    return staging / f"{unit.stem}.done.json"


def _split_entry(staging: Path, units: list[_Unit], views: int) -> dict:
    """The manifest entry of one split, from its units' records in image-shard order."""
    records = [json.loads(_done_path(staging, u).read_text(encoding="utf-8")) for u in units]
    shards = [part for record in records for part in record["shards"]]
    return {
        "role": units[0].role,
        "views": views if units[0].role == "train" else 1,
        "images": sum(s["images"] for s in shards),
        "captions": sum(s["captions"] for s in shards),
        "shards": shards,
        "skipped": [item for record in records for item in record["skipped"]],
    }


def _run_units(
    units: list[_Unit], made_of: _Input, source: str, staging: Path, options: CacheOptions
) -> None:
    """Encode the pending units; workers decode, this process runs the tower and writes."""
    if not units:
        return
    splits = made_of.manifest["splits"].values()
    sizes = {s["file"]: s["images"] for entry in splits for s in entry["shards"]}
    loader = DataLoader(
        made_of.batches(units),
        batch_size=None,
        num_workers=options.num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    writers: dict[int, _UnitWriter] = {}
    total = sum(sizes[u.file] for u in units)
    bar = tqdm(total=total, desc=f"features {source}", unit="img", disable=not options.progress)
    with torch.inference_mode(), bar:
        for batch in loader:
            unit = units[batch["unit"]]
            writer = writers.setdefault(batch["unit"], _UnitWriter(staging, unit, options))
            if batch["keys"]:
                tokens = _encode(made_of.encode, batch["inputs"], options.device, batch["keys"])
                writer.add(batch, tokens.reshape(len(batch["keys"]), -1, *tokens.shape[1:]))
            writer.skipped += batch["skipped"]
            bar.update(len(batch["keys"]) + len(batch["skipped"]))
            if batch["last"]:
                writers.pop(batch["unit"]).finish()


def _encode(encode: Callable, inputs: torch.Tensor, device: str, keys: list[str]):
    """The activations as float16 on the CPU; refuses values float16 cannot hold."""
    tokens = encode(inputs.to(device)).to(torch.float16).cpu()
    if not torch.isfinite(tokens).all():
        raise ValueError(f"tower output of {keys} overflows float16 (the cache's storage type)")
    return tokens


class _ViewImages(IterableDataset):
    """Decoded, transformed views of the units' images, in batches that never span units.

    Worker ``w`` of ``W`` takes units ``w, w + W, …``; each unit's batches come in order and
    the last one says so, which is all the writer needs however the workers interleave."""

    def __init__(self, units: list[_Unit], transforms: dict, views: int, batch_size: int) -> None:
        super().__init__()
        self.units, self.transforms = units, transforms
        self.views, self.batch_size = views, batch_size
        self.skips = SkipLog()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(worker, len(self.units), workers):
            yield from self._unit_batches(index)

    def _unit_batches(self, index: int) -> Iterator[dict]:
        unit = self.units[index]
        samples = storage.tar_samples([{"url": unit.path}], report=self.skips)
        views = self.views if unit.role == "train" else 1
        per_batch = max(1, self.batch_size // views)  # tower inputs are images x views
        batch = self._empty(index)
        for sample in samples:
            self._add(batch, sample, unit.role)
            if len(batch["keys"]) == per_batch:
                yield self._finished(batch, last=False)
                batch = self._empty(index)
        yield self._finished(batch, last=True)

    @staticmethod
    def _empty(index: int) -> dict:
        return {"unit": index, "keys": [], "json": [], "images": [], "inputs": [], "skipped": []}

    def _add(self, batch: dict, sample: dict, role: str) -> None:
        key = sample["__key__"]
        extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        try:
            if "json" not in sample:
                raise ValueError("no json member")
            inputs = self._inputs(key, sample, extension, role)
        except ValueError as err:
            reason = err.reason if isinstance(err, ImageError) else str(err)
            self.skips.sample(sample["__url__"], key, reason)
            batch["skipped"].append({"key": key, "reason": reason})
            return
        batch["keys"].append(key)
        batch["json"].append(sample["json"])
        eval_image = role == "eval" and extension is not None
        batch["images"].append((extension, sample[extension]) if eval_image else None)
        batch["inputs"] += inputs

    def _inputs(self, key: str, sample: dict, extension: str | None, role: str) -> list:
        """The tower inputs of one sample: its views, transformed."""
        if extension is None:
            raise ValueError(f"no {' or '.join(IMAGE_EXTENSIONS)} member")
        picture = load_image(sample[extension], name=key)
        if role == "eval":
            return [self.transforms["eval"](picture)]
        train = self.transforms["train"]
        return [with_cpu_seed(view_seed(key, v), train, picture) for v in range(self.views)]

    @staticmethod
    def _finished(batch: dict, last: bool) -> dict:
        inputs = torch.stack(batch["inputs"]) if batch["inputs"] else torch.empty(0)
        return {**batch, "inputs": inputs, "last": last}


class _CachedViews(_ViewImages):
    """The views of a cut cache's samples, in the same batches (eval samples keep their image)."""

    def __init__(self, units: list[_Unit], views: int, batch_size: int) -> None:
        super().__init__(units, {}, views, batch_size)

    def _inputs(self, key: str, sample: dict, extension: str | None, role: str) -> list:
        members = [view_member(v) for v in range(self.views if role == "train" else 1)]
        missing = [m for m in members if m not in sample]
        if missing:
            raise ValueError(f"no {missing[0]} member")
        return [decode_features(key, sample[m], None) for m in members]


def _tar_bytes(data: bytes) -> int:
    """Space a member takes in a tar: a 512-byte header and its data padded to 512 bytes."""
    return 512 + -(-len(data) // 512) * 512


class _UnitWriter:
    """The feature shards of one image shard: parts ``<stem>-NNN.tar`` within the size limits,
    each written under a temporary name and renamed when complete, then a ``.done.json``."""

    def __init__(self, staging: Path, unit: _Unit, options: CacheOptions) -> None:
        self.staging, self.unit = staging, unit
        self.max_images, self.max_bytes = options.max_shard_images, options.max_shard_mb * 1e6
        self.parts: list[dict] = []
        self.skipped: list[dict] = []
        self.tar: wds.TarWriter | None = None
        self.bytes = 0

    def add(self, batch: dict, tokens: torch.Tensor) -> None:
        """Write each image's views ([images, views, tokens, width] float16)."""
        for i, key in enumerate(batch["keys"]):
            sample = {"__key__": key, "json": batch["json"][i]}
            sample |= {view_member(v): encode_features(t) for v, t in enumerate(tokens[i])}
            if batch["images"][i] is not None:
                extension, data = batch["images"][i]
                sample[extension] = data
            size = sum(_tar_bytes(v) for k, v in sample.items() if k != "__key__")
            self._make_room(size)
            self.tar.write(sample)
            self.bytes += size
            part = self.parts[-1]
            part["images"] += 1
            part["captions"] += len(usable_captions(json.loads(batch["json"][i])["captions"]))

    def _make_room(self, size: int) -> None:
        full = self.tar is not None and (
            self.parts[-1]["images"] >= self.max_images or self.bytes + size > self.max_bytes
        )
        if self.tar is None or full:
            self._close_part()
            name = f"{self.unit.stem}-{len(self.parts):03d}.tar"
            self.parts.append({"file": name, "images": 0, "captions": 0})
            self.tar = wds.TarWriter(str(self._temporary(name)), encoder=False, **TAR_META)
            self.bytes = 0

    def _temporary(self, name: str) -> Path:
        path = self.staging / name
        return path.with_name(f".{path.name}.tmp")

    def _close_part(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        name = self.parts[-1]["file"]
        os.replace(self._temporary(name), self.staging / name)
        self.tar = None

    def finish(self) -> None:
        """Close the last part and record the unit as done (atomically)."""
        self._close_part()
        done = _done_path(self.staging, self.unit)
        record = {"source_shard": self.unit.file, "shards": self.parts, "skipped": self.skipped}
        temporary = done.with_name(f".{done.name}.tmp")
        temporary.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, done)
