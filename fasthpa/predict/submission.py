"""The submission: labels from probabilities, the Kaggle CSV and its probabilities beside it.

- ``OUT`` (the submission): header ``Id,Predicted``, one row per Id of the ids file in that
  file's order, Predicted = the label indices with probability >= threshold, space-separated and
  ascending. With ``at_least_one`` a row with no such label gets its arg-max label; without it
  the cell is empty. The file is read back and checked against the ids file after writing.
- ``<OUT stem>_probs.npz``: ``ids`` [N] str, ``probs`` [N, 28] float32 (exact, unlike a rounded
  CSV), ``thresholds`` [28] float64, and for labelled rows also ``labels`` [N, 28] uint8, so
  ``fasthpa thresholds --probs`` reads it like a run's dev_probs.npz.
Both are written atomically, the probabilities first.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasthpa.errors import UserError
from fasthpa.io import atomic_write_bytes, atomic_write_text
from fasthpa.labels import NUM_LABELS
from fasthpa.thresholds import apply_thresholds


def assign_labels(probs: np.ndarray, thresholds: np.ndarray, at_least_one: bool) -> np.ndarray:
    """bool [N, L]: label l predicted when probs[:, l] >= thresholds[l] (decided exactly as the
    threshold fit decided it: fasthpa.thresholds.apply_thresholds); with ``at_least_one`` a row
    with none gets its arg-max (the first on ties)."""
    probs = np.asarray(probs)
    predicted = np.array(apply_thresholds(probs, thresholds), dtype=bool)
    if at_least_one and len(probs):
        empty = ~predicted.any(axis=1)
        predicted[empty, probs[empty].argmax(axis=1)] = True
    return predicted


def format_labels(row: np.ndarray) -> str:
    """A bool [L] row as Kaggle's Predicted cell: ascending indices, space-separated."""
    return " ".join(str(i) for i in np.flatnonzero(row))


def validate_submission(path: str | os.PathLike, ids: Sequence[str], at_least_one: bool) -> None:
    """Check a written submission against the expected Ids: header Id,Predicted, every Id once
    in order, labels ascending integers in 0-27, and none empty when ``at_least_one``.

    Raises UserError naming the file and the first bad line.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["Id", "Predicted"]:
        raise UserError(f"{path}: line 1: expected the header Id,Predicted.")
    body = rows[1:]
    if len(body) != len(ids):
        raise UserError(f"{path}: {len(body)} data rows where the ids file has {len(ids)}.")
    for offset, (row, expected) in enumerate(zip(body, ids)):
        line = offset + 2
        if len(row) != 2 or row[0] != expected:
            raise UserError(f"{path}: line {line}: expected Id {expected}, found {row[:1]}.")
        tokens = row[1].split(" ") if row[1] else []
        try:
            labels = [int(t) for t in tokens]
        except ValueError:
            raise UserError(f"{path}: line {line}: Predicted {row[1]!r} is not integers.") from None
        if any(not 0 <= lab < NUM_LABELS for lab in labels) or labels != sorted(set(labels)):
            raise UserError(
                f"{path}: line {line}: Predicted {row[1]!r} is not ascending labels in "
                f"0-{NUM_LABELS - 1}."
            )
        if at_least_one and not labels:
            raise UserError(f"{path}: line {line}: no label although --at-least-one is on.")


@dataclass
class PredictResult:
    """What ``predict`` returns on rank 0."""

    ids: list[str]
    """the Ids, in the ids file's order (the submission's order)"""
    probs: np.ndarray
    """float32 [N, 28]: TTA-averaged probabilities"""
    predicted: np.ndarray
    """bool [N, 28]: the submitted labels"""
    thresholds: np.ndarray
    """float64 [28]"""
    labels: np.ndarray | None
    """uint8 [N, 28] for --split train, else None"""
    submission_path: Path
    probs_path: Path
    images_per_sec: float
    """images (not views) per second over all ranks, model and loader together"""


def probs_path_for(out: str | os.PathLike) -> Path:
    """Where the probabilities of submission ``out`` go: ``<out stem>_probs.npz`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + "_probs.npz")


def write_outputs(result: PredictResult) -> None:
    """Write the submission CSV and the probabilities .npz atomically."""
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["Id", "Predicted"])
    for sample_id, row in zip(result.ids, result.predicted):
        w.writerow([sample_id, format_labels(row)])
    arrays = {
        "ids": np.asarray(result.ids),
        "probs": result.probs.astype(np.float32),
        "thresholds": np.asarray(result.thresholds, dtype=np.float64),
    }
    if result.labels is not None:
        arrays["labels"] = result.labels.astype(np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    # probabilities first: a submission on disk always has its probabilities beside it
    atomic_write_bytes(result.probs_path, buf.getvalue())
    atomic_write_text(result.submission_path, text.getvalue())
