"""Multi-label stratified splits: train/dev/test fractions or K folds, seeded, written to CSV.

Stratification uses the `iterative-stratification` package (Sechidis et al.'s algorithm), the
same one the top HPA teams used, so rare labels are spread over every part.
The split file (``split.csv``: Id,split) lets a run be reproduced and audited.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from fasthpa.errors import UserError
from fasthpa.io import atomic_write_text

SPLIT_NAMES = ("train", "dev", "test")


def parse_fractions(text: str) -> tuple[float, float, float]:
    """Parse '0.9,0.05,0.05' (train,dev,test); the test part may be omitted (then 0)."""
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(
            f"--split {text!r}: expected fractions like 0.9,0.05,0.05 or a CSV file."
        ) from None
    if len(parts) == 2:
        parts.append(0.0)
    if (
        len(parts) != 3
        or any(p < 0 for p in parts)
        or abs(sum(parts) - 1.0) > 1e-6
        or parts[0] <= 0
    ):
        raise UserError(
            f"--split {text!r}: need train,dev[,test] fractions >= 0 that sum to 1 with train > 0."
        )
    return parts[0], parts[1], parts[2]


def stratified_split(
    targets: np.ndarray, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05), seed: int = 0
) -> np.ndarray:
    """Assign each row to train (0), dev (1) or test (2), stratified over all labels.

    Deterministic for a seed. Returns an int8 array [N].
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    n = len(targets)
    train_f, dev_f, test_f = fractions
    assignment = np.zeros(n, dtype=np.int8)
    holdout_f = dev_f + test_f
    if holdout_f <= 0 or n < 2:
        return assignment
    x = np.zeros((n, 1))
    y = np.asarray(targets, dtype=np.int64)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=holdout_f, random_state=seed)
    _, holdout = next(splitter.split(x, y))
    if test_f <= 0:
        assignment[holdout] = 1
        return assignment
    if dev_f <= 0:
        assignment[holdout] = 2
        return assignment
    inner = MultilabelStratifiedShuffleSplit(
        n_splits=1, test_size=test_f / holdout_f, random_state=seed + 1
    )
    dev_local, test_local = next(inner.split(x[holdout], y[holdout]))
    assignment[holdout[dev_local]] = 1
    assignment[holdout[test_local]] = 2
    return assignment


def kfold_assignment(targets: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """The fold (0..n_folds-1) of each row under a multi-label stratified K-fold. int8 [N]."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    if n_folds < 2:
        raise UserError(f"--fold: need at least 2 folds, got {n_folds}.")
    if n_folds > len(targets):
        raise UserError(f"--fold: {n_folds} folds for only {len(targets)} samples.")
    folds = np.full(len(targets), -1, dtype=np.int8)
    kf = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(kf.split(np.zeros((len(targets), 1)), np.asarray(targets))):
        folds[held] = k
    return folds


def fold_split(targets: np.ndarray, fold: int, n_folds: int, seed: int = 0) -> np.ndarray:
    """Train (0) / dev (1) assignment for fold ``fold`` of ``n_folds``: that fold is the dev set."""
    if not 0 <= fold < n_folds:
        raise UserError(f"--fold {fold}: must be in 0..{n_folds - 1}.")
    folds = kfold_assignment(targets, n_folds, seed)
    return np.where(folds == fold, 1, 0).astype(np.int8)


def write_split_csv(path: str | os.PathLike, ids: list[str], assignment: np.ndarray) -> Path:
    """Write ``Id,split`` (split in train/dev/test) atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Id", "split"])
    for sample_id, a in zip(ids, assignment):
        w.writerow([sample_id, SPLIT_NAMES[int(a)]])
    return atomic_write_text(path, buf.getvalue())


def read_split_csv(path: str | os.PathLike, ids: list[str]) -> np.ndarray:
    """Read a split file back into an assignment aligned with ``ids`` (every Id must appear once)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: split file not found.")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or [h.strip() for h in rows[0][:2]] != ["Id", "split"]:
        raise UserError(f"{path}: line 1: expected the header Id,split.")
    index = {sample_id: i for i, sample_id in enumerate(ids)}
    assignment = np.full(len(ids), -1, dtype=np.int8)
    for offset, row in enumerate(rows[1:]):
        line = offset + 2
        if not row:
            continue
        if len(row) < 2 or row[1].strip() not in SPLIT_NAMES:
            raise UserError(f"{path}: line {line}: expected Id,train|dev|test.")
        sample_id = row[0].strip()
        if sample_id not in index:
            raise UserError(f"{path}: line {line}: Id {sample_id} is not in the dataset.")
        if assignment[index[sample_id]] != -1:
            raise UserError(f"{path}: line {line}: duplicate Id {sample_id}.")
        assignment[index[sample_id]] = SPLIT_NAMES.index(row[1].strip())
    missing = int((assignment == -1).sum())
    if missing:
        first = ids[int(np.argmax(assignment == -1))]
        raise UserError(
            f"{path}: {missing} dataset Id(s) are not in the split file (first: {first})."
        )
    return assignment
