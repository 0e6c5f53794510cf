"""thresholds.json: write a fitted result, read thresholds back (every problem a UserError).

write_thresholds_json(run_dir / "thresholds.json", fit_thresholds(p, y), {"epoch": 12})
thr = load_thresholds(run_dir / "thresholds.json")       # float64 [28]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fasthpa.errors import UserError
from fasthpa.io import atomic_write_json
from fasthpa.labels import NUM_LABELS
from fasthpa.thresholds.search import ThresholdResult


def write_thresholds_json(
    path: str | os.PathLike, result: ThresholdResult, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``result`` as thresholds.json, atomically; ``extra`` keys (e.g. the source file or
    the run's checkpoint) are added at the top level.

        write_thresholds_json(run_dir / "thresholds.json", fit_thresholds(p, y), {"epoch": 12})
    """
    payload = result.to_json()
    if extra:
        clash = set(extra) & set(payload)
        if clash:
            raise ValueError(f"extra keys would overwrite result keys: {sorted(clash)}")
        payload.update(extra)
    return atomic_write_json(path, payload)


def load_thresholds(path: str | os.PathLike, n_labels: int = NUM_LABELS) -> np.ndarray:
    """The ``thresholds`` of a thresholds.json as float64 [n_labels]; UserError if unusable.

    thr = load_thresholds(run_dir / "thresholds.json"); preds = probs >= thr
    """
    import json

    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"thresholds file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"thresholds file {path} is not readable JSON ({e}).") from None
    values = payload.get("thresholds") if isinstance(payload, dict) else None
    try:
        thr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        thr = np.empty(0)
    if thr.shape != (n_labels,) or not np.isfinite(thr).all():
        raise UserError(f"thresholds file {path} needs a 'thresholds' list of {n_labels} numbers.")
    return thr
