"""Readers for the official caption annotation layouts (SPEC §4); the layout is detected.

- Karpathy JSON (UCM-Captions, RSICD): ``{"images": [{"filename", "imgid", "split",
  "sentences": [{"raw"}, ...]}, ...]}``; an optional ``label`` is the scene class and an
  optional ``filepath`` a sub-folder of the images directory.
- NWPU-Captions per-class JSON: ``{"<class>": [{"filename", "imgid", "split", "raw",
  "raw_1", ..., "raw_4"}, ...]}`` with images under ``<class>/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bita.errors import UserError

SPLITS = ("train", "val", "test")


class AnnotationError(UserError, ValueError):
    """An annotation file that does not follow a known layout; the message names the spot."""


@dataclass(frozen=True)
class CaptionRecord:
    """One image and its raw captions, as the official file lists it."""

    dataset: str
    split: str
    image_id: str
    filename: str  # relative to the images directory
    scene: str | None
    captions: list[str]


def read_annotations(path: str | Path, dataset: str) -> list[CaptionRecord]:
    """Read every record of an official annotation file, in file order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read annotation JSON: {err}") from err
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        records = [_karpathy(path, i, item, dataset) for i, item in enumerate(data["images"])]
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        records = [
            _nwpu(path, scene, i, item, dataset)
            for scene, items in data.items()
            for i, item in enumerate(items)
        ]
    else:
        raise AnnotationError(
            f"{path}: unknown annotation layout; expected Karpathy JSON "
            '{"images": [...]} or NWPU per-class JSON {"<class>": [...]}'
        )
    _check_unique_ids(path, records)
    return records


def _karpathy(path: Path, index: int, item: Any, dataset: str) -> CaptionRecord:
    where = f"{path}: images[{index}]"
    sentences = _field(where, item, "sentences", list)
    captions = [_field(f"{where}.sentences[{j}]", s, "raw", str) for j, s in enumerate(sentences)]
    filename = _field(where, item, "filename", str)
    if "filepath" in item:
        filename = f"{_field(where, item, 'filepath', str)}/{filename}"
    return CaptionRecord(
        dataset=dataset,
        split=_split(where, item),
        image_id=_image_id(where, item),
        filename=filename,
        scene=item.get("label"),
        captions=captions,
    )


def _nwpu(path: Path, scene: str, index: int, item: Any, dataset: str) -> CaptionRecord:
    where = f"{path}: [{scene!r}][{index}]"
    captions = [_field(where, item, "raw", str)]
    while f"raw_{len(captions)}" in item:
        captions.append(_field(where, item, f"raw_{len(captions)}", str))
    return CaptionRecord(
        dataset=dataset,
        split=_split(where, item),
        image_id=_image_id(where, item),
        filename=f"{scene}/{_field(where, item, 'filename', str)}",
        scene=scene,
        captions=captions,
    )


def _field(where: str, item: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(item, dict) or name not in item:
        raise AnnotationError(f"{where}: missing field {name!r}")
    value = item[name]
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise AnnotationError(
            f"{where}: field {name!r} should be {expected}, got {type(value).__name__}"
        )
    return value


def _split(where: str, item: Any) -> str:
    split = _field(where, item, "split", str)
    if split not in SPLITS:
        raise AnnotationError(f"{where}: field 'split' is {split!r}; expected one of {SPLITS}")
    return split


def _image_id(where: str, item: Any) -> str:
    """The id becomes part of a WebDataset key, which must not hold dots or slashes."""
    image_id = str(_field(where, item, "imgid", (int, str)))
    if not image_id or not image_id.replace("-", "").replace("_", "").isalnum():
        raise AnnotationError(
            f"{where}: field 'imgid' is {image_id!r}; expected letters, digits, '-' or '_'"
        )
    return image_id


def _check_unique_ids(path: Path, records: list[CaptionRecord]) -> None:
    seen: set[str] = set()
    for record in records:
        if record.image_id in seen:
            raise AnnotationError(f"{path}: field 'imgid' {record.image_id!r} appears twice")
        seen.add(record.image_id)


def first_per_class(records: list[CaptionRecord], counts: dict[str, int]) -> list[CaptionRecord]:
    """The first ``counts[split]`` records of each scene class in each named split (file order).

    Makes small, class-balanced samples such as the bundled demo; splits not named are dropped.
    """
    taken: dict[tuple[str, str], int] = {}
    chosen = []
    for record in records:
        if record.split not in counts:
            continue
        if record.scene is None:
            raise AnnotationError(f"record {record.image_id}: no scene class to sample by")
        slot = (record.split, record.scene)
        if taken.get(slot, 0) < counts[record.split]:
            taken[slot] = taken.get(slot, 0) + 1
            chosen.append(record)
    return chosen
