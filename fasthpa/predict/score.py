"""Score a submission against a known truth (a synthetic test set's ``test_labels.csv``, or a
held-out part of train.csv), the way the Kaggle leaderboard did: macro F1 over the 28 labels.

    s = score_submission("submission.csv", "data/synth/test_labels.csv")
    s["macro_f1"], s["rare_macro_f1"], s["labels_per_row"], s["labels_per_row_true"]
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from fasthpa.data.dataset import read_targets_csv
from fasthpa.errors import UserError
from fasthpa.labels import NUM_LABELS
from fasthpa.thresholds import per_label_metrics

RAREST = (8, 9, 10, 15, 17, 20, 24, 26, 27)
"""the nine labels under 1.1% of the Kaggle train set (../shared/reference/hpa.md)"""


def read_submission(path: str | os.PathLike, ids: list[str]) -> np.ndarray:
    """uint8 [N, 28] multi-hot of a Kaggle ``Id,Predicted`` file, rows in ``ids`` order; every
    Id must be there once (a UserError naming the file otherwise)."""
    path = Path(path)
    index = {sample_id: i for i, sample_id in enumerate(ids)}
    pred = np.zeros((len(ids), NUM_LABELS), dtype=np.uint8)
    seen = set()
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            sample_id = row.get("Id")
            if sample_id not in index or sample_id in seen:
                raise UserError(f"{path}: line {line}: Id {sample_id!r} unknown or repeated.")
            seen.add(sample_id)
            for label in (row.get("Predicted") or "").split():
                pred[index[sample_id], int(label)] = 1
    if len(seen) != len(ids):
        raise UserError(f"{path}: {len(ids) - len(seen)} Id(s) of the truth are missing.")
    return pred


def score_submission(submission: str | os.PathLike, truth: str | os.PathLike) -> dict[str, Any]:
    """Macro F1 of ``submission`` against ``truth`` (an ``Id,Target`` file), the mean F1 of the
    nine rarest labels, and labels per row predicted and true."""
    ids, labels = read_targets_csv(truth)
    pred = read_submission(submission, ids)
    m = per_label_metrics(pred.astype(np.float32), labels, 0.5)
    return {
        "samples": len(ids),
        "macro_f1": m["macro_f1"],
        "rare_macro_f1": float(np.mean([m["f1"][i] for i in RAREST])),
        "per_label_f1": np.asarray(m["f1"]).round(6).tolist(),
        "labels_per_row": float(pred.sum(1).mean()),
        "labels_per_row_true": float(labels.sum(1).mean()),
    }
