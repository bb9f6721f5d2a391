"""Feature caches at a cut point (`stage=tower`) on the demo_mini shards, tiny tower:
the cut cache gives the uncached loss, the derived cache gives the adapted tower's tokens, and a
cache made before adaptation or at another cut is refused."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bita.data import features
from bita.data.cache_writer import CacheOptions, cache_features, derive_features
from bita.data.images import load_image
from bita.data.stream import eval_batches, with_cpu_seed
from bita.locations import resolve_location
from bita.models.bita import ModelSettings
from bita.models.encoders import build_image_encoder
from bita.models.tower_adaptation import TowerAdaptation

from .conftest import load_tool
from .test_features import tar_samples

CUT = CacheOptions(views=2, batch_size=16, progress=False, activations="cut")


@pytest.fixture(scope="module", params=[["identity"], ["identity", "rot90"]], ids=["1", "2"])
def cfg(request):
    """`python tools/cache_features.py experiment=tiny encoder.adapt_blocks=1`, with one
    orientation or two (each one's activations at the cut are cached side by side)."""
    cfg = load_tool("cache_features").compose_config(
        [
            "experiment=tiny",
            "encoder.adapt_blocks=1",
            f"encoder.orientations=[{','.join(request.param)}]",
        ]
    )
    cfg.features.views = CUT.views
    return cfg


def tower(cfg, seed=0, **overrides):
    """The tiny tower with fixed random weights (the same bottom for the same seed)."""
    torch.manual_seed(seed)
    return build_image_encoder({**cfg.encoder, **overrides})


@pytest.fixture(scope="module")
def cut_root(cfg, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cut")
    cache_features(cfg.dataset, cfg.encoder, tower(cfg), root, CUT)
    return root


@pytest.fixture(scope="module")
def adapted(cfg):
    """The tiny tower after adaptation: its top block changed, its bottom the same."""
    adapted = tower(cfg)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if adapted.is_adapted(name):
                param.add_(0.05 * torch.randn_like(param))
    return adapted


def open_cache(cfg, root, encoder, activations, **encoder_cfg):
    features_cfg = {**cfg.features, "root": str(root)}
    encoder_cfg = {**cfg.encoder, **encoder_cfg}
    return features.open_cache(
        features_cfg, cfg.dataset, encoder_cfg, encoder, activations=activations
    )


def test_the_cut_cache_gives_the_loss_of_the_uncached_path_on_the_same_views(
    cfg, cut_root, sentence_encoder
):
    """Training views through the bottom of the tower once, cached at the cut, then the top
    and the contrastive head per step: the same loss as the whole tower on the same views (and
    the same orientation drawn for each image)."""
    model = TowerAdaptation(tower(cfg), sentence_encoder, ModelSettings(embed_dim=16))
    orientations = model.encoder.orientations
    assert open_cache(cfg, cut_root, model.encoder, "cut")
    stored = tar_samples(cut_root / "rsicd" / "train")
    demo = Path(resolve_location(cfg.dataset.root)) / "rsicd" / "train"
    samples = sorted(tar_samples(demo).items())[:6]
    train = features.cache_transforms(model.preprocess)["train"]
    captions = [f"caption {i} of a scene with trees" for i in range(6)]
    for view in range(2):
        pixels = torch.stack(
            [
                with_cpu_seed(features.view_seed(key, view), train, load_image(s["jpg"], name=key))
                for key, s in samples
            ]
        )
        cut = torch.stack(
            [
                features.decode_features(key, stored[key][features.view_member(view)], None)
                for key, _ in samples
            ]
        )
        assert cut.dtype == torch.float16 and cut.shape == (6, 17 * len(orientations), 64)
        with torch.no_grad():
            torch.manual_seed(view)
            uncached = model({"image": pixels, "caption": captions})["loss"]
            torch.manual_seed(view)
            from_cache = model({"features": cut, "caption": captions})["loss"]
        assert abs(uncached - from_cache) < 1e-3


def test_the_derived_cache_holds_the_adapted_towers_tokens(cfg, cut_root, adapted, tmp_path):
    options = replace(CUT, activations="tokens")
    manifest = derive_features(cfg.dataset, cfg.encoder, adapted, cut_root, tmp_path, options)
    cut_manifest = features.read_cache_manifest(cut_root, "rsicd")
    assert manifest["rsicd"]["derived_from"] == cut_manifest["fingerprint"]
    for split in ("train", "val"):
        assert (
            manifest["rsicd"]["splits"][split]["images"] == cut_manifest["splits"][split]["images"]
        )
    cache = open_cache(cfg, tmp_path, adapted, "tokens")
    val = features.cache_transforms(adapted.preprocess)["eval"]
    args = dict(split="val", batch_size=8, num_workers=0)
    images = eval_batches(cfg.dataset, transform=val, **args)
    cached = eval_batches(cfg.dataset, shards=cache.eval_shards(cfg.dataset, "val"), **args)
    for plain, stored in zip(images, cached, strict=True):
        assert plain["image_bytes"] == stored["image_bytes"]
        with torch.no_grad():
            expected = adapted(plain["image"])
        torch.testing.assert_close(stored["features"].float(), expected, atol=3e-3, rtol=3e-3)
    calls = []
    adapted.register_forward_pre_hook(lambda *_: calls.append(1))
    derive_features(cfg.dataset, cfg.encoder, adapted, cut_root, tmp_path, options)
    assert calls == []  # up to date: left as it is


def test_a_cache_made_before_adaptation_or_at_another_cut_is_refused(
    cfg, cut_root, adapted, tmp_path
):
    before = tower(cfg, adapt_blocks=0)
    tokens_cfg = {**cfg.encoder, "adapt_blocks": 0}
    tokens = replace(CUT, activations="tokens")
    cache_features(cfg.dataset, tokens_cfg, before, tmp_path / "frozen", tokens)
    both = r"fingerprint (\w{16}) but .* give (?!\1)\w{16}; they differ in: "
    with pytest.raises(
        ValueError,
        match=both + r"encoder.adapt_blocks: cache \(not recorded\) vs run 1; weights_sha256",
    ):
        open_cache(cfg, tmp_path / "frozen", adapted, "tokens")
    with pytest.raises(
        ValueError, match=both + r"activations: cache 'cut' vs run \(not recorded\)"
    ):
        open_cache(cfg, cut_root, adapted, "tokens")
    deeper = tower(cfg, adapt_blocks=2)
    with pytest.raises(ValueError, match=both + r"encoder.adapt_blocks: cache 1 vs run 2; weights"):
        open_cache(cfg, cut_root, deeper, "cut", adapt_blocks=2)
    other_bottom = tower(cfg, seed=1)
    with pytest.raises(ValueError, match=both + r"weights_sha256: cache '\w+' vs run '\w+'\. "):
        open_cache(cfg, cut_root, other_bottom, "cut")
    other = ["identity", "hflip", "vflip"]  # neither fixture's orientations
    turning = tower(cfg, orientations=other)
    refused = (
        both + r"encoder.orientations: cache (\[.+\]|\(not recorded\)) vs run \['identity', 'h"
    )
    with pytest.raises(ValueError, match=refused):
        open_cache(cfg, cut_root, turning, "cut", orientations=other)
    assert open_cache(cfg, cut_root, adapted, "cut")  # adapting the top keeps the cut valid
    with pytest.raises(ValueError, match="features.activations=cut needs a cut"):
        cache_features(cfg.dataset, tokens_cfg, before, tmp_path / "nocut", CUT)
