"""`python -m bita.run` with no arguments, as the README's first command runs it: the small
preset captions the demo sample's val images better than kNN caption retrieval does on the
same images (tools/baselines.py on the run's own feature cache), and no caption stutters."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .runner import bita_run

REPO = Path(__file__).resolve().parents[2]


def stutters(caption: str) -> bool:
    """A word three or more times in a row ("trees trees trees")."""
    return re.search(r"\b(\w+)(?: \1\b){2,}", caption.lower()) is not None


def test_stutter_rule():
    assert stutters("trees trees trees are are") and stutters("A a a beach")
    assert not stutters("many many buildings and a a road") and not stutters("trees")


@pytest.mark.slow
def test_default_run_beats_knn_retrieval_on_its_val_images(tmp_path):
    result = bita_run(tmp_path)

    (results,) = (tmp_path / "runs").rglob("evaluate/results/rsicd_val.json")
    metrics = json.loads(results.read_text())["metrics"]
    captions = json.loads((results.parent / "rsicd_val_captions.json").read_text())
    assert len(captions) == 93
    assert [c["caption"] for c in captions if stutters(c["caption"])] == []
    # what the run ends with: captions beside a reference, the table, gallery and MLflow
    assert "val captions (generated | a reference)" in result.stdout
    assert "| evaluate: val |" in result.stdout and "gallery: " in result.stdout
    assert "mlflow ui" in result.stdout

    floors = tmp_path / "floors.json"
    cache = results.parents[2] / "features"
    subprocess.run(
        [sys.executable, str(REPO / "tools/baselines.py"), f"features.root={cache}"]
        + ["--json", str(floors)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=600,
    )
    knn = json.loads(floors.read_text())["floors"]["knn"]
    assert set(knn["captions"]) == {c["image_id"] for c in captions}  # the same val images
    assert metrics["CIDEr"] > knn["metrics"]["CIDEr"], (metrics, knn["metrics"])
