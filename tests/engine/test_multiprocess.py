"""Data parallelism computes what one process computes, and `hardware=multinode` runs across
two "nodes" on this machine. Several processes each: slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bita.engine.distributed import free_port

HERE = Path(__file__).resolve().parent
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    """A fresh launch: one thread per process, no ranks inherited from the test process."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    return env


def trained_weights(out: Path, zero: int, processes: int) -> dict[str, torch.Tensor]:
    script = [str(HERE / "zero_equivalence.py"), str(out), "--zero", str(zero)]
    script += ["--micro", str(8 // processes)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node"]
        command += [str(processes), "--master_addr", "127.0.0.1"]
        command += ["--master_port", str(free_port()), *script]
    result = subprocess.run(command, env=clean_env(), timeout=600, capture_output=True, text=True)
    if result.returncode != 0:  # say why: a bare CalledProcessError hides the ranks' output
        raise AssertionError(f"{command} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return torch.load(out / "weights.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_processes_end_on_the_weights_of_one_process(tmp_path, zero):
    """2 processes x micro-batch 4 under ZeRO 2 / ZeRO 3 against 1 process x micro-batch 8 (ZeRO
    0), tiny BITA, 3 stage-1 (ITC) steps on the same global batches. Measured: the largest
    weight difference is 2.9e-5 (ZeRO 2) and 1.2e-4 (ZeRO 3), the L2 distance of all weights
    5.7e-5 and 1.7e-4 (summation order, through Adam); with ITC negatives gathered without
    gradient (the fault this test catches) they are 4.2e-3 and 0.76."""
    one = trained_weights(tmp_path / "one", 0, 1)
    two = trained_weights(tmp_path / "two", zero, 2)
    assert one.keys() == two.keys() and "temp" in one
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=5e-4, msg=name)
    distance = sum((two[name] - one[name]).square().sum() for name in one).sqrt()
    assert distance < 1e-3


# ---------------------------------------------------------------- two "nodes" on one machine

# Enough steps (two epochs of demo_mini at a global batch of 16) that the kill lands while the
# run still trains: an idle CPU runs about 5 of these steps a second.
STEPS = 30


def node_command(node: int, port: int) -> list[str]:
    """One torchrun agent of a 2-node run (one process each), rendezvous on 127.0.0.1, running
    tiny stage 1 under `hardware=multinode` on gloo into a fixed run folder."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--node_rank",
        str(node),
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{port}",
        "-m",
        "bita.run",
        "experiment=tiny",
        "stage=pretrain1",
        "dataset=demo_mini",
        "hardware=multinode",
        "hardware.accelerator=cpu",
        "hardware.autocast=null",
        "hardware.micro_batch_size=8",
        "hardware.num_workers=0",
        "hardware.num_threads=1",
        "train.epochs=2",
        f"train.max_steps={STEPS}",
        "train.save_every_steps=1",
        "tracking.enabled=false",
        "hydra.run.dir=runs/two_nodes",
    ]


def start_nodes(cwd: Path, logs: Path) -> list[subprocess.Popen]:
    port = free_port()
    nodes = []
    for node in (0, 1):
        log = (logs / f"node{node}.log").open("a")
        nodes.append(
            subprocess.Popen(
                node_command(node, port),
                cwd=cwd,
                env=clean_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return nodes


def kill_with_workers(agent: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent and its workers (they run in sessions of their own, so the
    agent's process group does not reach them), by process id."""
    import psutil  # a DeepSpeed dependency

    processes = [*psutil.Process(agent.pid).children(recursive=True), psutil.Process(agent.pid)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)
    agent.wait()


def checkpoint_step(last: Path) -> int:
    state = last / "trainer_state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


@pytest.mark.slow
def test_two_node_multinode_run_finishes_checkpoints_and_resumes(tmp_path):
    """Two torchrun agents (`--nnodes 2`), killed (agents and workers, SIGKILL) once a checkpoint
    past step 2 exists, then started again: the run resumes there and finishes. The checkpoint
    it resumed from held both ranks' optimizer state."""
    last = tmp_path / "runs/two_nodes/pretrain1/checkpoints/last"
    nodes = start_nodes(tmp_path, tmp_path)
    deadline = time.monotonic() + 400
    while checkpoint_step(last) < 2 and time.monotonic() < deadline:
        assert all(n.poll() is None for n in nodes), (tmp_path / "node0.log").read_text()[-3000:]
        time.sleep(0.05)
    for node in nodes:
        kill_with_workers(node)
    killed_at = checkpoint_step(last)
    assert 2 <= killed_at < STEPS
    # mid-run, `last` holds both ranks' optimizer state (a finished stage drops it)
    assert {p.name for p in last.glob("optimizer.rank*.pt")} == {
        "optimizer.rank0.pt",
        "optimizer.rank1.pt",
    }

    nodes = start_nodes(tmp_path, tmp_path)
    codes = [node.wait(timeout=400) for node in nodes]
    log = (tmp_path / "node0.log").read_text()
    assert codes == [0, 0], log[-3000:]
    assert f"at step {killed_at}" in log and "resumed from" in log
    state = json.loads((last / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (STEPS, 2)
    assert not list(last.glob("optimizer.rank*.pt"))  # finished: nothing left to resume
