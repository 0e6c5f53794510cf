"""The trainer end to end on CPU: artefacts, resume, damage detection, NaN stop, DDP, compile.

Runs are tiny (32 px synthetic images, tens of samples) and mostly in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fasthpa.checkpoint import load_checkpoint, load_latest
from fasthpa.data.synth import generate
from fasthpa.errors import UserError
from fasthpa.noise_scale import NOISE_SCALE_REQUIREMENT
from fasthpa.train import TrainHooks
from fasthpa.train.cli import main as train_main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, n=96, size=32, test_n=0, seed=0, workers=1)
    return root


def tiny_args(root: Path, out: Path, *extra: str) -> list[str]:
    """A tiny run of the trainer's machinery (the reference recipe: no refit at the end)."""
    flags = (
        "--image-size 32 --batch-size 8 --workers 0 --loader torch --no-progress --pretrained none "
        "--split 0.75,0.125,0.125 --log-every 2 --seed 1 --recipe reference"
    )
    return ["--data", str(root), "--out", str(out), *flags.split(), *extra]


def run_main(argv: list[str], hooks: TrainHooks | None = None) -> int:
    """The trainer's command line in-process; a UserError surfaces as SystemExit(2)."""
    try:
        return train_main(argv, hooks)
    except SystemExit as e:
        return int(e.code)


def sigterm_at(step: int) -> TrainHooks:
    """Send this process SIGTERM right after optimiser step ``step``."""
    import signal

    return TrainHooks(
        after_step=lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == step else None
    )


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_short_run_writes_every_artefact_and_loss_falls(synth_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(tiny_args(synth_root, run, "--epochs", "4", "--lr", "2e-3")) == 0
    out = capsys.readouterr().out
    assert "done: best dev macro F1" in out
    for name in (
        "config.json",
        "env.json",
        "split.csv",
        "channel_stats.json",
        "history.jsonl",
        "last.pt",
        "best.pt",
        "thresholds.json",
        "dev_probs.npz",
        "final_metrics.json",
    ):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["arch"] == "resnet18" and cfg["optim"]["lr"] == 2e-3
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["loader"] == "torch" and env["torch"] == torch.__version__
    rows = history(run)
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 4 and all(r["images_per_sec"] > 0 for r in steps)
    assert all(0 <= r["data_wait_share"] <= 1 and r["step_time_ms"] > 0 for r in steps)
    # the loss falls: every epoch's mean training loss is below the previous one's
    losses = [r["train_loss"] for r in epochs]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    th = json.loads((run / "thresholds.json").read_text())
    for key in (
        "method",
        "label_names",
        "thresholds",
        "f1_at_0.5",
        "f1_tuned",
        "macro_f1_at_0.5",
        "macro_f1_tuned",
        "positives",
    ):
        assert key in th
    assert len(th["thresholds"]) == 28 and th["macro_f1_tuned"] >= th["macro_f1_at_0.5"]
    split = dict(line.split(",") for line in (run / "split.csv").read_text().split()[1:])
    dev = np.load(run / "dev_probs.npz")
    dev_ids = [i for i, s in split.items() if s == "dev"]
    assert sorted(dev["ids"].tolist()) == sorted(dev_ids)
    assert dev["probs"].shape == (len(dev_ids), 28) and dev["labels"].shape == (len(dev_ids), 28)
    assert np.all((dev["probs"] >= 0) & (dev["probs"] <= 1))
    best = load_checkpoint(run / "best.pt")
    assert best["best_f1"] == pytest.approx(max(r["dev_macro_f1_tuned"] for r in epochs))
    assert not any(k.startswith("_orig_mod") or k.startswith("module.") for k in best["model"])
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["test_samples"] > 0 and 0 <= final["test_macro_f1_tuned"] <= 1


def test_kill_and_resume_equals_uninterrupted(synth_root, tmp_path, capsys):
    args = ("--epochs", "2", "--hflip", "--vflip", "--dropout", "0.2")
    assert run_main(tiny_args(synth_root, tmp_path / "a", *args)) == 0
    # SIGTERM in the middle of epoch 0 (8 steps per epoch): a checkpoint, a clean exit
    assert run_main(tiny_args(synth_root, tmp_path / "b", *args), sigterm_at(5)) == 0
    out = capsys.readouterr().out
    assert "stopped by SIGTERM at epoch 0, step 5" in out
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 5
    # the same command resumes by itself and finishes
    assert run_main(tiny_args(synth_root, tmp_path / "b", *args)) == 0
    assert "resuming" in capsys.readouterr().out
    a, b = model_tensors(tmp_path / "a" / "last.pt"), model_tensors(tmp_path / "b" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    steps_b = [r["step"] for r in history(tmp_path / "b") if r["kind"] == "step"]
    assert steps_b == sorted(set(steps_b)), "history repeats steps after the resume"


def test_damaged_last_checkpoint_is_detected_and_previous_used(synth_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(tiny_args(synth_root, run, "--epochs", "2")) == 0
    last = run / "last.pt"
    blob = bytearray(last.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a flipped bit inside tensor data: torch.load alone loads it
    last.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="last.pt: checkpoint is damaged"):
        load_checkpoint(last)
    state, path, warnings = load_latest(run)
    assert path.name == "last.prev.pt" and state["epoch"] == 1 and warnings
    # resuming goes on from last.prev.pt with a warning, never from the damaged file
    assert run_main(tiny_args(synth_root, run, "--epochs", "3")) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "damaged" in out and "from last.prev.pt" in out
    (run / "last.pt").write_bytes(b"junk")
    (run / "last.prev.pt").write_bytes(b"junk")
    assert run_main(tiny_args(synth_root, run, "--epochs", "4")) == 2
    assert "every checkpoint is damaged" in capsys.readouterr().err


def test_nan_loss_stops_with_the_step_and_keeps_last_good(synth_root, tmp_path, capsys):
    steps = []  # the loss hook runs inside step len(steps) (1-based), in epoch 1 at step 11
    hooks = TrainHooks(
        after_step=steps.append,
        loss_hook=lambda loss: loss * float("nan") if len(steps) + 1 == 11 else loss,
    )
    run = tmp_path / "run"
    assert run_main(tiny_args(synth_root, run, "--epochs", "3"), hooks) == 2
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 11 (epoch 1)" in err and err.count("\n") == 1
    epoch0 = [r for r in history(run) if r["kind"] == "epoch"]
    assert len(epoch0) == 1 and epoch0[0]["step"] == 8
    assert load_checkpoint(run / "last.pt")["step"] == 8  # the end of epoch 0, nothing later


def test_pretrained_path_rgb_stem_arrives(synth_root, tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    run = tmp_path / "run"
    # a frozen backbone keeps the stem exactly as loaded through training
    argv = tiny_args(synth_root, run, "--epochs", "1", "--freeze-backbone")
    argv[argv.index("--pretrained") + 1] = str(tmp_path / "r18.pth")
    assert run_main(argv) == 0
    state = model_tensors(run / "last.pt")
    stem = [k for k in state if k.endswith("conv1.weight") and state[k].shape[1] == 4][0]
    torch.testing.assert_close(state[stem][:, :3], tv.conv1.weight.detach(), rtol=0, atol=0)
    env = json.loads((run / "env.json").read_text())
    assert str(tmp_path / "r18.pth") in json.dumps(env["pretrained"])


def test_resume_errors_and_help(tmp_path, capsys):
    assert run_main(["--resume", str(tmp_path)]) == 2
    assert "no config.json there" in capsys.readouterr().err
    assert run_main(["--out", str(tmp_path / "x")]) == 2
    assert "--data is required" in capsys.readouterr().err
    p = subprocess.run(
        [sys.executable, "-m", "fasthpa.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0
    for flag in (
        "--lr-schedule",
        "--fold",
        "--pretrained",
        "--yellow-init",
        "--freeze-backbone",
        "--head",
        "--loss",
        "--focal-gamma",
        "--amp",
        "--no-channels-last",
        "--compile",
        "--compile-mode",
        "--loader",
        "--workers",
        "--resume",
        "--grad-accum",
    ):
        assert flag in p.stdout, flag


@pytest.mark.slow
def test_compiled_path_runs_on_cpu(synth_root, tmp_path):
    run = tmp_path / "run"
    argv = tiny_args(synth_root, run, "--epochs", "1", "--compile", "--max-steps", "3")
    assert run_main(argv) == 0
    assert json.loads((run / "env.json").read_text())["compile"] is True
    assert load_checkpoint(run / "last.pt")["step"] == 3


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_with_accumulation(synth_root, tmp_path):
    """2 ranks x batch 4 over gloo == 1 process x batch 4 x 2 accumulated micro-batches: the same
    global batches in the same order, so the same weights.

    BatchNorm normalises per micro-batch in both runs, so every parameter agrees. The running
    statistics (buffers, used only in eval mode) cannot: one process folds both micro-batches into
    its moving average one after the other, DDP averages the ranks' averages; so the dev
    probabilities are compared for coverage (each row exactly once), not value."""
    common = tiny_args(synth_root, tmp_path / "x", "--epochs", "1", "--batch-size", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fasthpa.train",
        *common,
    ]
    ddp[ddp.index("--out") + 1] = str(tmp_path / "ddp")
    p = subprocess.run(ddp, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    single = [sys.executable, "-m", "fasthpa.train", *common, "--grad-accum", "2"]
    single[single.index("--out") + 1] = str(tmp_path / "one")
    p = subprocess.run(single, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    env_ddp = json.loads((tmp_path / "ddp" / "env.json").read_text())
    assert env_ddp["world_size"] == 2 and env_ddp["global_batch"] == 8
    a = load_checkpoint(tmp_path / "ddp" / "last.pt")
    b = load_checkpoint(tmp_path / "one" / "last.pt")
    assert a["step"] == b["step"] > 0
    params = dict(torch.nn.Module.named_parameters(_module_from(a)))
    for name in params:
        torch.testing.assert_close(
            a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5, msg=name
        )
    # evaluation on 2 ranks saw every dev row exactly once
    da = np.load(tmp_path / "ddp" / "dev_probs.npz")
    db = np.load(tmp_path / "one" / "dev_probs.npz")
    assert da["ids"].tolist() == db["ids"].tolist()
    assert len(set(da["ids"].tolist())) == len(da["ids"]) and da["probs"].shape == db["probs"].shape


def _module_from(state: dict) -> torch.nn.Module:
    from fasthpa.model import build_model

    model, _ = build_model(state["arch"], in_channels=state["in_channels"], pretrained="none")
    model.load_state_dict(state["model"])
    return model


def test_resume_keeps_saved_config_and_names_ignored_flags(tmp_path):
    import argparse

    from fasthpa.config import add_config_arguments, config_from_args, save_config
    from fasthpa.train.folder import resolve_start

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    run = tmp_path / "run"
    first, _ = config_from_args(
        parser.parse_args(["--data", "d", "--out", str(run), "--lr", "0.01"])
    )
    save_config(run / "config.json", first)
    (run / "last.pt").write_bytes(b"placeholder")  # resolve_start only looks for the name
    args = parser.parse_args(["--data", "d", "--out", str(run), "--lr", "0.5", "--epochs", "20"])
    start = resolve_start(*config_from_args(args))
    assert start.resuming and start.run_dir == run
    assert start.cfg.optim.lr == 0.01 and start.cfg.run.epochs == 20  # saved lr kept, epochs grow
    assert start.ignored == ["--lr"]
    # a flag given with its default value is explicit too (no guessing from default values)
    args = parser.parse_args(["--out", str(run), "--lr", "0.001"])
    assert resolve_start(*config_from_args(args)).ignored == ["--lr"]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_lr_schedule_is_a_pure_function_of_the_step(schedule):
    from fasthpa.config import TrainConfig
    from fasthpa.runtime import lr_at

    cfg = TrainConfig()
    cfg.optim.lr_schedule = schedule
    total, warmup = 100, 10
    lrs = [lr_at(s, total, warmup, cfg.optim.lr, schedule) for s in range(total)]
    assert lrs[0] == pytest.approx(cfg.optim.lr / warmup)  # linear warm-up from lr / warmup
    assert lrs[warmup - 1] == pytest.approx(cfg.optim.lr)
    assert max(lrs) == pytest.approx(cfg.optim.lr)
    if schedule == "constant":
        assert lrs[warmup:] == [cfg.optim.lr] * (total - warmup)
    else:  # cosine decay after the warm-up: monotone, ends near the floor
        tail = lrs[warmup:]
        assert all(b <= a for a, b in zip(tail, tail[1:]))
        assert tail[-1] < 0.01 * cfg.optim.lr


def test_fold_flag_parsing_and_validation():
    from fasthpa.config import DataConfig, parse_fold

    assert parse_fold("2/5") == (2, 5) and parse_fold("0 of 4") == (0, 4)
    for bad in ("5/5", "1/1", "x"):
        with pytest.raises(UserError, match="--fold"):
            DataConfig(data="d", fold=bad)


def test_noise_scale_meter_logs_on_log_steps_and_needs_two_batch_sizes(
    synth_root, tmp_path, capsys
):
    run = tmp_path / "run"
    argv = tiny_args(synth_root, run, "--epochs", "1", "--noise-scale", "--batch-size", "4")
    assert run_main([*argv, "--grad-accum", "2"]) == 0
    steps = [r for r in history(run) if r["kind"] == "step"]
    assert steps and all(r["b_small"] == 4 and r["b_big"] == 8 for r in steps)
    assert all("grad_sq_ema" in r and "trace_sigma_ema" in r for r in steps)
    env = json.loads((run / "env.json").read_text())
    assert env["noise_scale"]["source"] == "grad_accum_micro_batches"
    capsys.readouterr()
    assert run_main(tiny_args(synth_root, tmp_path / "one", "--noise-scale")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: " + NOISE_SCALE_REQUIREMENT


def test_the_input_bound_note_comes_once_the_waits_are_measured():
    from fasthpa.train.meter import input_bound_hint

    assert input_bound_hint([0.9, 0.1, 0.2], "torch") is None  # the first row is start-up
    note = input_bound_hint([0.9, 0.5, 0.7], "dali-gpu")
    assert note.startswith(
        "note: the steps spent 60% of their time waiting for data (loader dali-gpu)"
    )
    assert "--loader resident" in note and "fasthpa pack --format" in note
    assert input_bound_hint([0.9, 0.5, 0.7], "resident") is None  # nothing left to hold
    assert input_bound_hint([0.9, 0.5], "torch") is None  # one measured row is not enough
