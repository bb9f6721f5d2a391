import logging
import tarfile
from collections import Counter

import pytest
import torch
import webdataset as wds

from bita.data.skips import SkipLog
from bita.data.stream import caption_texts, eval_batches, steps_per_epoch, train_batches

from .conftest import dataset_cfg, jpeg_bytes, shard_dataset


def train(cfg, transforms, **kw):
    args = dict(split="train", batch_size=4, transform=transforms["train"], num_workers=0)
    return list(train_batches(cfg, **{**args, "seed": 3, "epoch": 0, **kw}))


def evaluate(cfg, transforms, **kw):
    args = dict(split="val", batch_size=3, transform=transforms["eval"], num_workers=0)
    return list(eval_batches(cfg, **{**args, **kw}))


def eval_ids(cfg, transforms, **kw):
    return [i for b in evaluate(cfg, transforms, **kw) for i in b["image_id"]]


def same(a, b):
    return (
        a["caption"] == b["caption"]
        and a["image_id"] == b["image_id"]
        and torch.equal(a["image"], b["image"])
    )


def test_steps_per_epoch_counts_usable_captions(toy):
    cfg = dataset_cfg(toy["root"], "toy")
    assert steps_per_epoch(cfg, split="train", global_batch_size=4) == 35 // 4
    with pytest.raises(ValueError, match="fewer than one global batch of 64"):
        steps_per_epoch(cfg, split="train", global_batch_size=64)


def test_every_rank_gets_exactly_the_epoch_in_full_batches(toy, transforms):
    cfg = dataset_cfg(toy["root"], "toy")
    for rank in (0, 1):
        batches = train(cfg, transforms, rank=rank, world_size=2)
        assert len(batches) == steps_per_epoch(cfg, split="train", global_batch_size=8) == 4
        for batch in batches:
            assert batch["image"].shape == (4, 3, 16, 16)
            assert len(batch["caption"]) == len(batch["image_id"]) == 4
            assert all(c == c.lower() and "." not in c for c in batch["caption"])
            assert all(i.startswith("toy_") and "." not in i for i in batch["image_id"])


def test_batches_are_deterministic_and_differ_by_epoch_and_rank(toy, transforms):
    cfg = dataset_cfg(toy["root"], "toy")
    first = train(cfg, transforms)
    assert all(map(same, first, train(cfg, transforms)))
    assert not all(map(same, first, train(cfg, transforms, epoch=1)))
    assert not all(map(same, first, train(cfg, transforms, rank=1, world_size=2)))


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_resumes_with_identical_remaining_batches(toy, transforms, workers):
    cfg = dataset_cfg(toy["root"], "toy")
    full = train(cfg, transforms, num_workers=workers)
    for skip in (1, 3, len(full)):
        resumed = train(cfg, transforms, num_workers=workers, skip_batches=skip)
        assert len(resumed) == len(full) - skip
        assert all(map(same, full[skip:], resumed))


def test_sources_mix_in_proportion_to_size(tmp_path, transforms):
    shard_dataset(tmp_path, "small", 4, 1, shard_size=2)
    shard_dataset(tmp_path, "large", 16, 1, shard_size=2)
    cfg = dataset_cfg(tmp_path / "shards", "small", "large")
    ids = [i for b in train(cfg, transforms, batch_size=5) for i in b["image_id"]]
    assert len(ids) == (4 + 16) * 3 // 5 * 5
    share = Counter(i.split("_")[0] for i in ids)["small"] / len(ids)
    assert 0.1 < share < 0.35  # 0.2 expected
    weighted = dataset_cfg(tmp_path / "shards", "small", "large", weights=[1, 0])
    assert {i.split("_")[0] for b in train(weighted, transforms) for i in b["image_id"]} == {
        "small"
    }
    mixed = dataset_cfg(tmp_path / "shards", "small", "large", weights=[1, None])
    with pytest.raises(ValueError, match="all null"):
        train(mixed, transforms)
    (tmp_path / "shards/small/train/small-train-00001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="missing shards: .*small-train-00001.tar"):
        train(cfg, transforms)


@pytest.mark.parametrize(("world_size", "workers"), [(1, 0), (2, 2)])
def test_eval_yields_every_image_once_in_a_fixed_order(toy, transforms, world_size, workers):
    cfg = dataset_cfg(toy["root"], "toy")
    args = dict(world_size=world_size, num_workers=workers)
    ids = [i for r in range(world_size) for i in eval_ids(cfg, transforms, rank=r, **args)]
    assert sorted(ids) == sorted(f"toy_{i}" for i in range(14, 21))
    assert ids == [i for r in range(world_size) for i in eval_ids(cfg, transforms, rank=r, **args)]
    batch = evaluate(cfg, transforms)[0]
    assert set(batch) == {
        "image",
        "image_id",
        "filename",
        "references",
        "image_bytes",
        "dataset",
        "scene",
    }
    assert batch["references"][0] == ["a scene 14 with trees", "roads near scene 14", "some houses"]
    assert batch["image_bytes"][0] == jpeg_bytes(14) and batch["dataset"][0] == "toy"


def test_caption_texts_are_all_usable_cleaned_training_captions(toy):
    texts = caption_texts(dataset_cfg(toy["root"], "toy"), split="train")
    assert len(texts) == toy["manifest"]["splits"]["train"]["captions"] == 35
    assert {"a scene 0 with trees", "roads near scene 0", "some houses"} <= set(texts)
    assert texts.count("some houses") == 12 - 1  # toy_2's third caption is " ."


def plant(path, replace):
    """Rewrite a shard with some members' bytes replaced."""
    with tarfile.open(path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    with wds.TarWriter(str(path), encoder=False) as out:
        for name in dict.fromkeys(n.split(".")[0] for n in files):
            sample = {n.split(".", 1)[1]: d for n, d in files.items() if n.split(".")[0] == name}
            out.write(
                {"__key__": name, **{k: replace.get(f"{name}.{k}", v) for k, v in sample.items()}}
            )


def warnings_about(caplog, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


def test_every_skipped_sample_is_named_with_its_shard_and_counted(tmp_path, transforms, caplog):
    """Faults: a cut JPEG in a val shard, bytes that are no image in a train shard. Main named
    the key without its shard and gave no total a stage could report."""
    shard_dataset(tmp_path, "toy", 8, 4, shard_size=4)
    plant(tmp_path / "shards/toy/val/toy-val-00000.tar", {"toy_9.jpg": jpeg_bytes(9)[:300]})
    plant(tmp_path / "shards/toy/train/toy-train-00000.tar", {"toy_1.jpg": b"garbage"})
    cfg = dataset_cfg(tmp_path / "shards", "toy")
    skips = SkipLog()
    with caplog.at_level(logging.WARNING):
        ids = eval_ids(cfg, transforms, skips=skips)
    assert ids == ["toy_8", "toy_10", "toy_11"]
    (warning,) = warnings_about(caplog, "toy_9")
    assert "toy-val-00000.tar" in warning and "damaged image data" in warning
    assert skips.totals() == {"skipped_samples": 1, "distinct_skipped_samples": 1, "bad_shards": 0}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        batches = train(cfg, transforms)
    (warning,) = warnings_about(caplog, "toy_1")  # met once per caption and draw, named once
    assert "toy-train-00000.tar" in warning and "not an image" in warning
    assert all(len(b["image_id"]) == 4 and "toy_1" not in b["image_id"] for b in batches)
    skips = SkipLog()  # counted across DataLoader worker processes too
    train(cfg, transforms, num_workers=2, skips=skips)
    totals = skips.totals()
    assert totals["skipped_samples"] >= 3 and totals["distinct_skipped_samples"] in (1, 2)


def test_a_truncated_shard_is_reported_once_by_name(tmp_path, transforms, caplog):
    """Fault: a train and a val shard cut in half. Main reported each read twice (from
    WebDataset's tar iterator and expander) naming a file object, and again at every draw of
    the resampled train shard."""
    shard_dataset(tmp_path, "toy", 8, 8, shard_size=4)
    for name in ("train/toy-train-00001.tar", "val/toy-val-00000.tar"):
        shard = tmp_path / "shards/toy" / name
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cfg = dataset_cfg(tmp_path / "shards", "toy")
    skips = SkipLog()
    with caplog.at_level(logging.DEBUG, logger="bita.data.skips"):
        for epoch in range(3):
            train(cfg, transforms, epoch=epoch, skips=skips)
        evaluate(cfg, transforms, skips=skips)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    for name in ("toy-train-00001.tar", "toy-val-00000.tar"):
        about = [(level, text) for level, text in messages if text.startswith(f"shard {tmp_path}")]
        about = [(level, text) for level, text in about if name in text]
        assert [level for level, _ in about].count(logging.WARNING) == 1, name
        assert about[0][0] == logging.WARNING and "breaks off" in about[0][1]
    assert sum("toy-train-00001.tar" in text for _, text in messages) > 2  # drawn again
    assert skips.totals()["bad_shards"] == 2


def test_truncated_tar_is_reported_and_the_rest_read(tmp_path, transforms, caplog):
    shard_dataset(tmp_path, "toy", 4, 8, shard_size=4)
    shard = tmp_path / "shards/toy/val/toy-val-00000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        ids = eval_ids(dataset_cfg(tmp_path / "shards", "toy"), transforms)
    assert "toy-val-00000.tar" in caplog.text
    assert set(ids) >= {f"toy_{i}" for i in range(8, 12)} and len(ids) < 8
    assert ids[-4:] == [f"toy_{i}" for i in range(8, 12)]


def test_augmentation_leaves_the_callers_torch_rng_alone(toy, transforms):
    """Without workers the stream runs in the training process, whose RNG drives dropout."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    train(dataset_cfg(toy["root"], "toy"), transforms)
    assert torch.equal(torch.rand(3), expected)


def test_per_image_batches_carry_every_usable_caption_of_each_image(toy, transforms):
    cfg = dataset_cfg(toy["root"], "toy")
    assert steps_per_epoch(cfg, split="train", global_batch_size=4, per_image=True) == 12 // 4
    batches = train(cfg, transforms, per_image=True)
    assert len(batches) == 3
    for batch in batches:
        assert set(batch) == {"image", "references", "image_id"}
        assert batch["image"].shape[0] == len(batch["references"]) == 4
        for image_id, refs in zip(batch["image_id"], batch["references"], strict=True):
            n = image_id.split("_")[1]
            full = [f"a scene {n} with trees", f"roads near scene {n}", "some houses"]
            assert refs == (full[:2] if image_id == "toy_2" else full)  # toy_2's third is " ."
