"""Write PNG plots and a report.md for one training run, or several overlaid.

    fasthpa report runs/r18                          # -> runs/r18/report/report.md and PNGs
    fasthpa report runs/a runs/b --out reports/ab    # several runs on the same plots
    fasthpa report runs/r18 --labels 0,25,8,27       # precision/recall curves for these labels

Python::

    from fasthpa.report import load_run, summarise_run, write_report
    run = load_run("runs/r18")                 # RunRecord: history, config, dev probabilities
    summarise_run(run)["best_dev_macro_f1_tuned"]
    write_report(["runs/a", "runs/b"], "reports/ab", labels=[0, 25])

The plots, read from the run folder only (no model is loaded): training loss and dev macro F1
(at 0.5 and at the tuned thresholds) per epoch; images/sec and the data-wait share over the run;
per-label F1 against the label's frequency in the training split (log scale, points labelled by
label index); the per-label F1 gain from tuned thresholds; precision and recall against the
threshold for chosen labels (from dev_probs.npz); the confusion counts (TP/FP/FN/TN) per label at
the tuned thresholds (dev_probs.npz + thresholds.json). The per-label plots use the best epoch,
the one whose dev probabilities and thresholds the run kept. matplotlib renders through its Agg
canvas directly, so no display (and no pyplot state) is involved.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fasthpa.errors import UserError
from fasthpa.io import atomic_write_bytes, atomic_write_text, make_dir
from fasthpa.labels import LABEL_NAMES, NUM_LABELS

PLOTS = {
    "curves": "curves.png",
    "throughput": "throughput.png",
    "f1_vs_frequency": "f1_vs_frequency.png",
    "f1_gain": "f1_gain.png",
    "pr_threshold": "pr_threshold.png",
    "confusion": "confusion.png",
}
THRESHOLD_GRID = np.linspace(0.0, 1.0, 101)
DPI = 110


# ------------------------------------------------------------------------------ reading a run


@dataclass
class RunRecord:
    """What a run folder holds, as far as the report needs it. Optional parts are None."""

    path: Path
    name: str
    config: dict[str, Any]
    env: dict[str, Any]
    steps: list[dict[str, Any]]
    """history.jsonl log-step lines (kind "step")"""
    epochs: list[dict[str, Any]]
    """history.jsonl epoch lines (kind "epoch")"""
    final: dict[str, Any] | None = None
    thresholds: dict[str, Any] | None = None
    """thresholds.json as written (best epoch)"""
    dev_ids: np.ndarray | None = None
    dev_probs: np.ndarray | None = None
    dev_labels: np.ndarray | None = None
    frequency: np.ndarray | None = None
    """per-label frequency in the training split (float64 [28])"""
    frequency_source: str = "unavailable"
    notes: list[str] = field(default_factory=list)

    @property
    def has_dev(self) -> bool:
        return self.thresholds is not None and self.dev_probs is not None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e}).") from None


def _read_history(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}: line {number} is not a JSON object.") from None
            if not isinstance(row, dict) or "kind" not in row:
                raise UserError(f"{path}: line {number} has no 'kind' field.")
            rows.append(row)
    return rows


def _train_frequency(run_dir: Path, config: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """Label frequency over the run's training split (train.csv of its dataset + split.csv)."""
    from fasthpa.data.dataset import read_targets_csv
    from fasthpa.data.splits import read_split_csv

    root = (config.get("data") or {}).get("data") or ""
    csv_path = Path(root) / "train.csv"
    split_path = run_dir / "split.csv"
    if not root or not csv_path.is_file() or not split_path.is_file():
        return None, "unavailable"
    try:
        ids, targets = read_targets_csv(csv_path)
        assignment = read_split_csv(split_path, ids)
    except UserError:
        return None, "unavailable"
    train = targets[assignment == 0]
    if len(train) == 0:
        return None, "unavailable"
    return train.mean(axis=0).astype(np.float64), f"training split ({len(train)} samples)"


def load_run(path: str | Path) -> RunRecord:
    """Read a run folder written by ``fasthpa train``; a UserError names a folder that is not a
    run or has no history yet."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a folder; give a run folder written by `fasthpa train`.")
    history = path / "history.jsonl"
    config = _read_json(path / "config.json")
    if config is None and not history.exists():
        raise UserError(
            f"{path}: not a fasthpa run folder (it has neither config.json nor history.jsonl)."
        )
    if not history.is_file() or history.stat().st_size == 0:
        raise UserError(f"{path}: the run has no history yet (history.jsonl is missing or empty).")
    rows = _read_history(history)
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    if not steps and not epochs:
        raise UserError(f"{history}: no step or epoch lines; the run logged nothing yet.")
    run = RunRecord(
        path=path,
        name=path.resolve().name,
        config=config or {},
        env=_read_json(path / "env.json") or {},
        steps=steps,
        epochs=epochs,
        final=_read_json(path / "final_metrics.json"),
        thresholds=_read_json(path / "thresholds.json"),
    )
    npz = path / "dev_probs.npz"
    if npz.is_file():
        try:
            with np.load(npz, allow_pickle=False) as d:
                run.dev_ids = d["ids"]
                run.dev_probs = d["probs"].astype(np.float64)
                run.dev_labels = d["labels"].astype(np.uint8)
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{npz}: not a readable dev_probs.npz ({e}).") from None
        if run.dev_probs.shape != run.dev_labels.shape or run.dev_probs.shape[1:] != (NUM_LABELS,):
            raise UserError(f"{npz}: probs and labels must both be [N, {NUM_LABELS}].")
    if run.thresholds is None or run.dev_probs is None:
        run.notes.append("no dev evaluation kept yet (thresholds.json or dev_probs.npz missing)")
    run.frequency, run.frequency_source = _train_frequency(path, run.config)
    if run.frequency is None and run.dev_labels is not None:
        run.frequency = run.dev_labels.mean(axis=0).astype(np.float64)
        run.frequency_source = f"dev split ({len(run.dev_labels)} samples; train.csv not found)"
    return run


# ------------------------------------------------------------------------------ numbers


def confusion_counts(probs: Any, labels: Any, thresholds: Any) -> np.ndarray:
    """int64 [L, 4]: TP, FP, FN, TN per label, predicting positive when probs >= threshold.

    ``probs`` [N, L] in [0, 1], ``labels`` [N, L] 0/1, ``thresholds`` one float or [L].
    """
    from fasthpa.thresholds import per_label_metrics

    m = per_label_metrics(probs, labels, thresholds)
    n = np.asarray(probs).shape[0]
    tp, predicted, support = m["tp"], m["predicted"], m["support"]
    fp, fn = predicted - tp, support - tp
    return np.stack([tp, fp, fn, n - tp - fp - fn], axis=1).astype(np.int64)


def precision_recall_at(
    scores: np.ndarray, truth: np.ndarray, grid: np.ndarray = THRESHOLD_GRID
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of one label at each threshold of ``grid`` (positive: score >= t).

    Precision is NaN where nothing is predicted positive, recall NaN when the label has no
    positives: undefined points are left out of the plot rather than drawn as zeros.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    truth = np.asarray(truth).reshape(-1, 1).astype(bool)
    pred = scores >= np.asarray(grid, dtype=np.float64).reshape(1, -1)
    tp = (pred & truth).sum(axis=0).astype(np.float64)
    predicted = pred.sum(axis=0).astype(np.float64)
    support = float(truth.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan) * np.ones_like(tp)
    return precision, recall


def _median_images_per_sec(steps: list[dict[str, Any]]) -> float | None:
    # the first log window holds start-up (first batches, compilation): leave it out when
    # there are later windows to measure
    values = [s["images_per_sec"] for s in steps if "images_per_sec" in s]
    if len(values) > 1:
        values = values[1:]
    return float(statistics.median(values)) if values else None


def summarise_run(run: RunRecord) -> dict[str, Any]:
    """One row of figures for a run: its settings, F1 at 0.5 and tuned, speed and wall time.

    F1 figures come from the best epoch (highest tuned dev macro F1, the one the run kept);
    ``last_*`` from the last evaluated epoch; ``test_*`` from final_metrics.json when present.
    """
    cfg = run.config
    data, model, loss, run_cfg = (cfg.get(k, {}) for k in ("data", "model", "loss", "run"))
    evaluated = [e for e in run.epochs if e.get("dev_macro_f1_tuned") is not None]
    best = max(evaluated, key=lambda e: e["dev_macro_f1_tuned"], default=None)
    last = evaluated[-1] if evaluated else None
    pretrained = run.env.get("pretrained")
    row: dict[str, Any] = {
        "run": run.name,
        "arch": model.get("arch"),
        "image_size": data.get("image_size"),
        "channels": data.get("channels"),
        "head": model.get("head"),
        "freeze_backbone": model.get("freeze_backbone"),
        "loss": loss.get("loss"),
        "batch_size": run_cfg.get("batch_size"),
        "global_batch": run.env.get("global_batch"),
        "lr": (cfg.get("optim") or {}).get("lr"),
        "pretrained": pretrained.get("pretrained") if isinstance(pretrained, dict) else pretrained,
        "device": run.env.get("device"),
        "epochs": len(run.epochs),
        "steps": max((r.get("step", 0) for r in run.steps + run.epochs), default=0),
        "train_loss": run.epochs[-1]["train_loss"] if run.epochs else None,
        "best_epoch": best["epoch"] if best else None,
        "dev_macro_f1_at_0.5": best["dev_macro_f1_at_0.5"] if best else None,
        "dev_macro_f1_tuned": best["dev_macro_f1_tuned"] if best else None,
        "last_dev_macro_f1_at_0.5": last["dev_macro_f1_at_0.5"] if last else None,
        "last_dev_macro_f1_tuned": last["dev_macro_f1_tuned"] if last else None,
        "images_per_sec": _median_images_per_sec(run.steps),
        "wall_s": run.epochs[-1]["elapsed_s"] if run.epochs else None,
    }
    if run.final:
        for k in ("test_macro_f1_at_0.5", "test_macro_f1_tuned"):
            row[k] = run.final.get(k)
    return row


def default_labels(runs: list[RunRecord], count: int = 4) -> list[int]:
    """The two most frequent labels with dev positives and the two rarest: where tuning matters
    least and most."""
    dev = next((r for r in runs if r.dev_labels is not None), None)
    if dev is None:
        return [0, 25]
    pos = dev.dev_labels.sum(axis=0)
    present = [int(i) for i in np.argsort(-pos, kind="stable") if pos[i] > 0]
    if len(present) <= count:
        return present or [0]
    half = count // 2
    return present[:half] + present[-(count - half) :]


# ------------------------------------------------------------------------------ plots


def _figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (10, 4.5)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return atomic_write_bytes(path, buf.getvalue())


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_curves(runs: list[RunRecord], path: Path) -> Path:
    """Training loss (log steps and epoch means) and dev macro F1 (0.5 dashed, tuned solid)."""
    fig, ax = _figure(1, 2)
    loss_ax, f1_ax = ax[0, 0], ax[0, 1]
    for run, color in zip(runs, _colors(len(runs))):
        if run.steps:
            loss_ax.plot(
                [s["step"] for s in run.steps],
                [s["loss"] for s in run.steps],
                color=color,
                alpha=0.35,
                linewidth=1,
            )
        if run.epochs:
            loss_ax.plot(
                [e["step"] for e in run.epochs],
                [e["train_loss"] for e in run.epochs],
                "o-",
                color=color,
                label=f"{run.name} (epoch mean)",
            )
        ev = [e for e in run.epochs if e.get("dev_macro_f1_tuned") is not None]
        if ev:
            x = [e["epoch"] + 1 for e in ev]
            f1_ax.plot(
                x,
                [e["dev_macro_f1_tuned"] for e in ev],
                "o-",
                color=color,
                label=f"{run.name} tuned",
            )
            f1_ax.plot(
                x,
                [e["dev_macro_f1_at_0.5"] for e in ev],
                "s--",
                color=color,
                label=f"{run.name} at 0.5",
            )
    loss_ax.set(xlabel="optimiser step", ylabel="training loss", title="training loss")
    f1_ax.set(xlabel="epoch", ylabel="dev macro F1", title="dev macro F1: tuned vs at 0.5")
    f1_ax.set_ylim(bottom=0)
    for a in (loss_ax, f1_ax):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    return _save(fig, path)


def plot_throughput(runs: list[RunRecord], path: Path) -> Path:
    """images/sec (all devices) and the share of time spent waiting for data, per log step."""
    fig, ax = _figure(1, 2)
    ips_ax, wait_ax = ax[0, 0], ax[0, 1]
    for run, color in zip(runs, _colors(len(runs))):
        steps = [s for s in run.steps if "images_per_sec" in s]
        x = [s["step"] for s in steps]
        ips_ax.plot(
            x, [s["images_per_sec"] for s in steps], "o-", color=color, label=run.name, markersize=3
        )
        wait_ax.plot(
            x,
            [100 * s.get("data_wait_share", 0.0) for s in steps],
            "o-",
            color=color,
            label=run.name,
            markersize=3,
        )
    ips_ax.set(xlabel="optimiser step", ylabel="images/sec", title="training throughput")
    wait_ax.set(xlabel="optimiser step", ylabel="% of time waiting for data", title="data wait")
    ips_ax.set_ylim(bottom=0)
    wait_ax.set_ylim(0, 100)
    for a in (ips_ax, wait_ax):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return _save(fig, path)


def plot_f1_vs_frequency(runs: list[RunRecord], path: Path) -> Path:
    """Per-label dev F1 (tuned: filled, at 0.5: hollow) against training-split label frequency."""
    fig, ax = _figure(1, 1, (10, 6))
    a = ax[0, 0]
    annotated = False
    for run, color in zip(runs, _colors(len(runs))):
        if run.thresholds is None or run.frequency is None:
            continue
        freq = np.asarray(run.frequency, dtype=np.float64)
        tuned = np.asarray(run.thresholds["f1_tuned"], dtype=np.float64)
        at05 = np.asarray(run.thresholds["f1_at_0.5"], dtype=np.float64)
        keep = freq > 0  # a log axis has no place for labels absent from the split
        idx = np.flatnonzero(keep)
        a.scatter(freq[keep], tuned[keep], color=color, label=f"{run.name} tuned", zorder=3)
        a.scatter(
            freq[keep],
            at05[keep],
            facecolors="none",
            edgecolors=color,
            label=f"{run.name} at 0.5",
            zorder=2,
        )
        if not annotated:  # label the first run's points; colours carry the rest
            for i in idx:
                a.annotate(
                    str(i),
                    (freq[i], tuned[i]),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=7,
                )
            annotated = True
    a.set_xscale("log")
    a.set(
        xlabel="label frequency in the training split (log scale)",
        ylabel="dev F1 per label (best epoch)",
        title="per-label F1 against label frequency (points: label index)",
    )
    a.set_ylim(-0.02, 1.02)
    a.grid(alpha=0.3, which="both")
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=8)
    return _save(fig, path)


def plot_f1_gain(runs: list[RunRecord], path: Path) -> Path:
    """Per-label F1 gain (tuned minus at 0.5) on dev, one bar group per label."""
    fig, ax = _figure(1, 1, (12, 4.5))
    a = ax[0, 0]
    with_dev = [r for r in runs if r.thresholds is not None]
    width = 0.8 / max(1, len(with_dev))
    x = np.arange(NUM_LABELS)
    for k, (run, color) in enumerate(zip(with_dev, _colors(len(with_dev)))):
        gain = np.asarray(run.thresholds["f1_tuned"]) - np.asarray(run.thresholds["f1_at_0.5"])
        a.bar(x + (k - (len(with_dev) - 1) / 2) * width, gain, width, color=color, label=run.name)
    a.axhline(0, color="black", linewidth=0.8)
    a.set_xticks(x)
    a.set_xticklabels([str(i) for i in x], fontsize=8)
    a.set(
        xlabel="label index",
        ylabel="F1 tuned - F1 at 0.5",
        title="per-label F1 gain from tuned thresholds (dev, best epoch)",
    )
    a.grid(alpha=0.3, axis="y")
    if with_dev:
        a.legend(fontsize=8)
    return _save(fig, path)


def plot_pr_threshold(runs: list[RunRecord], labels: list[int], path: Path) -> Path:
    """Precision (solid) and recall (dashed) against the threshold for ``labels``; the dotted
    line is each run's tuned threshold."""
    cols = min(len(labels), 2)
    rows = (len(labels) + cols - 1) // cols
    fig, ax = _figure(rows, cols, (10, 3.6 * rows))
    for n, label in enumerate(labels):
        a = ax[n // cols, n % cols]
        for run, color in zip(runs, _colors(len(runs))):
            if not run.has_dev:
                continue
            precision, recall = precision_recall_at(
                run.dev_probs[:, label], run.dev_labels[:, label]
            )
            a.plot(THRESHOLD_GRID, precision, "-", color=color, label=f"{run.name} precision")
            a.plot(THRESHOLD_GRID, recall, "--", color=color, label=f"{run.name} recall")
            a.axvline(run.thresholds["thresholds"][label], color=color, linestyle=":", linewidth=1)
        positives = next((int(r.dev_labels[:, label].sum()) for r in runs if r.has_dev), 0)
        a.set(
            xlabel="threshold",
            ylabel="precision / recall",
            title=f"{label}: {LABEL_NAMES[label]} ({positives} dev positives)",
            xlim=(0, 1),
            ylim=(-0.02, 1.02),
        )
        a.grid(alpha=0.3)
        if n == 0 and a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    for n in range(len(labels), rows * cols):
        ax[n // cols, n % cols].set_visible(False)
    return _save(fig, path)


def plot_confusion(runs: list[RunRecord], path: Path) -> Path:
    """TP / FP / FN / TN per label at the tuned thresholds, one annotated grid per run."""
    with_dev = [r for r in runs if r.has_dev]
    fig, ax = _figure(1, len(with_dev), (4.2 * len(with_dev) + 2, 10))
    for k, run in enumerate(with_dev):
        a = ax[0, k]
        counts = confusion_counts(
            run.dev_probs, run.dev_labels, np.asarray(run.thresholds["thresholds"])
        )
        shade = np.log1p(counts)
        a.imshow(shade, aspect="auto", cmap="Blues")
        dark = shade > 0.6 * max(float(shade.max()), 1e-9)  # white text where the cell is dark
        for i in range(NUM_LABELS):
            for j in range(4):
                a.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark[i, j] else "black",
                )
        a.set_xticks(range(4))
        a.set_xticklabels(["TP", "FP", "FN", "TN"])
        a.set_yticks(range(NUM_LABELS))
        a.set_yticklabels([f"{i} {LABEL_NAMES[i][:18]}" for i in range(NUM_LABELS)], fontsize=7)
        a.set_title(f"{run.name}: dev counts at tuned thresholds", fontsize=9)
    return _save(fig, path)


# ------------------------------------------------------------------------------ report.md


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


SUMMARY_COLUMNS = [
    ("run", "run"),
    ("arch", "arch"),
    ("image_size", "px"),
    ("channels", "channels"),
    ("head", "head"),
    ("freeze_backbone", "frozen"),
    ("loss", "loss"),
    ("global_batch", "global batch"),
    ("pretrained", "pretrained"),
    ("epochs", "epochs"),
    ("best_epoch", "best epoch"),
    ("dev_macro_f1_at_0.5", "dev F1 @0.5"),
    ("dev_macro_f1_tuned", "dev F1 tuned"),
    ("test_macro_f1_at_0.5", "test F1 @0.5"),
    ("test_macro_f1_tuned", "test F1 tuned"),
    ("images_per_sec", "img/s (median)"),
    ("wall_s", "train s"),
    ("device", "device"),
]


@dataclass
class ReportResult:
    out: Path
    report: Path
    plots: dict[str, Path]
    summaries: list[dict[str, Any]]


def _unique_names(runs: list[RunRecord]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        base = run.name
        if base in seen:
            seen[base] += 1
            run.name = f"{base}#{seen[base]}"
        else:
            seen[base] = 1


def write_report(
    run_dirs: list[str | Path], out: str | Path, labels: list[int] | None = None
) -> ReportResult:
    """Render the plots and report.md for ``run_dirs`` into ``out``; returns the paths written.

    ``labels``: label indices for the precision/recall plot (default: see ``default_labels``).
    """
    runs = [load_run(p) for p in run_dirs]
    _unique_names(runs)
    out = Path(out)
    make_dir(out)
    labels = labels if labels else default_labels(runs)
    plots: dict[str, Path] = {
        "curves": plot_curves(runs, out / PLOTS["curves"]),
        "throughput": plot_throughput(runs, out / PLOTS["throughput"]),
    }
    with_dev = [r for r in runs if r.has_dev]
    if with_dev:
        plots["f1_vs_frequency"] = plot_f1_vs_frequency(runs, out / PLOTS["f1_vs_frequency"])
        plots["f1_gain"] = plot_f1_gain(runs, out / PLOTS["f1_gain"])
        plots["pr_threshold"] = plot_pr_threshold(runs, labels, out / PLOTS["pr_threshold"])
        plots["confusion"] = plot_confusion(runs, out / PLOTS["confusion"])
    summaries = [summarise_run(r) for r in runs]
    md = _markdown(runs, summaries, plots, labels, out)
    report = atomic_write_text(out / "report.md", md)
    return ReportResult(out=out, report=report, plots=plots, summaries=summaries)


def _markdown(runs, summaries, plots, labels, out: Path) -> str:
    from fasthpa import __version__

    now = _dt.datetime.now().isoformat(timespec="seconds")
    parts = [
        "# fasthpa report",
        "",
        f"{len(runs)} run(s), written {now} by fasthpa {__version__}. Runs: "
        + ", ".join(f"`{r.name}` ({r.path})" for r in runs)
        + ".",
        "",
        "## Runs",
        "",
        _table(
            [title for _, title in SUMMARY_COLUMNS],
            [[s.get(k) for k, _ in SUMMARY_COLUMNS] for s in summaries],
        ),
        "",
        "Dev F1 figures are from the best epoch (highest tuned macro F1); test figures use the "
        "thresholds fitted on dev. img/s: median over log steps after the first (start-up).",
        "",
        "## Training loss and dev macro F1 per epoch",
        "",
        f"![training loss and dev F1]({plots['curves'].name})",
        "",
        "## Throughput over the run",
        "",
        f"![images/sec and data wait]({plots['throughput'].name})",
        "",
    ]
    for run in runs:
        for note in run.notes:
            parts += [f"- `{run.name}`: {note}", ""]
    if "f1_vs_frequency" not in plots:
        parts += ["No run has a dev evaluation yet: the per-label plots need one.", ""]
        return "\n".join(parts)
    sources = "; ".join(f"`{r.name}`: {r.frequency_source}" for r in runs)
    parts += [
        "## Per-label F1 against label frequency",
        "",
        f"Frequency from {sources}. Labels absent from the split are left off the log axis.",
        "",
        f"![per-label F1 against label frequency]({plots['f1_vs_frequency'].name})",
        "",
        "## Per-label F1 gain from tuned thresholds",
        "",
        f"![per-label F1 gain]({plots['f1_gain'].name})",
        "",
        "## Precision and recall against the threshold",
        "",
        "Labels: " + ", ".join(f"{i} ({LABEL_NAMES[i]})" for i in labels) + ". Dotted lines: "
        "each run's tuned threshold.",
        "",
        f"![precision and recall against threshold]({plots['pr_threshold'].name})",
        "",
        "## Confusion counts per label at the tuned thresholds (dev, best epoch)",
        "",
        f"![confusion counts]({plots['confusion'].name})",
        "",
    ]
    for run in runs:
        if run.has_dev:
            parts += [f"### `{run.name}`", "", _per_label_table(run), ""]
    return "\n".join(parts)


PER_LABEL_COLUMNS = ["label", "name", "train freq", "threshold", "TP", "FP", "FN", "TN"]


def _per_label_table(run) -> str:
    """Threshold, confusion counts and F1 before and after tuning of every label (dev)."""
    thr = np.asarray(run.thresholds["thresholds"])
    counts = confusion_counts(run.dev_probs, run.dev_labels, thr)
    f05, ft = run.thresholds["f1_at_0.5"], run.thresholds["f1_tuned"]
    freq = run.frequency if run.frequency is not None else [None] * NUM_LABELS
    rows = [
        [i, LABEL_NAMES[i], None if freq[i] is None else float(freq[i]), float(thr[i])]
        + [*counts[i].tolist(), f05[i], ft[i]]
        for i in range(NUM_LABELS)
    ]
    return _table([*PER_LABEL_COLUMNS, "F1 @0.5", "F1 tuned"], rows)


# ------------------------------------------------------------------------------ command line


def parse_labels(text: str | None) -> list[int] | None:
    """'0,25,8' -> [0, 25, 8]; a UserError names --labels for anything else."""
    if text is None or not text.strip():
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"--labels {text!r}: expected comma-separated label indices, e.g. 0,25."
        ) from None
    bad = [v for v in values if not 0 <= v < NUM_LABELS]
    if bad:
        raise UserError(f"--labels {text!r}: label {bad[0]} is outside 0-{NUM_LABELS - 1}.")
    return list(dict.fromkeys(values))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folder(s) from `fasthpa train`"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: RUN_DIR/report for one run; required for several)",
    )
    parser.add_argument(
        "--labels",
        default=None,
        help="label indices for the precision/recall plot, e.g. 0,25,8 (default: the two most "
        "frequent and the two rarest labels with dev positives)",
    )


def run(args: argparse.Namespace) -> int:
    labels = parse_labels(args.labels)
    if args.out is None and len(args.runs) > 1:
        raise UserError("--out is required when the report covers several runs.")
    out = Path(args.out) if args.out else Path(args.runs[0]) / "report"
    result = write_report(args.runs, out, labels)
    print(f"wrote {result.report} and {len(result.plots)} plots to {result.out}")
    return 0
