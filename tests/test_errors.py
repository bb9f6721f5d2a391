"""Errors a user can fix are one line naming what to fix, from every entry point; anything
else keeps its traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bita.data import stream

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_user_errors_print_one_line_and_exit_2(capsys):
    from bita.errors import UserError, reports_user_errors

    @reports_user_errors
    def main():
        raise UserError("train.max_steps=0: expected an integer >= 1")

    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: train.max_steps=0: expected an integer >= 1\n"


def test_other_errors_keep_their_traceback():
    from bita.errors import reports_user_errors

    @reports_user_errors
    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        main()


def test_dataset_all_names_every_source_without_shards(tmp_path):
    """Fault: `dataset=all` before any shards exist named only the first missing source."""
    dataset = {
        "name": "all",
        "root": str(tmp_path),
        "sources": [{"name": name, "weight": None} for name in ("ucm", "rsicd", "nwpu")],
    }
    with pytest.raises(FileNotFoundError) as refused:
        stream.split_size(dataset, split="train", unit="captions")
    message = str(refused.value)
    assert "3 of 3 sources have no manifest" in message
    for name in ("ucm", "rsicd", "nwpu"):
        assert f"{tmp_path / name / 'manifest.json'}: no manifest" in message


def test_make_shards_reports_a_bad_annotation_file_in_one_line(tmp_path):
    """Fault: an annotation file in no known layout, once a 20-line traceback."""
    bad = tmp_path / "dataset.json"
    bad.write_text(json.dumps(["not", "a", "layout"]))
    (tmp_path / "images").mkdir()
    command = [sys.executable, str(TOOLS / "make_shards.py"), "--dataset", "rsicd"]
    command += ["--annotations", str(bad), "--images", str(tmp_path / "images")]
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}: unknown annotation layout; expected Karpathy JSON "
        '{"images": [...]} or NWPU per-class JSON {"<class>": [...]}'
    ]
