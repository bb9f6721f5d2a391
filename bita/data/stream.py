"""WebDataset streams: (image, caption) training batches and per-image evaluation batches.

Training. Every rank and every DataLoader worker reads its own endless stream of shards drawn
with replacement, each shard with probability proportional to its usable captions times its
source's weight (so ``dataset=all`` mixes the train splits in proportion to their size). Each
image expands to one (image, caption) pair per usable caption, pairs pass a shuffle buffer and
are grouped into batches before decoding. An epoch is ``captions // global_batch_size`` batches
per rank: one sample per caption per epoch in expectation (with resampling, not as an exact
permutation; exactness would need every worker to read every shard).

Determinism and resume. Batch ``i`` of a rank's epoch is batch ``i // W`` of logical stream
``i % W`` (``W`` = max(num_workers, 1)); each logical stream's shard draws, shuffle and per-sample
augmentation seeds derive from (seed, epoch, rank, world_size, W, stream). ``skip_batches=k``
hands DataLoader worker ``w`` the logical stream ``(k + w) % W`` and drops its batches before
``k`` undecoded, so the remaining batches are identical to an uninterrupted run.

Bad data. Shard and sample errors go to ``SkipLog``: logged with the shard and key, counted,
skipped. A training image that fails to decode is replaced by another pair of the same batch,
which keeps batch sizes and resume alignment; evaluation drops it.

Evaluation. All ranks and workers read the split's shards in manifest order and keep every
``S``-th sample (``S`` = world_size × W), so each image is decoded exactly once, in a fixed
order, however few shards there are.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from bita.data.captions import usable_captions
from bita.data.images import load_image
from bita.data.shards import read_manifest
from bita.locations import resolve_location

log = logging.getLogger(__name__)

Transform = Callable[[Any], torch.Tensor]
_IMAGE_EXTENSIONS = ("jpg", "png")


@dataclass(frozen=True)
class Shard:
    """One tar file of a split and what the manifest says it holds."""

    path: str
    source: str
    images: int
    captions: int


class SkipLog:
    """WebDataset ``handler=``: log a bad shard or sample with where it was, count it, go on."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, error: BaseException) -> bool:
        self.count += 1
        log.warning("skipped bad data (%d so far in this process): %s", self.count, error)
        return True


def _split_shards(dataset_cfg: Any, source: str, split: str) -> list[Shard]:
    """The shards of one source's split, in manifest order."""
    root = Path(resolve_location(str(dataset_cfg["root"])))
    manifest = read_manifest(root, source)
    if split not in manifest["splits"] or not manifest["splits"][split]["shards"]:
        raise ValueError(
            f"{root / source}/manifest.json: split {split!r} has no shards "
            f"(it has {sorted(manifest['splits'])})"
        )
    shards = [
        Shard(str(root / source / s["file"]), source, s["images"], s["captions"])
        for s in manifest["splits"][split]["shards"]
    ]
    missing = [s.path for s in shards if not Path(s.path).is_file()]
    if missing:
        raise FileNotFoundError(f"{root / source}/manifest.json lists missing shards: {missing}")
    return shards


def steps_per_epoch(dataset_cfg: Any, *, split: str, global_batch_size: int) -> int:
    """Batches per rank per epoch: usable captions of all sources // global batch size."""
    captions = sum(
        s.captions
        for src in _sources(dataset_cfg)
        for s in _split_shards(dataset_cfg, src["name"], split)
    )
    steps = captions // global_batch_size
    if steps < 1:
        raise ValueError(
            f"dataset {dataset_cfg['name']!r} split {split!r}: {captions} captions are fewer "
            f"than one global batch of {global_batch_size}"
        )
    return steps


def train_batches(
    dataset_cfg: Any,
    *,
    split: str,
    batch_size: int,
    transform: Transform,
    num_workers: int,
    seed: int,
    epoch: int,
    skip_batches: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterable[dict]:
    """This rank's training batches of one epoch (see the module docstring)."""
    n_batches = steps_per_epoch(dataset_cfg, split=split, global_batch_size=batch_size * world_size)
    if not 0 <= skip_batches <= n_batches:
        raise ValueError(f"skip_batches={skip_batches} outside 0..{n_batches} batches per epoch")
    shards, weights = _training_mix(dataset_cfg, split)
    stream = _TrainStream(
        shards=shards,
        weights=weights,
        batch_size=batch_size,
        transform=transform,
        n_batches=n_batches,
        skip_batches=skip_batches,
        streams=max(num_workers, 1),
        name=f"{seed}/{epoch}/{rank}/{world_size}",
        buffer=int(dataset_cfg.get("shuffle_buffer", 2000)),
    )
    return _loader(stream, num_workers)


def eval_batches(
    dataset_cfg: Any,
    *,
    split: str,
    batch_size: int,
    transform: Transform,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterable[dict]:
    """This rank's share of the evaluation images, each once, in a fixed order."""
    source = str(dataset_cfg["eval_source"])
    stream = _EvalStream(
        shards=_split_shards(dataset_cfg, source, split),
        batch_size=batch_size,
        transform=transform,
        rank=rank,
        world_size=world_size,
        streams=max(num_workers, 1),
    )
    return _loader(stream, num_workers)


def caption_texts(dataset_cfg: Any, *, split: str) -> list[str]:
    """All usable cleaned captions of a split over all sources, in shard order."""
    texts: list[str] = []
    for source in _sources(dataset_cfg):
        paths = [s.path for s in _split_shards(dataset_cfg, source["name"], split)]
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(paths),
            wds.tarfile_to_samples(handler=SkipLog(), select_files=lambda f: f.endswith(".json")),
        )
        for sample in pipeline:
            texts.extend(usable_captions(json.loads(sample["json"])["captions"]))
    return texts


def _loader(stream: IterableDataset, num_workers: int) -> DataLoader:
    """Batches come ready-made from the stream; the loader gets its own generator because it
    draws a worker base seed on every iteration, which would otherwise move the caller's torch
    RNG (dropout) depending on when batches are made."""
    generator = torch.Generator().manual_seed(0)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, generator=generator)


def _sources(dataset_cfg: Any) -> list[dict]:
    sources = list(dataset_cfg["sources"])
    if not sources:
        raise ValueError(f"dataset {dataset_cfg['name']!r}: 'sources' is empty")
    return sources


def _training_mix(dataset_cfg: Any, split: str) -> tuple[list[Shard], list[float]]:
    """All sources' shards and their draw weights (captions, scaled by the source weight)."""
    sources = _sources(dataset_cfg)
    weights = [s.get("weight") for s in sources]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise ValueError(
            f"dataset {dataset_cfg['name']!r}: sources[*].weight must be all null "
            f"(proportional to size) or all numbers, got {weights}"
        )
    shards, draw = [], []
    for source, weight in zip(sources, weights, strict=True):
        own = _split_shards(dataset_cfg, source["name"], split)
        total = sum(s.captions for s in own)
        scale = 1.0 if weight is None else float(weight) / total
        shards += own
        draw += [s.captions * scale for s in own]
    return shards, draw


def _worker() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def _parse(sample: dict) -> tuple[str, bytes, dict]:
    """(key, encoded image, record) of a raw shard sample; names the shard when incomplete."""
    key = sample.get("__key__")
    image = next((sample[e] for e in _IMAGE_EXTENSIONS if e in sample), None)
    if image is None or "json" not in sample:
        raise ValueError(f"sample {key} in {sample.get('__url__')}: needs an image and a json")
    try:
        record = json.loads(sample["json"])
    except json.JSONDecodeError as err:
        raise ValueError(f"sample {key} in {sample.get('__url__')}: bad json: {err}") from err
    return key, image, record


def _parsed(samples: Iterator[dict], handler: SkipLog) -> Iterator[tuple[str, bytes, dict]]:
    for sample in samples:
        try:
            yield _parse(sample)
        except ValueError as err:
            handler(err)


class _TrainStream(IterableDataset):
    def __init__(
        self,
        *,
        shards: list[Shard],
        weights: list[float],
        batch_size: int,
        transform: Transform,
        n_batches: int,
        skip_batches: int,
        streams: int,
        name: str,
        buffer: int,
    ) -> None:
        super().__init__()
        self.shards, self.weights = shards, weights
        self.batch_size, self.transform = batch_size, transform
        self.n_batches, self.skip_batches, self.streams = n_batches, skip_batches, streams
        self.name, self.buffer = name, buffer
        self.skips = SkipLog()

    def __iter__(self) -> Iterator[dict]:
        first = self.skip_batches + _worker()
        count = len(range(first, self.n_batches, self.streams))
        if count == 0:
            return iter(())
        start = first // self.streams
        name = f"{self.name}/{self.streams}/{first % self.streams}"
        pipeline = wds.DataPipeline(
            lambda: self._resampled(random.Random(f"shards/{name}")),
            wds.tarfile_to_samples(handler=self.skips),
            lambda samples: self._pairs(_parsed(samples, self.skips)),
            wds.shuffle(self.buffer, self.buffer, rng=random.Random(f"shuffle/{name}")),
            lambda pairs: self._seeded(pairs, random.Random(f"augment/{name}")),
            wds.batched(self.batch_size, collation_fn=None, partial=False),
            lambda batches: islice(batches, start, start + count),
            wds.map(self._decode_batch),
        )
        return iter(pipeline)

    def _resampled(self, rng: random.Random) -> Iterator[dict]:
        paths = [s.path for s in self.shards]
        while True:
            yield {"url": rng.choices(paths, weights=self.weights)[0]}

    @staticmethod
    def _pairs(records: Iterator[tuple[str, bytes, dict]]) -> Iterator[tuple[str, bytes, str]]:
        for key, image, record in records:
            for caption in usable_captions(record["captions"]):
                yield key, image, caption

    @staticmethod
    def _seeded(pairs: Iterator[tuple], rng: random.Random) -> Iterator[tuple]:
        for pair in pairs:
            yield (*pair, rng.getrandbits(63))

    def _decode_batch(self, batch: list[tuple[str, bytes, str, int]]) -> dict:
        decoded = [self._augment(*pair) for pair in batch]
        good = [i for i, image in enumerate(decoded) if image is not None]
        if not good:
            raise RuntimeError(f"every image of a batch failed to decode: {[p[0] for p in batch]}")
        slots = [i if decoded[i] is not None else good[i % len(good)] for i in range(len(batch))]
        return {
            "image": default_collate([decoded[i] for i in slots]),
            "caption": [batch[i][2] for i in slots],
            "image_id": [batch[i][0] for i in slots],
        }

    def _augment(self, key: str, image: bytes, caption: str, seed: int) -> torch.Tensor | None:
        try:
            picture = load_image(image, name=key)
        except ValueError as err:
            self.skips(err)
            return None
        return _with_cpu_seed(seed, self.transform, picture)


class _EvalStream(IterableDataset):
    def __init__(
        self,
        *,
        shards: list[Shard],
        batch_size: int,
        transform: Transform,
        rank: int,
        world_size: int,
        streams: int,
    ) -> None:
        super().__init__()
        self.shards, self.batch_size, self.transform = shards, batch_size, transform
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.skips = SkipLog()

    def __iter__(self) -> Iterator[dict]:
        slot = self.rank * self.streams + _worker()
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([s.path for s in self.shards]),
            wds.tarfile_to_samples(handler=self.skips),
            lambda samples: islice(samples, slot, None, self.world_size * self.streams),
            lambda samples: _parsed(samples, self.skips),
            wds.map(self._decode, handler=self.skips),
            wds.batched(self.batch_size, collation_fn=_collate_eval, partial=True),
        )
        return iter(pipeline)

    def _decode(self, parsed: tuple[str, bytes, dict]) -> dict:
        key, image, record = parsed
        return {
            "image": self.transform(load_image(image, name=key)),
            "image_id": key,
            "filename": record["filename"],
            "references": usable_captions(record["captions"]),
            "image_bytes": image,
            "dataset": record["dataset"],
        }


def _with_cpu_seed(seed: int, function: Callable, *args: Any) -> Any:
    """``function(*args)`` with torch's CPU generator seeded, then restored.

    The generator is driven directly: ``torch.manual_seed`` would also seed every accelerator
    and costs about 1 ms a call, a third of what a 224-px sample costs in all.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return function(*args)
    finally:
        generator.set_state(state)


def _collate_eval(samples: list[dict]) -> dict:
    batch = {name: [s[name] for s in samples] for name in samples[0]}
    batch["image"] = default_collate(batch["image"])
    return batch
