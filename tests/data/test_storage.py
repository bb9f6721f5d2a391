"""Shards and manifests from a URL or a pipe: command read as from a folder; failures name the
URL and say what went wrong."""

import logging
import shutil

import pytest
import torch

from bita.data import storage
from bita.data.skips import SkipLog
from bita.data.stream import caption_texts, eval_batches, train_batches

from .conftest import dataset_cfg


def batches(cfg, transforms, workers=0, evaluate=True):
    args = dict(num_workers=workers)
    trained = train_batches(
        cfg, split="train", batch_size=4, transform=transforms["train"], seed=1, epoch=0, **args
    )
    if not evaluate:
        return (list(trained),)
    evaluated = eval_batches(cfg, split="val", batch_size=3, transform=transforms["eval"], **args)
    return list(evaluated), list(trained)


def same_batches(first, second) -> bool:
    return all(
        a["image_id"] == b["image_id"] and torch.equal(a["image"], b["image"])
        for one, other in zip(first, second, strict=True)
        for a, b in zip(one, other, strict=True)
    )


def test_join_keeps_the_kind_of_location():
    assert (
        storage.join("data/shards", "rsicd", "manifest.json") == "data/shards/rsicd/manifest.json"
    )
    assert storage.join("https://host/s/", "rsicd", "a.tar") == "https://host/s/rsicd/a.tar"
    assert (
        storage.join("pipe:curl -s https://h/s", "r", "a.tar") == "pipe:curl -s https://h/s/r/a.tar"
    )
    assert storage.is_local("data/shards") and not storage.is_local("s3://bucket/shards")


def test_http_and_pipe_shards_stream_the_same_batches_as_the_folder(toy, transforms, serve_folder):
    local = dataset_cfg(toy["root"], "toy")
    expected = batches(local, transforms)
    server = serve_folder(toy["root"])
    over_http = dataset_cfg(server.url, "toy")
    assert same_batches(batches(over_http, transforms), expected)
    assert same_batches(
        batches(over_http, transforms, 2, evaluate=False),
        batches(local, transforms, 2, evaluate=False),
    )
    assert caption_texts(over_http, split="train") == caption_texts(local, split="train")
    through_pipe = dataset_cfg(f"pipe:cat {toy['root']}", "toy")
    assert same_batches(batches(through_pipe, transforms), expected)


def test_a_missing_or_failing_shard_is_reported_with_its_url(
    toy, transforms, serve_folder, tmp_path, caplog
):
    """Faults: one val shard deleted from the server, another answered with HTTP 500."""
    shutil.copytree(toy["root"], tmp_path / "shards")
    (tmp_path / "shards/toy/val/toy-val-00000.tar").unlink()
    server = serve_folder(tmp_path / "shards")
    server.failing.add("/toy/val/toy-val-00001.tar")
    skips = SkipLog()
    with caplog.at_level(logging.WARNING):
        ids = [
            i
            for batch in eval_batches(
                dataset_cfg(server.url, "toy"),
                split="val",
                batch_size=3,
                transform=transforms["eval"],
                num_workers=0,
                skips=skips,
            )
            for i in batch["image_id"]
        ]
    assert ids == []  # the toy val split is those two shards
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        f"shard {server.url}/toy/val/toy-val-00000.tar: cannot be opened (not found)" in warned[0]
    )
    assert f"shard {server.url}/toy/val/toy-val-00001.tar: cannot be opened (HTTP 500" in warned[1]
    assert skips.totals()["bad_shards"] == 2


def test_a_missing_or_unreachable_manifest_names_its_url(toy, transforms, serve_folder):
    server = serve_folder(toy["root"])
    args = dict(split="val", batch_size=3, transform=transforms["eval"], num_workers=0)
    with pytest.raises(
        FileNotFoundError, match=f"{server.url}/elsewhere/toy/manifest.json: no manifest"
    ):
        eval_batches(dataset_cfg(f"{server.url}/elsewhere", "toy"), **args)
    server.failing.add("/toy/manifest.json")
    with pytest.raises(storage.StorageError, match=f"{server.url}/toy/manifest.json: HTTP 500"):
        eval_batches(dataset_cfg(server.url, "toy"), **args)
    with pytest.raises(
        storage.StorageError, match="pipe:false/toy/manifest.json: the command exited"
    ):
        eval_batches(dataset_cfg("pipe:false", "toy"), **args)
