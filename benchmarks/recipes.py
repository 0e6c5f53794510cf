"""The reference recipe against fasthpa's default (and a K-fold cv ensemble), on one synthetic
set that no tuning has seen: test macro F1, F1 of the nine rarest labels, labels per row, wall
time and dev-F1-against-time curves, measured in one invocation on this machine.

    python benchmarks/recipes.py                       # 3,000 images at 128 px, 600 test, 3 epochs
    python benchmarks/recipes.py --quick               # a smoke run of the machinery, minutes
    python benchmarks/recipes.py --runs reference,fasthpa --data /data/synth2026

The set is ``fasthpa synth --seed 2026`` (the recipe was tuned on seeds 11 and 12), at the
Kaggle label frequencies; its hidden truth (``test_labels.csv``) scores the submissions. Each run
is the real command in its own process, timed from start to exit:

- ``reference``: ``fasthpa train --recipe reference`` (the report's recipe, exactly);
- ``fasthpa``: ``fasthpa train`` (its default recipe, no recipe flags);
- ``cv``: ``fasthpa cv --folds K`` at the same epochs per fold (its stack on the folds' features
  included), then ``fasthpa predict --run CVDIR`` (the stack and its out-of-fold thresholds).

Every run then predicts the test split with ``fasthpa predict`` (the run's own thresholds,
at-least-one on). Results: ``benchmarks/results/recipes_<device>_<date>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ResultFiles, markdown_table

RUNS = ("reference", "fasthpa", "cv")
COLUMNS = [
    "run",
    "test_macro_f1",
    "rare9_f1",
    "labels_per_row",
    "labels_per_row_true",
    "train_s",
    "loop_s",
    "predict_s",
    "images_per_s",
]


@dataclass
class Options:
    data: str | None = None
    n: int = 3000
    size: int = 128
    test_n: int = 600
    seed: int = 2026
    epochs: int = 3
    folds: int = 3
    runs: tuple[str, ...] = RUNS
    workers: int | None = None
    out_dir: Path | None = None
    workdir: Path | None = None
    quick: bool = False
    extra: list[str] = field(default_factory=list)


def parse_options(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="a Kaggle-layout root with test_labels.csv")
    p.add_argument("--n", type=int, default=3000, help="synthetic train images")
    p.add_argument("--size", type=int, default=128, help="synthetic image side = training size")
    p.add_argument("--test-n", type=int, default=600, help="synthetic test images")
    p.add_argument("--seed", type=int, default=2026, help="synthetic set seed (not a tuning seed)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (and per cv fold)")
    p.add_argument("--folds", type=int, default=3, help="cv folds")
    p.add_argument("--runs", default=",".join(RUNS), help=f"which of {', '.join(RUNS)}")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: trainer's)")
    p.add_argument("--out-dir", type=Path, default=None, help="results folder")
    p.add_argument("--workdir", type=Path, default=None, help="keep data and runs here")
    p.add_argument("--quick", action="store_true", help="120 images at 32 px, 1 epoch, 2 folds")
    args, extra = p.parse_known_args(argv)
    opts = Options(
        args.data,
        args.n,
        args.size,
        args.test_n,
        args.seed,
        args.epochs,
        args.folds,
        tuple(r for r in args.runs.split(",") if r),
        args.workers,
        args.out_dir,
        args.workdir,
        args.quick,
        extra,
    )
    unknown = set(opts.runs) - set(RUNS)
    if unknown:
        p.error(f"--runs: unknown {', '.join(sorted(unknown))}")
    if opts.quick:
        opts.n, opts.size, opts.test_n, opts.epochs, opts.folds = 120, 32, 24, 1, 2
    return opts


def _fasthpa(*args: str) -> list[str]:
    return [sys.executable, "-m", "fasthpa.cli", *args]


def train_command(opts: Options, name: str, root: Path, out: Path) -> list[str]:
    common = ["--data", str(root), "--out", str(out), "--epochs", str(opts.epochs)]
    common += ["--image-size", str(opts.size), "--pretrained", "none", "--no-progress"]
    if opts.workers is not None:
        common += ["--workers", str(opts.workers)]
    if opts.quick:
        common += ["--log-every", "2"]
    if name == "reference":
        return _fasthpa("train", *common, "--recipe", "reference", *opts.extra)
    if name == "cv":
        return _fasthpa("cv", *common, "--folds", str(opts.folds), *opts.extra)
    return _fasthpa("train", *common, *opts.extra)


def timed(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` to completion (its output into ``log``); seconds from start to exit."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=6 * 3600)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({p.returncode}):\n{tail}")
    return seconds


def history_runs(out: Path) -> list[Path]:
    """The run folders of a train run (itself) or a cv folder (its folds, in order)."""
    manifest = out / "cv.json"
    if manifest.is_file():
        return [out / f for f in json.loads(manifest.read_text())["folds"]]
    return [out]


def curve(out: Path) -> tuple[list[dict[str, float]], float, float | None]:
    """(dev F1 against elapsed seconds, the training loop's seconds, median images/s) from the
    history of a run, or of a cv folder's folds one after another."""
    points, offset, ips = [], 0.0, []
    for run in history_runs(out):
        rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        epochs = [r for r in rows if r["kind"] == "epoch"]
        ips += [r["images_per_sec"] for r in rows if r["kind"] == "step"]
        for r in epochs:
            if "dev_macro_f1_tuned" in r:
                points.append(
                    {"elapsed_s": offset + r["elapsed_s"], "dev_f1": r["dev_macro_f1_tuned"]}
                )
        offset += epochs[-1]["elapsed_s"] if epochs else 0.0
    return points, offset, (statistics.median(ips) if ips else None)


def one_run(opts: Options, name: str, root: Path, work: Path) -> dict[str, Any]:
    from fasthpa.predict.score import score_submission

    out = work / name
    train_s = timed(train_command(opts, name, root, out), work / f"{name}_train.log")
    sub = work / f"{name}_submission.csv"
    predict = _fasthpa("predict", "--run", str(out), "--data", str(root), "--out", str(sub))
    predict += ["--no-progress"] + (
        ["--workers", str(opts.workers)] if opts.workers is not None else []
    )
    predict_s = timed(predict, work / f"{name}_predict.log")
    score = score_submission(sub, root / "test_labels.csv")
    points, loop_s, ips = curve(out)
    return {
        "run": name,
        "test_macro_f1": score["macro_f1"],
        "rare9_f1": score["rare_macro_f1"],
        "labels_per_row": score["labels_per_row"],
        "labels_per_row_true": score["labels_per_row_true"],
        "train_s": train_s,
        "loop_s": loop_s,
        "predict_s": predict_s,
        "images_per_s": ips,
        "curve": points,
        "per_label_f1": score["per_label_f1"],
        "command": " ".join(train_command(opts, name, root, out)[3:]),
    }


def dataset(opts: Options, work: Path) -> tuple[Path, str]:
    if opts.data:
        return Path(opts.data), f"{opts.data}"
    from fasthpa.data.synth import generate

    root = work / "data"
    if not (root / "test_labels.csv").is_file():
        generate(root, n=opts.n, size=opts.size, test_n=opts.test_n, seed=opts.seed, workers=2)
    return (
        root,
        f"fasthpa synth --n {opts.n} --size {opts.size} --test-n {opts.test_n} --seed {opts.seed}",
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        xs = [p["elapsed_s"] for p in r["curve"]]
        a.plot(xs, [p["dev_f1"] for p in r["curve"]], marker="o", label=r["run"])
    a.set(xlabel="training seconds (elapsed)", ylabel="dev macro F1 (tuned)", title="time to F1")
    a.legend()
    names = [r["run"] for r in rows]
    b.bar(names, [r["test_macro_f1"] for r in rows], label="all 28 labels")
    b.bar(names, [r["rare9_f1"] for r in rows], width=0.4, label="rarest 9")
    b.set(ylabel="test macro F1", title="held-out test")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    files = ResultFiles("recipes", "cpu" if not _cuda() else "cuda", opts.out_dir)
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="fasthpa_recipes_"))
    work.mkdir(parents=True, exist_ok=True)
    root, described = dataset(opts, work)
    rows: list[dict[str, Any]] = []
    for name in opts.runs:
        print(f"== {name}", flush=True)
        rows.append(one_run(opts, name, root, work))
        print(markdown_table(rows, COLUMNS), flush=True)
        files.write(rows, _markdown(rows, described, opts), extra=_extra(described, opts))
    png = files.out / f"{files.stem}.png"
    plot(rows, png)
    paths = files.write(
        rows, _markdown(rows, described, opts), extra=_extra(described, opts), complete=True
    )
    print("wrote", *paths, png)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _extra(described: str, opts: Options) -> dict[str, Any]:
    return {
        "data": described,
        "epochs": opts.epochs,
        "folds": opts.folds,
        "load_average": os.getloadavg(),
    }


def _markdown(rows: list[dict[str, Any]], described: str, opts: Options) -> str:
    head = (
        f"data: {described}; {opts.epochs} epoch(s) per run (per fold for cv, {opts.folds} folds); "
        "test F1 = the submission's macro F1 against the hidden truth (at-least-one on); rare9 = "
        "mean F1 of labels 8 9 10 15 17 20 24 26 27; train_s = the whole train (or cv) command, "
        "start to exit; loop_s = its training loop (history elapsed, summed over folds); "
        f"1-minute load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.\n\n"
    )
    table = markdown_table(rows, COLUMNS)
    commands = "\n".join(f"- {r['run']}: `{r['command']}`" for r in rows)
    return head + table + "\n\nCommands (after `python -m fasthpa.cli`):\n\n" + commands + "\n"


if __name__ == "__main__":
    sys.exit(main())
