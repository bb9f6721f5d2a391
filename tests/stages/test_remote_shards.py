"""A tiny training run that streams real RSICD shards over HTTP from 127.0.0.1, and the totals of
bad data a stage ends with."""

import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bita.engine.distributed import init_distributed
from bita.stages.pipeline import run_stages

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rsicd_sample(shared_data, tmp_path_factory) -> Path:
    """Small shards of real RSICD images (two train and one val image per scene class, 16 a
    shard) made by tools/make_shards.py."""
    out = tmp_path_factory.mktemp("rsicd_sample")
    command = [sys.executable, str(REPO / "tools/make_shards.py"), "--dataset=rsicd"]
    command += [f"--annotations={shared_data / 'rsicd/dataset_rsicd.json'}", "--quiet"]
    command += [f"--images={shared_data / 'rsicd/images'}", f"--out={out}", "--shard-size=16"]
    subprocess.run([*command, "--per-class=train=2", "--per-class=val=1"], check=True)
    return out


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


class RecordingTracker:
    """Stands in for bita.tracking.Tracker (whose MLflow calls test_tracking checks): keeps
    the metrics a stage sends."""

    run_id = None  # no MLflow run behind it, so stages log no dataset inputs

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict, *, step: int) -> None:
        self.metrics.update(metrics)


def replace_member(shard: Path, name: str, data: bytes) -> None:
    """Rewrite a tar with member ``name``'s bytes replaced."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, content in members:
            content = data if member.name == name else content
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))


def test_a_tiny_training_run_streams_its_shards_over_http(
    rsicd_sample, serve_folder, tmp_path, caplog
):
    """Faults: one of the four train shards missing on the server (HTTP 404), and a sample of
    another whose json record is not JSON. Main could not read shards over HTTP, and ended a
    stage with no total of what it skipped."""
    shards = tmp_path / "served"
    shutil.copytree(rsicd_sample, shards)
    train = json.loads((shards / "rsicd/manifest.json").read_text())["splits"]["train"]
    missing, damaged = train["shards"][1]["file"], train["shards"][2]["file"]
    (shards / "rsicd" / missing).unlink()
    with tarfile.open(shards / "rsicd" / damaged) as tar:
        record = next(name for name in tar.getnames() if name.endswith(".json"))
    replace_member(shards / "rsicd" / damaged, record, b"{not json")
    server = serve_folder(shards)
    cfg = composed(
        "experiment=tiny",
        "stage=pretrain1",
        "dataset=rsicd",
        f"paths.shards={server.url}",
        "train.max_steps=2",
    )
    tracker = RecordingTracker()
    with caplog.at_level(logging.WARNING):
        run_stages(cfg, tmp_path / "run", init_distributed("cpu"), tracker)
    last = tmp_path / "run/pretrain1/checkpoints/last/trainer_state.json"
    assert json.loads(last.read_text())["step"] == 2
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("bita")
    ]
    key = record.split(".")[0]
    assert warned[:2] == [
        f"shard {server.url}/rsicd/{missing}: cannot be opened (not found); its samples are "
        "skipped",
        f"skipped sample {key} of shard {server.url}/rsicd/{damaged}: its json member is not "
        "valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
        "(char 1))",
    ]
    skipped = tracker.metrics["pretrain1/skipped_samples"]  # once per draw of its shard
    assert skipped >= 1 and tracker.metrics["pretrain1/distinct_skipped_samples"] == 1
    assert tracker.metrics["pretrain1/bad_shards"] == 1
    assert warned[-1] == (
        f"stage pretrain1: {skipped} samples skipped (1 distinct), 1 bad shards "
        "(each named in a warning above)"
    )
