"""Shards of the real datasets in ../shared/data (slow: RSICD is sharded once, ~15 s)."""

import json
import logging
import shutil
import tarfile
from collections import Counter

import pytest

from bita.data.annotations import first_per_class, read_annotations
from bita.data.shards import make_shards
from bita.data.stream import eval_batches

from .conftest import dataset_cfg, load_tool

pytestmark = pytest.mark.slow
make_shards_cli = load_tool("make_shards").main


def shard(shared_data, out, dataset, annotations, images=None, **kw):
    argv = ["--dataset", dataset, "--annotations", str(shared_data / dataset / annotations)]
    argv += ["--images", str(images or shared_data / dataset / "images"), "--out", str(out)]
    assert make_shards_cli([*argv, "--quiet", *kw.get("extra", [])]) == 0
    return json.loads((out / dataset / "manifest.json").read_text())


def shard_records(path):
    with tarfile.open(path) as tar:
        names = tar.getnames()
        records = [json.loads(tar.extractfile(n).read()) for n in names if n.endswith(".json")]
    return names, records


@pytest.fixture(scope="session")
def rsicd(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "shards"
    return out, shard(shared_data, out, "rsicd", "dataset_rsicd.json")


def test_rsicd_shards_hold_every_image_with_five_captions(rsicd):
    out, manifest = rsicd
    counts = {}
    for split in ("train", "val"):
        keys = []
        for entry in manifest["splits"][split]["shards"]:
            names, records = shard_records(out / "rsicd" / entry["file"])
            assert all(len(r["captions"]) == 5 for r in records)
            keys += [n.rsplit(".", 1)[0] for n in names if n.endswith(".json")]
            assert all(n.endswith((".jpg", ".json")) for n in names)
        assert len(keys) == len(set(keys)) and all("." not in k for k in keys)
        counts[split] = len(keys)
    # the data README: val has 1,093 images here; the 1,094-image test split is withheld
    assert counts == {"train": 8734, "val": 1093}
    assert manifest["splits"]["val"]["captions"] == 1093 * 5
    assert manifest["splits"]["train"]["captions"] == 8734 * 5 - 4
    unusable = {(u["key"], u["raw"]) for u in manifest["splits"]["train"]["unusable_captions"]}
    assert unusable == {("rsicd_1422", " ."), ("rsicd_2061", "1 ."), ("rsicd_5605", " .")}


def test_rsicd_eval_with_two_workers_yields_every_val_image_once(rsicd, transforms):
    out, manifest = rsicd
    ids = [
        i
        for b in eval_batches(
            dataset_cfg(out, "rsicd"),
            split="val",
            batch_size=64,
            transform=transforms["eval"],
            num_workers=2,
        )
        for i in b["image_id"]
    ]
    assert len(ids) == len(set(ids)) == manifest["splits"]["val"]["images"] == 1093


def test_truncated_rsicd_shard_is_reported_and_skipped(rsicd, tmp_path, transforms, caplog):
    out, manifest = rsicd
    copy = tmp_path / "shards"
    shutil.copytree(out / "rsicd", copy / "rsicd")
    first = copy / "rsicd" / manifest["splits"]["val"]["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:1_000_000])
    with caplog.at_level(logging.WARNING):
        ids = [
            i
            for b in eval_batches(
                dataset_cfg(copy, "rsicd"),
                split="val",
                batch_size=64,
                transform=transforms["eval"],
                num_workers=0,
            )
            for i in b["image_id"]
        ]
    assert first.name in caplog.text
    second = manifest["splits"]["val"]["shards"][1]["images"]
    assert second < len(ids) < 1093 and len(ids) == len(set(ids))


def test_planted_corrupt_jpeg_is_listed_as_skipped(shared_data, tmp_path):
    records = first_per_class(
        read_annotations(shared_data / "rsicd" / "dataset_rsicd.json", "rsicd"), {"val": 1}
    )[:5]
    for record in records:
        shutil.copy(shared_data / "rsicd" / "images" / record.filename, tmp_path / record.filename)
    broken = tmp_path / records[2].filename
    broken.write_bytes(broken.read_bytes()[:2000])
    manifest = make_shards(
        records, images_dir=tmp_path, out_dir=tmp_path / "out", dataset="rsicd", progress=False
    )
    val = manifest["splits"]["val"]
    assert val["images"] == 4
    (skipped,) = val["skipped"]
    assert skipped["filename"] == records[2].filename and skipped["reason"].startswith("unreadable")


def test_ucm_shards_hold_the_nine_real_tiffs_and_list_the_rest_missing(shared_data, tmp_path):
    only_nine = ["--min-found", "0"]  # the other 2,091 images are not in ../shared/data
    manifest = shard(shared_data, tmp_path / "a", "ucm", "dataset_ucm.json", extra=only_nine)
    images = sum(s["images"] for s in manifest["splits"].values())
    skipped = [x for s in manifest["splits"].values() for x in s["skipped"]]
    assert images == 9 and len(skipped) == 2091
    assert all(x["reason"].startswith("missing") for x in skipped)
    written = {
        n
        for s in manifest["splits"].values()
        for entry in s["shards"]
        for n in shard_records(tmp_path / "a" / "ucm" / entry["file"])[0]
    }
    assert written == {f"ucm_{i}.{ext}" for i in range(9) for ext in ("png", "json")}
    shard(shared_data, tmp_path / "b", "ucm", "dataset_ucm.json", extra=only_nine)
    tars = sorted((tmp_path / "a" / "ucm").rglob("*"))
    assert [p.relative_to(tmp_path / "a") for p in tars] == [
        p.relative_to(tmp_path / "b") for p in sorted((tmp_path / "b" / "ucm").rglob("*"))
    ]
    for path in tars:
        if path.is_file():
            twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
            assert path.read_bytes() == twin.read_bytes()


def test_nwpu_per_class_layout_is_read(shared_data, tmp_path):
    records = read_annotations(shared_data / "nwpu" / "dataset_nwpu_valtest.json", "nwpu")
    assert len(records) == 6300
    assert Counter(r.split for r in records) == {"val": 3150, "test": 3150}
    assert len({r.scene for r in records}) == 45
    assert all(len(r.captions) == 5 and r.filename.startswith(f"{r.scene}/") for r in records)
    with pytest.raises(SystemExit, match="nwpu/val: only 0 of 3150 annotated images"):
        shard(shared_data, tmp_path, "nwpu", "dataset_nwpu_valtest.json")
    extra = ["--min-found", "0"]
    manifest = shard(shared_data, tmp_path, "nwpu", "dataset_nwpu_valtest.json", extra=extra)
    assert sum(len(s["skipped"]) for s in manifest["splits"].values()) == 6300
