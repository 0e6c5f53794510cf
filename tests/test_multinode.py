"""Several nodes without a shared disk, simulated on one machine: two gloo ranks started by hand,
each in its own working folder, so the relative ``--data`` and ``--out`` of one rank are not the
other's (what two nodes with their own disks see).

- rank 0 decides whether the run resumes and reads the checkpoint; rank 1, whose ``--out`` is
  empty, gets it by broadcast, and the resumed run ends bit-identical to an uninterrupted one;
- a rank without the dataset stops the whole job within seconds with one line naming the rank,
  its host and the path, instead of the others hanging in a collective until the timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fasthpa.checkpoint import load_checkpoint
from fasthpa.data.synth import generate

pytestmark = pytest.mark.slow

# a rank that sends itself SIGTERM after optimiser step N (N from the first argument), then
# runs the trainer's command line: fault injection through the trainer's hooks
DRIVER = """
import os, signal, sys
from fasthpa.train import TrainHooks
from fasthpa.train.cli import main

stop_at = int(sys.argv[1])
hooks = TrainHooks(
    after_step=lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == stop_at else None
)
sys.exit(main(sys.argv[2:], hooks))
"""

ARGS = (
    "--data data --out run --image-size 32 --batch-size 4 --workers 0 --loader torch "
    "--no-progress --pretrained none --split 0.75,0.125,0.125 --log-every 2 --seed 1 --epochs 2 --recipe reference"
).split()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multinode") / "data"
    generate(root, n=64, size=32, test_n=0, seed=0, workers=1)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(folders: list[Path], driver: Path, stop_at: int, timeout: float = 600):
    """Start one rank per folder (rank r runs in folders[r]); wait; return their results."""
    port = free_port()
    procs = []
    for rank, cwd in enumerate(folders):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(driver), str(stop_at), *ARGS]
        procs.append(
            subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout.decode(), stderr.decode()))
    return out


def node(base: Path, name: str, dataset: Path | None) -> Path:
    """A folder standing for one node's disk, with the dataset on it or not."""
    folder = base / name
    folder.mkdir()
    if dataset is not None:
        (folder / "data").symlink_to(dataset)
    return folder


def test_rank0_resumes_for_a_rank_whose_out_is_empty(dataset, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    whole = [node(tmp_path, "u0", dataset), node(tmp_path, "u1", dataset)]
    for rc, _, err in launch(whole, driver, stop_at=-1):
        assert rc == 0, err[-3000:]
    cut = [node(tmp_path, "i0", dataset), node(tmp_path, "i1", dataset)]
    results = launch(cut, driver, stop_at=3)  # SIGTERM after step 3: the ranks agree at step 4
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert "stopped by SIGTERM at epoch 0, step 4" in results[0][1]
    assert not (cut[1] / "run").exists(), "only rank 0 writes the run folder"
    results = launch(cut, driver, stop_at=-1)  # the same command: rank 0 finds last.pt
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert "resuming run from last.pt: epoch 0, step 4" in results[0][1]
    assert not (cut[1] / "run").exists()
    a = load_checkpoint(whole[0] / "run" / "last.pt")
    b = load_checkpoint(cut[0] / "run" / "last.pt")
    assert a["step"] == b["step"] == 10
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0, msg=k)


def test_a_rank_without_the_dataset_stops_every_rank_in_one_line(dataset, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    folders = [node(tmp_path, "n0", dataset), node(tmp_path, "n1", None)]
    t0 = time.monotonic()
    results = launch(folders, driver, stop_at=-1, timeout=120)
    elapsed = time.monotonic() - t0
    assert elapsed < 90, f"took {elapsed:.0f} s: a rank waited for the other"
    host = socket.gethostname()
    for rc, _, err in results:
        assert rc == 2, err[-2000:]
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert f"rank 1 (host {host}): data: dataset folder not found" in lines[0], lines[0]
        assert "Traceback" not in err
