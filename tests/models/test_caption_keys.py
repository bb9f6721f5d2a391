"""Caption-aligned retrieval keys (`model.retrieval.key: caption_aligned`): neighbours that the
training captions say belong together, the map saved with the datastore and checked by its
fingerprint."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bita.data import features, stream
from bita.data.datastore import build_datastore, training_data_settings
from bita.models.build import build_model
from bita.models.caption_keys import KeyProjection, fit_key_projection
from bita.models.retrieval import Datastore, datastore_settings, tower_key_settings

CONF = Path(__file__).resolve().parents[2] / "conf"
SCENES = ("many planes are parked at the airport", "green trees grow in a quiet park")


def _looks_alike_but_differs(images: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Tower keys whose scene sits on one weak axis (dim 0, +-0.3) while seven strong nuisance
    axes (scale 1: lighting, season, ...) that say nothing about the scene dominate their
    cosine."""
    generator = torch.Generator().manual_seed(seed)
    scene = torch.randint(0, 2, (images,), generator=generator)
    keys = torch.randn(images, 8, generator=generator)
    keys[:, 0] = 0.3 * (2 * scene - 1) + 0.05 * torch.randn(images, generator=generator)
    return F.normalize(keys, dim=-1), scene.tolist()


def _same_scene_share(train_keys, train_scene, query_keys, query_scene) -> float:
    nearest = (query_keys @ train_keys.T).argmax(dim=1).tolist()
    return sum(train_scene[j] == s for j, s in zip(nearest, query_scene, strict=True)) / len(
        nearest
    )


def test_aligned_neighbours_share_the_scene_the_captions_name(sentence_encoder):
    """The tower's nearest training image is often of the other scene (the nuisance decides);
    after the map fitted on the training captions, it never is."""
    train_keys, train_scene = _looks_alike_but_differs(60, seed=0)
    query_keys, query_scene = _looks_alike_but_differs(40, seed=1)
    groups = [[SCENES[s], SCENES[s]] for s in train_scene]
    projection = fit_key_projection(train_keys, groups, sentence_encoder)
    tower = _same_scene_share(train_keys, train_scene, query_keys, query_scene)
    aligned = _same_scene_share(
        projection(train_keys), train_scene, projection(query_keys), query_scene
    )
    assert tower < 0.8 and aligned == 1.0
    assert projection(query_keys).norm(dim=-1).allclose(torch.ones(40))


def test_the_projection_is_saved_with_the_datastore_and_keys_queries(tmp_path):
    weight, bias = torch.randn(8, 4), torch.randn(4)
    projection = KeyProjection(weight, bias, alpha=0.1)
    tower_tokens = torch.randn(3, 5, 8)
    keys = projection(F.normalize(tower_tokens.mean(1), dim=-1))
    settings = {"key": {"kind": "caption_aligned"}}
    store = Datastore(keys.half(), ["a", "b", "c"], ["x", "y", "z"], settings, projection)
    loaded = Datastore.load(store.save(tmp_path / "ds"))
    assert loaded.projection.alpha == 0.1 and loaded.fingerprint == store.fingerprint
    assert torch.equal(loaded.query_keys(tower_tokens), keys)
    assert loaded.neighbour_captions(loaded.query_keys(tower_tokens), 1) == [["x"], ["y"], ["z"]]


def test_caption_aligned_keys_without_their_projection_are_refused():
    with pytest.raises(ValueError, match="projection missing"):
        Datastore(torch.ones(1, 2).half(), ["a"], ["x"], {"key": {"kind": "caption_aligned"}})


def test_a_caption_aligned_datastore_has_its_own_fingerprint(
    tiny_cfg, sentence_encoder, monkeypatch
):
    """Built from the demo's training split: the map is fitted there and the keys are the
    mapped ones; the tower-key datastore of the same split has another fingerprint, so a
    checkpoint trained with one never loads the other."""
    from bita.models.sentence_encoder import SentenceEncoder

    monkeypatch.setattr(SentenceEncoder, "from_location", lambda *a, **kw: sentence_encoder)
    dataset = OmegaConf.load(CONF / "dataset" / "demo_mini.yaml")
    cfg = tiny_cfg.copy()
    cfg.model.retrieval = {**cfg.model.retrieval, "enabled": True, "key": "caption_aligned"}
    model = build_model(cfg).eval()
    tower = tower_key_settings(cfg.encoder, model.encoder)
    expected = datastore_settings(tower, model.settings.retrieval, training_data_settings(dataset))
    shards = stream.image_shards(dataset, features.cache_transforms(model.preprocess)["eval"])
    store = build_datastore(dataset, shards, model.encoder, "central", expected, batch_size=16)
    assert store.projection is not None and store.keys.shape[1] == sentence_encoder.width
    model.use_datastore(store, expected)
    plain = datastore_settings(
        tower, model.settings.retrieval.__class__(enabled=True), training_data_settings(dataset)
    )
    with pytest.raises(ValueError, match="differ in the keys"):
        model.use_datastore(store, plain)
