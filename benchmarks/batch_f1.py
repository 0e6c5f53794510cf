"""Batch size against F1: the same epochs on the same data at several batch sizes, with the
learning rate scaled by a documented rule; images/sec, wall time and dev macro F1 for each.

    python benchmarks/batch_f1.py --quick                      # CPU, synthetic 32 px, minutes
    python benchmarks/batch_f1.py --batch-sizes 8,32,128,512 --epochs 10 --image-size 256
    python benchmarks/batch_f1.py --data /data/hpa --batch-sizes 16,64,256 --lr-rule sqrt

It answers "how large a batch can I use before F1 suffers, and what does it buy?".

Learning-rate rule (``--lr-rule``), from ``--base-lr`` at ``--base-batch`` (the reference
recipe: Adam 1e-3 at batch 8), B being the global batch of the run:

- ``linear`` (default; Goyal et al. 2017, "Accurate, Large Minibatch SGD"):
  lr = base_lr * B / base_B, with a linear warm-up over the first ``--warmup-epochs`` (1) epochs;
- ``sqrt`` (Krizhevsky 2014; Hoffer et al. 2017; the usual rule for Adam):
  lr = base_lr * sqrt(B / base_B), with the same warm-up.

Every batch size trains in its own process (``python -m fasthpa.train``: clean memory, and an
out-of-memory batch becomes a row, not a crash) with the same seed, the same split (the first
run's split.csv is passed to the others) and the same number of epochs. images/sec is the median
of the run's logged figures after the first log step (start-up and compilation excluded); wall
time is the whole process; F1 is the best epoch's dev macro F1 at 0.5 and with tuned per-label
thresholds. Results: a table on screen, ``benchmarks/results/batch_f1_<device>_<date>.{json,md}``
and a ``.png`` beside them (images/sec and F1 against batch size), run folders under --workdir.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shutil
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

LR_RULES = ("linear", "sqrt")


def scaled_lr(base_lr: float, batch: int, base_batch: int, rule: str) -> float:
    """The learning rate for global batch ``batch`` under ``rule`` (see the module docstring)."""
    if rule == "linear":
        return base_lr * batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(batch / base_batch)
    raise ValueError(f"lr rule must be one of {LR_RULES}, got {rule!r}")


@dataclass
class Options:
    batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
    epochs: int = 5
    lr_rule: str = "linear"
    base_lr: float = 1e-3
    base_batch: int = 8
    warmup_epochs: float = 1.0
    data: str | None = None
    synth_n: int = 2048
    stored_size: int = 512
    image_size: int = 256
    split: str = "0.8,0.2,0"
    device: str = "auto"
    pretrained: str = "auto"
    workers: int | None = None
    loader: str = "auto"
    log_every: int = 5
    seed: int = 0
    trainer_args: list[str] = field(default_factory=list)
    workdir: str | None = None
    out: str | None = None
    save: bool = True
    quick: bool = False
    timeout_s: float | None = None


def trainer_command(opts: Options, root: Path, run_dir: Path, batch: int, split: str) -> list[str]:
    """The ``python -m fasthpa.train`` command for one batch size."""
    lr = scaled_lr(opts.base_lr, batch, opts.base_batch, opts.lr_rule)
    cmd = [
        sys.executable, "-m", "fasthpa.train",
        "--data", str(root), "--out", str(run_dir),
        "--batch-size", str(batch), "--lr", repr(lr),
        "--warmup-epochs", repr(opts.warmup_epochs), "--epochs", str(opts.epochs),
        "--image-size", str(opts.image_size), "--split", split,
        "--seed", str(opts.seed), "--device", opts.device, "--pretrained", opts.pretrained,
        "--loader", opts.loader, "--log-every", str(opts.log_every), "--no-progress",
    ]  # fmt: skip
    if opts.workers is not None:
        cmd += ["--workers", str(opts.workers)]
    return cmd + list(opts.trainer_args)


def run_one(cmd: list[str], log_path: Path, timeout_s: float | None) -> tuple[int, float, str]:
    """Run the trainer; return (exit status, wall seconds, last stderr/stdout line)."""
    # the checkout first, so the trainer is this repository's even where fasthpa is installed
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(paths)}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - t0
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    return rc, wall, lines[-1] if lines else ""


def measure(opts: Options, root: Path, work: Path) -> list[dict[str, Any]]:
    """Train once per batch size; one row per batch size (failed runs say why)."""
    from fasthpa.report import load_run, summarise_run

    rows: list[dict[str, Any]] = []
    split = opts.split
    for batch in opts.batch_sizes:
        run_dir = work / "runs" / f"bs{batch}"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a stale folder would resume instead of training afresh
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = trainer_command(opts, root, run_dir, batch, split)
        print(f"batch {batch}: {' '.join(cmd[1:])}", flush=True)
        rc, wall, last = run_one(cmd, work / f"train_bs{batch}.log", opts.timeout_s)
        row: dict[str, Any] = {
            "batch": batch,
            "lr": scaled_lr(opts.base_lr, batch, opts.base_batch, opts.lr_rule),
            "lr_rule": opts.lr_rule,
            "epochs": opts.epochs,
            "wall_s": wall,
            "status": "ok" if rc == 0 else f"failed (exit {rc}): {last[-160:]}",
        }
        if rc == 0:
            s = summarise_run(load_run(run_dir))
            row |= {
                "global_batch": s["global_batch"],
                "steps": s["steps"],
                "images_per_s": s["images_per_sec"],
                "train_s": s["wall_s"],
                "train_loss": s["train_loss"],
                "dev_f1_at_0.5": s["dev_macro_f1_at_0.5"],
                "dev_f1_tuned": s["dev_macro_f1_tuned"],
                "last_dev_f1_at_0.5": s["last_dev_macro_f1_at_0.5"],
                "last_dev_f1_tuned": s["last_dev_macro_f1_tuned"],
                "device": s["device"],
                "pretrained": s["pretrained"],
            }
            if split == opts.split and (run_dir / "split.csv").is_file():
                # every later batch size trains and evaluates on exactly these rows
                split = str(work / "split.csv")
                shutil.copyfile(run_dir / "split.csv", split)
        rows.append(row)
        print(f"batch {batch}: {row['status']}, {wall:.1f} s", flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """images/sec (left axis) and dev macro F1 at 0.5 / tuned (right axis) against batch size."""
    import io

    from matplotlib.figure import Figure

    from fasthpa.io import atomic_write_bytes

    ok = [r for r in rows if r["status"] == "ok"]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    xs = [r["batch"] for r in ok]
    ax.plot(xs, [r["images_per_s"] for r in ok], "o-", color="tab:blue", label="images/sec")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs or [1])
    ax.set_xticklabels([str(x) for x in xs] or ["-"])
    ax.set_xlabel("batch size (learning rate scaled: see the md file)")
    ax.set_ylabel("images/sec (median)", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    f1 = ax.twinx()
    f1.plot(xs, [r["dev_f1_tuned"] for r in ok], "s-", color="tab:red", label="dev F1 tuned")
    f1.plot(xs, [r["dev_f1_at_0.5"] for r in ok], "^--", color="tab:orange", label="dev F1 at 0.5")
    f1.set_ylabel("dev macro F1 (best epoch)", color="tab:red")
    f1.set_ylim(0, max([0.05] + [r["dev_f1_tuned"] or 0 for r in ok]) * 1.15)
    handles = ax.get_legend_handles_labels()[0] + f1.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + f1.get_legend_handles_labels()[1]
    ax.legend(handles, labels, fontsize=8, loc="lower center")
    ax.set_title("\n".join(textwrap.wrap(title, 95)), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


COLUMNS = [
    "batch", "lr", "steps", "images_per_s", "wall_s", "train_s", "train_loss",
    "dev_f1_at_0.5", "dev_f1_tuned", "last_dev_f1_at_0.5", "last_dev_f1_tuned", "status",
]  # fmt: skip


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    print_rows(title, rows, COLUMNS)


def run_benchmark(opts: Options) -> dict[str, Any]:
    """Generate (or use) the data, train each batch size, print and write the results."""
    import torch

    from fasthpa.envinfo import device_name, environment

    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    opts.device = device
    temp = opts.workdir is None
    work = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="fasthpa_bf1_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if opts.data:
            root, data_desc = Path(opts.data), f"dataset {opts.data}"
        else:
            from fasthpa.data.synth import generate

            root = work / "data"
            if not (root / "train.csv").exists():
                generate(
                    root, n=opts.synth_n, size=opts.stored_size, seed=opts.seed,
                    workers=os.cpu_count() or 1,
                )  # fmt: skip
            data_desc = f"fasthpa.data.synth, {opts.synth_n} samples at {opts.stored_size} px"
        t0 = time.perf_counter()
        rows = measure(opts, root, work)
        total = time.perf_counter() - t0
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)

    env = environment(device)
    rule = (
        f"lr = {opts.base_lr:g} x B / {opts.base_batch}"
        if opts.lr_rule == "linear"
        else f"lr = {opts.base_lr:g} x sqrt(B / {opts.base_batch})"
    )
    title = (
        f"batch size vs F1: {env['device']}, {data_desc}, {opts.image_size} px, {opts.epochs} "
        f"epoch(s), {rule}, warm-up {opts.warmup_epochs:g} epoch(s)"
    )
    print_table(rows, title)
    result: dict[str, Any] = {"rows": rows, "title": title, "paths": [], "total_s": total}
    if not opts.save:
        return result
    out = Path(opts.out) if opts.out else RESULTS_DIR
    stem = f"batch_f1_{device_slug(device_name(device))}_{_dt.date.today().isoformat()}"
    png = plot(rows, out / f"{stem}.png", title)
    md = (
        f"{title}.\n\nSame seed, split and epochs for every batch size; the learning-rate rule "
        f"is `{opts.lr_rule}` ({rule}) with a linear warm-up over {opts.warmup_epochs:g} "
        "epoch(s). images_per_s: median of the trainer's logged figures after its first log "
        "step; wall_s: the whole training process (start-up and evaluation included); train_s: "
        "the trainer's own elapsed time at its last epoch; dev F1: best epoch, at 0.5 and with "
        "tuned per-label thresholds (last_*: the last epoch).\n\n"
        + markdown_table(rows, COLUMNS)
        + f"\n\n![images/sec and F1 against batch size]({png.name})\n"
    )
    extra = {
        "options": {k: v for k, v in vars(opts).items()},
        "data": data_desc,
        "lr_rule_formula": rule,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "plot": png.name,
    }
    paths = write_results("batch_f1", device, rows, md, extra=extra, out_dir=out)
    result["paths"] = [str(p) for p in paths] + [str(png)]
    print("wrote", *result["paths"])
    return result


def parse_options(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--batch-sizes", type=positive_int_list, default=None, help="e.g. 8,32,128")
    p.add_argument("--epochs", type=int, default=None, help="epochs per batch size (default 5)")
    p.add_argument("--lr-rule", default="linear", choices=LR_RULES)
    p.add_argument("--base-lr", type=float, default=1e-3)
    p.add_argument("--base-batch", type=int, default=8)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--data", default=None, help="Kaggle-layout root (default: synthetic)")
    p.add_argument("--synth-n", type=int, default=None, help="synthetic samples (default 2048)")
    p.add_argument("--stored-size", type=int, default=None, help="synthetic PNG side (512)")
    p.add_argument("--image-size", type=int, default=None, help="training size (default 256)")
    p.add_argument("--split", default=None, help="train,dev,test fractions (default 0.8,0.2,0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--pretrained", default="auto", help="passed to the trainer")
    p.add_argument("--workers", type=int, default=None, help="passed to the trainer")
    p.add_argument("--loader", default="auto", choices=("auto", "torch", "dali", "cache"))
    p.add_argument("--log-every", type=int, default=None, help="trainer log interval (steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per batch size")
    p.add_argument("--workdir", default=None, help="keep data, run folders and logs here")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print only, write no result files")
    p.add_argument("--quick", action="store_true", help="CPU: 128 samples at 32 px, 8,16,32")
    p.add_argument(
        "trainer_args", nargs="*", help="extra trainer flags after --, e.g. -- --arch resnet34"
    )
    a = p.parse_args(argv)
    q = a.quick
    return Options(
        batch_sizes=a.batch_sizes or ([8, 16, 32] if q else [8, 16, 32, 64, 128, 256]),
        epochs=a.epochs or (2 if q else 5),
        lr_rule=a.lr_rule,
        base_lr=a.base_lr,
        base_batch=a.base_batch,
        warmup_epochs=a.warmup_epochs,
        data=a.data,
        synth_n=a.synth_n or (128 if q else 2048),
        stored_size=a.stored_size or (32 if q else 512),
        image_size=a.image_size or (32 if q else 256),
        split=a.split or ("0.75,0.25,0" if q else "0.8,0.2,0"),
        device="cpu" if q and a.device == "auto" else a.device,
        pretrained=a.pretrained,
        workers=a.workers if a.workers is not None else (0 if q else None),
        loader="torch" if q and a.loader == "auto" else a.loader,
        log_every=a.log_every or (2 if q else 5),
        seed=a.seed,
        trainer_args=a.trainer_args,
        workdir=a.workdir,
        out=a.out,
        save=not a.no_save,
        quick=q,
        timeout_s=a.timeout,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    result = run_benchmark(opts)
    print(f"total {result['total_s']:.0f} s")
    return 0 if all(r["status"] == "ok" for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
