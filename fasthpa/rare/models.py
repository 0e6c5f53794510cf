"""Training the rare-label models of a run and comparing them with the run's own predictions."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fasthpa.config import TrainConfig, load_config
from fasthpa.data.dataset import read_targets_csv
from fasthpa.data.splits import SPLIT_NAMES, read_split_csv
from fasthpa.errors import UserError
from fasthpa.io import atomic_write_json
from fasthpa.labels import LABEL_NAMES
from fasthpa.thresholds import load_thresholds, per_label_metrics
from fasthpa.train import train
from fasthpa.train.build import enriched_negatives

COPIED = ("split.csv", "channel_stats.json")


def rare_labels(run_dir: Path, below: float) -> list[int]:
    """Labels with positives in the run's training part but a frequency there under ``below``."""
    freq = training_targets(run_dir, load_config(run_dir / "config.json")).mean(axis=0)
    return [int(i) for i in np.flatnonzero((freq > 0) & (freq < below))]


def training_targets(run_dir: Path, cfg: TrainConfig) -> np.ndarray:
    """The multi-hot targets of the run's training part."""
    ids, targets = read_targets_csv(Path(cfg.data.data) / "train.csv")
    return targets[read_split_csv(run_dir / "split.csv", ids) == SPLIT_NAMES.index("train")]


def rare_config(
    main: TrainConfig,
    run_dir: Path,
    label: int,
    share: float,
    epochs: int,
    overrides: dict[str, dict[str, Any]],
    train_rows: int,
) -> TrainConfig:
    """The config of one rare-label model: the main run's, for one label, fine-tuned."""
    out = run_dir / "rare" / f"label{label:02d}"
    data = dataclasses.replace(
        main.data,
        labels=str(label),
        positive_share=share,
        balance=0.0,
        fold=None,
        split=str(out / "split.csv"),
    )
    model = dataclasses.replace(main.model, init_from=str(run_dir / "best.pt"), pretrained="none")
    # the network fine-tunes on the enriched subsample (positives make ``share`` of it); a main
    # run that refits gets the same refit here, on the whole training part at the label's real
    # rate (fasthpa.train.refit), with its location features and threshold rule. Without a
    # refit the threshold is the exact cut on the dev part: a rule on the enriched subsample
    # would put it at the share rather than the real rate
    refit = main.run.refit_heads
    run = dataclasses.replace(
        main.run,
        out=str(out),
        epochs=epochs,
        resume=None,
        max_steps=None,
        batch_size=min(main.run.batch_size, batch_for(train_rows)),
        refit_heads=refit,
        location_features=refit and main.run.location_features,
        threshold_rule=main.run.threshold_rule if refit else "exact",
    )
    cfg = dataclasses.replace(main, data=data, model=model, run=run)
    values = cfg.to_dict()
    for section, fields in overrides.items():
        values[section].update(fields)
    return TrainConfig.from_dict(values)


def batch_for(rows: int) -> int:
    """The largest power of two giving at least two batches of ``rows`` (a rare label's
    subsample can hold fewer rows than the main run's batch)."""
    return 1 << max(0, (max(2, rows) // 2).bit_length() - 1)


def subsample_rows(targets: np.ndarray, label: int, share: float) -> int:
    """How many training rows the rare-label model of ``label`` gets from a training part with
    these ``targets`` (the trainer's enrichment: every positive, negatives up to the share)."""
    pos = int(targets[:, label].sum())
    return pos + enriched_negatives(pos, len(targets) - pos, share)


def train_rare_models(
    run_dir: str | Path,
    below: float = 0.05,
    share: float = 0.2,
    epochs: int = 2,
    labels: list[int] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the rare-label models of ``run_dir``; write and return the summary."""
    run_dir = Path(run_dir)
    for name in ("config.json", "best.pt", "split.csv", "channel_stats.json", "dev_probs.npz"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir / name}: not found; --run must be a finished run folder.")
    main = load_config(run_dir / "config.json")
    if main.data.labels is not None:
        raise UserError(f"--run {run_dir}: a model of some labels only; give the main run.")
    chosen = labels if labels is not None else rare_labels(run_dir, below)
    if not chosen:
        raise UserError(f"--run {run_dir}: no label is rarer than --below {below} there.")
    targets = training_targets(run_dir, main)
    for label in chosen:
        rows = subsample_rows(targets, label, share)
        cfg = rare_config(main, run_dir, label, share, epochs, overrides or {}, rows)
        out = Path(cfg.run.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in COPIED:  # the run's split and normalisation, so predict shares its loader
            if not (out / name).is_file():
                shutil.copyfile(run_dir / name, out / name)
        print(f"rare-label model for {label} ({LABEL_NAMES[label]}) -> {out}", flush=True)
        if train(cfg).status != "finished":
            return {"status": "stopped"}
    summary = {"status": "finished", "labels": [_dev_comparison(run_dir, lab) for lab in chosen]}
    if (read_split_csv(run_dir / "split.csv", _train_ids(main)) == SPLIT_NAMES.index("test")).any():
        summary["test_part"] = _test_comparison(run_dir, main, chosen, overrides or {})
    atomic_write_json(run_dir / "rare" / "summary.json", summary)
    _print(summary)
    return summary


def _train_ids(cfg: TrainConfig) -> list[str]:
    return read_targets_csv(Path(cfg.data.data) / "train.csv")[0]


def _test_comparison(run_dir: Path, main: TrainConfig, labels: list[int], overrides) -> dict:
    """The run's test part predicted with and without the rare-label models: per-label F1 of
    the rare labels and the macro F1 over all 28 (submission rule: at least one label)."""
    from fasthpa.predict import predict

    data = overrides.get("data", {})
    kw = {
        "split": "train",
        "part": "test",
        "workers": data.get("workers"),
        "loader": data.get("loader", "auto"),
    }
    out = {}
    for name, rare in (("with", True), ("without", False)):
        path = run_dir / "rare" / f"test_part_{name}_rare_models.csv"
        result = predict(run_dir, main.data.data, out=path, rare=rare, **kw)
        m = per_label_metrics(result.predicted.astype(np.float32), result.labels, 0.5)
        out[name] = {
            "macro_f1": m["macro_f1"],
            "per_label_f1": {int(i): float(m["f1"][i]) for i in labels},
        }
    return out


def _print(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    test = summary.get("test_part", {})
    t = Table(title="rare-label models: F1 per label, main model vs its own")
    for c in ("label", "name", "dev pos", "dev main", "dev own", "test without", "test with"):
        t.add_column(c, justify="right")
    for row in summary["labels"]:
        lab = row["label"]
        cells = [test.get(k, {}).get("per_label_f1", {}).get(lab) for k in ("without", "with")]
        t.add_row(
            str(lab),
            row["name"],
            str(row["dev_positives"]),
            f"{row['dev_f1_main']:.3f}",
            f"{row['dev_f1_rare_model']:.3f}",
            *("-" if c is None else f"{c:.3f}" for c in cells),
        )
    Console().print(t)
    if test:
        without, with_ = test["without"]["macro_f1"], test["with"]["macro_f1"]
        print(
            f"test part macro F1: {without:.4f} without the rare-label models, "
            f"{with_:.4f} with them"
        )
        if with_ < without:
            print(
                "note: the test part scored lower with them; `fasthpa predict` uses them unless "
                "given --no-rare (README: on held-out synthetic sets they have cost F1 so far)"
            )


def _dev_comparison(run_dir: Path, label: int) -> dict[str, Any]:
    """One label's dev F1 from the main model and from its rare-label model (same dev rows)."""
    rare_dir = run_dir / "rare" / f"label{label:02d}"
    with np.load(run_dir / "dev_probs.npz") as z:
        main_ids, main_probs, main_labels = list(z["ids"]), z["probs"], z["labels"]
    with np.load(rare_dir / "dev_probs.npz") as z:
        rare_ids, rare_probs = list(z["ids"]), z["probs"][:, 0]
    where = {i: k for k, i in enumerate(rare_ids)}
    rare_probs = rare_probs[[where[i] for i in main_ids]]
    truth = main_labels[:, label : label + 1]
    main_thr = load_thresholds(run_dir / "thresholds.json")[label]
    rare_thr = load_thresholds(rare_dir / "thresholds.json", 1)[0]
    main_f1 = per_label_metrics(main_probs[:, label : label + 1], truth, main_thr)["f1"][0]
    rare_f1 = per_label_metrics(rare_probs[:, None], truth, rare_thr)["f1"][0]
    return {
        "label": label,
        "name": LABEL_NAMES[label],
        "dev_positives": int(truth.sum()),
        "dev_f1_main": float(main_f1),
        "dev_f1_rare_model": float(rare_f1),
    }
