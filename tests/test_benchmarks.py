"""The benchmark machinery: FLOP counting against the analytic count, the OOM step-back sweep,
a tiny throughput run (rows and result files, written as it goes), the sweep's static compile
per batch size, the capped threshold baselines, the LR rules and trainer commands of
batch_f1.py, and the seed experiments' --quick miniature end to end. (gpu_check.sh has
test_gpu_check.py.)"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import `common` as a sibling

import batch_f1  # noqa: E402
import thresholds  # noqa: E402
import throughput  # noqa: E402


def test_flop_count_matches_the_analytic_count_of_an_mlp():
    b, i, h, o = 5, 7, 11, 3
    model = torch.nn.Sequential(torch.nn.Linear(i, h), torch.nn.ReLU(), torch.nn.Linear(h, o))
    x, y = torch.randn(b, i), torch.rand(b, o)
    loss = torch.nn.functional.binary_cross_entropy_with_logits
    # forward 2bih + 2bho; backward: both weight gradients, and the input gradient of the second
    # layer only (x needs no gradient)
    expected = 2 * b * i * h + 2 * b * h * o + 2 * b * h * o + 2 * b * i * h + 2 * b * h * o
    assert throughput.count_train_flops(model, x, y, loss) == expected
    assert all(p.grad is None for p in model.parameters())  # cleared for the timed steps


def _oom(limit: int, calls: list[int]):
    def measure(batch: int) -> dict:
        calls.append(batch)
        if batch > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"images_per_s": float(batch)}

    return measure


@pytest.mark.parametrize(
    ("limit", "expected", "ooms"),
    [
        (40, [8, 16, 32, 64, 48], [64, 48]),  # step back to 48: also too big
        (50, [8, 16, 32, 64, 48], [64]),  # step back to 48: fits
        (4, [8], [8]),  # nothing fits
        (10_000, [8, 16, 32, 64, 128], []),  # capped by max_batch
    ],
)
def test_sweep_doubles_until_out_of_memory_then_steps_back(limit, expected, ooms):
    calls: list[int] = []
    freed: list[int] = []
    rows = throughput.sweep_batches(
        _oom(limit, calls), None, max_batch=128, on_oom=lambda: freed.append(1)
    )
    assert calls == expected
    assert [r["batch"] for r in rows if r["oom"]] == ooms
    assert len(freed) == len(ooms)
    throughput.add_efficiency(rows)
    ok = [r for r in rows if not r["oom"]]
    if ok:
        best = max(r["images_per_s"] for r in ok)
        assert [r["efficiency"] for r in ok] == [r["images_per_s"] / best for r in ok]


def test_listed_sweep_stops_at_first_oom_and_other_errors_propagate():
    calls: list[int] = []
    rows = throughput.sweep_batches(_oom(20, calls), [8, 64, 16])
    assert calls == [8, 64] and rows[-1] == {"batch": 64, "oom": True}

    def broken(batch: int) -> dict:
        raise ValueError("a bug, not a batch size")

    with pytest.raises(ValueError):
        throughput.sweep_batches(broken, [8])


def _tiny_options(tmp_path, **kw) -> throughput.Options:
    base = dict(device="cpu", image_size=32, ladder_batch=2, batch_sizes=[2, 4], quick=True)
    base |= dict(warmup=0, repeats=1, e2e_steps=1, compile="off", synth_n=8, workers=0)
    base |= dict(loader="torch", matmul_n=256, out=str(tmp_path))
    return throughput.Options(**(base | kw))


def test_tiny_throughput_run_rows_and_result_files(tmp_path, monkeypatch):
    writes: list[tuple[int, bool]] = []  # (rows, complete) of each rewrite of the result files
    original_write = throughput.ResultFiles.write

    def spy(self, rows, markdown, extra=None, complete=True):
        writes.append((len(rows), complete))
        return original_write(self, rows, markdown, extra, complete)

    monkeypatch.setattr(throughput.ResultFiles, "write", spy)
    result = throughput.run_benchmark(_tiny_options(tmp_path))
    # a killed run keeps what it measured: the files are rewritten after every rung and size
    assert writes == [(n, False) for n in range(7)] + [(6, True)]

    ladder = result["ladder"]
    assert [r["step"] for r in ladder] == [c.name for c in throughput.ladder(False)]
    assert [(r["channels_last"], r["amp"], r["fused_loss"]) for r in ladder] == [
        (False, "off", False),
        (True, "off", False),
        (True, "bf16", False),
        (True, "bf16", True),
    ]
    peaks = result["peaks"]
    for r in ladder:
        assert r["images_per_s"] > 0 and r["e2e_images_per_s"] > 0
        assert r["images_per_s"] == pytest.approx(2 / (r["step_ms"] / 1e3))
        assert 0.0 <= r["data_wait_share"] <= 1.0
        assert r["loader"] == "torch" and r["first_step_s"] > 0
        peak = peaks["bfloat16" if r["amp"] == "bf16" else "float32"]["flops_per_s"]
        assert r["mfu"] == pytest.approx(result["flops_per_image"] * r["images_per_s"] / peak)
    assert ladder[0]["speedup"] == 1.0
    assert any("--compile off" in n for n in result["notes"])

    sweep = result["sweep"]
    assert [r["batch"] for r in sweep] == [2, 4] and not any(r["oom"] for r in sweep)
    assert max(r["efficiency"] for r in sweep) == 1.0
    assert all(r["peak_mem_gib"] > 0 and r["step_ms"] > 0 for r in sweep)
    # ResNet18 training FLOPs per image scale with pixels: (32/224)^2 of about 3 x 1.82 GFLOP
    assert 3 * 1.82e9 * (32 / 224) ** 2 * 0.5 < result["flops_per_image"] < 3 * 1.82e9

    json_path, md_path = (Path(p) for p in result["paths"])
    assert json_path.parent == tmp_path and json_path.name.startswith("throughput_cpu")
    payload = json.loads(json_path.read_text())
    env = payload["environment"]
    for key in ("device", "cpu_threads", "torch", "triton", "dali", "git_commit"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["cpu_threads"] == torch.get_num_threads()
    assert len(payload["rows"]) == len(ladder) + len(sweep)
    assert payload["peaks"]["float32"]["n"] == 256
    md = md_path.read_text()
    assert "## Ladder" in md and "## Batch-size sweep" in md and torch.__version__ in md


def test_sweep_compiles_each_batch_size_statically_with_a_fresh_model(tmp_path, monkeypatch):
    """Each size: Dynamo reset, a new model compiled for it, its row written at once (the third
    size fails here, as a time limit would stop it)."""
    events: list[str] = []
    built: list[object] = []

    class FakeStep:
        def __init__(self, cfg, arch, in_channels, device, seed=0):
            events.append(f"build compile={cfg.compile}")
            built.append(self)

    def fake_measure(step, batch, opts, channels):
        assert step is built[-1]  # each size measures the model built for it
        if batch == 8:
            raise RuntimeError("stopped at the time limit")
        events.append(f"measure {batch}")
        return {"images_per_s": float(batch), "first_step_s": 1.0}

    monkeypatch.setattr(throughput, "TrainStep", FakeStep)
    monkeypatch.setattr(throughput, "measure_model_only", fake_measure)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("dynamo reset"))
    run = throughput._Run(_tiny_options(tmp_path, batch_sizes=[2, 4, 8]))
    run.sweep_cfg = throughput.StepConfig("compiled", True, True, True, True)
    peak = {"flops_per_s": 1.0, "n": 1, "spread": 0.0}
    run.peaks = {"bfloat16": peak, "float32": peak}
    with pytest.raises(RuntimeError, match="time limit"):
        run.sweep()
    one_size = ["dynamo reset", "build compile=True"]
    assert events == [*one_size, "measure 2", *one_size, "measure 4", *one_size]
    assert len({id(s) for s in built}) == 3
    (json_path,) = tmp_path.glob("throughput_*.json")
    payload = json.loads(json_path.read_text())
    assert payload["complete"] is False and [r["batch"] for r in payload["rows"]] == [2, 4]
    assert all(r["sweep_compile"].startswith("static") for r in payload["rows"])
    assert payload["sweep_compile"].startswith("static")


def test_train_step_compiles_statically_and_a_loss_swap_keeps_the_model(monkeypatch):
    seen = {}

    def fake_compile(model, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = throughput.StepConfig("+ torch.compile", True, True, True, False)
    step = throughput.TrainStep(cfg, "resnet18", 4, torch.device("cpu"))
    assert seen == {"dynamic": False}
    fused = step.with_loss_of(dataclasses.replace(cfg, name="+ fused loss", fused_loss=True))
    assert fused.model is step.model and fused.optimizer is step.optimizer
    assert fused.cfg.fused_loss and fused.loss_fn is not step.loss_fn
    with pytest.raises(ValueError, match="needs another model"):
        step.with_loss_of(dataclasses.replace(cfg, amp=False))


def test_threshold_baselines_above_the_cap_are_timed_on_a_subsample_and_scaled(
    tmp_path, monkeypatch
):
    writes: list[tuple[int, bool]] = []
    original_write = thresholds.ResultFiles.write

    def spy(self, rows, markdown, extra=None, complete=True):
        writes.append((len(rows), complete))
        return original_write(self, rows, markdown, extra, complete)

    monkeypatch.setattr(thresholds.ResultFiles, "write", spy)
    argv = ["--sizes", "300", "900", "--baseline-max-n", "450", "--devices", "cpu"]
    thresholds.main([*argv, "--repeats", "1", "--budget-s", "0.01", "--out-dir", str(tmp_path)])
    # per N: 2 baselines + 4 fasthpa rows on the CPU, each written as it is measured
    assert writes == [(n, False) for n in range(1, 13)] + [(12, True)]
    (json_path,) = tmp_path.glob("thresholds_*.json")
    payload = json.loads(json_path.read_text())
    assert payload["complete"] is True and payload["baseline_max_n"] == 450
    base = {(r["n"], r["method"]): r for r in payload["rows"] if "timed_n" in r}
    assert set(base) == {(n, m) for n in (300, 900) for m in ("sklearn loop", "python grid")}
    assert base[(300, "python grid")]["timed_n"] == 300
    assert base[(900, "python grid")]["timed_n"] == 450
    md = json_path.with_suffix(".md").read_text()
    assert "timed on the first 450 rows" in md and "450 (scaled)" in md


@pytest.mark.parametrize(
    ("rule", "batch", "expected"),
    [("linear", 8, 1e-3), ("linear", 64, 8e-3), ("sqrt", 32, 2e-3), ("sqrt", 2, 5e-4)],
)
def test_lr_rules(rule, batch, expected):
    assert batch_f1.scaled_lr(1e-3, batch, 8, rule) == pytest.approx(expected)


def test_lr_rule_must_be_known():
    with pytest.raises(ValueError):
        batch_f1.scaled_lr(1e-3, 8, 8, "cubic")


def test_batch_f1_command_is_a_valid_trainer_command(tmp_path):
    import argparse

    from fasthpa.config import add_config_arguments, config_from_args

    opts = batch_f1.Options(
        lr_rule="sqrt", epochs=3, image_size=48, trainer_args=["--arch", "resnet34"]
    )
    cmd = batch_f1.trainer_command(opts, tmp_path / "data", tmp_path / "run", 32, "0.8,0.2,0")
    assert cmd[:3] == [sys.executable, "-m", "fasthpa.train"]
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg, _ = config_from_args(parser.parse_args(cmd[3:]))
    assert cfg.run.batch_size == 32 and cfg.run.epochs == 3 and cfg.data.image_size == 48
    assert cfg.optim.lr == pytest.approx(1e-3 * math.sqrt(32 / 8))
    assert cfg.optim.warmup_epochs == 1.0 and cfg.model.arch == "resnet34"
    assert cfg.run.eval_every == 1 and cfg.run.seed == opts.seeds[0]

    # the B_simple run: two micro-batches of half the batch, at the lr of the whole batch
    noise = batch_f1.noise_command(opts, tmp_path / "data", tmp_path / "n", 32, "0.8,0.2,0", 3)
    assert noise[-1] == batch_f1.NOISE_FLAG
    cfg, _ = config_from_args(parser.parse_args(noise[3:]))
    assert cfg.run.noise_scale
    assert (cfg.run.batch_size, cfg.optim.grad_accum, cfg.run.seed) == (16, 2, 3)
    assert cfg.optim.lr == pytest.approx(1e-3 * math.sqrt(32 / 8))


def test_batch_study_reads_the_trainers_help_for_the_noise_flag():
    help_text = batch_f1.trainer_help()
    for flag in ("--grad-accum", "--eval-every", "--progress"):  # --progress is [--x | --no-x]
        assert batch_f1.lists_flag(help_text, flag), flag
    assert not batch_f1.lists_flag(help_text, "--noise")  # a prefix is not the flag
    assert not batch_f1.lists_flag("usage: [--noise-scale-every N]", batch_f1.NOISE_FLAG)
    assert batch_f1.lists_flag("  --noise-scale, --no-noise-scale  ...", batch_f1.NOISE_FLAG)


# the fake trainer's world: S(B) = S_MIN (1 + B_NOISE / B) steps to reach F1 = TARGET
S_MIN, B_NOISE, TARGET, TRAIN_N = 50.0, 32.0, 0.5, 1024


def _fake_trainer(cmd: list[str], log_path: Path, timeout_s) -> tuple[int, float, str]:
    """Stands in for ``python -m fasthpa.train``: writes the run folder a real run would, with a
    dev F1 that rises linearly to TARGET at exactly S(B) steps, seed 1 taking 5% longer and
    seed 0 5% less, images/sec 100 B / (B + 6), and a test F1 of 0.6 (0.55 at batch 16)."""
    arg = {k: cmd[i + 1] for i, k in enumerate(cmd) if k.startswith("--") and i + 1 < len(cmd)}
    out, batch = Path(arg["--out"]), int(arg["--batch-size"]) * int(arg.get("--grad-accum", 1))
    seed, epochs, noise = int(arg["--seed"]), int(arg["--epochs"]), batch_f1.NOISE_FLAG in cmd
    steps_per_epoch = TRAIN_N // batch
    need = S_MIN * (1 + B_NOISE / batch) * (0.95 if seed == 0 else 1.05)
    ips = 100 * batch / (batch + 6)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"run": {"batch_size": batch}}))
    (out / "env.json").write_text(json.dumps({"global_batch": batch, "device": "fake"}))
    rows, step = [], 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch // 4):  # a log row every 4 steps
            step += 4
            rows.append({"kind": "step", "step": step, "images_per_sec": ips})
            if noise:
                rows[-1]["b_simple"] = 10.0 + step
        step = (epoch + 1) * steps_per_epoch
        f1 = min(0.8, TARGET * step / need)
        rows.append(
            {
                "kind": "epoch",
                "epoch": epoch,
                "step": step,
                "train_loss": 0.1,
                "elapsed_s": 1.5 * step * batch / ips,
                "dev_macro_f1_at_0.5": f1 / 2,
                "dev_macro_f1_tuned": f1,
            }
        )
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test_f1 = 0.55 if batch == 16 else 0.6
    final = {"test_macro_f1_tuned": test_f1, "test_macro_f1_at_0.5": test_f1 / 2}
    (out / "final_metrics.json").write_text(json.dumps(final))
    log_path.write_text("done\n")
    return 0, 0.1, "done"


def test_batch_study_fits_the_critical_batch_and_recommends(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_f1, "run_one", _fake_trainer)
    monkeypatch.setattr(batch_f1, "trainer_help", lambda: f"usage: [{batch_f1.NOISE_FLAG}]")
    opts = batch_f1.parse_options(
        [
            "--quick",
            "--batch-sizes",
            "8,16,32,64",
            "--epochs",
            "10",
            "--target-f1",
            str(TARGET),
            "--data",
            str(tmp_path / "no_data_needed"),
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    result = batch_f1.run_benchmark(opts)
    rows = {(r["batch"], r["seed"]): r for r in result["rows"]}
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows.values())
    for (batch, seed), r in rows.items():
        need = S_MIN * (1 + B_NOISE / batch) * (0.95 if seed == 0 else 1.05)
        assert r["steps_to_target"] == pytest.approx(need) and r["first_eval"] is False
        ips = 100 * batch / (batch + 6)
        assert r["train_s_to_target"] == pytest.approx(need * batch / ips)
        assert r["elapsed_s_to_target"] == pytest.approx(1.5 * need * batch / ips)
    fit = result["fit"]
    assert fit["status"] == "ok" and fit["points"] == 8
    assert fit["s_min"] == pytest.approx(S_MIN) and fit["b_noise"] == pytest.approx(B_NOISE)
    # the seeds' ±5% is all the line cannot explain (the fit goes through each batch's mean)
    steps = [S_MIN * (1 + B_NOISE / b) * f for b in (8, 16, 32, 64) for f in (0.95, 1.05)]
    resid = sum((0.05 * S_MIN * (1 + B_NOISE / b)) ** 2 * 2 for b in (8, 16, 32, 64))
    total = sum((v - statistics.fmean(steps)) ** 2 for v in steps)
    assert fit["r2"] == pytest.approx(1 - resid / total)
    by_batch = {b["batch"]: b for b in result["batches"]}
    assert by_batch[16]["test_f1"] == pytest.approx(0.55) and by_batch[8]["test_f1_std"] == 0.0
    assert by_batch[8]["steps_to_target_std"] == pytest.approx(
        statistics.stdev([0.95 * 250, 1.05 * 250])
    )
    # training seconds to target: 35 at batch 8, 33 at 16 (F1 0.05 below: out), 38 at 32
    rec = result["recommendation"]
    assert rec["batch"] == 8 and "batch 16" in rec["reason"]
    # B_simple: the noise runs (the middle batch, 32) log 10 + step; read at the last log row
    # before the run reached the target
    noise = result["noise"]
    assert noise["status"] == "ok" and noise["batch"] == 32
    for p in noise["per_seed"]:
        need = S_MIN * (1 + B_NOISE / 32) * (0.95 if p["seed"] == 0 else 1.05)
        assert p["at_step"] == 4 * (need // 4) and p["b_simple"] == 10.0 + p["at_step"]
    assert noise["b_noise_over_b_simple"] == pytest.approx(fit["b_noise"] / noise["b_simple"])
    json_path, md_path, png_path = (Path(p) for p in result["paths"])
    payload = json.loads(json_path.read_text())
    assert payload["recommendation"]["batch"] == 8 and payload["fit"]["b_noise"] == fit["b_noise"]
    assert len(payload["rows"]) == 8 and len(payload["noise_runs"]) == 2
    md = md_path.read_text()
    assert "Recommended batch size: 8" in md and png_path.name in md
    assert png_path.stat().st_size > 10_000


def test_batch_study_without_the_noise_flag_says_not_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_f1, "run_one", _fake_trainer)
    monkeypatch.setattr(batch_f1, "trainer_help", lambda: "usage: [--grad-accum N]")
    opts = batch_f1.parse_options(
        [
            "--quick",
            "--batch-sizes",
            "8,32",
            "--seeds",
            "0",
            "--epochs",
            "10",
            "--no-save",
            "--data",
            str(tmp_path / "d"),
            "--workdir",
            str(tmp_path / "work"),
        ]
    )
    result = batch_f1.run_benchmark(opts)
    assert result["noise"]["status"].startswith("not measured")
    assert not list((tmp_path / "work" / "runs").glob("noise_*"))
    # the automatic target: 0.9 x the lowest best dev F1 (both runs top out at 0.8)
    assert result["target"] == pytest.approx(0.72)
    assert result["fit"]["status"] == "ok" and result["paths"] == []


def test_seed_experiments_quick_assembles_every_experiment_with_numbers(tmp_path):
    root, out = tmp_path / "synth", tmp_path / "out"
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "seed_experiments.sh"),
            str(root),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    payload = json.loads((out / "comparison.json").read_text())
    rows = {r["experiment"]: r for r in payload["experiments"]}
    import seed_experiments

    assert set(rows) == {e.name for e in seed_experiments.experiments(64, 32)}
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["status"])
        for key in ("dev_f1_at_0.5", "dev_f1_tuned", "test_f1_at_0.5", "test_f1_tuned"):
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
        assert math.isfinite(r["train_loss"]) and r["images_per_s"] > 0 and r["wall_s"] > 0
        assert r["tuning_gain"] == pytest.approx(r["dev_f1_tuned"] - r["dev_f1_at_0.5"])
        assert r["pretrained"] in ("none", "imagenet")
    assert len(payload["per_label"]) == 28
    assert all(0.0 <= x["f1_tuned"] <= 1.0 for x in payload["per_label"])

    # each experiment's flag reached its trainer run, and everything else stayed the baseline's
    def run_info(name: str) -> tuple[dict, dict]:
        d = out / "runs" / name
        return json.loads((d / "config.json").read_text()), json.loads((d / "env.json").read_text())

    base_cfg, base_env = run_info("baseline")
    assert (base_cfg["loss"]["loss"], base_cfg["data"]["image_size"]) == ("bce", 64)
    _, frozen_env = run_info("frozen")
    assert frozen_env["pretrained"]["params_trainable"] < base_env["pretrained"]["params_trainable"]
    assert run_info("downsized")[0]["data"]["image_size"] == 32
    assert run_info("rgb")[1]["pretrained"]["in_channels"] == 3
    assert run_info("maxavg_head")[0]["model"]["head"] == "maxavg"
    assert run_info("wbce")[0]["loss"]["loss"] == "wbce"
    assert run_info("focal_report")[0]["loss"]["focal_variant"] == "reference_report"
    splits = {(out / "runs" / n / "split.csv").read_text() for n in rows}
    assert len(splits) == 1  # every run trained and evaluated on the same rows

    md = (out / "comparison.md").read_text()
    for heading in (
        "Frozen backbone",
        "downsized",
        "RGBY vs RGB",
        "weighted BCE",
        "tuned thresholds",
        "Per-label F1",
    ):
        assert heading in md
    assert all(f"| {name} |" in md for name in rows)
    assert (out / "report" / "report.md").is_file() and (out / "per_label.csv").is_file()


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_sweep_runs_the_default_recipes_amp(monkeypatch, native):
    """The sweep's CPU config is what `fasthpa train` runs: bf16 where --amp auto picks it."""
    import fasthpa.runtime as rt

    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: native)
    cfg = throughput.default_config("cpu", compile_on=False)
    expected = rt.amp_dtype("auto", torch.device("cpu")) is not None
    assert cfg.amp is expected is native
    assert (cfg.channels_last, cfg.compile) == (True, False)
    assert cfg.name.endswith("bf16)" if native else "fp32)")
