"""Training the K fold runs of a cross-validation folder, one after another.

    result = run_cv(cfg, folds=5)         # cfg.run.out is the CV folder; any train settings
    result.status, result.folds, result.summary

``CVDIR/cv.json`` records the fold count, the seed and the data the folds were cut from; running
the same command again continues (each fold run resumes by itself, a finished one has nothing
left to do), and a different ``--folds`` or ``--seed`` on an existing folder is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasthpa.config import TrainConfig
from fasthpa.cv.manifest import CV_MANIFEST, STACK, STACK_THRESHOLDS, fold_dirs
from fasthpa.cv.oof import collect_oof
from fasthpa.data.source import open_source
from fasthpa.data.stats import compute_channel_stats, save_stats
from fasthpa.distributed import barrier, cleanup, decide_on_main, init_distributed
from fasthpa.errors import UserError
from fasthpa.io import atomic_write_json, make_dir
from fasthpa.train import TrainHooks, train

STATS = "channel_stats.json"


@dataclass
class CVResult:
    """What a cross-validation ended with."""

    status: str
    """"finished", or "stopped" (a fold was stopped by a signal; run the command again)"""
    cv_dir: Path
    folds: list[dict[str, Any]] = field(default_factory=list)
    """per fold: run folder, status, best dev macro F1"""
    summary: dict[str, Any] = field(default_factory=dict)
    """cv_summary.json (rank 0, finished)"""


def run_cv(
    cfg: TrainConfig,
    folds: int,
    *,
    explicit: set[str] | None = None,
    hooks: TrainHooks | None = None,
    stack: bool = True,
) -> CVResult:
    """Train the ``folds`` fold runs of ``cfg`` into ``cfg.run.out``, then collect the
    out-of-fold probabilities and fit the thresholds, and with ``stack`` the stacked head
    (fasthpa.cv.stack; see the package docstring)."""
    _check_request(cfg, folds, explicit)
    import torch.distributed as dist

    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.speed.device)
    try:
        cv_dir = Path(cfg.run.out)
        decide_on_main(lambda: prepare_cv_dir(cv_dir, cfg, folds), info)
        done = []
        for k, fold_dir in enumerate(fold_dirs(cv_dir, folds)):
            fold_cfg = _fold_config(cfg, fold_dir, k, folds)
            result = train(fold_cfg, explicit=explicit, hooks=hooks)
            done.append(
                {
                    "fold": k,
                    "run": str(fold_dir),
                    "status": result.status,
                    "best_dev_macro_f1_tuned": result.best_dev_f1,
                }
            )
            if result.status != "finished":
                return CVResult("stopped", cv_dir, done)
        barrier(info)
        summary = _conclude(cv_dir, stack, info.device) if info.is_main else {}
        return CVResult("finished", cv_dir, done, summary)
    finally:
        if owns_group:
            cleanup(info)


def _conclude(cv_dir: Path, stack: bool, device) -> dict[str, Any]:
    """Rank 0, every fold finished: the out-of-fold thresholds, then the stack."""
    summary = collect_oof(cv_dir)
    if stack:
        # here, not at the top: fasthpa.cv.stack reads runs through fasthpa.predict, whose
        # inputs import fasthpa.cv.manifest (and with it this package's __init__)
        from fasthpa.cv.stack import fit_stack

        summary |= fit_stack(cv_dir, device)
        atomic_write_json(cv_dir / "cv_summary.json", summary)
        print(
            f"stack of {len(summary['folds'])} folds ({summary['stack_features']} features per "
            f"image): out-of-fold macro F1 {summary['stack_oof_macro_f1_tuned']:.4f} (rule "
            f"{summary['stack_threshold_rule']}); wrote {cv_dir / STACK}, "
            f"{cv_dir / STACK_THRESHOLDS}"
        )
    return summary


def _check_request(cfg: TrainConfig, folds: int, explicit: set[str] | None) -> None:
    if folds < 2:
        raise UserError(f"--folds {folds}: cross-validation needs at least 2 folds.")
    given = explicit or set()
    for key, flag in (
        ("data.fold", "--fold"),
        ("data.split", "--split"),
        ("run.resume", "--resume"),
    ):
        if key in given:
            raise UserError(f"{flag}: fasthpa cv chooses each fold's split and folder itself.")
    if not cfg.data.data:
        raise UserError("--data is required (the dataset root in the Kaggle layout).")


def prepare_cv_dir(cv_dir: Path, cfg: TrainConfig, folds: int) -> None:
    """Create (or check) ``cv.json`` and the shared channel statistics (rank 0)."""
    manifest_path = cv_dir / CV_MANIFEST
    want = {"folds": [d.name for d in fold_dirs(cv_dir, folds)], "k": folds, "seed": cfg.run.seed}
    if manifest_path.is_file():
        try:
            have = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(
                f"{manifest_path}: not a valid cross-validation manifest ({e})."
            ) from None
        for key, flag in (("k", "--folds"), ("seed", "--seed")):
            if have.get(key) != want[key]:
                raise UserError(
                    f"{cv_dir} was made with {flag} {have.get(key)}, not {want[key]}: its folds "
                    f"would not match; use a new --out."
                )
    else:
        make_dir(cv_dir)
        atomic_write_json(
            manifest_path, want | {"thresholds": "thresholds.json", "config": cfg.to_dict()}
        )
    stats = cv_dir / STATS
    if not stats.is_file():
        source = open_source(cfg.data.data, "train", cfg.data.packed)
        save_stats(stats, compute_channel_stats(source, range(len(source)), seed=cfg.run.seed))
    for fold_dir in fold_dirs(cv_dir, folds):
        fold_dir.mkdir(exist_ok=True)
        if not (fold_dir / STATS).is_file():  # one normalisation for every fold (see the package)
            shutil.copyfile(stats, fold_dir / STATS)


def _fold_config(cfg: TrainConfig, fold_dir: Path, k: int, folds: int) -> TrainConfig:
    run = dataclasses.replace(cfg.run, out=str(fold_dir), resume=None)
    data = dataclasses.replace(cfg.data, fold=f"{k}/{folds}")
    return dataclasses.replace(cfg, run=run, data=data)
