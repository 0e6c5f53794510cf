"""Config files and live tracking: TOML in, flags over it, --print-config out and back, a run's
config.json replayed; TensorBoard event files read back with tensorboard's EventAccumulator,
also after a resume; every bad config file is one line naming the key and the file; recipes."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from fasthpa.train import TrainHooks
from fasthpa.train.cli import main as train_main

FLAGS = (
    "--image-size 32 --batch-size 8 --workers 0 --loader torch --no-progress --pretrained none "
    "--split 0.75,0.125,0.125 --log-every 2 --seed 1"
).split()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from fasthpa.data.synth import generate

    root = tmp_path_factory.mktemp("cfg") / "data"
    generate(root, n=48, size=32, test_n=0, seed=4, workers=1)
    return root


def call(argv, hooks=None) -> int:
    try:
        return train_main(argv, hooks)
    except SystemExit as e:
        return int(e.code)


def config_of(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    cfg["run"].pop("out")
    return cfg


def test_print_config_file_and_flags_round_trip_to_the_same_config_json(root, tmp_path, capsys):
    common = ["--data", str(root), *FLAGS, "--epochs", "1", "--lr", "0.002", "--dropout", "0.1"]
    assert call([*common, "--out", str(tmp_path / "flags")]) == 0
    capsys.readouterr()
    assert call([*common, "--out", str(tmp_path / "x"), "--print-config"]) == 0
    toml = capsys.readouterr().out
    assert "[optim]\nlr = 0.002" in toml and not (tmp_path / "x").exists()
    (tmp_path / "hpa.toml").write_text(toml)
    # the file alone; then the file with a flag over it
    assert call(["--config", str(tmp_path / "hpa.toml"), "--out", str(tmp_path / "file")]) == 0
    assert config_of(tmp_path / "file") == config_of(tmp_path / "flags")
    argv = [
        "--config",
        str(tmp_path / "hpa.toml"),
        "--out",
        str(tmp_path / "over"),
        "--lr",
        "0.004",
    ]
    assert call(argv) == 0
    over = config_of(tmp_path / "over")
    assert over["optim"]["lr"] == 0.004 and over["model"]["dropout"] == 0.1
    # a run's config.json replays the run
    replay = ["--config", str(tmp_path / "flags" / "config.json"), "--out", str(tmp_path / "again")]
    assert call(replay) == 0
    assert config_of(tmp_path / "again") == config_of(tmp_path / "flags")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[trainer]\nepochs = 3\n", "unknown section [trainer]"),
        ("[run]\nepoch = 3\n", "[run] epoch: unknown setting"),
        ('[optim]\nlr = "fast"\n', "[optim] lr = 'fast': expected a number"),
        ("[run]\nepochs = 2.5\n", "[run] epochs = 2.5: expected an integer"),
        ("[data]\nhflip = 1\n", "[data] hflip = 1: expected true or false"),
        ("[run]\nepochs = 0\n", "--epochs 0: must be an integer >= 1"),
        ('[model]\narch = "resnet9"\n', "--arch 'resnet9': must be one of"),
        ("[run\nepochs = 3\n", "not valid TOML"),
    ],
)
def test_bad_config_files_are_one_line_naming_key_and_file(tmp_path, text, needle, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert call(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert "bad.toml" in err and needle in err, err


def test_recipes_reference_and_fasthpa(root, tmp_path, capsys):
    from fasthpa.recipes import RECIPES

    assert call(["--out", str(tmp_path / "r"), "--recipe", "reference", "--print-config"]) == 0
    reference = capsys.readouterr().out
    assert 'recipe = "reference"' in reference and "batch_size = 8" in reference
    assert 'lr_schedule = "constant"' in reference and 'loss = "wbce"' in reference
    assert 'amp = "off"' in reference  # the report's fp32, on every device
    assert call(["--out", str(tmp_path / "f"), "--print-config"]) == 0
    default = capsys.readouterr().out
    import tomllib

    printed = tomllib.loads(default)
    assert printed["run"]["recipe"] == "fasthpa"
    for section, values in RECIPES["fasthpa"].items():
        for name, value in values.items():
            assert printed[section][name] == value, (section, name)
    # a flag beats the recipe, and config.json records the recipe that ran
    run = tmp_path / "run"
    assert call(["--data", str(root), "--out", str(run), *FLAGS, "--epochs", "1"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["recipe"] == "fasthpa" and cfg["run"]["batch_size"] == 8


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def test_tensorboard_curves_hold_every_log_step_once_also_after_a_resume(root, tmp_path):
    run = tmp_path / "run"
    argv = ["--data", str(root), "--out", str(run), *FLAGS, "--epochs", "2", "--tensorboard"]
    stop = TrainHooks(after_step=lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == 5 else None)
    assert call(argv, stop) == 0  # stopped at step 5 (one process checks every step)
    assert call(argv) == 0  # resumed to the end
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    log_steps = [r["step"] for r in rows if r["kind"] == "step"]
    epoch_steps = [r["step"] for r in rows if r["kind"] == "epoch"]
    acc = _events(run / "tb")
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "speed/images_per_sec",
        "speed/data_wait_share",
        "speed/step_time_ms",
        "dev/macro_f1_tuned",
        "dev/macro_f1_at_0.5",
    ):
        assert tag in tags, tag
    assert any(t.startswith("dev_f1/") for t in tags)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == log_steps, "a step is missing or repeated"
    assert [e.step for e in acc.Scalars("dev/macro_f1_tuned")] == epoch_steps
    by_step = {r["step"]: r["loss"] for r in rows if r["kind"] == "step"}
    assert all(abs(e.value - by_step[e.step]) < 1e-5 for e in loss)


def test_tensorboard_without_the_package_is_one_line(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    argv = ["--data", str(root), "--out", str(tmp_path / "run"), *FLAGS, "--tensorboard"]
    assert call(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: --tensorboard needs the tensorboard package: pip install 'fasthpa[tensorboard]' "
        "(or: pip install tensorboard)."
    )
