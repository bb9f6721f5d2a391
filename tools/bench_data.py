"""Decoded-and-augmented samples/s: the shard training stream beside a plain map-style reader.

    python tools/bench_data.py --shards /tmp/bita_shards --dataset rsicd \
        --annotations ../shared/data/rsicd/dataset_rsicd.json --images ../shared/data/rsicd/images

Both sides read the train split's (image, caption) pairs, decode with bita.data.images.load_image
and apply the same train transform (SPEC §2, 224 px); the plain side is a
torch.utils.data.Dataset over the JPEG files with a shuffling DataLoader.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from bita.data.annotations import read_annotations
from bita.data.captions import usable_captions
from bita.data.images import load_image
from bita.data.stream import train_batches
from bita.data.transforms import train_transform

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FilePairs(Dataset):
    """(image, caption) pairs read straight from the image files: the baseline."""

    def __init__(self, annotations: Path, images: Path, dataset: str, transform) -> None:
        records = [r for r in read_annotations(annotations, dataset) if r.split == "train"]
        self.pairs = [
            (images / r.filename, c) for r in records for c in usable_captions(r.captions)
        ]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self.pairs[index]
        return self.transform(load_image(path)), caption


def throughput(batches: Iterable, n_batches: int, warmup: int) -> tuple[float, float]:
    """(samples/s, CPU ms/sample of this process) over ``n_batches`` after ``warmup`` batches.

    The CPU figure covers all the work only without workers; on a shared machine it is the
    number that other users' load does not move.
    """
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    wall, cpu, samples = time.perf_counter(), time.process_time(), 0
    for _ in range(n_batches):
        batch = next(iterator)
        samples += len(batch["caption"] if isinstance(batch, dict) else batch[1])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return samples / wall, 1000 * cpu / samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shards", required=True, help="shard root holding <dataset>/manifest.json"
    )
    parser.add_argument("--dataset", default="rsicd")
    parser.add_argument("--annotations", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    transform = train_transform(224, CLIP_MEAN, CLIP_STD)
    cfg = {
        "name": args.dataset,
        "root": args.shards,
        "sources": [{"name": args.dataset, "weight": None}],
        "shuffle_buffer": 5000,
    }
    plain = FilePairs(args.annotations, args.images, args.dataset, transform)
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; batch {args.batch_size}"
    )
    print(f"{'workers':>7} {'stream/s':>14} {'files/s':>14} CPU ms/sample (stream, files)")
    for workers in args.workers:
        runs: dict[str, list[tuple[float, float]]] = {"stream": [], "files": []}
        for _ in range(args.repeats):  # alternate the two readers; keep each one's best run
            stream = train_batches(
                cfg,
                split="train",
                batch_size=args.batch_size,
                transform=transform,
                num_workers=workers,
                seed=0,
                epoch=0,
            )
            files = DataLoader(plain, batch_size=args.batch_size, shuffle=True, num_workers=workers)
            runs["stream"].append(throughput(stream, args.batches, args.warmup))
            runs["files"].append(throughput(files, args.batches, args.warmup))
        cells = [f"{max(r)[0]:>14.0f}" for r in runs.values()]
        if workers == 0:
            cells += [f"{min(c for _, c in r):>6.2f}" for r in runs.values()]
        print(f"{workers:>7} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
