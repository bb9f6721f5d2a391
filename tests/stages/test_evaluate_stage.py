"""`stage=evaluate` scores a checkpoint on a split: result files, gallery, every image once."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .runner import bita_run

REPO = Path(__file__).resolve().parents[2]


def evaluate(cwd, checkpoint, *overrides):
    bita_run(
        cwd,
        "stage=evaluate",
        f"init_from={checkpoint}",
        "hardware.num_workers=2",
        "tracking.enabled=false",
        "decode.num_beams=1",
        "decode.max_new_tokens=4",
        "decode.min_new_tokens=1",
        *overrides,
    )
    return next((cwd / "runs").rglob("evaluate/results"))


def test_evaluate_on_the_demo_writes_results_and_gallery(tmp_path, tiny_checkpoint):
    results = evaluate(tmp_path, tiny_checkpoint, "dataset=demo_mini")
    summary = json.loads((results / "rsicd_val.json").read_text())
    captions = json.loads((results / "rsicd_val_captions.json").read_text())
    assert summary["counts"]["images"] == len(captions) == 31
    assert len({c["image_id"] for c in captions}) == 31
    assert "<img" in (results / "rsicd_val_gallery.html").read_text()


@pytest.mark.slow
def test_evaluate_on_rsicd_val_shards_scores_each_image_once(
    tmp_path, tiny_checkpoint, shared_data
):
    shards = tmp_path / "shards"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/make_shards.py"),
            "--dataset=rsicd",
            f"--annotations={shared_data / 'rsicd/dataset_rsicd.json'}",
            f"--images={shared_data / 'rsicd/images'}",
            f"--out={shards}",
            "--quiet",
        ],
        check=True,
    )
    results = evaluate(tmp_path, tiny_checkpoint, "dataset=rsicd", f"paths.shards={shards}")
    captions = json.loads((results / "rsicd_val_captions.json").read_text())
    assert len(captions) == len({c["image_id"] for c in captions}) == 1093
    assert (results / "rsicd_val_gallery.html").is_file()
