"""``predict()``: one run, several, or a cross-validation folder -> a validated submission.

    result = predict("runs/r18", "data/hpa", tta="flips", out="submission.csv")
    result = predict(["cv/hpa"], "data/hpa", out="sub.csv")          # the folds, averaged
    result.probs, result.predicted, result.submission_path

Every rank validates the same inputs, so a bad one stops all ranks alike (no rank hangs); the
Ids first (cheap), the checkpoints' integrity digests after. Each rank predicts its share of
the rows, rank 0 gathers, averages the members and the TTA views, applies the thresholds and
writes the files (fasthpa.predict.submission).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasthpa.cv.manifest import STACK_THRESHOLDS, is_cv_dir, load_stack
from fasthpa.data.preflight import preflight
from fasthpa.distributed import DistInfo, check_every_rank, cleanup, init_distributed
from fasthpa.errors import UserError
from fasthpa.predict.inputs import (
    expand_runs,
    load_run_config,
    load_run_inputs,
    rare_runs,
    select_rows,
)
from fasthpa.predict.predictor import build_predictors, with_stack
from fasthpa.predict.submission import (
    PredictResult,
    assign_labels,
    probs_path_for,
    validate_submission,
    write_outputs,
)
from fasthpa.predict.tta import View, resolve_views

PathLike = str | os.PathLike


@dataclass(frozen=True)
class PredictRequest:
    """Everything one prediction needs (see :func:`predict` for the fields' meaning)."""

    runs: tuple[PathLike, ...]
    data_root: PathLike
    split: str = "test"
    checkpoint: str = "best"
    ids_csv: PathLike | None = None
    tta: str | Sequence[View] = "none"
    at_least_one: bool = True
    out: PathLike = "submission.csv"
    part: str | None = None
    thresholds: PathLike | None = None
    packed: PathLike | None = None
    batch_size: int | None = None
    workers: int | None = None
    loader: str = "auto"
    device: str = "auto"
    progress: bool = False
    rare: bool = True
    """use the rare-label models in the runs' rare/ folders (``fasthpa rare``) for their labels"""
    stack: bool = True
    """a cv folder with a stack (``stack.pt``, fasthpa.cv.stack): score with it and its
    thresholds; False: average the folds and use thresholds.json"""

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be at least 1.")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers {self.workers}: must be >= 0.")
        out = Path(self.out)
        if out.suffix.lower() != ".csv":
            raise UserError(f"--out {out}: the submission must be a .csv file.")
        if out.is_dir():
            raise UserError(f"--out {out}: is a folder; give the submission's file name.")


def predict(
    run_dir: PathLike | Sequence[PathLike],
    data_root: PathLike,
    split: str = "test",
    checkpoint: str = "best",
    ids_csv: PathLike | None = None,
    tta: str | Sequence[View] = "none",
    at_least_one: bool = True,
    out: PathLike = "submission.csv",
    **options,
) -> PredictResult | None:
    """Predict every Id once and write the submission and its probabilities. Returns a
    PredictResult on rank 0 and None on the other ranks.

    ``run_dir``: a run folder, a cross-validation folder (its stack, else its folds averaged
    with its out-of-fold thresholds) or several of them (averaged; thresholds: ``thresholds``,
    else the mean of the members'). ``options``: part, thresholds, packed, batch_size, workers
    (default: the run's), loader, device, progress, rare, stack (see :class:`PredictRequest`).
    Under torchrun each rank predicts its share and rank 0 gathers and writes; a process group
    this call did not create is left open.
    """
    import torch.distributed as dist

    runs = (run_dir,) if isinstance(run_dir, (str, os.PathLike)) else tuple(run_dir)
    request = PredictRequest(
        runs, data_root, split, checkpoint, ids_csv, tta, at_least_one, out, **options
    )
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(request.device)
    try:
        return run_request(request, info)
    finally:
        if owns_group:
            cleanup(info)


def run_request(request: PredictRequest, info: DistInfo) -> PredictResult | None:
    """:func:`predict` on an initialised ``info`` (see the module docstring)."""
    views = resolve_views(request.tta)
    members, default_thr, _ = expand_runs(request.runs)
    rows, in_channels = _rows(request, members, info)
    stack = _stack(request, members)
    if stack is not None:
        default_thr = Path(request.runs[0]) / STACK_THRESHOLDS
    runs = [
        load_run_inputs(m, request.checkpoint, request.thresholds or default_thr) for m in members
    ]
    rare = (
        [load_run_inputs(d, request.checkpoint) for d in rare_runs(members)] if request.rare else []
    )
    thresholds = _with_rare_thresholds(_thresholds(request, runs, default_thr), rare)
    predictors = build_predictors(
        runs + rare, rows, info, request.batch_size, request.workers, request.loader
    )
    if stack is not None:
        with_stack(predictors, stack)
    t0 = time.perf_counter()
    got = [p.probs(views, request.progress) for p in predictors]
    seconds = time.perf_counter() - t0
    if not info.is_main:
        return None
    weights = [p.main_models for p in predictors]
    probs = sum(w * g[1].astype(np.float64) for w, g in zip(weights, got)) / sum(weights)
    probs = probs.astype(np.float32) if len(got) > 1 else got[0][1]
    result = PredictResult(
        ids=rows.ids,
        probs=probs,
        predicted=assign_labels(probs, thresholds, request.at_least_one),
        thresholds=thresholds,
        labels=rows.labels,
        submission_path=Path(request.out),
        probs_path=probs_path_for(request.out),
        images_per_sec=len(rows.ids) / max(seconds, 1e-9),
    )
    write_outputs(result)
    validate_submission(request.out, rows.ids, request.at_least_one)
    return result


def _rows(request: PredictRequest, members, info: DistInfo):
    """The rows to predict (cheap checks first: Ids, then every file's header)."""
    configs = [load_run_config(m) for m in members]
    channels = configs[0].in_channels
    rows = select_rows(
        request.data_root,
        request.split,
        request.ids_csv,
        request.part,
        members[0],
        channels,
        request.packed,
    )
    _check_members(members, configs)
    check_every_rank(
        lambda: info.local_rank or preflight(rows.source, range(len(rows.ids)), channels), info
    )
    return rows, channels


def _stack(request: PredictRequest, members: list[Path]):
    """The stack of a single cv folder, unless --no-stack (None: average the folds)."""
    if not request.stack or len(request.runs) != 1 or not is_cv_dir(Path(request.runs[0])):
        return None
    stack = load_stack(Path(request.runs[0]), members)
    if stack is not None and request.checkpoint != "best":
        print(
            f"notice: the stack was fitted on the folds' best.pt, not --checkpoint "
            f"{request.checkpoint}: averaging the folds instead (--no-stack).",
            file=sys.stderr,
        )
        return None
    return stack


def _with_rare_thresholds(thresholds: np.ndarray, rare) -> np.ndarray:
    """The main thresholds, with each rare-label model's own (fitted on its dev part) for its
    labels (the mean where several models cover one label)."""
    if not rare:
        return thresholds
    out = np.array(thresholds, dtype=np.float64)
    per_label: dict[int, list[float]] = {}
    for run in rare:
        for k, label in enumerate(run.config.label_indices):
            per_label.setdefault(label, []).append(float(run.thresholds[k]))
    for label, values in per_label.items():
        out[label] = float(np.mean(values))
    return out


def _check_members(members, configs) -> None:
    """Members must predict the same labels from the same stains."""
    first = configs[0]
    for path, cfg in zip(members[1:], configs[1:]):
        if cfg.data.channels != first.data.channels:
            raise UserError(
                f"--run: {path} was trained on {cfg.data.channels} but {members[0]} on "
                f"{first.data.channels}; an ensemble needs the same stains."
            )


def _thresholds(request: PredictRequest, runs, default_thr) -> np.ndarray:
    if request.thresholds is not None or default_thr is not None:
        return runs[0].thresholds  # every member was given the same file
    mean = np.mean([r.thresholds for r in runs], axis=0)
    print(
        f"notice: {len(runs)} runs with no shared thresholds: using the mean of their "
        f"thresholds.json (pass --thresholds to choose).",
        file=sys.stderr,
    )
    return mean
