"""Run `python -m bita.run` in a subprocess, as a user types it."""

import os
import subprocess
import sys
from pathlib import Path


def bita_run(cwd: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    # a fresh single-process run: not the rendezvous of the test process that launches it
    launcher = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "bita.run", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"bita.run {overrides} failed:\n{result.stderr[-4000:]}")
    return result
