import json
import tarfile

import pytest

import bita.data.shards as shards_module
from bita.data.annotations import read_annotations
from bita.data.shards import ShardingError, make_shards, read_manifest

from .conftest import jpeg_bytes, load_tool, shard_dataset, write_karpathy

make_shards_cli = load_tool("make_shards").main


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def tree_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_manifest_counts_skips_and_lists_unusable_captions(toy):
    train = toy["manifest"]["splits"]["train"]
    assert train["images"] == 12 and train["captions"] == 12 * 3 - 1
    assert [s["images"] for s in train["shards"]] == [4, 4, 4]
    reasons = {s["image_id"]: s["reason"] for s in train["skipped"]}
    assert reasons["3"].startswith("missing") and reasons["4"].startswith("unreadable")
    assert "toy.4.jpg" in reasons["4"]
    assert train["unusable_captions"] == [{"key": "toy_2", "index": 2, "raw": " ."}]
    assert toy["manifest"]["splits"]["val"]["images"] == 7
    assert read_manifest(toy["root"], "toy") == toy["manifest"]


def shard_keys(root, dataset, split):
    """Sample keys in write order across a split's shards."""
    manifest = read_manifest(root, dataset)
    names = [
        n for s in manifest["splits"][split]["shards"] for n in members(root / dataset / s["file"])
    ]
    return list(dict.fromkeys(n.split(".")[0] for n in names))


def test_samples_hold_dot_free_keys_kept_jpeg_png_for_tiff_and_the_record(toy):
    files = {}
    for shard in toy["manifest"]["splits"]["train"]["shards"]:
        files |= members(toy["root"] / "toy" / shard["file"])
    assert {"toy_0.jpg", "toy_0.json", "toy_1.png", "toy_1.json", "toy_5.jpg"} <= set(files)
    assert not any(name.startswith(("toy_3.", "toy_4.")) for name in files)  # skipped
    assert files["toy_0.jpg"] == jpeg_bytes(0)
    assert files["toy_1.png"].startswith(b"\x89PNG")
    record = json.loads(files["toy_0.json"])
    assert record["filename"] == "toy.0.jpg" and record["scene"] == "class0"
    assert record["captions"][0] == "A Scene 0 with Trees ."


def test_two_runs_write_identical_bytes_and_rerun_replaces(tmp_path):
    first = shard_dataset(tmp_path / "a", "toy", 6, 2, shard_size=3)
    shard_dataset(tmp_path / "b", "toy", 6, 2, shard_size=3)
    assert tree_bytes(tmp_path / "a" / "shards") == tree_bytes(tmp_path / "b" / "shards")
    again = shard_dataset(tmp_path / "a", "toy", 6, 2, shard_size=3)
    assert again == first
    assert [p.name for p in (tmp_path / "a" / "shards").iterdir()] == ["toy"]


def test_train_split_is_written_in_a_seeded_shuffled_order(tmp_path):
    """Annotation files list images class by class; shuffled train shards mix the classes."""
    in_file_order = [f"toy_{i}" for i in range(20)]
    shard_dataset(tmp_path / "a", "toy", 20, 5, shard_size=6, train_order_seed=0)
    shard_dataset(tmp_path / "b", "toy", 20, 5, shard_size=6, train_order_seed=1)
    shard_dataset(tmp_path / "c", "toy", 20, 5, shard_size=6, train_order_seed=None)
    orders = {x: shard_keys(tmp_path / x / "shards", "toy", "train") for x in "abc"}
    assert sorted(orders["a"]) == sorted(orders["b"]) == sorted(in_file_order)
    assert len({tuple(order) for order in orders.values()}) == 3
    assert orders["c"] == in_file_order
    val = [f"toy_{i}" for i in range(20, 25)]
    assert shard_keys(tmp_path / "a" / "shards", "toy", "val") == val
    assert read_manifest(tmp_path / "a" / "shards", "toy")["train_order_seed"] == 0


def test_killed_run_leaves_previous_shards_and_no_staging(tmp_path, monkeypatch):
    shard_dataset(tmp_path, "toy", 6, 2, shard_size=3)
    before = tree_bytes(tmp_path / "shards")
    calls = []

    def dies_midway(path):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return "jpg", path.read_bytes()

    monkeypatch.setattr(shards_module, "encode_for_shard", dies_midway)
    records = read_annotations(tmp_path / "raw" / "dataset_toy.json", "toy")
    with pytest.raises(KeyboardInterrupt):
        make_shards(
            records,
            images_dir=tmp_path / "raw" / "images",
            out_dir=tmp_path / "shards",
            dataset="toy",
            shard_size=3,
            progress=False,
        )
    assert tree_bytes(tmp_path / "shards") == before
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["toy"]


def test_cli_writes_a_per_class_sample(tmp_path, capsys):
    annotations = write_karpathy(tmp_path, "toy", 8, 4)
    argv = ["--dataset", "ucm", "--annotations", str(annotations), "--images"]
    argv += [str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--quiet"]
    assert make_shards_cli([*argv, "--per-class", "train=1", "--per-class", "val=1"]) == 0
    manifest = read_manifest(tmp_path / "out", "ucm")
    assert {k: v["images"] for k, v in manifest["splits"].items()} == {"train": 2, "val": 2}
    assert "ucm/train: 2 images, 6 captions" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--per-class 'dev=1'"):
        make_shards_cli([*argv, "--per-class", "dev=1"])


def test_missing_manifest_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tools/make_shards.py --dataset nwpu"):
        read_manifest(tmp_path, "nwpu")


def test_a_wrong_images_folder_never_replaces_good_shards(tmp_path):
    """Fault: make_shards re-run over good shards with --images pointing at an empty folder.
    Main exited 0, deleted the tars and wrote an empty manifest."""
    annotations = write_karpathy(tmp_path, "toy", 8, 4)
    out = tmp_path / "out"
    argv = ["--dataset", "ucm", "--annotations", str(annotations), "--out", str(out), "--quiet"]
    assert make_shards_cli([*argv, "--images", str(tmp_path / "images")]) == 0
    before = tree_bytes(out)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SystemExit) as stopped:
        make_shards_cli([*argv, "--images", str(tmp_path / "elsewhere")])
    message = str(stopped.value.code)
    assert "ucm/train: only 0 of 8 annotated images" in message
    assert f"not found in the images folder {tmp_path / 'elsewhere'}" in message
    assert tree_bytes(out) == before and [p.name for p in out.iterdir()] == ["ucm"]


def test_too_few_images_found_stops_unless_min_found_allows_it(tmp_path):
    """Fault: an images folder holding 3 of a split's 8 images. Main sharded the 3 and
    exited 0."""
    annotations = write_karpathy(tmp_path, "toy", 8, 2)
    for index in range(3, 8):
        (tmp_path / "images" / f"toy.{index}.jpg").unlink()
    argv = ["--dataset", "ucm", "--annotations", str(annotations), "--quiet"]
    argv += ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"only 3 of 8 .* at least 50% \(--min-found 0.5\)"):
        make_shards_cli(argv)
    assert not (tmp_path / "out" / "ucm").exists()
    assert make_shards_cli([*argv, "--min-found", "0.3"]) == 0
    assert read_manifest(tmp_path / "out", "ucm")["splits"]["train"]["images"] == 3
    with pytest.raises(SystemExit):
        make_shards_cli([*argv, "--min-found", "1.5"])


def test_even_with_min_found_zero_a_split_holding_images_is_never_emptied(tmp_path):
    """Fault: every image of a good split unreadable on a re-run that accepts any shortfall."""
    shard_dataset(tmp_path, "toy", 6, 2, shard_size=3)
    before = tree_bytes(tmp_path / "shards")
    for image in (tmp_path / "raw" / "images").iterdir():
        image.write_bytes(b"")
    records = read_annotations(tmp_path / "raw" / "dataset_toy.json", "toy")
    args = dict(images_dir=tmp_path / "raw" / "images", dataset="toy", progress=False)
    with pytest.raises(ShardingError, match=r"split\(s\) train \(6 images\), val \(2 images\)"):
        make_shards(records, out_dir=tmp_path / "shards", min_found=0, **args)
    assert tree_bytes(tmp_path / "shards") == before
    fresh = make_shards(records, out_dir=tmp_path / "fresh", min_found=0, **args)
    assert fresh["splits"]["train"]["images"] == 0 and len(fresh["splits"]["train"]["skipped"]) == 6
