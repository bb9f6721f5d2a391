"""Shared test set-up: offline hub, one CPU process, paths to the real data beside the checkout."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BITA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real caption data laid beside the checkout; tests that need it skip with a reason."""
    if not (SHARED_DATA / "rsicd" / "dataset_rsicd.json").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (set BITA_SHARED_DATA)")
    return SHARED_DATA
