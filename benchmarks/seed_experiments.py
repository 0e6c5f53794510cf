"""Re-run the reference report's experiments with fasthpa flags and assemble one comparison.

    scripts/seed_experiments.sh /data/hpa                         # full: 512 px, 10 epochs each
    scripts/seed_experiments.sh /tmp/hpa_synth --quick            # synthetic miniature, CPU, minutes
    python benchmarks/seed_experiments.py ROOT --epochs 20 --out results/seed -- --arch resnet34

The reference (CS230 "Kaggle Human Protein Atlas", ../shared/reference/hpa.md) trained a ResNet18
with BCE and compared; each comparison here is a set of runs of ``python -m fasthpa.train`` that
differ from the baseline in one flag (same seed, split, epochs, batch and learning rate):

=======================  =========================================================================
backbone                 full retraining (baseline) vs ``--freeze-backbone`` (head only)
input size / head        512 px with adaptive average pooling (baseline) vs downsized to 256
                         (``--image-size``) vs the avg+max concatenated head (``--head maxavg``;
                         the report's extra residual layers are not implemented in fasthpa)
channels                 RGBY (baseline) vs RGB (``--channels rgb``)
loss                     BCE (baseline) vs weighted BCE (w = 1 - f_l) vs focal (gamma 2, the
                         standard (1 - p_t)^gamma) vs the report's printed p_t^gamma variant
thresholds               dev and test macro F1 at 0.5 vs with per-label thresholds tuned on dev,
                         for every run
per-label F1             against label frequency, from the baseline's thresholds.json
=======================  =========================================================================

``--quick`` is a miniature of the same grid on CPU: if ROOT holds no train.csv, a synthetic
dataset (``fasthpa.data.synth``) is written there; sizes 64 vs 32 px stand for 512 vs 256; one
epoch each. Pretrained ImageNet weights are passed through (``--pretrained``, default ``auto``:
used when cached; this machine may be offline) and each row records what was used.

Output (``--out``, default ``benchmarks/results/seed_experiments[_quick]_<date>/``):
``comparison.md`` and ``comparison.json`` (every experiment with its figures), ``per_label.csv``
(the baseline's per-label F1 and frequency), a ``fasthpa report`` of all runs under ``report/``,
and the run folders and logs under ``runs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import io
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch_f1 import run_one
from common import RESULTS_DIR, markdown_table, print_rows

from fasthpa.errors import UserError
from fasthpa.io import atomic_write_json, atomic_write_text
from fasthpa.labels import KAGGLE_TRAIN_COUNTS, KAGGLE_TRAIN_SAMPLES, LABEL_NAMES, NUM_LABELS

QUICK_MAX_SAMPLES = 2000


@dataclass(frozen=True)
class Experiment:
    """One training run: a name, the comparison it belongs to, and its flags beyond the base."""

    name: str
    group: str
    varies: str
    flags: tuple[str, ...]


def experiments(full_size: int, small_size: int) -> list[Experiment]:
    """The grid: a BCE/RGBY/avgpool/full-retraining baseline and one-flag variations of it."""
    return [
        Experiment(
            "baseline", "all", f"baseline: full retraining, {full_size} px avgpool, RGBY, BCE", ()
        ),
        Experiment("frozen", "backbone", "frozen backbone (head only)", ("--freeze-backbone",)),
        Experiment(
            "downsized", "input", f"downsized to {small_size} px", ("--image-size", str(small_size))
        ),
        Experiment("maxavg_head", "input", "avg+max pooled head", ("--head", "maxavg")),
        Experiment("rgb", "channels", "RGB only (no yellow)", ("--channels", "rgb")),
        Experiment("wbce", "loss", "weighted BCE (w = 1 - f_l)", ("--loss", "wbce")),
        Experiment("focal", "loss", "focal, (1 - p_t)^2 (standard)", ("--loss", "focal")),
        Experiment(
            "focal_report",
            "loss",
            "focal, p_t^2 (as printed in the report)",
            ("--loss", "focal", "--focal-variant", "reference_report"),
        ),
    ]


@dataclass
class Options:
    root: Path
    quick: bool = False
    out: Path | None = None
    epochs: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    image_size: int | None = None
    small_size: int | None = None
    split: str | None = None
    device: str = "auto"
    pretrained: str = "auto"
    workers: int | None = None
    loader: str | None = None
    synth_n: int = 64
    seed: int = 0
    only: list[str] | None = None
    trainer_args: tuple[str, ...] = ()
    timeout_s: float | None = None
    in_process: bool = False
    """train in this process (saves an interpreter start per run: --quick's default)"""


def prepare_data(opts: Options) -> str:
    """Use ROOT, or (with --quick and no train.csv there) write a synthetic dataset into it."""
    root = opts.root
    csv_path = root / "train.csv"
    if csv_path.is_file():
        if opts.quick:
            rows = sum(1 for _ in open(csv_path)) - 1
            if rows > QUICK_MAX_SAMPLES:
                raise UserError(
                    f"{csv_path}: {rows} samples; --quick is a miniature for a small synthetic set "
                    f"(at most {QUICK_MAX_SAMPLES}): give an empty folder and it writes one."
                )
        return f"{root} (existing)"
    if not opts.quick:
        raise UserError(
            f"{root}: no train.csv; give a Kaggle-layout dataset root (or use --quick for a "
            "synthetic miniature)."
        )
    from fasthpa.data.synth import generate

    size = opts.image_size or 64
    s = generate(root, n=opts.synth_n, size=size, seed=opts.seed, workers=1, overwrite=True)
    return f"{root} (synthetic: {s.n_train} samples at {size} px, written now)"


def train_in_process(argv: list[str], log_path: Path) -> tuple[int, float, str]:
    """``fasthpa.train.main(argv)`` here, its output into ``log_path``; same return as run_one."""
    from fasthpa.train.cli import main as train_main

    t0 = time.perf_counter()
    with (
        open(log_path, "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        try:
            rc = train_main(argv)
        except SystemExit as e:  # a UserError: the trainer printed its one line already
            rc = e.code if isinstance(e.code, int) else 1
        except Exception:  # one broken experiment must not lose the others
            traceback.print_exc(file=log)
            rc = 1
    wall = time.perf_counter() - t0
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    return int(rc or 0), wall, lines[-1] if lines else ""


def base_flags(opts: Options, full_size: int, epochs: int, split: str) -> list[str]:
    flags = [
        "--epochs",
        str(epochs),
        "--batch-size",
        str(opts.batch_size),
        "--lr",
        repr(opts.lr),
        "--image-size",
        str(full_size),
        "--split",
        split,
        "--seed",
        str(opts.seed),
        "--device",
        opts.device,
        "--pretrained",
        opts.pretrained,
        "--loss",
        "bce",
        "--head",
        "avgpool",
        "--channels",
        "rgby",
        "--no-freeze-backbone",
        "--no-progress",
        # the report's experiments: its recipe (constant lr, fp32, exact dev thresholds, no refit)
        "--recipe",
        "reference",
    ]
    if opts.workers is not None:
        flags += ["--workers", str(opts.workers)]
    if opts.loader:
        flags += ["--loader", opts.loader]
    if opts.quick:
        flags += ["--log-every", "2"]
    return flags + list(opts.trainer_args)


def _label_table(run) -> list[dict[str, Any]]:
    """The baseline's per-label figures: frequency (its training split and Kaggle), F1 at 0.5
    and tuned on dev, the tuned threshold and the dev positives."""
    thr = run.thresholds
    freq = run.frequency if run.frequency is not None else [math.nan] * NUM_LABELS
    return [
        {
            "label": i,
            "name": LABEL_NAMES[i],
            "train_frequency": float(freq[i]),
            "kaggle_frequency": KAGGLE_TRAIN_COUNTS[i] / KAGGLE_TRAIN_SAMPLES,
            "dev_positives": int(thr["positives"][i]),
            "threshold": float(thr["thresholds"][i]),
            "f1_at_0.5": float(thr["f1_at_0.5"][i]),
            "f1_tuned": float(thr["f1_tuned"][i]),
        }
        for i in range(NUM_LABELS)
    ]


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def frequency_bands(labels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean tuned and 0.5 F1 of labels above and below 5% frequency (the report's collapse).

    Labels without dev positives are left out: their F1 is 0 whatever the model does.
    """
    bands = []
    for name, keep in (
        ("labels present in >= 5% of training images", lambda f: f >= 0.05),
        ("labels present in < 5% of training images", lambda f: f < 0.05),
    ):
        rows = [
            r
            for r in labels
            if r["dev_positives"] > 0
            and not math.isnan(r["train_frequency"])
            and keep(r["train_frequency"])
        ]
        bands.append(
            {
                "band": name,
                "labels_with_dev_positives": len(rows),
                "mean_f1_at_0.5": _mean([r["f1_at_0.5"] for r in rows]),
                "mean_f1_tuned": _mean([r["f1_tuned"] for r in rows]),
            }
        )
    return bands


ROW_COLUMNS = [
    "experiment",
    "group",
    "varies",
    "status",
    "pretrained",
    "image_size",
    "epochs",
    "train_loss",
    "dev_f1_at_0.5",
    "dev_f1_tuned",
    "tuning_gain",
    "test_f1_at_0.5",
    "test_f1_tuned",
    "images_per_s",
    "wall_s",
]


def assemble(
    rows: list[dict[str, Any]], labels: list[dict[str, Any]] | None, meta: dict[str, Any]
) -> str:
    """comparison.md: the settings, one table per comparison, thresholds, per-label F1."""
    by_name = {r["experiment"]: r for r in rows}
    base = by_name.get("baseline", {})

    def table(names: list[str]) -> str:
        shown = [by_name[n] for n in names if n in by_name]
        return markdown_table(
            shown,
            [
                "experiment",
                "varies",
                "dev_f1_at_0.5",
                "dev_f1_tuned",
                "test_f1_at_0.5",
                "test_f1_tuned",
                "train_loss",
                "images_per_s",
                "status",
            ],
        )

    parts = [
        f"# The reference report's experiments, re-run with fasthpa ({meta['mode']})",
        "",
        f"- data: {meta['data']}",
        f"- every run: {' '.join(meta['base_flags'])}",
        f"- device: {meta['device']}; pretrained requested `{meta['pretrained']}`, used: "
        + ", ".join(sorted({str(r.get("pretrained")) for r in rows})),
        f"- date: {meta['date']}; commit {meta['commit']}; total {meta['total_s']:.0f} s",
        "",
        "Dev F1 at the best epoch (highest tuned macro F1); test F1 on the split's test part with "
        "the dev-fitted thresholds (absent when the split has no test part). The reference "
        "figures (ResNet18 on Kaggle, 512 px): frozen vs full train F1 0.2 vs 0.8, test 0.05 vs "
        "0.3; average pooling best for 512 px; yellow channel little gain; weighted BCE learned "
        "faster, none beat BCE at convergence; tuned thresholds raised test macro F1 0.43 -> 0.53.",
        "",
        "## Frozen backbone vs full retraining",
        "",
        table(["baseline", "frozen"]),
        "",
        "## 512 px average pooling vs downsized vs the avg+max head",
        "",
        "(The report's fourth option, extra residual layers, is not implemented in fasthpa.)",
        "",
        table(["baseline", "downsized", "maxavg_head"]),
        "",
        "## RGBY vs RGB",
        "",
        table(["baseline", "rgb"]),
        "",
        "## BCE vs weighted BCE vs focal",
        "",
        table(["baseline", "wbce", "focal", "focal_report"]),
        "",
        "## F1 at 0.5 vs tuned thresholds (every run)",
        "",
        markdown_table(
            rows,
            [
                "experiment",
                "dev_f1_at_0.5",
                "dev_f1_tuned",
                "tuning_gain",
                "test_f1_at_0.5",
                "test_f1_tuned",
            ],
        ),
        "",
        "## All runs",
        "",
        markdown_table(rows, ROW_COLUMNS),
        "",
    ]
    if labels:
        parts += [
            "## Per-label F1 against label frequency (baseline, dev, best epoch)",
            "",
            markdown_table(frequency_bands(labels)),
            "",
            markdown_table(sorted(labels, key=lambda r: -r["train_frequency"])),
            "",
        ]
    else:
        parts += ["Per-label F1: the baseline has no dev evaluation (it failed).", ""]
    if base.get("status") == "ok":
        parts += [
            "Plots of every run (loss, F1, throughput, per-label F1 against frequency, "
            "threshold gain, precision/recall, confusion counts): [report/report.md](report/report.md)",
            "",
        ]
    return "\n".join(parts)


def run_experiments(opts: Options) -> dict[str, Any]:
    """Run the grid, write comparison.md/.json, per_label.csv and report/; return the payload."""
    import torch

    from fasthpa.envinfo import device_name, git_commit
    from fasthpa.report import load_run, summarise_run, write_report

    date = _dt.date.today().isoformat()
    out = opts.out or RESULTS_DIR / f"seed_experiments{'_quick' if opts.quick else ''}_{date}"
    out.mkdir(parents=True, exist_ok=True)
    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    full = opts.image_size or (64 if opts.quick else 512)
    small = opts.small_size or full // 2
    epochs = opts.epochs or (1 if opts.quick else 10)
    split = opts.split or ("0.5,0.25,0.25" if opts.quick else "0.9,0.05,0.05")
    if opts.quick and opts.workers is None:
        opts.workers = 0  # decode in the training process: no worker start-up per tiny run
    if opts.quick and opts.loader is None:
        opts.loader = "torch"
    data = prepare_data(opts)
    grid = experiments(full, small)
    if opts.only:
        unknown = sorted(set(opts.only) - {e.name for e in grid})
        if unknown:
            raise UserError(
                f"--only {','.join(opts.only)}: unknown experiment {unknown[0]!r} (known: "
                f"{', '.join(e.name for e in grid)})."
            )
        grid = [e for e in grid if e.name in opts.only or e.name == "baseline"]
    flags = base_flags(opts, full, epochs, split)
    runs_dir = out / "runs"
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    ok_runs: list[Path] = []
    for exp in grid:
        run_dir = runs_dir / exp.name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a stale folder would resume instead of training afresh
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        argv = ["--data", str(opts.root), "--out", str(run_dir), *flags, *exp.flags]
        print(f"[{exp.name}] {exp.varies}", flush=True)
        log = runs_dir / f"{exp.name}.log"
        if opts.in_process:
            rc, wall, last = train_in_process(argv, log)
        else:
            cmd = [sys.executable, "-m", "fasthpa.train", *argv]
            rc, wall, last = run_one(cmd, log, opts.timeout_s)
        row: dict[str, Any] = {
            "experiment": exp.name,
            "group": exp.group,
            "varies": exp.varies,
            "flags": " ".join(exp.flags),
            "status": "ok" if rc == 0 else f"failed (exit {rc}): {last[-160:]}",
            "wall_s": wall,
        }
        if rc == 0:
            s = summarise_run(load_run(run_dir))
            row |= {
                "pretrained": s["pretrained"],
                "image_size": s["image_size"],
                "epochs": s["epochs"],
                "train_loss": s["train_loss"],
                "dev_f1_at_0.5": s["dev_macro_f1_at_0.5"],
                "dev_f1_tuned": s["dev_macro_f1_tuned"],
                "tuning_gain": s["dev_macro_f1_tuned"] - s["dev_macro_f1_at_0.5"],
                "test_f1_at_0.5": s.get("test_macro_f1_at_0.5"),
                "test_f1_tuned": s.get("test_macro_f1_tuned"),
                "images_per_s": s["images_per_sec"],
            }
            ok_runs.append(run_dir)
            if exp.name == "baseline":
                # the other runs train and evaluate on exactly the baseline's rows
                split_file = out / "split.csv"
                shutil.copyfile(run_dir / "split.csv", split_file)
                flags[flags.index("--split") + 1] = str(split_file)
        rows.append(row)
        print(f"[{exp.name}] {row['status']} in {wall:.0f} s", flush=True)
    total = time.perf_counter() - t0

    labels = None
    base_dir = runs_dir / "baseline"
    if base_dir in ok_runs:
        base_run = load_run(base_dir)
        if base_run.thresholds is not None:
            labels = _label_table(base_run)
    if ok_runs:
        write_report(ok_runs, out / "report")
    meta = {
        "mode": "quick miniature on synthetic data" if opts.quick else "full",
        "data": data,
        "base_flags": flags,
        "device": device_name(opts.device),
        "pretrained": opts.pretrained,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "total_s": total,
        "image_sizes": [full, small],
        "epochs": epochs,
    }
    payload = {
        "meta": meta,
        "experiments": rows,
        "per_label": labels,
        "frequency_bands": frequency_bands(labels) if labels else None,
    }
    atomic_write_json(out / "comparison.json", payload)
    atomic_write_text(out / "comparison.md", assemble(rows, labels, meta) + "\n")
    if labels:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(labels[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(labels)
        atomic_write_text(out / "per_label.csv", buf.getvalue())
    _print(rows, out)
    return payload


def _print(rows: list[dict[str, Any]], out: Path) -> None:
    cols = [
        "experiment",
        "status",
        "dev_f1_at_0.5",
        "dev_f1_tuned",
        "test_f1_at_0.5",
        "test_f1_tuned",
        "images_per_s",
        "wall_s",
    ]
    print_rows(f"reference experiments -> {out / 'comparison.md'}", rows, cols)


def parse_options(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("root", type=Path, metavar="ROOT", help="Kaggle-layout dataset root")
    p.add_argument("--quick", action="store_true", help="synthetic miniature on CPU in minutes")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (10; --quick 1)")
    p.add_argument("--batch-size", type=int, default=8, help="the reference recipe's 8")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (reference 1e-3)")
    p.add_argument("--image-size", type=int, default=None, help="full size (512; --quick 64)")
    p.add_argument("--small-size", type=int, default=None, help="downsized size (half)")
    p.add_argument("--split", default=None, help="train,dev,test fractions or a split CSV")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--pretrained", default="auto", help="auto, imagenet, none or a file")
    p.add_argument("--workers", type=int, default=None, help="trainer loader workers")
    p.add_argument("--loader", default=None, choices=("auto", "torch", "dali", "cache"))
    p.add_argument("--synth-n", type=int, default=64, help="--quick: synthetic samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated experiments (+ baseline)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per run")
    p.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train in this process instead of one `python -m fasthpa.train` per run "
        "(default: on with --quick; --timeout needs separate processes)",
    )
    p.add_argument("trainer_args", nargs="*", help="extra trainer flags after --")
    a = p.parse_args(argv)
    if a.quick and a.device == "auto":
        a.device = "cpu"
    return Options(
        root=a.root.absolute(),
        quick=a.quick,
        out=a.out,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        image_size=a.image_size,
        small_size=a.small_size,
        split=a.split,
        device=a.device,
        pretrained=a.pretrained,
        workers=a.workers,
        loader=a.loader,
        synth_n=a.synth_n,
        seed=a.seed,
        only=[s.strip() for s in a.only.split(",")] if a.only else None,
        trainer_args=tuple(a.trainer_args),
        timeout_s=a.timeout,
        in_process=a.in_process if a.in_process is not None else a.quick and a.timeout is None,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        payload = run_experiments(parse_options(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(r["status"] == "ok" for r in payload["experiments"]) else 1


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.exit(main())
