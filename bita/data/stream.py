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

Bad data. Shard and sample errors go to a ``SkipLog`` (bita.data.skips; a stage passes its
own, which it totals at its end): named with the shard and key, counted, skipped. A training
image that fails to decode is replaced by another pair of the same batch, which keeps batch
sizes and resume alignment; evaluation drops it.

Shards may live in a local folder, behind a URL or a ``pipe:`` command (bita.data.storage);
local shards the manifest lists must all be there before a stream starts, remote ones are
reported, once and by URL, when one cannot be read.

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
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from bita.data import storage
from bita.data.captions import usable_captions
from bita.data.images import ImageError, load_image
from bita.data.shards import MANIFEST, read_manifest
from bita.data.skips import SkipLog
from bita.errors import MissingFileError
from bita.locations import resolve_location

Transform = Callable[[Any], torch.Tensor]
Decode = Callable[[str, bytes, int | None], torch.Tensor]
IMAGE_EXTENSIONS = ("jpg", "png")


@dataclass(frozen=True)
class ShardSet:
    """Where a stream's shards are and what each sample gives the model.

    ``views[v]`` lists the sample members that may hold view ``v`` (the first present is used);
    ``decode(key, data, seed)`` turns its bytes into a tensor (``seed`` None: no randomness)
    and raises ValueError saying what is wrong with bad data (the stream adds the key and
    shard).
    ``root`` is a folder, URL or ``pipe:`` command (bita.data.storage).
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
        try:
            picture = load_image(data, name=key)
        except ImageError as err:
            raise ValueError(err.reason) from err  # the stream names the key and shard
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


def _split_shards(shard_set: ShardSet, source: str, split: str) -> list[Shard]:
    """The shards of one source's split, in manifest order."""
    manifest = shard_set.read_manifest(shard_set.root, source)
    where = storage.join(shard_set.root, source, MANIFEST)
    if split not in manifest["splits"] or not manifest["splits"][split]["shards"]:
        raise ValueError(
            f"{where}: split {split!r} has no shards (it has {sorted(manifest['splits'])})"
        )
    shards = [
        Shard(storage.join(shard_set.root, source, s["file"]), source, s["images"], s["captions"])
        for s in manifest["splits"][split]["shards"]
    ]
    missing = [s.path for s in shards if storage.is_local(s.path) and not Path(s.path).is_file()]
    if missing:
        raise MissingFileError(f"{where} lists missing shards: {missing}")
    return shards


def split_size(dataset_cfg: Any, *, split: str, unit: str, shards: ShardSet | None = None) -> int:
    """Usable ``"captions"`` or ``"images"`` of a split over all sources (from the image
    manifests, or from those of ``shards``)."""
    shard_set = shards or image_shards(dataset_cfg, transform=None)
    per_source = _source_shards(dataset_cfg, shard_set, split)
    return sum(getattr(s, unit) for own in per_source.values() for s in own)


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
    skips: SkipLog | None = None,
) -> Iterable[dict]:
    """This rank's training batches of one epoch (see the module docstring): images through
    ``transform``, or the ``field`` of another shard set ``shards`` (a feature cache); one
    ``caption`` per sample, or with ``per_image`` all of an image's ``references``. Bad data
    goes to ``skips`` (None: a log of this stream's own)."""
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
        skips=skips or SkipLog(),
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
    skips: SkipLog | None = None,
) -> Iterable[dict]:
    """This rank's share of the evaluation images, each once, in a fixed order: images through
    ``transform``, or view 0 of another shard set ``shards`` (a feature cache). Bad data goes
    to ``skips`` (None: a log of this stream's own)."""
    source = str(dataset_cfg["eval_source"])
    shard_set = _chosen(dataset_cfg, transform, shards)
    stream = _EvalStream(
        shards=_split_shards(shard_set, source, split),
        batch_size=batch_size,
        shard_set=shard_set,
        rank=rank,
        world_size=world_size,
        streams=max(num_workers, 1),
        skips=skips or SkipLog(),
    )
    return _loader(stream, num_workers)


def eval_image_count(dataset_cfg: Any, *, split: str, shards: ShardSet) -> int:
    """Images of the evaluation source's split, as its manifest counts them."""
    source = str(dataset_cfg["eval_source"])
    return sum(s.images for s in _split_shards(shards, source, split))


def eval_image_keys(dataset_cfg: Any, *, split: str, shards: ShardSet) -> list[str]:
    """Keys of the evaluation source's split, read from the shards' json members only."""
    own = _split_shards(shards, str(dataset_cfg["eval_source"]), split)
    return [raw.key for raw in _json_records(own, SkipLog())]


def caption_groups(
    dataset_cfg: Any, *, split: str, skips: SkipLog | None = None
) -> list[list[str]]:
    """Each image's usable cleaned captions over all sources, in shard order (images without
    one left out), read from the image shards' json members only."""
    skips = skips or SkipLog()
    groups: list[list[str]] = []
    shard_set = image_shards(dataset_cfg, transform=None)
    for own in _source_shards(dataset_cfg, shard_set, split).values():
        for raw in _json_records(own, skips):
            captions = usable_captions(raw.record["captions"])
            if captions:
                groups.append(captions)
    return groups


def _json_records(shards: list[Shard], skips: SkipLog) -> Iterator[_Raw]:
    """The parsed json records of ``shards`` in order, reading no image or feature member."""
    samples = storage.tar_samples(
        [{"url": s.path} for s in shards], report=skips, select_files=_selector(())
    )
    return _parsed(samples, skips, members=None)


def split_records(
    dataset_cfg: Any, shard_set: ShardSet, *, split: str, skips: SkipLog
) -> Iterator[_Raw]:
    """Every sample of a split over all sources, in shard order, with view 0's member as its
    payload: what an index over the split (the retrieval datastore) reads once. Samples that
    do not parse go to ``skips`` with their key and shard."""
    members = shard_set.members(0)
    for own in _source_shards(dataset_cfg, shard_set, split).values():
        samples = storage.tar_samples(
            [{"url": s.path} for s in own], report=skips, select_files=_selector(members)
        )
        yield from _parsed(samples, skips, members)


def caption_texts(dataset_cfg: Any, *, split: str, skips: SkipLog | None = None) -> list[str]:
    """All usable cleaned captions of a split over all sources, in shard order."""
    groups = caption_groups(dataset_cfg, split=split, skips=skips)
    return [text for group in groups for text in group]


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


def _source_shards(dataset_cfg: Any, shard_set: ShardSet, split: str) -> dict[str, list[Shard]]:
    """Each source's shards of `split`; sources without a manifest are named all at once
    (`dataset=all` with two datasets not yet sharded names both)."""
    found: dict[str, list[Shard]] = {}
    missing: list[str] = []
    for source in _sources(dataset_cfg):
        try:
            found[source["name"]] = _split_shards(shard_set, source["name"], split)
        except MissingFileError as err:
            missing.append(str(err))
    if len(missing) > 1:
        raise MissingFileError(
            f"dataset {dataset_cfg['name']!r}: {len(missing)} of {len(found) + len(missing)} "
            f"sources have no manifest: {' | '.join(missing)}"
        )
    if missing:
        raise MissingFileError(missing[0])
    return found


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
    per_source = _source_shards(dataset_cfg, shard_set, split)
    shards, draw = [], []
    for source, weight in zip(sources, weights, strict=True):
        own = per_source[source["name"]]
        total = sum(s.captions for s in own)
        scale = 1.0 if weight is None else float(weight) / total
        shards += own
        draw += [s.captions * scale for s in own]
    return shards, draw


def _worker() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


class _Raw(NamedTuple):
    """A shard sample as read: its key, its shard, the member that feeds the model (None when
    only records are read) and its parsed json record."""

    key: str
    shard: str
    payload: bytes | None
    record: dict


def _parse(sample: dict, members: tuple[str, ...] | None) -> _Raw:
    """The ``_Raw`` of a sample, the payload being the first of ``members`` present; raises
    ValueError saying what is missing or wrong."""
    payload = None if members is None else _member(sample, members)
    if "json" not in sample:
        raise ValueError("no json member (the record with its captions)")
    try:
        record = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"its json member is not valid JSON ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("captions"), list):
        raise ValueError("its json record has no list of captions")
    return _Raw(sample["__key__"], sample["__url__"], payload, record)


def _member(sample: dict, names: tuple[str, ...]) -> bytes:
    """The first of the members ``names`` a raw sample has."""
    data = next((sample[e] for e in names if e in sample), None)
    if data is None:
        raise ValueError(f"no {' or '.join(names)} member")
    return data


def _parsed(
    samples: Iterator[dict], skips: SkipLog, members: tuple[str, ...] | None
) -> Iterator[_Raw]:
    """The samples that parse; the others go to ``skips`` with their key and shard."""
    for sample in samples:
        try:
            yield _parse(sample, members)
        except ValueError as err:
            skips.sample(sample.get("__url__"), sample.get("__key__"), str(err))


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
        skips: SkipLog,
    ) -> None:
        super().__init__()
        self.shards, self.weights, self.per_image = shards, weights, per_image
        self.batch_size, self.shard_set, self.members = batch_size, shard_set, members
        self.n_batches, self.skip_batches, self.streams = n_batches, skip_batches, streams
        self.name, self.buffer, self.skips = name, buffer, skips

    def __iter__(self) -> Iterator[dict]:
        first = self.skip_batches + _worker()
        count = len(range(first, self.n_batches, self.streams))
        if count == 0:
            return iter(())
        start = first // self.streams
        name = f"{self.name}/{self.streams}/{first % self.streams}"
        pipeline = wds.DataPipeline(
            lambda: self._resampled(random.Random(f"shards/{name}")),
            partial(storage.tar_samples, report=self.skips, select_files=_selector(self.members)),
            lambda samples: self._units(_parsed(samples, self.skips, self.members)),
            wds.shuffle(self.buffer, self.buffer, rng=random.Random(f"shuffle/{name}")),
            lambda units: self._seeded(units, random.Random(f"augment/{name}")),
            wds.batched(self.batch_size, collation_fn=None, partial=False),
            lambda batches: islice(batches, start, start + count),
            wds.map(self._decode_batch),
        )
        return iter(pipeline)

    def _resampled(self, rng: random.Random) -> Iterator[dict]:
        paths = [s.path for s in self.shards]
        while True:
            yield {"url": rng.choices(paths, weights=self.weights)[0]}

    def _units(self, samples: Iterator[_Raw]) -> Iterator[tuple[_Raw, Any]]:
        """(sample, caption) per usable caption, or (sample, captions) per image with
        ``per_image``."""
        for raw in samples:
            captions = usable_captions(raw.record["captions"])
            if self.per_image:
                if captions:
                    yield raw, captions
            else:
                yield from ((raw, caption) for caption in captions)

    @staticmethod
    def _seeded(units: Iterator[tuple], rng: random.Random) -> Iterator[tuple]:
        for unit in units:
            yield (*unit, rng.getrandbits(63))

    def _decode_batch(self, batch: list[tuple[_Raw, Any, int]]) -> dict:
        decoded = [self._augment(raw, seed) for raw, _, seed in batch]
        good = [i for i, tensor in enumerate(decoded) if tensor is not None]
        if not good:
            keys = [raw.key for raw, _, _ in batch]
            raise RuntimeError(f"every sample of a batch failed to decode: {keys}")
        slots = [i if decoded[i] is not None else good[i % len(good)] for i in range(len(batch))]
        return {
            self.shard_set.field: default_collate([decoded[i] for i in slots]),
            "references" if self.per_image else "caption": [batch[i][1] for i in slots],
            "image_id": [batch[i][0].key for i in slots],
        }

    def _augment(self, raw: _Raw, seed: int) -> torch.Tensor | None:
        try:
            return self.shard_set.decode(raw.key, raw.payload, seed)
        except ValueError as err:
            self.skips.sample(raw.shard, raw.key, str(err))
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
        skips: SkipLog,
    ) -> None:
        super().__init__()
        self.shards, self.batch_size, self.shard_set = shards, batch_size, shard_set
        self.members = shard_set.members(0)
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.skips = skips

    def __iter__(self) -> Iterator[dict]:
        slot = self.rank * self.streams + _worker()
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([s.path for s in self.shards]),
            partial(
                storage.tar_samples,
                report=self.skips,
                select_files=_selector((*self.members, *IMAGE_EXTENSIONS)),
            ),
            lambda samples: islice(samples, slot, None, self.world_size * self.streams),
            self._decoded,
            wds.batched(
                self.batch_size,
                collation_fn=partial(_collate_eval, field=self.shard_set.field),
                partial=True,
            ),
        )
        return iter(pipeline)

    def _decoded(self, samples: Iterator[dict]) -> Iterator[dict]:
        """Each sample that parses and decodes; the others go to ``skips``."""
        for sample in samples:
            try:
                decoded = self._decode(sample)
            except ValueError as err:
                self.skips.sample(sample.get("__url__"), sample.get("__key__"), str(err))
            else:
                yield decoded

    def _decode(self, sample: dict) -> dict:
        """Model input, references, and the encoded image (galleries show it; None in a feature
        cache's train split, which keeps no images)."""
        raw = _parse(sample, self.members)
        missing = [name for name in ("filename", "dataset") if name not in raw.record]
        if missing:
            raise ValueError(f"its json record has no {' or '.join(missing)}")
        return {
            self.shard_set.field: self.shard_set.decode(raw.key, raw.payload, None),
            "image_id": raw.key,
            "filename": raw.record["filename"],
            "references": usable_captions(raw.record["captions"]),
            "image_bytes": next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None),
            "dataset": raw.record["dataset"],
            "scene": raw.record.get("scene"),  # the annotation's scene class, None where none
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
    names = list(samples[0])
    batch = {name: [s[name] for s in samples] for name in names}
    batch[field] = default_collate(batch[field])
    return batch
