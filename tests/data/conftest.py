"""Small synthetic caption datasets (a handful of generated images) for the fast data tests."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tifffile
from PIL import Image

from bita.data.annotations import read_annotations
from bita.data.shards import make_shards
from bita.data.transforms import eval_transform, train_transform

TOOLS = Path(__file__).resolve().parents[2] / "tools"
SIZE = 16
MEAN = STD = (0.5, 0.5, 0.5)


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jpeg_bytes(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_karpathy(
    folder: Path, name: str, n_train: int, n_val: int, extras: dict | None = None
) -> Path:
    """A Karpathy-layout dataset of JPEGs with 3 captions each; returns the annotation file.

    ``extras`` maps an image index to ``"missing"``, ``"corrupt"``, ``"tiff16"`` or ``"empty"``
    (an unusable ``" ."`` caption) to plant the cases make_shards must handle.
    """
    extras = extras or {}
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(n_train + n_val):
        kind = extras.get(index)
        filename = f"{name}.{index}.tif" if kind == "tiff16" else f"{name}.{index}.jpg"
        if kind == "tiff16":
            ramp = np.arange(24 * 24 * 3, dtype=np.uint16).reshape(24, 24, 3) * 7
            tifffile.imwrite(images_dir / filename, ramp)
        elif kind == "corrupt":
            (images_dir / filename).write_bytes(jpeg_bytes(index)[:200])
        elif kind != "missing":
            (images_dir / filename).write_bytes(jpeg_bytes(index))
        captions = [f"A Scene {index} with Trees .", f"Roads near scene {index}!", "some (houses)"]
        if kind == "empty":
            captions[2] = " ."
        items.append(
            {
                "filename": filename,
                "imgid": index,
                "split": "train" if index < n_train else "val",
                "label": f"class{index % 2}",
                "sentences": [{"raw": c} for c in captions],
            }
        )
    annotations = folder / f"dataset_{name}.json"
    annotations.write_text(json.dumps({"images": items}))
    return annotations


def shard_dataset(folder: Path, name: str, n_train: int, n_val: int, **kw) -> dict:
    annotations = write_karpathy(folder / "raw", name, n_train, n_val, kw.pop("extras", None))
    return make_shards(
        read_annotations(annotations, name),
        images_dir=folder / "raw" / "images",
        out_dir=folder / "shards",
        dataset=name,
        progress=False,
        **kw,
    )


def dataset_cfg(root: Path, *names: str, weights: list | None = None) -> dict:
    weights = weights or [None] * len(names)
    return {
        "name": "+".join(names),
        "root": str(root),
        "sources": [{"name": n, "weight": w} for n, w in zip(names, weights, strict=True)],
        "train_split": "train",
        "val_split": "val",
        "test_split": "val",
        "eval_source": names[0],
        "shuffle_buffer": 20,
    }


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> dict:
    """A sharded 'toy' dataset: 14 train images (one 16-bit TIFF, one with an unusable caption,
    one missing, one corrupt) and 7 val images, 4 images per shard."""
    folder = tmp_path_factory.mktemp("toy")
    extras = {1: "tiff16", 2: "empty", 3: "missing", 4: "corrupt"}
    manifest = shard_dataset(folder, "toy", 14, 7, shard_size=4, extras=extras)
    return {"root": folder / "shards", "raw": folder / "raw", "manifest": manifest}


@pytest.fixture(scope="session")
def transforms() -> dict:
    return {"train": train_transform(SIZE, MEAN, STD), "eval": eval_transform(SIZE, MEAN, STD)}
