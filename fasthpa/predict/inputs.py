"""What predict reads: the member runs (one run, several, or a cross-validation folder), their
config, statistics, thresholds and checkpoints, and the rows to predict.

    members, thr_path, how = expand_runs(["cv/hpa"])      # a CV folder -> its fold runs
    run = load_run_inputs("runs/r18", checkpoint="best")   # RunInputs, every problem a UserError
    rows = select_rows(root, "test", None, None, "runs/r18", channels=4)

A cross-validation folder (written by ``fasthpa cv``) holds ``cv.json`` naming its fold runs
and the thresholds fitted on their out-of-fold probabilities (``thresholds.json``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fasthpa.checkpoint import load_checkpoint, load_latest
from fasthpa.config import TrainConfig, load_config
from fasthpa.cv.manifest import is_cv_dir, read_fold_dirs
from fasthpa.data.dataset import SPLIT_CSV, read_ids_csv, read_targets_csv
from fasthpa.data.source import DataSource, open_source
from fasthpa.data.splits import SPLIT_NAMES, read_split_csv
from fasthpa.data.stats import ChannelStats, load_stats
from fasthpa.errors import UserError
from fasthpa.thresholds import load_thresholds

CHECKPOINTS = ("best", "last")
PARTS = ("all", "train", "dev", "test")
SPLITS = ("test", "train")


def expand_runs(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], Path | None, str]:
    """The member run folders of ``--run`` and the default thresholds file.

    One run folder: itself and its thresholds.json. A CV folder (``cv.json``): its fold runs and
    the thresholds fitted out of fold. Several folders: each one's members; no shared thresholds
    (None: the caller averages the members'). Returns (members, thresholds, description).
    """
    members: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"--run {p}: run folder not found.")
        members += read_fold_dirs(p) if is_cv_dir(p) else [p]
    if len(set(members)) != len(members):
        raise UserError(f"--run: a run folder is listed twice ({', '.join(map(str, paths))}).")
    if len(paths) == 1:
        only = Path(paths[0])
        how = f"cv ensemble of {len(members)} folds" if len(members) > 1 else "one run"
        return members, only / "thresholds.json", how
    return members, None, f"ensemble of {len(members)} runs"


def rare_runs(members: Sequence[Path]) -> list[Path]:
    """The rare-label runs (``fasthpa rare``) kept in the members' ``rare/`` folders."""
    found = []
    for member in members:
        found += sorted(p.parent for p in (Path(member) / "rare").glob("label*/best.pt"))
    return found


@dataclass
class RunInputs:
    """What predict reads from one run folder, validated."""

    run_dir: Path
    config: TrainConfig
    state: dict[str, Any]
    """the chosen checkpoint"""
    checkpoint_path: Path
    thresholds: np.ndarray
    thresholds_path: Path
    stats: ChannelStats


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig in RUN_DIR/config.json; a UserError when it is not a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: run folder not found.")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path}: not found; --run must be a fasthpa run folder.")
    return load_config(config_path)


def load_run_inputs(
    run_dir: str | os.PathLike,
    checkpoint: str = "best",
    thresholds: str | os.PathLike | None = None,
) -> RunInputs:
    """Read config.json, channel_stats.json, the thresholds and the checkpoint of a run folder.

    ``checkpoint`` is "best" (best.pt), "last" (last.pt, else last.prev.pt) or a file path.
    Every problem is a UserError naming the file.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    stats = load_stats(run_dir / "channel_stats.json")
    thr_path = Path(thresholds) if thresholds else run_dir / "thresholds.json"
    if not thr_path.is_file():
        raise UserError(
            f"{thr_path}: thresholds file not found (the run has not finished a dev evaluation; "
            f"pass --thresholds PATH to use another)."
        )
    thr = load_thresholds(thr_path, len(cfg.label_indices))
    state, ckpt_path = _load_state(run_dir, checkpoint)
    for key, expected in (("arch", cfg.model.arch), ("in_channels", cfg.in_channels)):
        if key in state and state[key] != expected:
            raise UserError(
                f"{ckpt_path}: the checkpoint's {key} is {state[key]!r} but "
                f"{run_dir / 'config.json'} says {expected!r}; it belongs to another run."
            )
    return RunInputs(run_dir, cfg, state, ckpt_path, thr, thr_path, stats)


def _load_state(run_dir: Path, checkpoint: str) -> tuple[dict[str, Any], Path]:
    if checkpoint == "best":
        path = run_dir / "best.pt"
        if not path.is_file():
            raise UserError(
                f"{path}: checkpoint not found (the run has no evaluated epoch yet; try "
                f"--checkpoint last or a PATH)."
            )
        state = load_checkpoint(path)
    elif checkpoint == "last":
        found = load_latest(run_dir)
        if found is None:
            raise UserError(f"{run_dir / 'last.pt'}: checkpoint not found (nor last.prev.pt).")
        state, path, warnings = found
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
    else:
        path = Path(checkpoint)
        state = load_checkpoint(path)
    if "model" not in state:
        raise UserError(f"{path}: the checkpoint holds no model state.")
    return state, path


@dataclass
class Rows:
    """The Ids to predict, their pixel source (row r = ids[r]) and labels when known."""

    ids: list[str]
    source: DataSource
    labels: np.ndarray | None
    ids_path: Path


def select_rows(
    data_root: str | os.PathLike,
    split: str,
    ids_csv: str | os.PathLike | None,
    part: str | None,
    run_dir: str | os.PathLike,
    channels: int,
    packed: str | os.PathLike | None = None,
) -> Rows:
    """The Ids to predict, in output order, with a source whose row r holds Id r.

    ``split`` "test" reads ROOT/test (Ids default to ROOT/sample_submission.csv); "train" reads
    ROOT/train (Ids default to train.csv, restricted to ``part`` of RUN_DIR/split.csv). Every Id
    must have its images (or its packed file); otherwise a UserError naming the ids file.
    """
    part = _check_selection(split, part, ids_csv)
    root = Path(data_root)
    if not root.is_dir():
        raise UserError(f"--data {root}: dataset folder not found.")
    ids_path = Path(ids_csv) if ids_csv is not None else root / SPLIT_CSV[split]
    if not ids_path.is_file():
        raise UserError(f"{ids_path}: ids file not found (pass --ids FILE with an Id column).")
    ids = read_ids_csv(ids_path)
    labels = None
    if split == "train":
        ids, labels = _train_rows(root, ids, ids_path, part, Path(run_dir))
    source = _source_for(root, split, ids, labels, packed)
    _check_images(source, ids, ids_path, channels)
    return Rows(ids, source, labels, ids_path)


def _check_selection(split: str, part: str | None, ids_csv) -> str:
    if split not in SPLITS:
        raise UserError(f"--split {split!r} is not one of {', '.join(SPLITS)}.")
    part = part or "all"
    if part not in PARTS:
        raise UserError(f"--part {part!r} is not one of {', '.join(PARTS)}.")
    if part != "all" and split != "train":
        raise UserError(f"--part {part} selects rows of train.csv: it needs --split train.")
    if part != "all" and ids_csv is not None:
        raise UserError(f"--part {part} and --ids both choose the Ids: give one of them.")
    return part


def _train_rows(root: Path, ids: list[str], ids_path: Path, part: str, run_dir: Path):
    train_ids, targets = read_targets_csv(root / SPLIT_CSV["train"])
    where = {sample_id: i for i, sample_id in enumerate(train_ids)}
    if part != "all":
        assignment = read_split_csv(run_dir / "split.csv", train_ids)
        chosen = assignment == SPLIT_NAMES.index(part)
        if not chosen.any():
            raise UserError(f"{run_dir / 'split.csv'}: the {part} part has no rows.")
        ids = [sample_id for sample_id, c in zip(train_ids, chosen) if c]
    unknown = [sample_id for sample_id in ids if sample_id not in where]
    if unknown:
        raise UserError(
            f"{ids_path}: {len(unknown)} Id(s) are not in {root / 'train.csv'} (first: "
            f"{unknown[0]}); --split train predicts labelled training images."
        )
    return ids, targets[[where[sample_id] for sample_id in ids]]


def _source_for(root: Path, split: str, ids, labels, packed) -> DataSource:
    if packed is None:
        image_dir = root / split
        if not image_dir.is_dir():
            raise UserError(f"{image_dir}: image folder not found.")
        return DataSource("kaggle", image_dir, ids, labels)
    base = open_source(root, split, packed)  # validates the pack's manifest
    return DataSource(base.kind, base.root, ids, labels, base.size)


def _check_images(source: DataSource, ids: list[str], ids_path: Path, channels: int) -> None:
    present = {entry.name for entry in os.scandir(source.root)}

    def missing(row: int) -> list[str]:
        return [p.name for p in source.sample_paths(row, channels) if p.name not in present]

    for row, sample_id in enumerate(ids):
        first = missing(row)
        if first:
            count = sum(bool(missing(r)) for r in range(row, len(ids)))
            raise UserError(
                f"{ids_path}: {count} Id(s) have no images in {source.root} (first: {sample_id}, "
                f"missing {first[0]})."
            )
