"""What a cross-validation folder holds, as predict reads it: ``CVDIR/cv.json`` names the fold
runs, ``CVDIR/stack.pt`` is the stack on their features (fasthpa.cv.stack).

{"folds": ["fold0", "fold1", "fold2"], "k": 3, "seed": 0, "thresholds": "thresholds.json",
 "config": {...the base training config...}}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fasthpa.checkpoint import load_checkpoint
from fasthpa.errors import UserError
from fasthpa.labels import NUM_LABELS

CV_MANIFEST = "cv.json"
STACK = "stack.pt"
STACK_THRESHOLDS = "stack_thresholds.json"


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


def load_stack(cv_dir: Path, folds: list[Path]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight [L, K*F], bias [L]) of the stack of ``cv_dir``, None when it has none; a
    UserError when it is damaged or was fitted on other folds."""
    path = Path(cv_dir) / STACK
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    names = [f.name for f in folds]
    try:
        weight, bias = state["weight"].float(), state["bias"].float()
        fitted_on = list(state["folds"])
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a fasthpa stack ({e}).") from None
    if fitted_on != names or weight.shape[0] != bias.shape[0] or weight.shape[0] > NUM_LABELS:
        raise UserError(
            f"{path}: fitted on folds {fitted_on} ({tuple(weight.shape)}), but {cv_dir} has "
            f"{names}; run `fasthpa cv` on the folder again to refit it, or pass --no-stack."
        )
    return weight, bias
