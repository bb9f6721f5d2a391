"""Turn an official caption dataset into WebDataset shards and a manifest (see bita.data.shards).

    python tools/make_shards.py --dataset rsicd --annotations dataset_rsicd.json \
        --images RSICD/images --out data/shards [--shard-size 1000]

writes data/shards/rsicd/<split>/rsicd-<split>-NNNNN.tar and data/shards/rsicd/manifest.json.
It stops, leaving any previous shards as they were, when fewer than --min-found (0.5) of a
split's annotated images are found and readable, or when a split that holds images would be
replaced by an empty one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bita.data.annotations import SPLITS, first_per_class, read_annotations
from bita.data.shards import ShardingError, make_shards
from bita.errors import reports_user_errors

DATASETS = ("ucm", "rsicd", "nwpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--annotations", required=True, type=Path, help="official JSON file")
    parser.add_argument("--images", required=True, type=Path, help="folder the file names are in")
    parser.add_argument("--out", required=True, type=Path, help="shard root (paths.shards)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument(
        "--per-class",
        action="append",
        default=[],
        metavar="SPLIT=N",
        help="keep only the first N images of each scene class in SPLIT (repeatable; "
        "splits not named are left out) — for small samples such as the bundled demo",
    )
    parser.add_argument(
        "--train-order-seed",
        type=int,
        default=0,
        help="seed of the train split's shuffled write order, so every shard mixes scene classes",
    )
    parser.add_argument(
        "--keep-order",
        action="store_true",
        help="write the train split in annotation order (its shards then hold few classes each)",
    )
    parser.add_argument(
        "--min-found",
        type=fraction,
        default=0.5,
        metavar="FRACTION",
        help="stop, writing nothing, when fewer than this fraction of a split's annotated images "
        "can be sharded (default 0.5: a wrong --images finds none); 0 shards whatever is there",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def fraction(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a fraction from 0 to 1")
    return value


def per_class_counts(specs: list[str]) -> dict[str, int]:
    """``["train=2", "val=1"]`` → ``{"train": 2, "val": 1}``, with errors naming the option."""
    counts = {}
    for spec in specs:
        split, _, number = spec.partition("=")
        if split not in SPLITS or not number.isdigit():
            raise SystemExit(f"--per-class {spec!r}: expected SPLIT=N with SPLIT in {SPLITS}")
        counts[split] = int(number)
    return counts


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.images.is_dir():
        raise SystemExit(f"--images {args.images}: not a folder")
    records = read_annotations(args.annotations, args.dataset)
    if args.per_class:
        records = first_per_class(records, per_class_counts(args.per_class))
    try:
        manifest = make_shards(
            records,
            images_dir=args.images,
            out_dir=args.out,
            dataset=args.dataset,
            shard_size=args.shard_size,
            source_name=args.annotations.name,
            progress=not args.quiet,
            train_order_seed=None if args.keep_order else args.train_order_seed,
            min_found=args.min_found,
        )
    except ShardingError as err:
        raise SystemExit(f"make_shards: {err}") from None
    for split, info in manifest["splits"].items():
        print(
            f"{args.dataset}/{split}: {info['images']} images, {info['captions']} captions, "
            f"{len(info['shards'])} shards, {len(info['skipped'])} skipped, "
            f"{len(info['unusable_captions'])} unusable captions"
        )
    print(f"manifest: {args.out / args.dataset / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
