"""Writing and reading the shard layout: ``<root>/<dataset>/<split>/<dataset>-<split>-NNNNN.tar``.

Each sample is one image, keyed ``<dataset>_<imgid>`` (WebDataset splits keys at the first dot,
and file names repeat across datasets), holding the image (``jpg`` kept as is, else ``png``) and
a ``json`` with the record and its raw captions. ``manifest.json`` beside the split folders
counts images and usable captions per shard (the loaders size epochs from it) and lists every
skipped image and unusable caption.

The train split is written in a seeded random order: annotation files list images class by
class, and a training stream's shuffle buffer only mixes the few shards it holds, so shards in
file order gave batches of four or five scene classes that drifted class by class through an
epoch. Other splits keep annotation order.

Runs are deterministic (fixed tar metadata, seeded order, no timestamps) and atomic: all
files go to a hidden temporary folder that replaces ``<root>/<dataset>`` only when complete, so
a killed run leaves the previous shards (and a stale ``.<dataset>.tmp-*`` folder) behind.

Runs never lose good shards. A split of which fewer than ``min_found`` of the annotated images
could be sharded stops the run, naming the images folder (a wrong ``--images`` finds none, a
folder of another dataset or a partial download a fraction); and a run that would replace a
split holding images with an empty or absent one stops too. Either way the previous shards
stay as they were.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from bita.data import storage
from bita.data.annotations import SPLITS, CaptionRecord
from bita.data.captions import usable_captions
from bita.data.images import ImageError, encode_for_shard
from bita.errors import MissingFileError, UserError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "bita-shards/1"
# deterministic tar headers: same input, same bytes
TAR_META = {"mtime": 0, "user": "bita", "group": "bita", "mode": 0o444}


def sample_key(record: CaptionRecord) -> str:
    """The WebDataset key of a record: ``<dataset>_<imgid>``, unique across datasets, dot-free."""
    return f"{record.dataset}_{record.image_id}"


def make_shards(
    records: list[CaptionRecord],
    *,
    images_dir: Path,
    out_dir: Path,
    dataset: str,
    shard_size: int = 1000,
    source_name: str = "",
    progress: bool = True,
    train_order_seed: int | None = 0,
    min_found: float = 0.5,
) -> dict:
    """Write shards and manifest of ``records`` under ``out_dir/dataset``; return the manifest.

    ``train_order_seed`` shuffles the train split's order (None: annotation order);
    ``min_found`` is the fraction of each split's images that must be sharded (see the module
    docstring; 0 accepts any, but never an emptied split)."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    if not 0 <= min_found <= 1:
        raise ValueError(f"--min-found must be between 0 and 1, got {min_found}")
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_sizes(out_dir / dataset)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset}.tmp-", dir=out_dir))
    try:
        splits = {}
        for split in SPLITS:
            chosen = [r for r in records if r.split == split]
            if split == "train" and train_order_seed is not None:
                random.Random(train_order_seed).shuffle(chosen)
            if chosen:
                splits[split] = _write_split(
                    chosen, images_dir, staging, split, shard_size, progress
                )
                _check_found(
                    splits[split], len(chosen), f"{dataset}/{split}", images_dir, min_found
                )
        _check_nothing_emptied(previous, splits, out_dir / dataset)
        manifest = {
            "format": MANIFEST_FORMAT,
            "dataset": dataset,
            "annotations": source_name,
            "shard_size": shard_size,
            "train_order_seed": train_order_seed,
            "splits": splits,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        staging.chmod(0o755)
        replace_folder(staging, out_dir / dataset)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


class ShardingError(UserError, ValueError):
    """make_shards stopped before replacing anything; the message says why and what to do."""


def _check_found(
    entry: dict, annotated: int, where: str, images_dir: Path, min_found: float
) -> None:
    """Stop when fewer than ``min_found`` of a split's ``annotated`` images were sharded."""
    if entry["images"] >= min_found * annotated:
        return
    missing = [s for s in entry["skipped"] if s["reason"].startswith("missing")]
    example = f", e.g. {images_dir / missing[0]['filename']}" if missing else ""
    unreadable = len(entry["skipped"]) - len(missing)
    raise ShardingError(
        f"{where}: only {entry['images']} of {annotated} annotated images could be sharded: "
        f"{len(missing)} not found in the images folder {images_dir}{example}, {unreadable} "
        f"unreadable; expected at least {min_found:.0%} (--min-found {min_found}). Check "
        "--images (the annotations' file names are relative to it), or lower --min-found to "
        "shard what is there. Nothing was written."
    )


def _previous_sizes(folder: Path) -> dict[str, int]:
    """Images per split of the shards already in ``folder`` ({} when there are none)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return {split: int(entry["images"]) for split, entry in manifest["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _check_nothing_emptied(previous: dict[str, int], splits: dict, final: Path) -> None:
    """Stop rather than replace a split that holds images with an empty or absent one."""
    emptied = [
        f"{split} ({count} images)"
        for split, count in previous.items()
        if count and not splits.get(split, {}).get("images")
    ]
    if emptied:
        raise ShardingError(
            f"{final}: this run would leave the split(s) {', '.join(emptied)} empty or absent; "
            f"the shards there were left as they are. Write to another --out, or remove "
            f"{final} first if that is really wanted."
        )


def _write_split(
    records: list[CaptionRecord],
    images_dir: Path,
    staging: Path,
    split: str,
    shard_size: int,
    progress: bool,
) -> dict:
    dataset = records[0].dataset
    (staging / split).mkdir()
    skipped: list[dict] = []
    unusable: list[dict] = []
    shards: list[dict] = []
    bar = tqdm(records, desc=f"{dataset}/{split}", unit="img", disable=not progress)
    samples = _encoded_samples(bar, images_dir, skipped, unusable)
    for index, chunk in enumerate(_chunks(samples, shard_size)):
        name = f"{split}/{dataset}-{split}-{index:05d}.tar"
        shard = {"file": name, "images": 0, "captions": 0}
        with wds.TarWriter(str(staging / name), encoder=False, **TAR_META) as tar:
            for sample, captions in chunk:
                tar.write(sample)
                shard["images"] += 1
                shard["captions"] += captions
        shards.append(shard)
    return {
        "images": sum(s["images"] for s in shards),
        "captions": sum(s["captions"] for s in shards),
        "shards": shards,
        "skipped": skipped,
        "unusable_captions": unusable,
    }


def _encoded_samples(
    records: Iterable[CaptionRecord], images_dir: Path, skipped: list[dict], unusable: list[dict]
) -> Iterator[tuple[dict, int]]:
    """(sample, usable caption count) per readable image; the others go to ``skipped``."""
    for record in records:
        key = sample_key(record)
        try:
            extension, data = encode_for_shard(images_dir / record.filename)
        except FileNotFoundError:
            skipped.append(_skip(record, "missing: no such file"))
            continue
        except (ImageError, OSError) as err:
            skipped.append(_skip(record, f"unreadable: {err}"))
            continue
        usable = usable_captions(record.captions)
        unusable.extend(
            {"key": key, "index": i, "raw": raw}
            for i, raw in enumerate(record.captions)
            if not usable_captions([raw])
        )
        payload = json.dumps(asdict(record), sort_keys=True).encode("utf-8")
        yield {"__key__": key, extension: data, "json": payload}, len(usable)


def _skip(record: CaptionRecord, reason: str) -> dict:
    return {"image_id": record.image_id, "filename": record.filename, "reason": reason}


def _chunks(items: Iterator, size: int) -> Iterator[Iterator]:
    """Consecutive runs of ``size`` items, streamed; no empty trailing run."""
    for first in items:
        yield _run(first, items, size)


def _run(first, items: Iterator, size: int) -> Iterator:
    yield first
    for _, item in zip(range(size - 1), items, strict=False):
        yield item


def replace_folder(staging: Path, final: Path) -> None:
    """Put a complete ``staging`` folder at ``final``, removing what was there only after."""
    if not final.exists():
        staging.rename(final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    final.rename(old)
    staging.rename(final)
    shutil.rmtree(old)


def read_manifest(root: str | Path, dataset: str) -> dict:
    """The manifest of ``<root>/<dataset>`` (a folder, URL or ``pipe:`` command: see
    bita.data.storage), with a clear error when the shards are not there."""
    return read_json_manifest(
        storage.join(root, dataset, MANIFEST),
        MANIFEST_FORMAT,
        how_to_build=f"build it with `python tools/make_shards.py --dataset {dataset} "
        f"--annotations FILE --images DIR --out {root}` "
        "(or point paths.shards / BITA_SHARDS at the folder or URL holding it)",
    )


def read_json_manifest(location: str, expected_format: str, *, how_to_build: str) -> dict:
    """A manifest file of the expected format; a missing one says how to build it."""
    try:
        text = storage.read_bytes(location).decode("utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"{location}: no manifest; {how_to_build}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{location}: not a JSON manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{location}: format {found!r}, expected {expected_format!r}")
    return manifest
