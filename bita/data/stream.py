"""WebDataset streams: (image, caption) training batches and per-image evaluation batches.

Training. Every rank and every DataLoader worker reads its own endless stream of shards drawn
with replacement, each shard with probability proportional to its usable captions times its
source's weight (so ``dataset=all`` mixes the train splits in proportion to their size). Each
image expands to one (image, caption) pair per usable caption, pairs pass a shuffle buffer and
are grouped into batches before decoding. An epoch is ``captions // global_batch_size`` batches
per rank: one sample per caption per epoch in expectation (with resampling, not as an exact
permutation; exactness would need every worker to read every shard). With ``per_image`` each
image with a usable caption is one sample carrying all its captions as ``references`` (what a
sequence-level reward scores against), and an epoch is ``images // global_batch_size``.

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

Shard sets. Everything above is the same for the image shards of tools/make_shards.py and for
the feature shards of tools/cache_features.py (bita.data.features): a ``ShardSet`` says where
the manifests are, which sample member feeds the model under which batch key, and how its bytes
become a tensor. A set may hold several views per sample; epoch ``e`` reads view ``e % views``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
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
Decode = Callable[[str, bytes, int | None], torch.Tensor]
IMAGE_EXTENSIONS = ("jpg", "png")


@dataclass(frozen=True)
class ShardSet:
    """Where a stream's shards are and what each sample gives the model.

    ``views[v]`` lists the sample members that may hold view ``v`` (the first present is used);
    ``decode(key, data, seed)`` turns its bytes into a tensor (``seed`` None: no randomness)
    and raises ValueError on bad data.
    """

    root: str
    read_manifest: Callable[[str | Path, str], dict]
    field: str
    views: tuple[tuple[str, ...], ...]
    decode: Decode

    def members(self, epoch: int) -> tuple[str, ...]:
        """The members an epoch reads: view ``epoch % views``."""
        return self.views[epoch % len(self.views)]


def image_shards(dataset_cfg: Any, transform: Transform | None) -> ShardSet:
    """The image shards of ``dataset_cfg.root``, decoded and passed through ``transform``
    (None: only manifests and captions will be read)."""

    def decode(key: str, data: bytes, seed: int | None) -> torch.Tensor:
        picture = load_image(data, name=key)
        return transform(picture) if seed is None else with_cpu_seed(seed, transform, picture)

    root = resolve_location(str(dataset_cfg["root"]))
    return ShardSet(root, read_manifest, "image", (IMAGE_EXTENSIONS,), decode)


def _chosen(dataset_cfg: Any, transform: Transform | None, shards: ShardSet | None) -> ShardSet:
    """The shard set a public function reads: image shards through ``transform``, or ``shards``."""
    if (transform is None) == (shards is None):
        raise ValueError("give either transform (image shards) or shards (e.g. a feature cache)")
    return shards if shards is not None else image_shards(dataset_cfg, transform)


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


def _split_shards(shard_set: ShardSet, source: str, split: str) -> list[Shard]:
    """The shards of one source's split, in manifest order."""
    root = Path(shard_set.root)
    manifest = shard_set.read_manifest(root, source)
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


def split_size(dataset_cfg: Any, *, split: str, unit: str, shards: ShardSet | None = None) -> int:
    """Usable ``"captions"`` or ``"images"`` of a split over all sources (from the image
    manifests, or from those of ``shards``)."""
    shard_set = shards or image_shards(dataset_cfg, transform=None)
    return sum(
        getattr(s, unit)
        for src in _sources(dataset_cfg)
        for s in _split_shards(shard_set, src["name"], split)
    )


def steps_per_epoch(
    dataset_cfg: Any,
    *,
    split: str,
    global_batch_size: int,
    shards: ShardSet | None = None,
    per_image: bool = False,
) -> int:
    """Batches per rank per epoch: usable captions (images with ``per_image``) of all sources
    // global batch size."""
    unit = "images" if per_image else "captions"
    samples = split_size(dataset_cfg, split=split, unit=unit, shards=shards)
    steps = samples // global_batch_size
    if steps < 1:
        raise ValueError(
            f"dataset {dataset_cfg['name']!r} split {split!r}: {samples} {unit} are fewer "
            f"than one global batch of {global_batch_size}"
        )
    return steps


def train_batches(
    dataset_cfg: Any,
    *,
    split: str,
    batch_size: int,
    transform: Transform | None = None,
    num_workers: int,
    seed: int,
    epoch: int,
    skip_batches: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shards: ShardSet | None = None,
    per_image: bool = False,
) -> Iterable[dict]:
    """This rank's training batches of one epoch (see the module docstring): images through
    ``transform``, or the ``field`` of another shard set ``shards`` (a feature cache); one
    ``caption`` per sample, or with ``per_image`` all of an image's ``references``."""
    shard_set = _chosen(dataset_cfg, transform, shards)
    n_batches = steps_per_epoch(
        dataset_cfg,
        split=split,
        global_batch_size=batch_size * world_size,
        shards=shard_set,
        per_image=per_image,
    )
    if not 0 <= skip_batches <= n_batches:
        raise ValueError(f"skip_batches={skip_batches} outside 0..{n_batches} batches per epoch")
    files, weights = _training_mix(dataset_cfg, shard_set, split)
    stream = _TrainStream(
        shards=files,
        weights=weights,
        batch_size=batch_size,
        shard_set=shard_set,
        members=shard_set.members(epoch),
        n_batches=n_batches,
        skip_batches=skip_batches,
        streams=max(num_workers, 1),
        name=f"{seed}/{epoch}/{rank}/{world_size}",
        buffer=int(dataset_cfg.get("shuffle_buffer", 2000)),
        per_image=per_image,
    )
    return _loader(stream, num_workers)


def eval_batches(
    dataset_cfg: Any,
    *,
    split: str,
    batch_size: int,
    transform: Transform | None = None,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    shards: ShardSet | None = None,
) -> Iterable[dict]:
    """This rank's share of the evaluation images, each once, in a fixed order: images through
    ``transform``, or view 0 of another shard set ``shards`` (a feature cache)."""
    source = str(dataset_cfg["eval_source"])
    shard_set = _chosen(dataset_cfg, transform, shards)
    stream = _EvalStream(
        shards=_split_shards(shard_set, source, split),
        batch_size=batch_size,
        shard_set=shard_set,
        rank=rank,
        world_size=world_size,
        streams=max(num_workers, 1),
    )
    return _loader(stream, num_workers)


def caption_groups(dataset_cfg: Any, *, split: str) -> list[list[str]]:
    """Each image's usable cleaned captions over all sources, in shard order (images without
    one left out), read from the image shards' json members only."""
    groups: list[list[str]] = []
    shard_set = image_shards(dataset_cfg, transform=None)
    for source in _sources(dataset_cfg):
        paths = [s.path for s in _split_shards(shard_set, source["name"], split)]
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(paths),
            wds.tarfile_to_samples(handler=SkipLog(), select_files=lambda f: f.endswith(".json")),
        )
        for sample in pipeline:
            captions = usable_captions(json.loads(sample["json"])["captions"])
            if captions:
                groups.append(captions)
    return groups


def caption_texts(dataset_cfg: Any, *, split: str) -> list[str]:
    """All usable cleaned captions of a split over all sources, in shard order."""
    return [text for group in caption_groups(dataset_cfg, split=split) for text in group]


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


def _training_mix(
    dataset_cfg: Any, shard_set: ShardSet, split: str
) -> tuple[list[Shard], list[float]]:
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
        own = _split_shards(shard_set, source["name"], split)
        total = sum(s.captions for s in own)
        scale = 1.0 if weight is None else float(weight) / total
        shards += own
        draw += [s.captions * scale for s in own]
    return shards, draw


def _worker() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def _parse(sample: dict, members: tuple[str, ...]) -> tuple[str, bytes, dict]:
    """(key, payload, record) of a raw shard sample, the payload being the first of ``members``
    present; names the shard when incomplete."""
    key = sample.get("__key__")
    payload = _member(sample, members)
    if "json" not in sample:
        raise ValueError(f"sample {key} in {sample.get('__url__')}: needs a json")
    try:
        record = json.loads(sample["json"])
    except json.JSONDecodeError as err:
        raise ValueError(f"sample {key} in {sample.get('__url__')}: bad json: {err}") from err
    return key, payload, record


def _member(sample: dict, names: tuple[str, ...]) -> bytes:
    """The first of the members ``names`` a raw sample has; names the shard when it has none."""
    data = next((sample[e] for e in names if e in sample), None)
    if data is None:
        raise ValueError(
            f"sample {sample.get('__key__')} in {sample.get('__url__')}: needs one of {list(names)}"
        )
    return data


def _parsed(
    samples: Iterator[dict], handler: SkipLog, members: tuple[str, ...]
) -> Iterator[tuple[str, bytes, dict]]:
    for sample in samples:
        try:
            yield _parse(sample, members)
        except ValueError as err:
            handler(err)


def _selector(members: tuple[str, ...]) -> Callable[[str], bool]:
    """Read only the json and ``members`` of each sample (a feature sample holds all views)."""
    suffixes = tuple(f".{m}" for m in ("json", *members))
    return lambda name: name.endswith(suffixes)


class _TrainStream(IterableDataset):
    def __init__(
        self,
        *,
        shards: list[Shard],
        weights: list[float],
        batch_size: int,
        shard_set: ShardSet,
        members: tuple[str, ...],
        n_batches: int,
        skip_batches: int,
        streams: int,
        name: str,
        buffer: int,
        per_image: bool,
    ) -> None:
        super().__init__()
        self.shards, self.weights, self.per_image = shards, weights, per_image
        self.batch_size, self.shard_set, self.members = batch_size, shard_set, members
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
            wds.tarfile_to_samples(handler=self.skips, select_files=_selector(self.members)),
            lambda samples: self._units(_parsed(samples, self.skips, self.members)),
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

    def _units(self, records: Iterator[tuple[str, bytes, dict]]) -> Iterator[tuple]:
        """(key, payload, caption) per usable caption, or (key, payload, captions) per image
        with ``per_image``."""
        for key, image, record in records:
            captions = usable_captions(record["captions"])
            if self.per_image:
                if captions:
                    yield key, image, captions
            else:
                yield from ((key, image, caption) for caption in captions)

    @staticmethod
    def _seeded(pairs: Iterator[tuple], rng: random.Random) -> Iterator[tuple]:
        for pair in pairs:
            yield (*pair, rng.getrandbits(63))

    def _decode_batch(self, batch: list[tuple[str, bytes, Any, int]]) -> dict:
        decoded = [self._augment(*pair) for pair in batch]
        good = [i for i, tensor in enumerate(decoded) if tensor is not None]
        if not good:
            raise RuntimeError(f"every sample of a batch failed to decode: {[p[0] for p in batch]}")
        slots = [i if decoded[i] is not None else good[i % len(good)] for i in range(len(batch))]
        return {
            self.shard_set.field: default_collate([decoded[i] for i in slots]),
            "references" if self.per_image else "caption": [batch[i][2] for i in slots],
            "image_id": [batch[i][0] for i in slots],
        }

    def _augment(self, key: str, data: bytes, text: Any, seed: int) -> torch.Tensor | None:
        try:
            return self.shard_set.decode(key, data, seed)
        except ValueError as err:
            self.skips(err)
            return None


class _EvalStream(IterableDataset):
    def __init__(
        self,
        *,
        shards: list[Shard],
        batch_size: int,
        shard_set: ShardSet,
        rank: int,
        world_size: int,
        streams: int,
    ) -> None:
        super().__init__()
        self.shards, self.batch_size, self.shard_set = shards, batch_size, shard_set
        self.members = shard_set.members(0)
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.skips = SkipLog()

    def __iter__(self) -> Iterator[dict]:
        slot = self.rank * self.streams + _worker()
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([s.path for s in self.shards]),
            wds.tarfile_to_samples(
                handler=self.skips, select_files=_selector((*self.members, *IMAGE_EXTENSIONS))
            ),
            lambda samples: islice(samples, slot, None, self.world_size * self.streams),
            wds.map(self._decode, handler=self.skips),
            wds.batched(
                self.batch_size,
                collation_fn=partial(_collate_eval, field=self.shard_set.field),
                partial=True,
            ),
        )
        return iter(pipeline)

    def _decode(self, sample: dict) -> dict:
        """Model input, references, and the encoded image (galleries show it; None in a feature
        cache's train split, which keeps no images)."""
        key, data, record = _parse(sample, self.members)
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        return {
            self.shard_set.field: self.shard_set.decode(key, data, None),
            "image_id": key,
            "filename": record["filename"],
            "references": usable_captions(record["captions"]),
            "image_bytes": image,
            "dataset": record["dataset"],
            "scene": record.get("scene"),  # the annotation's scene class, None where it has none
        }


def with_cpu_seed(seed: int, function: Callable, *args: Any) -> Any:
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


def _collate_eval(samples: list[dict], field: str) -> dict:
    names = [name for name in samples[0] if not name.startswith("__")]  # wds.map adds __key__
    batch = {name: [s[name] for s in samples] for name in names}
    batch[field] = default_collate(batch[field])
    return batch
