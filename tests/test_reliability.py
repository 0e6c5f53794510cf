"""Every failure a user can cause ends in one clear line (exit status 2, no traceback, at most
three lines, the file or flag named), in every command, loader backend and process; signals
end in a clean stop; nothing the user had is lost.

Cases that the start-of-run checks catch (fasthpa.data.preflight) are the same for every
backend, since they stop the run before a loader is built; cases only decoding reveals (a
damaged zlib stream, 16-bit data that is not 8-bit) go through the real worker processes of
the PyTorch loader and through DALI.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasthpa.checkpoint import load_checkpoint
from fasthpa.cli import main as cli_main
from fasthpa.errors import UserError
from fasthpa.io import atomic_write_bytes, make_dir
from fasthpa.train import TrainHooks
from fasthpa.train.cli import main as train_main
from fasthpa.train.folder import LOCK_NAME, RunLock

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("dali", id="dali", marks=pytest.mark.dali),
]
FLAGS = (
    "--image-size 32 --batch-size 8 --no-progress --pretrained none --epochs 1 "
    "--split 0.75,0.125,0.125 --log-every 2 --seed 1 --recipe reference"
).split()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from fasthpa.data.synth import generate

    root = tmp_path_factory.mktemp("reliability") / "data"
    generate(root, n=40, size=32, test_n=6, seed=2, workers=1)
    return root


@pytest.fixture()
def data(base, tmp_path) -> Path:
    """A private copy of the dataset for one test to damage."""
    return Path(shutil.copytree(base, tmp_path / "data"))


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert call(train_main, ["--data", str(base), "--out", str(run), *FLAGS, "--workers", "0"]) == 0
    return run


def call(fn, argv, hooks=None) -> int:
    try:
        return fn(argv, hooks) if hooks is not None else fn(argv)
    except SystemExit as e:
        return int(e.code)


def one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and 1 <= len(lines) <= 3, err
    assert lines[-1].startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def dev_row_file(data: Path, run_split: str = "0.75,0.125,0.125") -> Path:
    """The green stain of a row of the dev part of the split the FLAGS make."""
    from fasthpa.data.dataset import read_targets_csv
    from fasthpa.data.splits import parse_fractions, stratified_split

    ids, targets = read_targets_csv(data / "train.csv")
    assignment = stratified_split(targets, parse_fractions(run_split), 1)
    return data / "train" / f"{ids[int(np.flatnonzero(assignment == 1)[0])]}_green.png"


def a_test_file(data: Path) -> Path:
    first = (data / "sample_submission.csv").read_text().splitlines()[1].split(",")[0]
    return data / "test" / f"{first}_green.png"


# ---------------------------------------------------------------- damaged files, caught at start


def _zero_byte(p: Path) -> str:
    p.write_bytes(b"")
    return "the file is empty"


def _truncated(p: Path) -> str:
    p.write_bytes(p.read_bytes()[:-40])
    return "truncated"


def _text(p: Path) -> str:
    p.write_text("this is not an image\n")
    return "not a PNG file"


def _jpeg(p: Path) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(buf, format="JPEG")
    p.write_bytes(buf.getvalue())
    return "is a JPEG file, not a PNG"


def _tiny(p: Path) -> str:
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(p)
    return "is 1 x 1 pixels"


def _other_size(p: Path) -> str:
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(p)
    return "stains differ in size"


def _symlink_loop(p: Path) -> str:
    p.unlink()
    p.symlink_to(p)
    return "Too many levels of symbolic links"


def _bomb(p: Path) -> str:
    p.write_bytes(bomb_png(100_000, 100_000))
    return "over the 89,478,485-pixel limit"


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width x height (its data is tiny and wrong)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return len(payload).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


AT_START = [_zero_byte, _truncated, _text, _jpeg, _tiny, _other_size, _symlink_loop, _bomb]


@pytest.mark.parametrize("damage", AT_START, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_dev_file_stops_training_before_it_starts(data, tmp_path, damage, capsys):
    bad = dev_row_file(data)
    needle = damage(bad)
    run = tmp_path / "run"
    t0 = time.monotonic()
    argv = ["--data", str(data), "--out", str(run), *FLAGS, "--workers", "1", "--loader", "torch"]
    assert call(train_main, argv) == 2
    one_line(capsys, bad.name, needle)
    assert not (run / "history.jsonl").exists(), "it trained before it stopped"
    assert time.monotonic() - t0 < 120


@pytest.mark.parametrize("damage", AT_START, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_test_file_stops_predict_in_one_line(trained, data, tmp_path, damage, capsys):
    bad = a_test_file(data)
    needle = damage(bad)
    out = tmp_path / "sub.csv"
    argv = ["predict", "--run", str(trained), "--data", str(data), "--out", str(out)]
    assert call(cli_main, [*argv, "--loader", "torch", "--workers", "1", "--no-progress"]) == 2
    one_line(capsys, bad.name, needle)
    assert not out.exists()


@pytest.mark.parametrize("damage", [_bomb, _jpeg, _truncated], ids=["bomb", "jpeg", "truncated"])
def test_check_decode_all_names_the_file(data, damage, capsys):
    bad = dev_row_file(data)
    damage(bad)
    assert call(cli_main, ["check", str(data), "--decode-all"]) == 2
    one_line(capsys, bad.name)


# ---------------------------------------------------------------- damage only decoding shows


def _damaged_stream(p: Path) -> str:
    """Valid header and IEND, a corrupt zlib stream: passes the start-of-run checks."""
    raw = bytearray(p.read_bytes())
    idat = raw.index(b"IDAT") + 4
    raw[idat + 2 : idat + 10] = b"\xff" * 8
    p.write_bytes(bytes(raw))
    return "not a readable PNG"


def _sixteen_bit(p: Path) -> str:
    Image.fromarray(np.full((32, 32), 1000, np.uint16)).save(p)
    return "16-bit PNG whose values are not 8-bit data"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", [_damaged_stream, _sixteen_bit], ids=["stream", "16bit"])
def test_decode_errors_in_workers_arrive_as_one_line(data, tmp_path, backend, damage, capsys):
    bad = dev_row_file(data)
    needle = damage(bad)
    argv = ["--data", str(data), "--out", str(tmp_path / "run"), *FLAGS, "--workers", "1"]
    assert call(train_main, [*argv, "--loader", backend]) == 2
    err = one_line(capsys, needle)
    assert bad.name in err or "DALI could not decode" in err


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_errors_in_predict_workers_arrive_as_one_line(
    trained, data, tmp_path, backend, capsys
):
    bad = a_test_file(data)
    _sixteen_bit(bad)
    argv = ["predict", "--run", str(trained), "--data", str(data), "--out", str(tmp_path / "s.csv")]
    assert call(cli_main, [*argv, "--loader", backend, "--workers", "1", "--no-progress"]) == 2
    one_line(capsys, bad.name, "16-bit")


# ---------------------------------------------------------------- file-system errors


def test_out_that_is_a_file_or_under_a_file_is_one_line(base, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for out, needle in ((blocker, "is a file, not a folder"), (blocker / "run", "Not a directory")):
        argv = ["--data", str(base), "--out", str(out), *FLAGS, "--workers", "0"]
        assert call(train_main, argv) == 2
        one_line(capsys, str(out), needle)
    assert blocker.read_text() == "mine"


def test_unwritable_folder_and_full_disk_name_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="the folder is not writable"):
        make_dir(tmp_path / "ro")
    monkeypatch.undo()
    target = tmp_path / "last.pt"
    target.write_bytes(b"the old checkpoint")

    def full(f):
        raise OSError(28, "No space left on device")

    from fasthpa.io import atomic_write

    with pytest.raises(UserError, match=r"last.pt: cannot write it \(No space left on device\)"):
        atomic_write(target, full)
    assert target.read_bytes() == b"the old checkpoint"
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file was left behind"


def test_predict_out_that_is_a_folder(trained, base, tmp_path, capsys):
    folder = tmp_path / "sub.csv"
    folder.mkdir()
    argv = ["predict", "--run", str(trained), "--data", str(base), "--out", str(folder)]
    assert call(cli_main, [*argv, "--loader", "torch", "--workers", "0"]) == 2
    one_line(capsys, "is a folder")


@pytest.mark.parametrize("name", ["empty.npy", "empty.npz"])
def test_empty_probability_files_for_thresholds(tmp_path, name, capsys):
    (tmp_path / name).write_bytes(b"")
    argv = ["thresholds", "--probs", str(tmp_path / name), "--out", str(tmp_path / "t.json")]
    assert call(cli_main, argv) == 2
    one_line(capsys, name)


# ---------------------------------------------------------------- flags and config values


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--lr", "nan", "--lr nan: must be a finite number"),
        ("--lr", "inf", "--lr inf: must be a finite number"),
        ("--beta1", "2", "--beta1 2.0: must be a finite number >= 0 and < 1"),
        ("--warmup-epochs", "nan", "--warmup-epochs nan"),
        ("--max-steps", "0", "--max-steps 0: must be an integer >= 1"),
        ("--arch", "resnet9", "invalid choice: 'resnet9'"),
        ("--epochs", "1.5", "'1.5' is not a valid int"),
    ],
)
def test_bad_flag_values_are_one_line(base, tmp_path, flag, value, needle, capsys):
    argv = ["--data", str(base), "--out", str(tmp_path / "run"), *FLAGS, flag, value]
    assert call(train_main, argv) == 2
    err = one_line(capsys, needle)
    assert "usage:" not in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["predict", "--run", "r", "--data", "d", "--out", "s.csv", "--tta", "x"], "--tta"),
        (["thresholds", "--probs", "p.npy", "--out", "t.json", "--method", "x"], "--method"),
        (["cv", "--folds", "x"], "--folds"),
        (["nosuchcommand"], "invalid choice"),
    ],
)
def test_bad_choices_in_other_commands_are_one_line(argv, needle, capsys):
    assert call(cli_main, argv) == 2
    assert "usage:" not in one_line(capsys, needle)


def test_a_nan_before_any_checkpoint_does_not_claim_one_is_kept(base, tmp_path, capsys):
    hooks = TrainHooks(loss_hook=lambda loss: loss * float("nan"))
    run = tmp_path / "run"
    argv = ["--data", str(base), "--out", str(run), *FLAGS, "--workers", "0"]
    assert call(train_main, argv, hooks) == 2
    err = one_line(capsys, "non-finite loss (nan) at step 1", "No checkpoint had been written yet")
    assert "kept" not in err


def test_too_many_workers_are_capped_with_a_note(base, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "--data",
        str(base),
        "--out",
        str(run),
        *FLAGS,
        "--loader",
        "torch",
        "--workers",
        "1000",
    ]
    assert call(train_main, [*argv, "--max-steps", "1"]) == 0
    cores = len(os.sched_getaffinity(0))
    assert f"--workers 1000 is more than the {cores} CPU cores here; using {cores}" in (
        capsys.readouterr().err
    )


# ---------------------------------------------------------------- the run folder


def test_a_second_trainer_into_the_same_folder_is_refused(base, tmp_path, capsys):
    run = tmp_path / "run"
    holder = RunLock(run)
    holder.acquire()
    try:
        argv = ["--data", str(base), "--out", str(run), *FLAGS, "--workers", "0"]
        assert call(train_main, argv) == 2
        one_line(capsys, "another fasthpa run is using this folder", f"pid {os.getpid()} on host")
        assert not (run / "config.json").exists()
    finally:
        holder.release()
    (run / LOCK_NAME).write_text("pid 999999 on host gone\n")  # a dead run's file: taken over
    assert call(train_main, argv + ["--max-steps", "1"]) == 0


def test_stale_temporary_files_are_removed_when_a_run_starts(base, tmp_path):
    run = tmp_path / "run"
    argv = ["--data", str(base), "--out", str(run), *FLAGS, "--workers", "0", "--max-steps", "2"]
    assert call(train_main, argv) == 0
    stale = run / ".last.pt.new.x1y2z3.tmp"  # what a kill -9 during a write leaves
    stale.write_bytes(b"half a checkpoint")
    keep = run / "notes.txt"
    keep.write_text("mine")
    assert call(train_main, argv[:-1] + ["3"]) == 0
    assert not stale.exists() and keep.read_text() == "mine"


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_cleanly_and_resumes_bit_identical(base, tmp_path):
    """What a scheduler (or Ctrl-C in a terminal) does: every process of the group, the loader's
    workers too, gets the signal; the trainer saves and exits 0, and the same command resumes."""
    argv = ["--data", str(base), *FLAGS, "--loader", "torch", "--workers", "1", "--epochs", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fasthpa.train", *argv]
    whole = subprocess.run(
        [*cmd, "--out", str(tmp_path / "a")], env=env, capture_output=True, text=True, timeout=600
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = tmp_path / "b"
    proc = subprocess.Popen(
        [*cmd, "--out", str(run)],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    history = run / "history.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if history.exists() and '"kind": "step"' in history.read_text():
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out and "Traceback" not in err, err[-3000:]
    again = subprocess.run(
        [*cmd, "--out", str(run)], env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["step"] == b["step"]
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0, msg=k)


def test_a_killed_loader_worker_is_one_sentence(base, tmp_path):
    """The out-of-memory killer takes a worker: the trainer says so in one line, exit 1."""
    argv = ["--data", str(base), *FLAGS, "--loader", "torch", "--workers", "1", "--epochs", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fasthpa.train", *argv, "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = tmp_path / "run" / "history.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if history.exists() and '"kind": "step"' in history.read_text():
            break
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert children, "the torch loader with --workers 1 runs a worker process"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "data loader worker process died" in err and "killed by signal" in err


def test_atomic_writes_keep_the_old_file_when_the_new_one_fails(tmp_path):
    path = tmp_path / "thresholds.json"
    atomic_write_bytes(path, json.dumps({"thresholds": [0.5]}).encode())
    from fasthpa.io import atomic_write

    with pytest.raises(ZeroDivisionError):
        atomic_write(path, lambda f: 1 / 0)
    assert json.loads(path.read_text()) == {"thresholds": [0.5]}
