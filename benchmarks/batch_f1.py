"""The batch-size study: for several batch sizes x seeds, images/sec, the steps and the time to
reach a target dev macro F1, and the final test F1 with its spread; a fit of the steps against
the batch to the critical-batch model of McCandlish et al. 2018 (arXiv:1812.06162), compared with
the gradient noise scale B_simple the trainer measures, and the batch size to use on this device.

    python benchmarks/batch_f1.py --quick    # CPU smoke test: 192 synthetic samples at 32 px,
                                             # batch 8,16,32 x seeds 0,1, 6 epochs (minutes)
    python benchmarks/batch_f1.py --batch-sizes 8,32,128,512 --seeds 0,1,2 --epochs 12
    python benchmarks/batch_f1.py --data /data/hpa --batch-sizes 16,64,256 --lr-rule linear

Learning-rate rule (``--lr-rule``), from ``--base-lr`` at ``--base-batch`` (the reference recipe:
Adam 1e-3 at batch 8), B being the global batch of the run, with a linear warm-up over the first
``--warmup-epochs`` (1) epochs and a constant rate after it (``--lr-schedule constant``, so the
steps to a target depend on the batch rather than on a decaying schedule's position):

- ``sqrt`` (default; Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
  Algorithms", the square-root rule for Adam): lr = base_lr * sqrt(B / base_B);
- ``linear`` (Goyal et al. 2017, the rule for SGD): lr = base_lr * B / base_B.

Every (batch, seed) trains in its own ``python -m fasthpa.train`` process (clean memory; an
out-of-memory batch becomes a row, not a crash) on the same split (the first run's split.csv is
passed to the others) for the same epochs, evaluating dev every epoch. From each run's
history.jsonl epoch rows (step, elapsed_s, dev_macro_f1_tuned):

- steps to target: the first evaluation at or above the target F1, interpolated linearly in steps
  from the evaluation before it (a run that is above the target at its first evaluation gets
  that evaluation's step: an upper bound, flagged ``first_eval``);
- train_s_to_target: steps to target x global batch / images/sec (the median of the logged
  figures after the first log step): training time at this device's speed, without the dev
  evaluations (whose cost depends on how often one evaluates); elapsed_s_to_target is the trainer's
  own clock, evaluations of earlier epochs included;
- the target: ``--target-f1``, or ``--target-frac`` (0.9) x the lowest best dev F1 over the runs,
  so that every run reaches it;
- final F1: final_metrics.json's test macro F1 (dev-fitted thresholds, best checkpoint).

The fit: S = S_min (1 + B_noise / B) is linear in 1/B (S = S_min + E_min / B, E_min = S_min
B_noise), so a least-squares line through (1/B, steps to target) gives S_min, E_min and
B_noise = E_min / S_min; the points are the runs that reached the target after their first
evaluation (upper bounds are used only when fewer than two batch sizes remain). McCandlish et al. tune the learning rate per batch size; a
fixed rule only approximates that, so B_noise here is an estimate of the critical batch for this
rule. B_simple: when the trainer's --help lists ``--noise-scale``, one more run per seed at
``--noise-batch`` (default: the middle batch size) as 2 accumulated micro-batches of half that
size logs B_simple (a separate run, so the study runs are not changed by measuring); the figure
is the last logged one at or before that run reached the target. Otherwise "not measured".

Recommendation: among batch sizes whose every seed reached the target and whose mean final F1 is
within ``--f1-tolerance`` of the best batch size's, the one with the shortest mean training time
to target. Results: a table on screen, ``benchmarks/results/batch_f1_<device>_<date>.{json,md,png}``,
run folders under --workdir.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    RESULTS_DIR,
    ROOT,
    device_slug,
    markdown_table,
    positive_int_list,
    print_rows,
    write_results,
)

from fasthpa.data.contract import BACKENDS  # noqa: E402

LR_RULES = ("sqrt", "linear")
NOISE_FLAG = "--noise-scale"


def scaled_lr(base_lr: float, batch: int, base_batch: int, rule: str) -> float:
    """The learning rate for global batch ``batch`` under ``rule`` (see the module docstring)."""
    if rule == "linear":
        return base_lr * batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(batch / base_batch)
    raise ValueError(f"lr rule must be one of {LR_RULES}, got {rule!r}")


def lr_rule_formula(opts: Options) -> str:
    if opts.lr_rule == "linear":
        return f"lr = {opts.base_lr:g} x B / {opts.base_batch}"
    return f"lr = {opts.base_lr:g} x sqrt(B / {opts.base_batch})"


@dataclass
class Options:
    batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    epochs: int = 10
    lr_rule: str = "sqrt"
    base_lr: float = 1e-3
    base_batch: int = 8
    warmup_epochs: float = 1.0
    target_f1: float | None = None
    target_frac: float = 0.9
    f1_tolerance: float = 0.02
    noise_batch: int | None = None
    data: str | None = None
    synth_n: int = 2048
    stored_size: int = 512
    image_size: int = 256
    split: str = "0.7,0.15,0.15"
    device: str = "auto"
    pretrained: str = "auto"
    workers: int | None = None
    loader: str = "auto"
    log_every: int = 5
    data_seed: int = 0
    trainer_args: list[str] = field(default_factory=list)
    workdir: str | None = None
    out: str | None = None
    save: bool = True
    quick: bool = False
    timeout_s: float | None = None


# ---------------------------------------------------------------------------- running the trainer


def trainer_command(
    opts: Options, root: Path, run_dir: Path, batch: int, split: str, seed: int | None = None
) -> list[str]:
    """The ``python -m fasthpa.train`` command for one global batch size and seed."""
    lr = scaled_lr(opts.base_lr, batch, opts.base_batch, opts.lr_rule)
    seed = opts.seeds[0] if seed is None else seed
    cmd = [sys.executable, "-m", "fasthpa.train", "--data", str(root), "--out", str(run_dir)]
    cmd += ["--batch-size", str(batch), "--lr", repr(lr), "--epochs", str(opts.epochs)]
    cmd += ["--warmup-epochs", repr(opts.warmup_epochs), "--eval-every", "1"]
    # a constant rate after the warm-up: steps to a target F1 then depend on the batch, not on
    # where a decaying schedule happens to be after a fixed number of epochs
    cmd += ["--lr-schedule", "constant"]
    cmd += ["--image-size", str(opts.image_size), "--split", split, "--seed", str(seed)]
    cmd += ["--device", opts.device, "--pretrained", opts.pretrained, "--loader", opts.loader]
    cmd += ["--log-every", str(opts.log_every), "--no-progress"]
    if opts.workers is not None:
        cmd += ["--workers", str(opts.workers)]
    return cmd + list(opts.trainer_args)


def noise_command(
    opts: Options, root: Path, run_dir: Path, batch: int, split: str, seed: int
) -> list[str]:
    """The trainer command that measures B_simple at global batch ``batch`` on one device: two
    accumulated micro-batches of batch/2 (the meter's two batch sizes), the lr of ``batch``."""
    cmd = trainer_command(opts, root, run_dir, batch, split, seed)
    cmd[cmd.index("--batch-size") + 1] = str(batch // 2)
    return cmd + ["--grad-accum", "2", NOISE_FLAG]


def trainer_help() -> str:
    """The text of ``python -m fasthpa.train --help`` ('' if it fails)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fasthpa.train", "--help"],
        capture_output=True,
        text=True,
        env=_trainer_env(),
        timeout=120,
    )
    return proc.stdout if proc.returncode == 0 else ""


def lists_flag(help_text: str, flag: str) -> bool:
    """Whether ``help_text`` lists ``flag`` as a whole option name (``--noise-scale`` is not
    ``--noise-scale-every``; ``[--noise-scale | --no-noise-scale]`` and ``--noise-scale,`` are)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def _trainer_env() -> dict[str, str]:
    # the checkout first, so the trainer is this repository's even where fasthpa is installed
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths)}


def run_one(cmd: list[str], log_path: Path, timeout_s: float | None) -> tuple[int, float, str]:
    """Run the trainer; return (exit status, wall seconds, last stderr/stdout line)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=_trainer_env(), timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - t0
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    return rc, wall, lines[-1] if lines else ""


def train_run(cmd: list[str], run_dir: Path, work: Path, timeout_s: float | None) -> dict:
    """Train afresh into ``run_dir``; the run's figures and curve, or a status saying why not."""
    from fasthpa.report import load_run, summarise_run

    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale folder would resume instead of training afresh
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"{run_dir.name}: {' '.join(cmd[1:])}", flush=True)
    rc, wall, last = run_one(cmd, work / f"train_{run_dir.name}.log", timeout_s)
    row: dict[str, Any] = {"wall_s": wall, "status": "ok" if rc == 0 else f"failed (exit {rc})"}
    if rc != 0:
        row["status"] += f": {last[-160:]}"
        return row
    run = load_run(run_dir)
    s = summarise_run(run)
    row |= {
        "global_batch": s["global_batch"],
        "steps": s["steps"],
        "images_per_s": s["images_per_sec"],
        "train_s": s["wall_s"],
        "best_dev_f1": s["dev_macro_f1_tuned"],
        "test_f1": s.get("test_macro_f1_tuned"),
        "test_f1_at_0.5": s.get("test_macro_f1_at_0.5"),
        "device": s["device"],
        "curve": [
            {"step": e["step"], "elapsed_s": e["elapsed_s"], "f1": e["dev_macro_f1_tuned"]}
            for e in run.epochs
            if e.get("dev_macro_f1_tuned") is not None
        ],
        "b_simple_log": [
            {"step": r["step"], "b_simple": r["b_simple"]}
            for r in run.steps
            if r.get("b_simple") is not None
        ],
    }
    return row


def measure(opts: Options, root: Path, work: Path, noise: bool) -> tuple[list[dict], list[dict]]:
    """Every (batch, seed) run, then (if ``noise``) one B_simple run per seed."""
    rows: list[dict[str, Any]] = []
    split = opts.split
    for batch in opts.batch_sizes:
        for seed in opts.seeds:
            run_dir = work / "runs" / f"bs{batch}_seed{seed}"
            cmd = trainer_command(opts, root, run_dir, batch, split, seed)
            row = {"batch": batch, "seed": seed, "lr": float(cmd[cmd.index("--lr") + 1])}
            row |= train_run(cmd, run_dir, work, opts.timeout_s)
            rows.append(row)
            print(f"{run_dir.name}: {row['status']}, {row['wall_s']:.1f} s", flush=True)
            if split == opts.split and (run_dir / "split.csv").is_file():
                # every later run trains and evaluates on exactly these rows
                split = str(work / "split.csv")
                shutil.copyfile(run_dir / "split.csv", split)
    noise_rows: list[dict[str, Any]] = []
    for seed in opts.seeds if noise else []:
        batch = noise_batch(opts)
        run_dir = work / "runs" / f"noise_bs{batch}_seed{seed}"
        cmd = noise_command(opts, root, run_dir, batch, split, seed)
        row = {"batch": batch, "seed": seed} | train_run(cmd, run_dir, work, opts.timeout_s)
        noise_rows.append(row)
    return rows, noise_rows


def noise_batch(opts: Options) -> int:
    """The global batch of the B_simple runs: ``--noise-batch`` or the middle batch size, even
    (it is split into two micro-batches)."""
    batch = opts.noise_batch or sorted(opts.batch_sizes)[len(opts.batch_sizes) // 2]
    return max(2, batch - batch % 2)


# ---------------------------------------------------------------------------- analysis


def crossing(curve: list[dict], target: float) -> dict[str, Any] | None:
    """Steps and elapsed seconds at which a dev-F1 curve first reaches ``target``, interpolated
    linearly from the evaluation before; None if it never does."""
    for i, point in enumerate(curve):
        if point["f1"] < target:
            continue
        if i == 0:
            return {
                "steps": float(point["step"]),
                "elapsed_s": point["elapsed_s"],
                "first_eval": True,
            }
        prev = curve[i - 1]
        frac = (target - prev["f1"]) / (point["f1"] - prev["f1"])
        return {
            "steps": prev["step"] + frac * (point["step"] - prev["step"]),
            "elapsed_s": prev["elapsed_s"] + frac * (point["elapsed_s"] - prev["elapsed_s"]),
            "first_eval": False,
        }
    return None


def auto_target(rows: list[dict], frac: float) -> float | None:
    """``frac`` x the lowest best dev F1 over the runs that finished (every run reaches it)."""
    best = [r["best_dev_f1"] for r in rows if r["status"] == "ok" and r.get("best_dev_f1")]
    return frac * min(best) if best else None


def add_time_to_target(rows: list[dict], target: float) -> None:
    """Fill steps_to_target, elapsed_s_to_target, train_s_to_target and first_eval in place."""
    for r in rows:
        hit = crossing(r.get("curve", []), target) if r["status"] == "ok" else None
        r["reached"] = hit is not None
        r["steps_to_target"] = hit["steps"] if hit else None
        r["elapsed_s_to_target"] = hit["elapsed_s"] if hit else None
        r["first_eval"] = hit["first_eval"] if hit else None
        ips = r.get("images_per_s")
        r["train_s_to_target"] = (
            hit["steps"] * r["global_batch"] / ips
            if hit and ips and r.get("global_batch")
            else None
        )


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise_batches(rows: list[dict]) -> list[dict]:
    """One row per batch size: means and spreads over seeds."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        runs = [r for r in rows if r["batch"] == batch]
        ok = [r for r in runs if r["status"] == "ok"]
        row: dict[str, Any] = {"batch": batch, "lr": runs[0]["lr"], "runs": len(runs)}
        row["reached"] = sum(r["reached"] for r in ok)
        for key in ("images_per_s", "steps_to_target", "train_s_to_target", "test_f1"):
            values = [r[key] for r in ok if r.get(key) is not None]
            row[key], row[f"{key}_std"] = _mean_std(values)
        f1s = [r["test_f1"] for r in ok if r.get("test_f1") is not None]
        row["test_f1_min"], row["test_f1_max"] = (min(f1s), max(f1s)) if f1s else (None, None)
        row["best_dev_f1"] = _mean_std([r["best_dev_f1"] for r in ok if r.get("best_dev_f1")])[0]
        out.append(row)
    return out


def fit_points(rows: list[dict]) -> tuple[list[tuple[int, float]], str]:
    """The (batch, steps to target) points to fit and which runs they are: those that crossed
    after their first evaluation (the others give only an upper bound), unless that leaves fewer
    than two batch sizes."""
    hit = [r for r in rows if r.get("steps_to_target") is not None]
    exact = [r for r in hit if not r["first_eval"]]
    if len({r["batch"] for r in exact}) >= 2:
        used = "runs that reached the target after their first evaluation"
        if len(exact) == len(hit):
            used = "every run that reached the target"
        return [(r["batch"], r["steps_to_target"]) for r in exact], used
    used = "every run that reached the target, first-evaluation upper bounds included"
    return [(r["batch"], r["steps_to_target"]) for r in hit], used


def fit_critical_batch(points: list[tuple[int, float]], used: str = "") -> dict[str, Any]:
    """Least squares of S = S_min + E_min / B over (B, S) points: S_min, E_min, B_noise, R²."""
    import numpy as np

    batches = sorted({b for b, _ in points})
    if len(batches) < 2:
        return {"status": "not fitted: fewer than two batch sizes reached the target"}
    x = np.array([1.0 / b for b, _ in points])
    y = np.array([s for _, s in points], dtype=np.float64)
    e_min, s_min = np.polyfit(x, y, 1)
    resid = y - (s_min + e_min * x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    fit: dict[str, Any] = {
        "s_min": float(s_min),
        "e_min": float(e_min),
        "r2": 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else None,
        "points": len(points),
        "points_used": used,
        "batch_sizes": batches,
        "b_noise": None,
    }
    if s_min > 0 and e_min > 0:
        fit["b_noise"] = float(e_min / s_min)
        fit["status"] = "ok"
    elif s_min <= 0:
        fit["status"] = (
            "no plateau: the fitted S_min <= 0, steps still fall as 1/B over these batch sizes "
            "(B_noise is above the largest batch tried)"
        )
    else:
        fit["status"] = "steps do not fall with the batch: every batch here is past B_noise"
    return fit


def recommend(batches: list[dict], tolerance: float, runs_per_batch: int) -> dict[str, Any]:
    """The batch with the shortest mean training time to target among those whose every seed
    reached it and whose mean final F1 is within ``tolerance`` of the best; with the reason."""
    quality = "test_f1" if any(b["test_f1"] is not None for b in batches) else "best_dev_f1"
    full = [b for b in batches if b["reached"] == runs_per_batch and b["train_s_to_target"]]
    if not full:
        return {"batch": None, "reason": "no batch size reached the target in every seed"}
    best_f1 = max(b[quality] for b in full if b[quality] is not None)
    ok = [b for b in full if b[quality] is not None and b[quality] >= best_f1 - tolerance]
    pick = min(ok, key=lambda b: b["train_s_to_target"])
    faster = [b for b in full if b["train_s_to_target"] < pick["train_s_to_target"]]
    name = "test macro F1" if quality == "test_f1" else "best dev macro F1"
    reason = (
        f"batch {pick['batch']}: {pick['train_s_to_target']:.3g} s of training to the target "
        f"({pick['steps_to_target']:.3g} steps at {pick['images_per_s']:.4g} img/s), the shortest "
        f"among batch sizes whose mean {name} is within {tolerance:g} of the best "
        f"({best_f1:.4f}); its own is {pick[quality]:.4f}"
    )
    if faster:
        reason += "; faster but outside the F1 tolerance: " + ", ".join(
            f"batch {b['batch']} ({b['train_s_to_target']:.3g} s, F1 {b[quality]:.4f})"
            for b in faster
        )
    return {"batch": pick["batch"], "quality_metric": quality, "reason": reason}


def measured_b_simple(noise_rows: list[dict], target: float | None) -> dict[str, Any]:
    """B_simple from the noise runs: the last logged value at or before each run reached the
    target (its last value if it never did), and the mean over seeds."""
    if not noise_rows:
        return {"status": "not measured: no B_simple run"}
    per_seed = []
    for r in noise_rows:
        log = r.get("b_simple_log") or []
        hit = crossing(r.get("curve", []), target) if target is not None and log else None
        upto = [e for e in log if hit is None or e["step"] <= hit["steps"]] or log[:1]
        value = upto[-1]["b_simple"] if upto else None
        per_seed.append(
            {
                "seed": r["seed"],
                "b_simple": value,
                "at_step": upto[-1]["step"] if upto else None,
                "status": r["status"],
            }
        )
    values = [p["b_simple"] for p in per_seed if p["b_simple"] is not None]
    return {
        "status": "ok" if values else "not measured: the noise runs logged no b_simple",
        "batch": noise_rows[0]["batch"],
        "per_seed": per_seed,
        "b_simple": statistics.fmean(values) if values else None,
    }


# ---------------------------------------------------------------------------- plot and tables


def plot(result: dict[str, Any], path: Path, title: str) -> Path:
    """Four panels: dev F1 against steps, steps to target with the fit, training time to target
    with images/sec, and final F1 with its spread over seeds."""
    import io

    from matplotlib.figure import Figure

    from fasthpa.io import atomic_write_bytes

    fig = Figure(figsize=(12, 8.5), layout="constrained")
    axes = fig.subplots(2, 2)
    _plot_curves(axes[0][0], result["rows"], result["target"])
    _plot_steps(axes[0][1], result)
    _plot_time(axes[1][0], result["batches"])
    _plot_f1(axes[1][1], result)
    fig.suptitle("\n".join(textwrap.wrap(title, 130)), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(path, buf.getvalue())


def _batch_colors(rows: list[dict]) -> dict[int, Any]:
    from matplotlib import colormaps

    batches = sorted({r["batch"] for r in rows})
    cmap = colormaps["viridis"]
    return {b: cmap(i / max(1, len(batches) - 1) * 0.9) for i, b in enumerate(batches)}


def _log2_batch_axis(ax, batches: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches or [1])
    ax.set_xticklabels([str(b) for b in batches] or ["-"])
    ax.set_xlabel("global batch size")
    ax.grid(alpha=0.3)


def _plot_curves(ax, rows: list[dict], target: float | None) -> None:
    colors = _batch_colors(rows)
    styles = ["-", "--", ":", "-."]
    seeds = sorted({r["seed"] for r in rows})
    for r in rows:
        curve = r.get("curve") or []
        if curve:
            style = styles[seeds.index(r["seed"]) % len(styles)]
            ax.plot(
                [p["step"] for p in curve],
                [p["f1"] for p in curve],
                style,
                marker=".",
                color=colors[r["batch"]],
                label=f"B={r['batch']} seed {r['seed']}",
            )
    if target is not None:
        ax.axhline(target, color="tab:red", lw=1, label=f"target {target:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("optimiser steps")
    ax.set_ylabel("dev macro F1 (tuned)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)


def _plot_steps(ax, result: dict[str, Any]) -> None:
    import numpy as np

    rows, fit = result["rows"], result["fit"]
    hit = [r for r in rows if r.get("steps_to_target") is not None]
    ax.plot(
        [r["batch"] for r in hit],
        [r["steps_to_target"] for r in hit],
        "o",
        alpha=0.5,
        color="tab:blue",
        label="steps to target (each seed)",
    )
    batches = sorted({r["batch"] for r in rows})
    b_simple = result["noise"].get("b_simple")
    if fit.get("s_min") is not None and batches:
        # the curve spans the batch sizes tried and the two noise scales when they are near
        marks = [b for b in (fit.get("b_noise"), b_simple) if b and b < 16 * max(batches)]
        xs = np.geomspace(min(batches), max(batches + marks), 100)
        ax.plot(
            xs,
            fit["s_min"] + fit["e_min"] / xs,
            "-",
            color="tab:blue",
            label=f"fit S_min + E_min/B (B_noise {_fmt(fit.get('b_noise'))})",
        )
    if fit.get("b_noise"):
        ax.axvline(fit["b_noise"], color="tab:blue", ls="--", lw=1, label="B_noise (fit)")
    if b_simple:
        ax.axvline(b_simple, color="tab:green", ls=":", lw=1.5, label="B_simple (measured)")
    ax.set_yscale("log")
    _log2_batch_axis(ax, batches)
    ax.set_ylabel("steps to target dev F1")
    ax.legend(fontsize=7)


def _plot_time(ax, batches: list[dict]) -> None:
    ok = [b for b in batches if b["train_s_to_target"] is not None]
    ax.errorbar(
        [b["batch"] for b in ok],
        [b["train_s_to_target"] for b in ok],
        yerr=[b["train_s_to_target_std"] for b in ok],
        fmt="s-",
        color="tab:purple",
        capsize=3,
        label="training s to target (mean ± sd)",
    )
    _log2_batch_axis(ax, [b["batch"] for b in batches])
    ax.set_ylabel("training seconds to target", color="tab:purple")
    ax.set_ylim(bottom=0)
    speed = ax.twinx()
    with_ips = [b for b in batches if b["images_per_s"] is not None]
    speed.plot(
        [b["batch"] for b in with_ips],
        [b["images_per_s"] for b in with_ips],
        "o--",
        color="tab:gray",
        label="images/sec",
    )
    speed.set_ylabel("images/sec (median)", color="tab:gray")
    speed.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + speed.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + speed.get_legend_handles_labels()[1]
    ax.legend(handles, labels, fontsize=7, loc="upper center")


def _plot_f1(ax, result: dict[str, Any]) -> None:
    batches, rec = result["batches"], result["recommendation"]
    key = rec.get("quality_metric", "test_f1")
    ok = [b for b in batches if b[key] is not None]
    spread = [b.get(f"{key}_std") or 0.0 for b in ok]
    ax.errorbar(
        [b["batch"] for b in ok],
        [b[key] for b in ok],
        yerr=spread,
        fmt="o-",
        color="tab:red",
        capsize=3,
        label=f"{key} (mean ± sd over seeds)",
    )
    if rec.get("batch") is not None:
        pick = next(b for b in batches if b["batch"] == rec["batch"])
        ax.plot(
            [pick["batch"]],
            [pick[key]],
            "*",
            ms=16,
            color="gold",
            mec="k",
            zorder=5,
            label=f"recommended: {pick['batch']}",
        )
    _log2_batch_axis(ax, [b["batch"] for b in batches])
    ax.set_ylabel("final macro F1 (tuned)")
    ax.legend(fontsize=7)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


RUN_COLUMNS = [
    "batch",
    "seed",
    "lr",
    "steps",
    "images_per_s",
    "steps_to_target",
    "first_eval",
    "train_s_to_target",
    "elapsed_s_to_target",
    "best_dev_f1",
    "test_f1",
    "wall_s",
    "status",
]
BATCH_COLUMNS = [
    "batch",
    "lr",
    "runs",
    "reached",
    "images_per_s",
    "steps_to_target",
    "steps_to_target_std",
    "train_s_to_target",
    "train_s_to_target_std",
    "test_f1",
    "test_f1_std",
    "test_f1_min",
    "test_f1_max",
    "best_dev_f1",
]


def analyse(
    rows: list[dict], noise_rows: list[dict], opts: Options, noise_supported: bool
) -> dict[str, Any]:
    """Target, time to target, per-batch summary, the fit, B_simple and the recommendation."""
    target = opts.target_f1 if opts.target_f1 is not None else auto_target(rows, opts.target_frac)
    if target is not None:
        add_time_to_target(rows, target)
    else:
        for r in rows:
            r |= {"reached": False, "steps_to_target": None, "train_s_to_target": None}
    batches = summarise_batches(rows)
    fit = fit_critical_batch(*fit_points(rows))
    noise = (
        measured_b_simple(noise_rows, target)
        if noise_supported
        else {"status": f"not measured: the trainer's --help has no {NOISE_FLAG}"}
    )
    if fit.get("b_noise") and noise.get("b_simple"):
        noise["b_noise_over_b_simple"] = fit["b_noise"] / noise["b_simple"]
    return {
        "target": target,
        "target_rule": (
            f"--target-f1 {opts.target_f1:g}"
            if opts.target_f1 is not None
            else f"{opts.target_frac:g} x the lowest best dev F1 over the runs"
        ),
        "rows": rows,
        "batches": batches,
        "fit": fit,
        "noise": noise,
        "recommendation": recommend(batches, opts.f1_tolerance, len(opts.seeds)),
    }


def markdown(result: dict[str, Any], opts: Options, title: str, png: str) -> str:
    fit, noise, rec = result["fit"], result["noise"], result["recommendation"]
    runs = [{k: v for k, v in r.items() if k in RUN_COLUMNS} for r in result["rows"]]
    lines = [
        f"{title}.",
        "",
        f"Learning-rate rule `{opts.lr_rule}` ({lr_rule_formula(opts)}), linear warm-up over "
        f"{opts.warmup_epochs:g} epoch(s); seeds {', '.join(map(str, opts.seeds))} on one split; "
        f"dev evaluated every epoch. Target dev macro F1 (tuned): "
        f"{_fmt(result['target'])} ({result['target_rule']}). steps_to_target: interpolated "
        "between evaluations (first_eval: reached at the first evaluation, an upper bound); "
        "train_s_to_target: steps x global batch / images/sec; elapsed_s_to_target: the "
        "trainer's clock, earlier dev evaluations included; test_f1: final_metrics.json, best "
        "checkpoint with dev-fitted thresholds.",
        "",
        f"**Recommended batch size: {_fmt(rec['batch'])}.** {rec['reason']}.",
        "",
        f"**Fit** S = S_min (1 + B_noise / B): {fit['status']}; S_min {_fmt(fit.get('s_min'))} "
        f"steps, E_min {_fmt(fit.get('e_min'))} samples, B_noise {_fmt(fit.get('b_noise'))}, "
        f"R² {_fmt(fit.get('r2'))} over {fit.get('points', 0)} runs "
        f"({fit.get('points_used', '-')}).",
        "",
        f"**Measured B_simple** (`{NOISE_FLAG}`): {noise['status']}"
        + (
            f"; B_simple {_fmt(noise.get('b_simple'))} at batch {noise.get('batch')}, "
            f"B_noise / B_simple {_fmt(noise.get('b_noise_over_b_simple'))}"
            if noise.get("b_simple")
            else ""
        )
        + ".",
        "",
        "## Per batch size (mean and sd over seeds)",
        "",
        markdown_table(result["batches"], BATCH_COLUMNS),
        "",
        "## Per run",
        "",
        markdown_table(runs, RUN_COLUMNS),
        "",
        f"![the batch-size study]({png})",
    ]
    return "\n".join(lines)


def make_data(opts: Options, work: Path) -> tuple[Path, str]:
    if opts.data:
        return Path(opts.data), f"dataset {opts.data}"
    from fasthpa.data.synth import generate

    root = work / "data"
    if not (root / "train.csv").exists():
        generate(
            root,
            n=opts.synth_n,
            size=opts.stored_size,
            seed=opts.data_seed,
            workers=os.cpu_count() or 1,
        )
    return root, f"fasthpa.data.synth, {opts.synth_n} samples at {opts.stored_size} px"


def run_benchmark(opts: Options) -> dict[str, Any]:
    """Generate (or use) the data, train every (batch, seed), analyse, print and write."""
    import torch

    from fasthpa.envinfo import device_name, environment

    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    temp = opts.workdir is None
    work = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="fasthpa_bf1_"))
    work.mkdir(parents=True, exist_ok=True)
    noise_supported = lists_flag(trainer_help(), NOISE_FLAG)
    try:
        root, data_desc = make_data(opts, work)
        t0 = time.perf_counter()
        rows, noise_rows = measure(opts, root, work, noise_supported)
        total = time.perf_counter() - t0
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    result = analyse(rows, noise_rows, opts, noise_supported) | {"total_s": total, "paths": []}
    env = environment(opts.device)
    title = (
        f"batch-size study: {env['device']}, {data_desc}, {opts.image_size} px, {opts.epochs} "
        f"epoch(s), {len(opts.seeds)} seed(s), {lr_rule_formula(opts)}"
    )
    result["title"] = title
    print_rows(title, result["batches"], BATCH_COLUMNS)
    print_rows("runs", result["rows"], RUN_COLUMNS)
    print(f"fit: {result['fit']['status']}; B_noise {_fmt(result['fit'].get('b_noise'))}")
    print(f"B_simple: {result['noise']['status']}; {_fmt(result['noise'].get('b_simple'))}")
    print(
        f"recommended batch size: {_fmt(result['recommendation']['batch'])}. "
        f"{result['recommendation']['reason']}."
    )
    if not opts.save:
        return result
    out = Path(opts.out) if opts.out else RESULTS_DIR
    stem = f"batch_f1_{device_slug(device_name(opts.device))}_{_dt.date.today().isoformat()}"
    png = plot(result, out / f"{stem}.png", title)
    extra = {
        key: result[key]
        for key in ("title", "target", "target_rule", "batches", "fit", "noise", "recommendation")
    } | {
        "options": dict(vars(opts)),
        "data": data_desc,
        "lr_rule_formula": lr_rule_formula(opts),
        "noise_runs": noise_rows,
        "total_s": total,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "plot": png.name,
    }
    md = markdown(result, opts, title, png.name)
    paths = write_results("batch_f1", opts.device, rows, md, extra=extra, out_dir=out)
    result["paths"] = [str(p) for p in paths] + [str(png)]
    print("wrote", *result["paths"])
    return result


def parse_options(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--batch-sizes", type=positive_int_list, default=None, help="e.g. 8,32,128")
    p.add_argument("--seeds", type=_int_list, default=None, help="training seeds (default 0,1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 10)")
    p.add_argument("--lr-rule", default="sqrt", choices=LR_RULES)
    p.add_argument("--base-lr", type=float, default=1e-3)
    p.add_argument("--base-batch", type=int, default=8)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--target-f1", type=float, default=None, help="target dev macro F1 (tuned)")
    p.add_argument("--target-frac", type=float, default=0.9, help="auto target: x lowest best")
    p.add_argument("--f1-tolerance", type=float, default=0.02, help="for the recommendation")
    p.add_argument("--noise-batch", type=int, default=None, help="global batch of B_simple runs")
    p.add_argument("--data", default=None, help="Kaggle-layout root (default: synthetic)")
    p.add_argument("--synth-n", type=int, default=None, help="synthetic samples (default 2048)")
    p.add_argument("--stored-size", type=int, default=None, help="synthetic PNG side (512)")
    p.add_argument("--image-size", type=int, default=None, help="training size (default 256)")
    p.add_argument("--split", default=None, help="train,dev,test fractions (0.7,0.15,0.15)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--pretrained", default="auto", help="passed to the trainer")
    p.add_argument("--workers", type=int, default=None, help="passed to the trainer")
    p.add_argument("--loader", default="auto", choices=BACKENDS)
    p.add_argument("--log-every", type=int, default=None, help="trainer log interval (steps)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per run")
    p.add_argument("--workdir", default=None, help="keep data, run folders and logs here")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print only, write no result files")
    p.add_argument("--quick", action="store_true", help="CPU: 192 samples at 32 px, 8,16,32")
    p.add_argument(
        "trainer_args", nargs="*", help="extra trainer flags after --, e.g. -- --arch resnet34"
    )
    a = p.parse_args(argv)
    q = a.quick
    return Options(
        batch_sizes=a.batch_sizes or ([8, 16, 32] if q else [8, 16, 32, 64, 128, 256]),
        seeds=a.seeds or [0, 1],
        epochs=a.epochs or (6 if q else 10),
        lr_rule=a.lr_rule,
        base_lr=a.base_lr,
        base_batch=a.base_batch,
        warmup_epochs=a.warmup_epochs,
        target_f1=a.target_f1,
        target_frac=a.target_frac,
        f1_tolerance=a.f1_tolerance,
        noise_batch=a.noise_batch,
        data=a.data,
        synth_n=a.synth_n or (192 if q else 2048),
        stored_size=a.stored_size or (32 if q else 512),
        image_size=a.image_size or (32 if q else 256),
        split=a.split or ("0.6,0.2,0.2" if q else "0.7,0.15,0.15"),
        device="cpu" if q and a.device == "auto" else a.device,
        pretrained=a.pretrained,
        workers=a.workers if a.workers is not None else (0 if q else None),
        loader="torch" if q and a.loader == "auto" else a.loader,
        log_every=a.log_every or (2 if q else 5),
        data_seed=a.data_seed,
        trainer_args=a.trainer_args,
        workdir=a.workdir,
        out=a.out,
        save=not a.no_save,
        quick=q,
        timeout_s=a.timeout,
    )


def _int_list(text: str) -> list[int]:
    """An argparse type for '0,1,2': comma-separated integers >= 0."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    result = run_benchmark(opts)
    print(f"total {result['total_s']:.0f} s")
    return 0 if all(r["status"] == "ok" for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
