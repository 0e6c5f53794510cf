"""Out-of-fold probabilities of a cross-validation folder, the thresholds they fit, a summary.

    summary = collect_oof(Path("cv/hpa"))   # writes oof_probs.npz, thresholds.json, cv_summary.json

Each fold run's ``dev_probs.npz`` (its best epoch, on the fold it did not train on) gives the
probabilities of its rows; together they cover every train row exactly once. The folds must be
runs of one experiment: the same data, image size, stains and architecture.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from fasthpa.config import load_config
from fasthpa.cv.manifest import read_fold_dirs
from fasthpa.data.dataset import read_targets_csv
from fasthpa.errors import UserError
from fasthpa.io import atomic_write_bytes, atomic_write_json
from fasthpa.thresholds import per_label_metrics, write_thresholds_json
from fasthpa.thresholds.rules import decode, fit_configured

SAME = (("data", "data"), ("data", "image_size"), ("data", "channels"), ("model", "arch"))


def collect_oof(cv_dir: Path) -> dict[str, Any]:
    """Assemble, fit, write and print (see the module docstring); returns cv_summary.json."""
    cv_dir = Path(cv_dir)
    folds = read_fold_dirs(cv_dir)
    _check_same_experiment(folds)
    ids, probs, labels, per_fold = _gather(folds)
    cfg = load_config(folds[0] / "config.json")
    result, record = fit_configured(
        probs, labels, cfg.run.threshold_rule, labels.mean(0), cfg.run.seed, cfg.run.lpr_tolerance
    )
    oof_path = cv_dir / "oof_probs.npz"
    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray(ids), probs=probs, labels=labels.astype(np.uint8))
    atomic_write_bytes(oof_path, buf.getvalue())
    extra = {"fitted_on": str(oof_path), "rule": record}
    write_thresholds_json(cv_dir / "thresholds.json", result, extra)
    tuned = per_label_metrics(probs, labels, result.thresholds)
    predicted = decode(probs, result.thresholds).sum(1)
    summary = {
        "folds": per_fold,
        "oof_samples": len(ids),
        "oof_macro_f1_at_0.5": float(per_label_metrics(probs, labels, 0.5)["macro_f1"]),
        "oof_macro_f1_tuned": float(tuned["macro_f1"]),
        "threshold_rule": record["rule"],
        "threshold_rule_crossfit_macro_f1": record.get("cv_macro_f1"),
        "labels_per_row_predicted": float(predicted.mean()),
        "labels_per_row_true": float(labels.sum(1).mean()),
        "oof_per_label_f1": np.asarray(tuned["f1"]).round(6).tolist(),
    }
    atomic_write_json(cv_dir / "cv_summary.json", summary)
    _print(summary, cv_dir)
    return summary


def _check_same_experiment(folds: list[Path]) -> None:
    first = load_config(folds[0] / "config.json").to_dict()
    for fold in folds[1:]:
        cfg = load_config(fold / "config.json").to_dict()
        for section, name in SAME:
            if cfg[section][name] != first[section][name]:
                raise UserError(
                    f"{fold}: trained with --{name.replace('_', '-')} {cfg[section][name]!r} but "
                    f"{folds[0].name} with {first[section][name]!r}; the folds of one "
                    f"cross-validation must be one experiment."
                )


def _gather(folds: list[Path]):
    """(ids, probs, labels, per-fold rows) over the folds in train.csv order, each train row
    exactly once."""
    ids, probs, labels, per_fold = [], [], [], []
    for k, fold in enumerate(folds):
        path = fold / "dev_probs.npz"
        if not path.is_file():
            raise UserError(f"{path}: not found; fold {k} has not finished a dev evaluation.")
        with np.load(path, allow_pickle=False) as z:
            ids += [str(i) for i in z["ids"]]
            probs.append(z["probs"].astype(np.float32))
            labels.append(z["labels"].astype(np.uint8))
        final = fold / "final_metrics.json"
        best = (
            json.loads(final.read_text()).get("best_dev_macro_f1_tuned")
            if final.is_file()
            else None
        )
        per_fold.append(
            {
                "fold": k,
                "run": fold.name,
                "dev_rows": len(probs[-1]),
                "best_dev_macro_f1_tuned": best,
            }
        )
    train_ids, _ = read_targets_csv(
        Path(load_config(folds[0] / "config.json").data.data) / "train.csv"
    )
    where = {sample_id: i for i, sample_id in enumerate(train_ids)}
    if len(set(ids)) != len(ids) or set(ids) != set(train_ids):
        raise UserError(
            f"{folds[0].parent}: the folds' dev parts do not cover train.csv exactly once "
            f"({len(ids)} rows, {len(set(ids))} distinct, train.csv has {len(train_ids)})."
        )
    order = np.argsort([where[i] for i in ids], kind="stable")
    probs_all, labels_all = np.concatenate(probs)[order], np.concatenate(labels)[order]
    return [ids[i] for i in order], probs_all, labels_all, per_fold


def _print(summary: dict[str, Any], cv_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"cross-validation {cv_dir} ({len(summary['folds'])} folds)")
    for c in ("fold", "dev rows", "best dev F1 (tuned)"):
        t.add_column(c, justify="right")
    for f in summary["folds"]:
        best = f["best_dev_macro_f1_tuned"]
        t.add_row(str(f["fold"]), str(f["dev_rows"]), "-" if best is None else f"{best:.4f}")
    Console().print(t)
    print(
        f"out of fold ({summary['oof_samples']} rows): macro F1 {summary['oof_macro_f1_at_0.5']:.4f}"
        f" at 0.5, {summary['oof_macro_f1_tuned']:.4f} with thresholds fitted on them (rule "
        f"{summary['threshold_rule']}); "
        f"labels per row {summary['labels_per_row_predicted']:.2f} predicted, "
        f"{summary['labels_per_row_true']:.2f} true; wrote {cv_dir / 'thresholds.json'}"
    )
