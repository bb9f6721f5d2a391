"""Retrieval-augmented captioning (`model.retrieval`): the datastore, what the LM reads while it
trains, and a datastore's fingerprint against the checkpoint it is loaded with."""

import shutil
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from bita.data import features, stream
from bita.data.datastore import build_datastore, central_captions, training_data_settings
from bita.engine.checkpoint import TrainState, load_model, save_checkpoint
from bita.engine.distributed import DistInfo
from bita.models.build import build_model
from bita.models.retrieval import (
    FORMAT,
    INDEX_FILE,
    Datastore,
    DatastoreFormatError,
    check_datastore,
    datastore_settings,
    fingerprint,
    retrieval_keys,
    tower_key_settings,
)
from bita.stages.datastore import _fitting

CONF = Path(__file__).resolve().parents[2] / "conf"
DEMO = OmegaConf.load(CONF / "dataset" / "demo.yaml")


def _retrieving_cfg(tiny_cfg, **retrieval):
    cfg = tiny_cfg.copy()
    cfg.model.retrieval = {**cfg.model.retrieval, "enabled": True, **retrieval}
    return cfg


def _demo_datastore(model):
    """The demo training split's datastore, keys from the eval view through the model's tower."""
    transform = features.cache_transforms(model.preprocess)["eval"]
    caption = model.settings.retrieval.caption
    shards = stream.image_shards(DEMO, transform)
    return build_datastore(DEMO, shards, model.encoder, caption, _expected(model), batch_size=16)


def _expected(model):
    tower = tower_key_settings(OmegaConf.load(CONF / "encoder" / "tiny.yaml"), model.encoder)
    data = training_data_settings(DEMO)
    return datastore_settings(tower, model.settings.retrieval, data)


def test_the_nearest_entry_is_never_the_querys_own():
    keys = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    store = Datastore(keys.half(), [f"img{i}" for i in range(5)], list("abcde"), {"x": 1})
    queries = keys[[1, 3]]
    assert [row[0] for row in store.neighbour_captions(queries, 2)] == ["b", "d"]
    kept = store.neighbour_captions(queries, 4, exclude=["img1", "img3"])
    assert sorted(kept[0]) == list("acde") and sorted(kept[1]) == list("abce")
    assert sorted(store.neighbour_captions(queries[:1], 9, exclude=["img1"])[0]) == list("acde")


def test_a_pool_returns_its_most_agreed_captions_and_never_the_querys_own():
    """Of the pool's captions, the two that repeat what the others say come first; the query's
    own entry, the nearest and a perfect match of the majority, stays out."""
    # entry i sits at distance offset[i] from the query (img0): the two odd captions nearest
    offset = torch.tensor([0.0, 0.1, 0.3, 0.4, 0.2, 0.5])
    keys = torch.nn.functional.normalize(torch.eye(6)[0] + offset[:, None] * torch.eye(6), dim=-1)
    captions = [
        "many planes at an airport",  # img0: the query itself
        "a lake with a boat",
        "planes parked at an airport",
        "many planes parked at an airport",
        "green trees and a road",
        "planes at the airport",
    ]
    store = Datastore(keys.half(), [f"img{i}" for i in range(6)], captions, {"x": 1})
    (chosen,) = store.neighbour_captions(keys[:1], 2, exclude=["img0"], pool=5)
    assert set(chosen) == {"planes parked at an airport", "many planes parked at an airport"}
    (plain,) = store.neighbour_captions(keys[:1], 2, exclude=["img0"])
    assert plain == ["a lake with a boat", "green trees and a road"]  # without: the 2 nearest


def test_central_caption_is_the_one_closest_to_the_images_others():
    groups = [
        ["a plane at the airport", "many planes are parked at an airport", "planes at an airport"],
        ["green trees"],
    ]
    assert central_captions(groups) == ["planes at an airport", "green trees"]


def test_training_never_retrieves_an_images_own_captions(tiny_cfg):
    """Training batches are the datastore's own images, seen through the eval view its keys
    came from, so each image's nearest entry is itself: the captions the LM reads after the
    prefix must still never be that image's. Each entry's caption names its image, so the
    check reads the LM's actual input."""
    model = build_model(_retrieving_cfg(tiny_cfg, k=2, max_tokens=8, caption="first")).eval()
    store = _demo_datastore(model)
    store.captions = [f"scene {i}" for i in range(len(store.ids))]
    name = dict(zip(store.ids, store.captions, strict=True))
    model.use_datastore(store, _expected(model))
    read = []
    prefix_loss = model.llm.prefix_loss
    model.llm.prefix_loss = lambda *a, contexts, **kw: (
        read.append(contexts) or prefix_loss(*a, contexts=contexts, **kw)
    )
    batches = stream.train_batches(
        DEMO,
        split="train",
        batch_size=16,
        transform=features.cache_transforms(model.preprocess, augment=False)["train"],
        num_workers=0,
        seed=0,
        epoch=0,
    )
    for batch in islice(batches, 6):
        model(batch, objective="lm", prompt="a photo of ")
        with torch.no_grad():
            keys = retrieval_keys(model.encode_images(batch["image"]))
        nearest = [row[0] for row in store.neighbour_captions(keys, 1)]
        assert nearest == [name[i] for i in batch["image_id"]]  # without exclusion: itself
        for image_id, context in zip(batch["image_id"], read[-1], strict=True):
            retrieved = [text.strip() for text in model.llm.tokenizer.decode(context).split("\n")]
            assert retrieved[-1] == "" and set(retrieved[:-1]) <= set(store.captions)
            assert len(retrieved) == 3 and name[image_id] not in retrieved
    assert len(read) == 6


def _save_retrieving_checkpoint(tiny_cfg, folder: Path, seed: int) -> Path:
    """A tiny random BITA (its tower seeded by `seed`) trained with the demo datastore, saved
    as a stage saves it: the datastore in assets, its fingerprint in the config."""
    cfg = _retrieving_cfg(tiny_cfg)
    torch.manual_seed(seed)
    model = build_model(cfg)
    store = _demo_datastore(model)
    model.use_datastore(store, _expected(model))
    cfg.model.retrieval.fingerprint = store.fingerprint
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return save_checkpoint(
        folder,
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        state=TrainState(),
        config=cfg,
        dist=DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")),
    )


def test_a_checkpoint_decodes_with_its_own_datastore(tiny_cfg, tmp_path):
    checkpoint = _save_retrieving_checkpoint(tiny_cfg, tmp_path / "a", seed=1)
    assert (checkpoint / "assets" / "retrieval" / INDEX_FILE).is_file()
    model, cfg = load_model(checkpoint)
    assert model.datastore.fingerprint == cfg.model.retrieval.fingerprint
    images = torch.randn(2, 3, 64, 64)
    decode = {"num_beams": 2, "max_new_tokens": 5, "min_new_tokens": 1}
    with_context = model.caption(images, **decode)
    with pytest.raises(ValueError, match="retrieved captions"):
        model.generate(model.image_tokens(images), **decode)
    contexts = model.retrieved_contexts(model.encode_images(images))
    assert model.generate(model.image_tokens(images), contexts=contexts, **decode) == with_context


def test_a_datastore_built_for_another_checkpoint_is_refused(tiny_cfg, tmp_path):
    """Checkpoints with different towers: a's datastore copied into b is refused on load,
    naming both fingerprints; so is b's own once its tower no longer is the one it indexed."""
    a = _save_retrieving_checkpoint(tiny_cfg, tmp_path / "a", seed=1)
    b = _save_retrieving_checkpoint(tiny_cfg, tmp_path / "b", seed=2)
    a_print, b_print = (load_model(c)[1].model.retrieval.fingerprint for c in (a, b))
    assert a_print != b_print
    shutil.rmtree(b / "assets" / "retrieval")
    shutil.copytree(a / "assets" / "retrieval", b / "assets" / "retrieval")
    with pytest.raises(ValueError, match=f"{a_print}.*{b_print}.*another checkpoint"):
        load_model(b)
    # the same datastore under a's fingerprint, but a tower that is not the one it indexed
    config = OmegaConf.load(b / "config.yaml")
    config.model.retrieval.fingerprint = a_print
    OmegaConf.save(config, b / "config.yaml")
    with pytest.raises(ValueError, match=f"{a_print}.*needs .*image tower"):
        load_model(b)


def test_check_names_both_fingerprints_and_the_part_that_differs():
    settings = {"format": "f", "key": {"w": 1}, "caption": "first", "data": {"split": "train"}}
    store = Datastore(torch.ones(1, 2).half(), ["x"], ["c"], settings)
    other = {**settings, "data": {"split": "val"}}
    with pytest.raises(ValueError) as err:
        check_datastore(store, other, "here")
    message = str(err.value)
    assert store.fingerprint in message and fingerprint(other) in message
    assert "training split" in message and "image tower" not in message
    check_datastore(store, settings, "here")


def test_an_edited_datastore_file_is_refused(tmp_path):
    store = Datastore(torch.ones(2, 2).half(), ["x", "y"], ["c", "d"], {"caption": "first"})
    folder = store.save(tmp_path / "ds")
    assert Datastore.load(folder).captions == ["c", "d"]
    index = folder / INDEX_FILE
    index.write_text(index.read_text().replace('"first"', '"central"'))
    with pytest.raises(ValueError, match="edited"):
        Datastore.load(folder)
    with pytest.raises(FileNotFoundError, match="no retrieval datastore"):
        Datastore.load(tmp_path / "nothing")


def test_retrieval_settings_are_checked_by_name(tiny_cfg):
    for key, value in (("k", 0), ("caption", "longest"), ("max_tokens", 0), ("key", "pixels")):
        with pytest.raises(ValueError, match=f"model.retrieval.{key}"):
            build_model(_retrieving_cfg(tiny_cfg, **{key: value}))
    with pytest.raises(ValueError, match="model.retrieval: unknown keys"):
        build_model(_retrieving_cfg(tiny_cfg, kk=2))


def test_neighbours_are_ranked_in_float32_under_autocast():
    """Training runs under bf16 autocast, whose 8-bit mantissa would tie close cosines."""
    base = torch.randn(1, 64)
    keys = torch.nn.functional.normalize(base + 0.02 * torch.randn(50, 64), dim=-1)
    store = Datastore(keys.half(), [str(i) for i in range(50)], [str(i) for i in range(50)], {})
    query = torch.nn.functional.normalize(base + 0.02 * torch.randn(1, 64), dim=-1)
    plain = store.neighbour_captions(query, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert store.neighbour_captions(query, 10) == plain


def test_consensus_reranking_returns_the_beam_the_neighbours_agree_with(tiny_cfg):
    """decode.rerank=consensus: of the image's beams, the one closest to the captions of its
    pool of nearest training images, which never holds the image's own entry."""
    model = build_model(_retrieving_cfg(tiny_cfg, k=1, pool=3, caption="first")).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        keys = retrieval_keys(model.tower_tokens(images))
    captions = [
        "a lake with a boat",  # the query's own entry: left out
        "planes parked at an airport",
        "planes at the airport",
        "a lake with a small boat",
    ]
    model.datastore = Datastore(keys.half(), [f"img{i}" for i in range(4)], captions, {})
    beams = ["a boat on a lake", "green trees", "many planes are parked at an airport"]
    model.generate = lambda tokens, contexts, num_beams, num_return_sequences, **kw: beams
    read = []
    most_agreed = model.datastore.most_agreed
    model.datastore.most_agreed = lambda c, r: read.append(r) or most_agreed(c, r)
    chosen = model.caption(images[:1], image_ids=["img0"], rerank="consensus", num_beams=3)
    assert chosen == ["many planes are parked at an airport"]
    assert sorted(read[0]) == sorted(captions[1:])
    # without num_beams, generate's default of 5 candidates per image is what is split
    asked = []
    model.generate = lambda tokens, contexts, num_beams, num_return_sequences, **kw: (
        asked.append((num_beams, num_return_sequences)) or [f"plane {i}" for i in range(10)]
    )
    assert model.caption(images[:2], rerank="consensus") == ["plane 0", "plane 5"]
    assert asked == [(5, 5)]
    without = build_model(tiny_cfg).eval()
    with pytest.raises(ValueError, match="needs model.retrieval"):
        without.caption(images[:1], rerank="consensus", num_beams=3)


def test_mbr_lets_the_neighbours_captions_compete_with_the_beams(tiny_cfg):
    """decode.rerank=mbr: beams and every caption of the nearest training images are scored
    against those captions, a candidate's own copy left out. A neighbour's caption wins where
    the neighbours agree on it more than on any beam; the query's own entry is never read."""
    model = build_model(_retrieving_cfg(tiny_cfg, k=1, pool=3, caption="first")).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        keys = retrieval_keys(model.tower_tokens(images))
    sets = [
        ["many planes are parked at an airport"] * 2,  # the query's own entry: never read
        ["a river runs through a green forest", "a river in a forest"],
        ["a river runs through a green forest", "green trees along a river"],
        ["a river runs through a dense green forest", "a bridge over a river"],
    ]
    model.datastore = Datastore(
        keys.half(), [f"img{i}" for i in range(4)], [s[0] for s in sets], {}, caption_sets=sets
    )
    beams = ["many planes are parked at an airport", "a river in a green forest"]
    model.generate = lambda tokens, contexts, num_beams, num_return_sequences, **kw: beams
    chosen = model.caption(images[:1], image_ids=["img0"], rerank="mbr", num_beams=2)
    assert chosen == ["a river runs through a green forest"]
    # neighbours that agree on no caption of theirs: the beam closest to all of them wins
    sets[1:] = [["a river near a forest"], ["a green forest"], ["a river in green fields"]]
    model.datastore = Datastore(
        keys.half(), [f"img{i}" for i in range(4)], [s[0] for s in sets], {}, caption_sets=sets
    )
    chosen = model.caption(images[:1], image_ids=["img0"], rerank="mbr", num_beams=2)
    assert chosen == ["a river in a green forest"]  # reading its own entry: the planes
    with pytest.raises(ValueError, match="rerank=mbr .* needs model.retrieval"):
        build_model(tiny_cfg).eval().caption(images[:1], rerank="mbr", num_beams=2)


def test_a_candidates_own_copy_does_not_vote_for_it():
    """Of two captions each given once, neither votes for itself: against the others only,
    the beam that matches neither scores 0, and each caption scores against the other."""
    store = Datastore(
        torch.ones(2, 2).half(),
        ["a", "b"],
        ["x", "y"],
        {},
        caption_sets=[["a red roof on a house"], ["a red roof on a big house"]],
    )
    assert store.mbr_choice(["green grass"], [0, 1]) == "a red roof on a house"
    assert store.mbr_choice(["a red roof on a house"], [0]) == "a red roof on a house"


def test_sharpness_lets_nearer_neighbours_outvote_farther_ones():
    """decode.rerank_sharpness: two far neighbours agreeing on planes outvote the near ones'
    river when all weigh alike, and lose to them when weights grow with similarity."""
    sets = [
        ["a river runs through a green forest"],
        ["many planes are parked at an airport"],
        ["many planes are parked at a large airport"],
        ["a bridge over a river"],
    ]
    store = Datastore(
        torch.ones(4, 2).half(), list("abcd"), [s[0] for s in sets], {}, caption_sets=sets
    )
    beams, rows, cosines = ["a river in a forest"], [0, 1, 2, 3], [0.9, 0.5, 0.5, 0.85]
    assert store.mbr_choice(beams, rows) == sets[2][0]
    assert store.mbr_choice(beams, rows, cosines, 0.0) == sets[2][0]
    assert store.mbr_choice(beams, rows, cosines, 8.0) == beams[0]
    with pytest.raises(ValueError, match="one similarity per neighbour row"):
        store.mbr_choice(beams, rows, cosines[:2], 8.0)


def test_caption_sets_travel_with_the_datastore(tmp_path):
    sets = [["c", "c two"], ["d"]]
    store = Datastore(torch.ones(2, 2).half(), ["x", "y"], ["c", "d"], {}, caption_sets=sets)
    assert Datastore.load(store.save(tmp_path / "ds")).caption_sets == sets
    with pytest.raises(ValueError, match="caption sets"):
        Datastore(torch.ones(2, 2).half(), ["x", "y"], ["c", "d"], {}, caption_sets=[["c"]])


def test_a_datastore_of_another_format_is_rebuilt_by_a_stage_and_refused_by_a_checkpoint(
    tmp_path,
):
    """A stage started from a checkpoint whose datastore predates `caption_sets` looks past it
    (and builds one); loading that datastore directly names the file and both formats."""
    store = Datastore(torch.ones(1, 2).half(), ["x"], ["c"], {})
    folder = store.save(tmp_path / "ckpt" / "assets" / "retrieval")
    index = folder / INDEX_FILE
    index.write_text(index.read_text().replace(FORMAT, "bita-retrieval/1"))
    with pytest.raises(DatastoreFormatError, match=f"datastore.json: format .*/1.*{FORMAT}"):
        Datastore.load(folder)
    ctx = SimpleNamespace(
        stage_dir=tmp_path / "stage", cfg=SimpleNamespace(init_from=tmp_path / "ckpt")
    )
    assert _fitting(ctx, store.fingerprint) is None
