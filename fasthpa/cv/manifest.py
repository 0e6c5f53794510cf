"""``CVDIR/cv.json``: which fold runs a cross-validation folder holds (read by predict too).

{"folds": ["fold0", "fold1", "fold2"], "k": 3, "seed": 0, "thresholds": "thresholds.json",
 "config": {...the base training config...}}
"""

from __future__ import annotations

import json
from pathlib import Path

from fasthpa.errors import UserError

CV_MANIFEST = "cv.json"


def fold_dirs(cv_dir: Path, folds: int) -> list[Path]:
    """The fold run folders of a K-fold cross-validation in ``cv_dir``."""
    return [Path(cv_dir) / f"fold{k}" for k in range(folds)]


def read_fold_dirs(cv_dir: Path) -> list[Path]:
    """The fold runs ``cv.json`` names; a UserError when the manifest is damaged or a fold run
    is missing or has not started (no config.json)."""
    manifest = Path(cv_dir) / CV_MANIFEST
    try:
        paths = [Path(cv_dir) / str(f) for f in json.loads(manifest.read_text())["folds"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{manifest}: not a valid cross-validation manifest ({e}).") from None
    if len(paths) < 2:
        raise UserError(f"{manifest}: names {len(paths)} fold(s); a cross-validation has >= 2.")
    missing = [p for p in paths if not (p / "config.json").is_file()]
    if missing:
        raise UserError(
            f"{cv_dir}: fold run {missing[0].name} is missing or unfinished (no config.json); "
            f"finish it with `fasthpa cv` on the same folder."
        )
    return paths


def is_cv_dir(path: Path) -> bool:
    return (Path(path) / CV_MANIFEST).is_file()
