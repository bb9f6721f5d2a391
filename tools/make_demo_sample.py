"""Build the bundled demo sample (bita/data/demo) from RSICD's train and val splits.

    python tools/make_demo_sample.py --annotations ../shared/data/rsicd/dataset_rsicd.json \
        --images ../shared/data/rsicd/images [--out bita/data/demo] [--train-per-class 20] \
        [--val-per-class 3] [--quality 80] [--seed 0]

Takes N train and M val images of every scene class, chosen by a seeded shuffle (so the sample
is not the first, often alike, files of a class), re-encodes each as a JPEG of the given quality
(it sets the package's size: RSICD's own JPEGs are ~19 KB, quality 80 ~14 KB), and writes them
with their verbatim captions through make_shards (train split in its seeded shuffled order).
The same arguments give the same shards. RSICD's test split is never sampled.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

from PIL import Image

from bita.data.annotations import CaptionRecord, first_per_class, read_annotations
from bita.data.shards import make_shards

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotations", required=True, type=Path, help="dataset_rsicd.json")
    parser.add_argument("--images", required=True, type=Path, help="RSICD's image folder")
    parser.add_argument("--out", type=Path, default=ROOT / "bita" / "data" / "demo")
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--val-per-class", type=int, default=3)
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality of the sample")
    parser.add_argument("--seed", type=int, default=0, help="which images of each class")
    parser.add_argument("--shard-size", type=int, default=200, help="images per shard")
    args = parser.parse_args(argv)
    if not 1 <= args.quality <= 95:
        parser.error(f"--quality {args.quality}: expected 1-95 (PIL's useful JPEG range)")
    if args.train_per_class < 1 or args.val_per_class < 1:
        parser.error("--train-per-class and --val-per-class must be at least 1")
    return args


def choose(records: list[CaptionRecord], train: int, val: int, seed: int) -> list[CaptionRecord]:
    """`train` train and `val` val records per scene class, drawn by a seeded shuffle, returned
    in annotation order."""
    position = {record.image_id: i for i, record in enumerate(records)}
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    chosen = first_per_class(shuffled, {"train": train, "val": val})
    return sorted(chosen, key=lambda record: position[record.image_id])


def reencode(records: list[CaptionRecord], images: Path, out: Path, quality: int) -> None:
    """Each record's image as an RGB JPEG of `quality` under `out`, same relative name."""
    for record in records:
        target = out / record.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(images / record.filename) as image:
            image.convert("RGB").save(target, "JPEG", quality=quality, optimize=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = read_annotations(args.annotations, "rsicd")
    chosen = choose(records, args.train_per_class, args.val_per_class, args.seed)
    with tempfile.TemporaryDirectory(prefix="bita-demo-") as tmp:
        reencode(chosen, args.images, Path(tmp), args.quality)
        manifest = make_shards(
            chosen,
            images_dir=Path(tmp),
            out_dir=args.out,
            dataset="rsicd",
            shard_size=args.shard_size,
            source_name=args.annotations.name,
            progress=False,
        )
    for split, info in manifest["splits"].items():
        print(f"rsicd/{split}: {info['images']} images, {info['captions']} captions")
    size = sum(f.stat().st_size for f in (args.out / "rsicd").rglob("*") if f.is_file())
    print(f"{args.out / 'rsicd'}: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
