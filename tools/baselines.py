r"""Reference floors for caption quality on one split: kNN caption retrieval on the frozen
tower's features and the one-caption-per-scene-class oracle (bita.eval.baselines), scored
with the project's metric code, printed as a table and written as JSON.

    python tools/baselines.py dataset=rsicd paths.shards=data/shards [--split val] [--k 25]
    python tools/baselines.py dataset=rsicd features.root=data/features ...   # from a cache
    python tools/baselines.py                                                 # the demo sample

Takes the overrides of `python -m bita.run` (the encoder, dataset, features and hardware
groups decide what is read). Without `features.root` the tower encodes every image of the
train split and of `--split` through its eval transform; with it the cache's tokens are read
(the train split's first cached view: the eval view when the cache was made with augment=false,
a random crop otherwise). Writes `--json` (default runs/baselines/<dataset>_<split>.json): the
settings, the metrics of both floors and every image's chosen caption.

Two diagnostics compare towers on the same images: `--aligned` adds kNN retrieval with
caption-aligned keys (the ridge map of `model.retrieval.key: caption_aligned`, fitted on the
train split), `--probe` the linear-probe scene accuracy of the features (bita/eval/scene_probe.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from bita.data import features, stream
from bita.engine.distributed import apply_thread_count
from bita.eval.baselines import (
    SplitFeatures,
    class_oracle_captions,
    knn_captions,
    mean_token_features,
)
from bita.eval.cider_reward import CiderReward
from bita.eval.metrics import score_captions
from bita.eval.scene_probe import scene_probe_accuracy
from bita.eval.tables import metrics_table
from bita.models.caption_keys import fit_key_projection_with
from bita.models.encoders import FrozenImageEncoder
from bita.run import compose_config
from bita.stages.features import build_tower

log = logging.getLogger("baselines")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--split", default=None, help="split to floor (default dataset.val_split)")
    parser.add_argument("--k", type=int, default=25, help="train images retrieved per query")
    parser.add_argument("--json", type=Path, default=None, help="where the JSON goes")
    parser.add_argument("--batch-size", type=int, default=64, help="images per tower pass")
    parser.add_argument(
        "--aligned", action="store_true", help="also kNN retrieval with caption-aligned keys"
    )
    parser.add_argument(
        "--probe", action="store_true", help="also the linear-probe scene accuracy (diagnostic)"
    )
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if "=" not in o]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}: give KEY=VALUE overrides or --options")
    return args, overrides


def source_of(dataset_cfg: DictConfig) -> str:
    """The one source the floors are for: they compare a split with its own train split."""
    names = [s.name for s in dataset_cfg.sources]
    if names != [dataset_cfg.eval_source]:
        raise SystemExit(
            f"dataset={dataset_cfg.name} mixes sources {names}: floors need one dataset whose "
            f"train and evaluation splits come from the same source (e.g. dataset=rsicd)"
        )
    return str(dataset_cfg.eval_source)


def split_shards(
    cfg: DictConfig, tower: FrozenImageEncoder, split: str, *, train: bool
) -> stream.ShardSet:
    """The cache's shards when `features.root` is set, else the images through the tower's
    eval transform (training augmentation has no place in retrieval)."""
    cache = features.open_cache(
        cfg.features, cfg.dataset, cfg.encoder, tower, augment=bool(cfg.augment)
    )
    if cache is None:
        return stream.image_shards(cfg.dataset, features.cache_transforms(tower.preprocess)["eval"])
    return (
        cache.train_shards(cfg.dataset, split) if train else cache.eval_shards(cfg.dataset, split)
    )


def read_split(
    cfg: DictConfig, tower: FrozenImageEncoder, split: str, *, train: bool, batch_size: int
) -> SplitFeatures:
    """Every image of `split` with its mean tower tokens, references and scene class."""
    ids, vectors, references, scenes = [], [], [], []
    batches = stream.eval_batches(
        cfg.dataset,
        split=split,
        batch_size=batch_size,
        shards=split_shards(cfg, tower, split, train=train),
        num_workers=int(cfg.hardware.num_workers),
    )
    with torch.inference_mode():
        for batch in batches:
            tokens = batch["features"] if "features" in batch else tower(batch["image"])
            vectors.append(mean_token_features(tokens))
            ids += batch["image_id"]
            references += batch["references"]
            scenes += batch["scene"]
    log.info("%s: %d images", split, len(ids))
    return SplitFeatures(ids, torch.cat(vectors), references, scenes)


def caption_aligned(
    train: SplitFeatures, query: SplitFeatures, text_encoder: str
) -> tuple[SplitFeatures, SplitFeatures]:
    """Both splits with their features mapped by the caption-aligned key projection that a
    datastore of `train` would fit (bita/models/caption_keys.py)."""
    projection = fit_key_projection_with(text_encoder, train.features, train.references)
    return tuple(replace(split, features=projection(split.features)) for split in (train, query))


def floors(
    train: SplitFeatures,
    query: SplitFeatures,
    k: int,
    spice: str | None,
    aligned: tuple[SplitFeatures, SplitFeatures] | None = None,
) -> dict:
    """Both floors' captions and metrics (the oracle's `error` where classes are missing), and
    kNN on the `aligned` (train, query) features when given."""
    reward = CiderReward(train.references)
    references = dict(zip(query.image_ids, query.references, strict=True))
    results = {}
    choosers = {
        "knn": lambda: knn_captions(train, query, reward, k),
        "class_oracle": lambda: class_oracle_captions(train, query, reward),
    }
    if aligned is not None:
        choosers["knn_caption_aligned"] = lambda: knn_captions(*aligned, reward, k)
    for name, choose in choosers.items():
        try:
            captions = choose()
        except ValueError as err:
            results[name] = {"error": str(err)}
            continue
        metrics = score_captions(captions, references, spice_dir=spice)
        metrics.pop("per_image_CIDEr")
        results[name] = {
            "metrics": metrics,
            "distinct_captions": len(set(captions.values())),
            "captions": captions,
        }
    return results


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = compose_config(overrides)
    apply_thread_count(cfg.hardware)
    source = source_of(cfg.dataset)
    split = args.split or str(cfg.dataset.val_split)
    tower = build_tower(cfg)
    read = {"train": True, "batch_size": args.batch_size}
    train = read_split(cfg, tower, str(cfg.dataset.train_split), **read)
    query = read_split(cfg, tower, split, **{**read, "train": False})
    text_encoder = str(cfg.model.retrieval.text_encoder)
    aligned = caption_aligned(train, query, text_encoder) if args.aligned else None
    results = floors(train, query, args.k, cfg.paths.spice, aligned)

    labels = {
        "knn": f"kNN retrieval, k={args.k}",
        "knn_caption_aligned": f"kNN retrieval, caption-aligned keys, k={args.k}",
        "class_oracle": "class oracle",
    }
    rows = {
        f"{label} ({source} {split})": results[name]["metrics"]
        for name, label in labels.items()
        if "metrics" in results.get(name, {})
    }
    print(metrics_table(rows))
    for name, result in results.items():
        if "error" in result:
            print(f"{name}: not computed: {result['error']}")
    probe = scene_probe_accuracy(train, query) if args.probe else None
    if probe is not None:
        scores = ", ".join(f"C={c:g}: {a:.3f}" for c, a in probe["accuracy"].items())
        print(f"scene probe on {probe['images']} {split} images of train classes: {scores}")
    out = args.json or Path("runs") / "baselines" / f"{cfg.dataset.name}_{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "dataset": str(cfg.dataset.name),
        "source": source,
        "split": split,
        "train_split": str(cfg.dataset.train_split),
        "images": {"train": len(train.image_ids), split: len(query.image_ids)},
        "k": args.k,
        "features": str(cfg.features.root or f"the {cfg.encoder.model} tower on the images"),
        "floors": results,
        "scene_probe": probe,
    }
    out.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
