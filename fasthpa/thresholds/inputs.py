"""Reading the ``fasthpa thresholds`` command's input files: probabilities and labels.

PROBS: a run's dev_probs.npz, an [N, 28] .npy, or a CSV of Id plus 28 columns; LABELS: a
train.csv-style Id,Target file matched by Id, or an [N, 28] multi-hot .npy/.npz. Every problem is
a UserError naming the file and row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fasthpa.errors import UserError
from fasthpa.labels import NUM_LABELS


@dataclass
class Table:
    """Rows read from a file: optional Ids and an [N, L] array."""

    ids: list[str] | None
    values: np.ndarray
    path: Path
    first_line: int | None = None
    """For a text file: the line number of the first row (names rows by line, not index)."""

    def row(self, i: int) -> str:
        """How to name row ``i`` in a message."""
        where = f"line {i + self.first_line}" if self.first_line else f"row {i}"
        return where + (f" (Id {self.ids[i]})" if self.ids is not None else "")


def _load_npz(path: Path, key: str) -> tuple[list[str] | None, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            ids = [str(i) for i in z["ids"]] if "ids" in z.files else None
            values = z[key] if key in z.files else None
    except ValueError as e:
        raise UserError(f"{path} cannot be read without pickle ({e}); save ids as str.") from None
    except (OSError, KeyError, EOFError) as e:
        raise UserError(f"{path} is not a readable .npz file ({e}).") from None
    return ids, values


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path} is not a readable .npy array ({e}).") from None


def read_probs(path: Path, n_labels: int) -> tuple[Table, Table | None]:
    """PROBS as a table, plus the labels stored beside them in a dev_probs.npz (if any)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserError(f"--probs file not found: {path}")
    labels = None
    if suffix == ".npz":
        ids, probs = _load_npz(path, "probs")
        if probs is None:
            raise UserError(f"--probs {path} has no 'probs' array.")
        _, y = _load_npz(path, "labels")
        if y is not None:
            labels = Table(ids, y, path)
        table = Table(ids, probs, path)
    elif suffix == ".npy":
        table = Table(None, _load_npy(path), path)
    elif suffix == ".csv":
        table = _read_probs_csv(path, n_labels)
    else:
        raise UserError(f"--probs {path} must be a .npz, .npy or .csv file.")
    _check_probs(table, n_labels)
    return table, labels


def _read_probs_csv(path: Path, n_labels: int) -> Table:
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype={"Id": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise UserError(f"--probs {path} is not a readable CSV ({e}).") from None
    if "Id" not in df.columns or len(df.columns) != n_labels + 1:
        raise UserError(
            f"--probs {path} needs a header 'Id' plus {n_labels} probability columns, "
            f"got {len(df.columns)} columns."
        )
    cols = [c for c in df.columns if c != "Id"]
    # columns named 0..L-1 (in any order) are put in label order; other names are taken in order
    if all(str(c).strip().isdigit() for c in cols):
        idx = [int(c) for c in cols]
        if sorted(idx) != list(range(n_labels)):
            raise UserError(f"--probs {path} numbered columns must be 0..{n_labels - 1}.")
        cols = [cols[idx.index(i)] for i in range(n_labels)]
    values = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.argwhere(np.isnan(values))
    if len(bad):
        r, c = bad[0]
        raise UserError(
            f"--probs {path} line {r + 2} (Id {df['Id'].iloc[r]}) column {cols[c]!r} "
            f"is not a number."
        )
    return Table([str(i) for i in df["Id"]], values, path, first_line=2)


def _check_probs(table: Table, n_labels: int) -> None:
    p, path = table.values, table.path
    if p.ndim != 2 or p.shape[1] != n_labels or p.shape[0] == 0:
        raise UserError(f"--probs {path} must hold an [N, {n_labels}] array, got {p.shape}.")
    if not np.issubdtype(p.dtype, np.floating):
        raise UserError(f"--probs {path} must hold floating-point probabilities, got {p.dtype}.")
    if table.ids is not None and len(table.ids) != p.shape[0]:
        raise UserError(f"--probs {path} has {len(table.ids)} ids for {p.shape[0]} rows.")
    bad = np.argwhere(~((p >= 0) & (p <= 1)))
    if len(bad):
        r, c = bad[0]
        raise UserError(
            f"--probs {path} {table.row(r)} label {c} holds {float(p[r, c])!r}, not a "
            f"probability in [0, 1]."
        )
    if table.ids is not None:
        seen: dict[str, int] = {}
        for i, name in enumerate(table.ids):
            if name in seen:
                raise UserError(
                    f"--probs {path} lists Id {name} twice ({table.row(seen[name])}, "
                    f"{table.row(i)})."
                )
            seen[name] = i


def _read_targets_csv(path: str | os.PathLike, n_labels: int = NUM_LABELS):
    """A train.csv-style file as (ids, uint8 multi-hot [N, 28]): the dataset layer's parser, so
    every command reads Kaggle labels the same way (UserError naming the line of a bad row)."""
    from fasthpa.data.dataset import read_targets_csv

    if n_labels != NUM_LABELS:
        raise ValueError(f"train.csv-style labels have {NUM_LABELS} columns, not {n_labels}")
    return read_targets_csv(path)


def read_labels(path: Path, n_labels: int) -> Table:
    if not path.is_file():
        raise UserError(f"--labels file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        ids, y = _read_targets_csv(path, n_labels)
        return Table(ids, y, path)
    if suffix == ".npz":
        ids, y = _load_npz(path, "labels")
        if y is None:
            raise UserError(f"--labels {path} has no 'labels' array.")
    elif suffix == ".npy":
        ids, y = None, _load_npy(path)
    else:
        raise UserError(f"--labels {path} must be a train.csv-style .csv, a .npy or a .npz file.")
    if y.ndim != 2 or y.shape[1] != n_labels:
        raise UserError(f"--labels {path} must hold an [N, {n_labels}] array, got {y.shape}.")
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        raise UserError(f"--labels {path} must be multi-hot: every entry 0 or 1.")
    return Table(ids, y.astype(np.uint8), path)


def align_labels(probs: Table, labels: Table) -> np.ndarray:
    """Labels in the row order of the probabilities: by Id when the probs have Ids and the labels
    are a train.csv (which may list more samples); else by row, requiring equal lengths."""
    if probs.ids is not None and labels.ids is not None:
        index = {name: i for i, name in enumerate(labels.ids)}
        missing = [name for name in probs.ids if name not in index]
        if missing:
            raise UserError(
                f"--labels {labels.path} lacks {len(missing)} Id(s) of --probs {probs.path}, "
                f"e.g. {missing[0]}."
            )
        return labels.values[[index[name] for name in probs.ids]]
    if labels.ids is not None and probs.ids is None:
        raise UserError(
            f"--probs {probs.path} has no Ids to match --labels {labels.path} by; give the "
            f"probabilities as a dev_probs.npz or an Id CSV, or the labels as a .npy."
        )
    if labels.values.shape[0] != probs.values.shape[0]:
        raise UserError(
            f"--labels {labels.path} has {labels.values.shape[0]} rows but --probs "
            f"{probs.path} has {probs.values.shape[0]}."
        )
    return labels.values


def read_prevalence(spec: str, n_labels: int) -> Any:
    if spec in ("fit", "kaggle"):
        return spec
    if not Path(spec).is_file():
        raise UserError(f"--prevalence must be fit, kaggle or a train.csv-style file: {spec!r}.")
    ids, y = _read_targets_csv(spec, n_labels)
    if not ids:
        raise UserError(f"--prevalence {spec} lists no samples.")
    return y.mean(0, dtype=np.float64)
