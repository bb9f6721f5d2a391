"""Frozen-feature cache on the bundled demo shards with the tiny tower: same losses as images,
refusal of a foreign cache, deterministic views, resumable writing and reading."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import webdataset as wds

from bita.data import cache_writer, features
from bita.data.cache_writer import CacheOptions, cache_features
from bita.data.images import load_image
from bita.data.stream import eval_batches, steps_per_epoch, train_batches, with_cpu_seed
from bita.locations import resolve_location
from bita.models.build import build_model
from bita.models.encoders import build_image_encoder
from bita.models.llm import train_caption_tokenizer

from .conftest import load_tool

OPTIONS = CacheOptions(views=2, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """The root config of `python -m bita.run experiment=tiny` (tiny parts, the demo_mini
    sample) with a caption LM tokenizer trained on the spot."""
    cfg = load_tool("cache_features").compose_config(["experiment=tiny"])
    tokenizer = tmp_path_factory.mktemp("tokenizer")
    cfg.llm.tokenizer = str(
        train_caption_tokenizer(["a river runs near trees"] * 8, 300, tokenizer)
    )
    cfg.features.views = OPTIONS.views
    return cfg


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def cache_root(cfg, model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("features")
    cache_features(cfg.dataset, cfg.encoder, model.encoder, root, OPTIONS)
    return root


@pytest.fixture(scope="module")
def cache(cfg, model, cache_root):
    return features.open_cache(
        {**cfg.features, "root": str(cache_root)}, cfg.dataset, cfg.encoder, model.encoder
    )


def tar_samples(folder: Path) -> dict[str, dict]:
    paths = sorted(str(p) for p in folder.glob("*.tar"))
    pipeline = wds.DataPipeline(wds.SimpleShardList(paths), wds.tarfile_to_samples())
    return {s["__key__"]: s for s in pipeline}


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_cached_and_uncached_eval_views_give_the_same_losses(cfg, model, cache):
    args = dict(split="val", batch_size=8, num_workers=0)
    pre = model.preprocess
    transform = features.cache_transforms(pre)["eval"]
    images = list(eval_batches(cfg.dataset, transform=transform, **args))
    cached = list(eval_batches(cfg.dataset, shards=cache.eval_shards(cfg.dataset, "val"), **args))
    assert [b["image_id"] for b in images] == [b["image_id"] for b in cached]
    assert [b["image_bytes"] for b in images] == [b["image_bytes"] for b in cached]
    assert set(cached[0]) == set(images[0]) - {"image"} | {"features"}
    with torch.no_grad():
        for plain, stored in zip(images, cached, strict=True):
            assert stored["features"].dtype == torch.float16
            torch.testing.assert_close(
                stored["features"].float(),
                model.encode_images(plain["image"]),
                atol=2e-3,
                rtol=2e-3,
            )
            captions = [refs[0] for refs in plain["references"]]
            for objective in ("itc", "lm"):
                uncached = model({"image": plain["image"], "caption": captions}, objective)
                from_cache = model({"features": stored["features"], "caption": captions}, objective)
                assert abs(uncached["loss"] - from_cache["loss"]) < 1e-3, objective


def test_training_views_are_seeded_by_key_and_chosen_by_epoch(cfg, model, cache, cache_root):
    stored = tar_samples(cache_root / "rsicd" / "train")
    demo = Path(resolve_location(cfg.dataset.root)) / "rsicd" / "train"
    key, sample = sorted(tar_samples(demo).items())[5]
    picture = load_image(sample["jpg"], name=key)
    train = features.cache_transforms(model.preprocess)["train"]
    for view in range(2):
        pixels = with_cpu_seed(features.view_seed(key, view), train, picture)
        cached = features.decode_features(key, stored[key][features.view_member(view)], None)
        torch.testing.assert_close(
            cached.float(), model.encode_images(pixels[None])[0], atol=2e-3, rtol=2e-3
        )
    assert stored[key]["f0.npy"] != stored[key]["f1.npy"]
    shards = cache.train_shards(cfg.dataset, "train")
    for epoch in range(3):
        batches = train_batches(
            cfg.dataset,
            split="train",
            batch_size=8,
            shards=shards,
            num_workers=0,
            seed=1,
            epoch=epoch,
        )
        for batch in batches:
            for image_id, tensor in zip(batch["image_id"], batch["features"], strict=True):
                expected = stored[image_id][features.view_member(epoch % 2)]
                assert torch.equal(tensor, features.decode_features(image_id, expected, None))


@pytest.mark.parametrize("workers", [0, 2])
def test_feature_stream_has_the_image_epoch_and_resumes_identically(cfg, cache, workers):
    shards = cache.train_shards(cfg.dataset, "train")
    assert steps_per_epoch(cfg.dataset, split="train", global_batch_size=8, shards=shards) == (
        steps_per_epoch(cfg.dataset, split="train", global_batch_size=8)
    )
    args = dict(split="train", batch_size=8, shards=shards, num_workers=workers, seed=2, epoch=1)
    full = list(train_batches(cfg.dataset, **args))
    assert len(full) == 310 // 8 and set(full[0]) == {"features", "caption", "image_id"}
    assert full[0]["features"].shape == (8, 17, 64)
    for skip in (1, 5):
        resumed = list(train_batches(cfg.dataset, skip_batches=skip, **args))
        assert len(resumed) == len(full) - skip
        for a, b in zip(full[skip:], resumed, strict=True):
            assert a["image_id"] == b["image_id"] and a["caption"] == b["caption"]
            assert torch.equal(a["features"], b["features"])
    eval_shards = cache.eval_shards(cfg.dataset, "val")
    ids = [
        i
        for rank in range(2)
        for b in eval_batches(
            cfg.dataset,
            split="val",
            batch_size=4,
            shards=eval_shards,
            num_workers=workers,
            rank=rank,
            world_size=2,
        )
        for i in b["image_id"]
    ]
    assert len(ids) == len(set(ids)) == 31


def test_a_cache_of_another_tower_preprocessing_orientation_or_view_count_is_refused(
    cfg, model, cache_root
):
    features_cfg = {**cfg.features, "root": str(cache_root)}
    torch.manual_seed(0)  # the same weights as the model's tower, another normalisation
    other_mean = {**cfg.encoder, "mean": [0.5, 0.5, 0.5]}
    pattern = r"fingerprint \w+ but .* give \w+; they differ in: encoder.mean: .*; transforms.eval"
    with pytest.raises(ValueError, match=pattern):
        features.open_cache(features_cfg, cfg.dataset, other_mean, build_image_encoder(other_mean))
    torch.manual_seed(0)  # the same tower, its tokens averaged over two orientations
    turned = {**cfg.encoder, "orientations": ["identity", "hflip"]}
    with pytest.raises(
        ValueError, match=r"orientations: cache \(not recorded\) vs run \['identity', 'h"
    ):
        features.open_cache(features_cfg, cfg.dataset, turned, build_image_encoder(turned))
    torch.manual_seed(1)
    other_weights = build_image_encoder(cfg.encoder)
    with pytest.raises(ValueError, match=r"differ in: weights_sha256: cache '\w+' vs run '\w+'\. "):
        features.open_cache(features_cfg, cfg.dataset, cfg.encoder, other_weights)
    with pytest.raises(ValueError, match=r"views: cache 2 vs run 1"):
        features.open_cache({**features_cfg, "views": 1}, cfg.dataset, cfg.encoder, model.encoder)
    one_view = {**features_cfg, "views": 1}
    foreign_train_view = r"(?s)transforms.train: cache .*RandomResizedCrop.* vs run"
    with pytest.raises(ValueError, match=foreign_train_view):
        features.open_cache(one_view, cfg.dataset, cfg.encoder, model.encoder, augment=False)
    with pytest.raises(FileNotFoundError, match="tools/cache_features.py"):
        features.open_cache(
            {**features_cfg, "root": str(cache_root / "nowhere")},
            cfg.dataset,
            cfg.encoder,
            model.encoder,
        )
    cache = features.open_cache(features_cfg, cfg.dataset, cfg.encoder, model.encoder)
    with pytest.raises(ValueError, match="split 'val' holds eval views"):
        cache.train_shards(cfg.dataset, "val")


def test_caches_written_before_orientation_averaging_keep_their_fingerprint(cfg, model):
    def fingerprint_of(encoder_cfg: dict) -> str:
        return features.fingerprint(features.fingerprint_settings(encoder_cfg, model.encoder, 2))

    before = {k: v for k, v in cfg.encoder.items() if k != "orientations"}
    one_view = fingerprint_of({**before, "orientations": ["identity"]})
    assert fingerprint_of(before) == one_view
    assert fingerprint_of({**before, "orientations": ["identity", "hflip"]}) != one_view


def test_without_augment_training_views_are_the_eval_view(cfg, model, tmp_path):
    options = replace(OPTIONS, views=1, augment=False)
    cache_features(cfg.dataset, cfg.encoder, model.encoder, tmp_path, options)
    stored = tar_samples(tmp_path / "rsicd" / "train")
    demo = Path(resolve_location(cfg.dataset.root)) / "rsicd" / "train"
    key, sample = sorted(tar_samples(demo).items())[3]
    eval_view = features.cache_transforms(model.preprocess)["eval"]
    pixels = eval_view(load_image(sample["jpg"], name=key))
    cached = features.decode_features(key, stored[key][features.view_member(0)], None)
    torch.testing.assert_close(
        cached.float(), model.encode_images(pixels[None])[0], atol=2e-3, rtol=2e-3
    )
    features_cfg = {**cfg.features, "root": str(tmp_path), "views": 1}
    assert features.open_cache(features_cfg, cfg.dataset, cfg.encoder, model.encoder, False)
    with pytest.raises(ValueError, match="features.views=2 with augment=false"):
        cache_features(cfg.dataset, cfg.encoder, model.encoder, tmp_path, replace(options, views=2))


def test_writing_is_deterministic_resumable_and_skips_an_up_to_date_cache(
    cfg, model, cache_root, tmp_path, monkeypatch
):
    encode, calls = cache_writer._encode, []

    def failing(*args):
        if len(calls) == 6:  # inside the second image shard, after the first (5 batches)
            raise KeyboardInterrupt
        calls.append(1)
        return encode(*args)

    monkeypatch.setattr(cache_writer, "_encode", failing)
    with pytest.raises(KeyboardInterrupt):
        cache_features(cfg.dataset, cfg.encoder, model.encoder, tmp_path, OPTIONS)
    assert not (tmp_path / "rsicd").exists() and len(list(tmp_path.glob(".rsicd.partial-*"))) == 1

    def counting(*args):
        calls.append(1)
        return encode(*args)

    monkeypatch.setattr(cache_writer, "_encode", counting)
    calls.clear()
    other_batching = replace(OPTIONS, batch_size=6, num_workers=2)
    cache_features(cfg.dataset, cfg.encoder, model.encoder, tmp_path, other_batching)
    assert len(calls) == 8 + 6  # 22 + 31 images in batches of 3 and 6: the first shard is done
    assert tree(tmp_path / "rsicd") == tree(cache_root / "rsicd")
    assert not list(tmp_path.glob(".rsicd.partial-*"))
    calls.clear()
    cache_features(cfg.dataset, cfg.encoder, model.encoder, tmp_path, OPTIONS)
    assert calls == []


def test_feature_shards_stay_within_the_size_limits(cfg, model, tmp_path):
    demo = {**cfg.dataset, "sources": [{"name": "rsicd", "weight": None}]}
    limits = replace(OPTIONS, views=1, max_shard_images=9, max_shard_mb=0.1)
    manifest = cache_features(demo, cfg.encoder, model.encoder, tmp_path, limits)["rsicd"]
    for split, entry in manifest["splits"].items():
        sizes = [(tmp_path / "rsicd" / s["file"]).stat().st_size for s in entry["shards"]]
        assert all(s["images"] <= 9 for s in entry["shards"]) and max(sizes) <= 0.1e6 + 10240, split
        assert entry["images"] == sum(s["images"] for s in entry["shards"])
    assert manifest["splits"]["val"]["images"] == 31
    assert manifest["splits"]["train"]["captions"] == 310
    assert len(manifest["splits"]["val"]["shards"]) > 31 // 9 + 1  # the byte limit binds there


def test_a_cache_over_http_reads_and_writes_as_from_folders(
    cfg, model, cache, cache_root, serve_folder, tmp_path
):
    """features.root may be a URL; the cache writer may read its image shards from one."""
    served = serve_folder(cache_root)
    remote = features.open_cache(
        {**cfg.features, "root": served.url}, cfg.dataset, cfg.encoder, model.encoder
    )
    assert remote.fingerprint == cache.fingerprint
    by_url = features.manifest_shards({**cfg.features, "root": served.url})
    assert steps_per_epoch(cfg.dataset, split="train", global_batch_size=8, shards=by_url) == (
        steps_per_epoch(
            cfg.dataset,
            split="train",
            global_batch_size=8,
            shards=cache.train_shards(cfg.dataset, "train"),
        )
    )
    args = dict(split="val", batch_size=8, num_workers=0)
    here = eval_batches(cfg.dataset, shards=cache.eval_shards(cfg.dataset, "val"), **args)
    there = eval_batches(cfg.dataset, shards=remote.eval_shards(cfg.dataset, "val"), **args)
    for local, fetched in zip(here, there, strict=True):
        assert local["image_id"] == fetched["image_id"]
        assert torch.equal(local["features"], fetched["features"])
    images = serve_folder(Path(resolve_location(cfg.dataset.root)))
    remote_images = {**cfg.dataset, "root": images.url}
    cache_features(remote_images, cfg.encoder, model.encoder, tmp_path, OPTIONS)
    assert tree(tmp_path) == tree(cache_root)
