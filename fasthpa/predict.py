"""Predict a Kaggle submission (Id,Predicted) from a trained run, with optional flip/dihedral TTA.

Single process (CPU or one GPU)::

    fasthpa predict --run runs/r18 --data ROOT --out submission.csv
    python -m fasthpa.predict --run runs/r18 --data ROOT --tta dihedral --out submission.csv

Many GPUs (every Id is predicted exactly once over the ranks; rank 0 writes the files). Spell
the run flag ``--run-dir`` there: torchrun's own parser rejects ``--run`` anywhere on its command
line as an ambiguous abbreviation of its ``--run-path``::

    torchrun --nproc_per_node=8 -m fasthpa.predict --run-dir runs/r18 --data ROOT --out sub.csv

Check that prediction reproduces the trainer (the dev part of the run's split.csv, best.pt)::

    fasthpa predict --run runs/r18 --data ROOT --split train --part dev --out dev.csv

Python::

    from fasthpa.predict import predict
    result = predict("runs/r18", "data/hpa", tta="flips", out="submission.csv")
    result.probs, result.predicted, result.submission_path

What it uses from the run folder: config.json (arch, channels, image size, the eval centre crop of
--random-crop, amp, channels_last), channel_stats.json (normalisation), thresholds.json (per-label
thresholds, fitted on dev at the best epoch; ``--thresholds`` overrides) and the chosen
checkpoint's model state (best.pt by default).

Outputs, both written atomically:

- ``OUT`` (the submission): header ``Id,Predicted``, one row per Id of the ids file in that
  file's order, Predicted = the label indices with probability >= threshold, space-separated and
  ascending. With ``--at-least-one`` (the default) a row with no such label gets its arg-max
  label; with ``--no-at-least-one`` it is an empty string. The file is read back and checked
  against the ids file after writing.
- ``<OUT stem>_probs.npz``: ``ids`` [N] str, ``probs`` [N, 28] float32 (the TTA-averaged
  sigmoid outputs, exact, unlike a rounded CSV), ``thresholds`` [28] float64, and for
  ``--split train`` also ``labels`` [N, 28] uint8, so ``fasthpa thresholds --probs`` reads it
  like the run's dev_probs.npz.

TTA (``--tta``) averages probabilities over views of the normalised batch, applied on the
device: ``none``; ``flips`` = identity, horizontal, vertical and both flips; ``dihedral`` = the 8
views of the dihedral group (a transposition or not, times the 4 flip combinations, which is the
same set as rot90 by 0-3 with and without a flip).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fasthpa.errors import UserError, module_main
from fasthpa.labels import NUM_LABELS

if TYPE_CHECKING:
    import torch

    from fasthpa.data.source import DataSource
    from fasthpa.distributed import DistInfo

CHECKPOINTS = ("best", "last")
PARTS = ("all", "train", "dev", "test")
SPLITS = ("test", "train")


# ---------------------------------------------------------------------------- TTA views


@dataclass(frozen=True)
class View:
    """One test-time view of an NCHW batch: an optional H/W transposition, then flips.

    ``View("rot90", transpose=True, vflip=True)(x)`` equals ``torch.rot90(x, 1, dims=(-2, -1))``.
    """

    name: str
    transpose: bool = False
    hflip: bool = False
    vflip: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.transpose:
            x = x.transpose(-2, -1)
        if self.hflip:
            x = x.flip(-1)
        if self.vflip:
            x = x.flip(-2)
        return x


IDENTITY = View("identity")
FLIP_VIEWS = (
    IDENTITY,
    View("hflip", hflip=True),
    View("vflip", vflip=True),
    View("rot180", hflip=True, vflip=True),
)
DIHEDRAL_VIEWS = FLIP_VIEWS + (
    View("transpose", transpose=True),
    View("rot270", transpose=True, hflip=True),
    View("rot90", transpose=True, vflip=True),
    View("antitranspose", transpose=True, hflip=True, vflip=True),
)
TTA_VIEWS: dict[str, tuple[View, ...]] = {
    "none": (IDENTITY,),
    "flips": FLIP_VIEWS,
    "dihedral": DIHEDRAL_VIEWS,
}


def resolve_views(tta: str | Sequence[View]) -> tuple[View, ...]:
    """``tta`` as a tuple of views: a name from TTA_VIEWS, or the views themselves (tests)."""
    if isinstance(tta, str):
        if tta not in TTA_VIEWS:
            raise UserError(f"--tta {tta!r} is not one of {', '.join(TTA_VIEWS)}.")
        return TTA_VIEWS[tta]
    views = tuple(tta)
    if not views or not all(isinstance(v, View) for v in views):
        raise ValueError("tta must be a name or a non-empty sequence of View objects")
    return views


# ---------------------------------------------------------------------------- decisions


def assign_labels(probs: np.ndarray, thresholds: np.ndarray, at_least_one: bool) -> np.ndarray:
    """bool [N, L]: label l predicted when probs[:, l] >= thresholds[l] (decided exactly as the
    threshold fit decided it: fasthpa.thresholds.apply_thresholds); with ``at_least_one`` a row
    with none gets its arg-max (the first on ties)."""
    from fasthpa.thresholds import apply_thresholds

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


# ---------------------------------------------------------------------------- inputs


@dataclass
class RunInputs:
    """What predict reads from the run folder, validated."""

    config: Any
    """the run's TrainConfig"""
    state: dict[str, Any]
    """the chosen checkpoint"""
    checkpoint_path: Path
    thresholds: np.ndarray
    thresholds_path: Path
    stats: Any
    """ChannelStats"""


def load_run_config(run_dir: str | os.PathLike):
    """The TrainConfig in RUN_DIR/config.json; a UserError when it is not a run folder."""
    from fasthpa.config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: run folder not found.")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path}: not found; --run must be a fasthpa run folder.")
    return load_config(config_path)


def load_run_inputs(
    run_dir: str | os.PathLike, checkpoint: str = "best", thresholds: str | None = None
) -> RunInputs:
    """Read config.json, channel_stats.json, the thresholds and the checkpoint of a run folder.

    ``checkpoint`` is "best" (best.pt), "last" (last.pt, else last.prev.pt) or a file path.
    Every problem is a UserError naming the file.
    """
    from fasthpa.checkpoint import load_checkpoint, load_latest
    from fasthpa.data.stats import load_stats
    from fasthpa.thresholds import load_thresholds

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    config_path = run_dir / "config.json"
    stats = load_stats(run_dir / "channel_stats.json")
    thr_path = Path(thresholds) if thresholds else run_dir / "thresholds.json"
    if not thr_path.is_file():
        raise UserError(
            f"{thr_path}: thresholds file not found (the run has not finished a dev evaluation; "
            f"pass --thresholds PATH to use another)."
        )
    thr = load_thresholds(thr_path)

    if checkpoint == "best":
        ckpt_path = run_dir / "best.pt"
        if not ckpt_path.is_file():
            raise UserError(
                f"{ckpt_path}: checkpoint not found (the run has no evaluated epoch yet; try "
                f"--checkpoint last or a PATH)."
            )
        state = load_checkpoint(ckpt_path)
    elif checkpoint == "last":
        found = load_latest(run_dir)
        if found is None:
            raise UserError(f"{run_dir / 'last.pt'}: checkpoint not found (nor last.prev.pt).")
        state, ckpt_path, warnings = found
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
    else:
        ckpt_path = Path(checkpoint)
        state = load_checkpoint(ckpt_path)
    if "model" not in state:
        raise UserError(f"{ckpt_path}: the checkpoint holds no model state.")

    in_channels = 4 if cfg.data.channels == "rgby" else 3
    for key, expected in (("arch", cfg.model.arch), ("in_channels", in_channels)):
        if key in state and state[key] != expected:
            raise UserError(
                f"{ckpt_path}: the checkpoint's {key} is {state[key]!r} but {config_path} says "
                f"{expected!r}; it belongs to another run."
            )
    return RunInputs(cfg, state, ckpt_path, thr, thr_path, stats)


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
    from fasthpa.data.dataset import SPLIT_CSV, read_ids_csv, read_targets_csv
    from fasthpa.data.source import DataSource, open_source
    from fasthpa.data.splits import SPLIT_NAMES, read_split_csv

    if split not in SPLITS:
        raise UserError(f"--split {split!r} is not one of {', '.join(SPLITS)}.")
    part = part or "all"
    if part not in PARTS:
        raise UserError(f"--part {part!r} is not one of {', '.join(PARTS)}.")
    if part != "all" and split != "train":
        raise UserError(f"--part {part} selects rows of train.csv: it needs --split train.")
    if part != "all" and ids_csv is not None:
        raise UserError(f"--part {part} and --ids both choose the Ids: give one of them.")
    root = Path(data_root)
    if not root.is_dir():
        raise UserError(f"--data {root}: dataset folder not found.")
    ids_path = Path(ids_csv) if ids_csv is not None else root / SPLIT_CSV[split]
    if not ids_path.is_file():
        raise UserError(f"{ids_path}: ids file not found (pass --ids FILE with an Id column).")
    ids = read_ids_csv(ids_path)

    labels = None
    if split == "train":
        train_ids, targets = read_targets_csv(root / SPLIT_CSV["train"])
        where = {sample_id: i for i, sample_id in enumerate(train_ids)}
        if part != "all":
            assignment = read_split_csv(Path(run_dir) / "split.csv", train_ids)
            chosen = assignment == SPLIT_NAMES.index(part)
            if not chosen.any():
                raise UserError(f"{Path(run_dir) / 'split.csv'}: the {part} part has no rows.")
            ids = [sample_id for sample_id, c in zip(train_ids, chosen) if c]
        unknown = [sample_id for sample_id in ids if sample_id not in where]
        if unknown:
            raise UserError(
                f"{ids_path}: {len(unknown)} Id(s) are not in {root / 'train.csv'} (first: "
                f"{unknown[0]}); --split train predicts labelled training images."
            )
        labels = targets[[where[sample_id] for sample_id in ids]]

    if packed is None:
        image_dir = root / split
        if not image_dir.is_dir():
            raise UserError(f"{image_dir}: image folder not found.")
        source = DataSource("kaggle", image_dir, ids, labels)
    else:
        base = open_source(root, split, packed)  # validates the pack's manifest
        source = DataSource(base.kind, base.root, ids, labels, base.size)
    present = {entry.name for entry in os.scandir(source.root)}
    for row, sample_id in enumerate(ids):
        missing = [p.name for p in source.sample_paths(row, channels) if p.name not in present]
        if missing:
            count = sum(
                any(p.name not in present for p in source.sample_paths(r, channels))
                for r in range(row, len(ids))
            )
            raise UserError(
                f"{ids_path}: {count} Id(s) have no images in {source.root} (first: {sample_id}, "
                f"missing {missing[0]})."
            )
    return Rows(ids, source, labels, ids_path)


# ---------------------------------------------------------------------------- prediction


def _progress_bar(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), transient=True)
    bar.start()
    bar.add_task("predict", total=total)
    return bar


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


def predict(
    run_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    split: str = "test",
    checkpoint: str = "best",
    ids_csv: str | os.PathLike | None = None,
    tta: str | Sequence[View] = "none",
    at_least_one: bool = True,
    out: str | os.PathLike = "submission.csv",
    *,
    part: str | None = None,
    thresholds: str | os.PathLike | None = None,
    packed: str | os.PathLike | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    loader: str = "auto",
    device: str = "auto",
    progress: bool = False,
) -> PredictResult | None:
    """Predict every Id once and write the submission and its probabilities (see the module
    docstring). Returns a PredictResult on rank 0 and None on the other ranks.

    ``batch_size`` and ``workers`` default to the run's; under torchrun each rank predicts its
    share and rank 0 gathers and writes. A process group this call did not create is left open.
    """
    import torch.distributed as dist

    from fasthpa.distributed import cleanup, init_distributed

    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        return _predict(
            info, run_dir, data_root, split, checkpoint, ids_csv, tta, at_least_one, out,
            part, thresholds, packed, batch_size, workers, loader, progress,
        )  # fmt: skip
    finally:
        if owns_group:
            cleanup(info)


@dataclass
class Predictor:
    """A run's model and a loader over the chosen rows, ready to predict with any views.

    Build with :func:`build_predictor`; ``predictor.probs(views)`` gives (rows, probs) on rank 0.
    """

    model: Any
    loader: Any
    info: Any
    """DistInfo"""
    n_rows: int
    amp: Any
    """torch dtype of the autocast, or None"""
    channels_last: bool

    def autocast(self):
        import torch

        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=self.amp)

    def probs(
        self, views: Sequence[View] = (IDENTITY,), progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, probs float32 [N, 28]) on rank 0, None elsewhere (fasthpa.evaluate)."""
        from fasthpa.evaluate import predict_probs

        bar = _progress_bar(len(self.loader)) if progress and self.info.is_main else None
        try:
            return predict_probs(
                self.model, self.loader, self.info, self.n_rows, self.autocast, views=views,
                channels_last=self.channels_last,
                on_batch=(lambda: bar.advance(bar.task_ids[0])) if bar is not None else None,
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.stop()


def build_predictor(
    run: RunInputs,
    rows: Rows,
    info: DistInfo,
    batch_size: int | None = None,
    workers: int | None = None,
    backend: str = "auto",
) -> Predictor:
    """The run's model (eval, on ``info.device``) and an eval loader over ``rows`` for this rank.

    ``batch_size`` and ``workers`` default to the run's config.
    """
    import torch

    from fasthpa.data.contract import AugmentConfig
    from fasthpa.data.loader import build_loader
    from fasthpa.model import build_model
    from fasthpa.train import amp_dtype

    cfg = run.config
    dev = info.device
    amp = amp_dtype(cfg, dev)
    loader = build_loader(
        rows.source,
        np.arange(len(rows.ids)),
        train=False,
        batch_size=batch_size or cfg.run.batch_size,
        image_size=cfg.data.image_size,
        channels=cfg.data.channels,
        # eval takes the centred crop of the training crop size; no random draws in eval
        augment=AugmentConfig(random_crop=cfg.data.random_crop),
        stats=run.stats,
        device=dev,
        dtype=amp or torch.float32,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.run.seed,
        workers=cfg.data.workers if workers is None else workers,
        backend=backend,
    )
    model, _ = build_model(
        cfg.model.arch,
        num_classes=NUM_LABELS,
        in_channels=4 if cfg.data.channels == "rgby" else 3,
        pretrained="none",
        head=cfg.model.head,
        dropout=cfg.model.dropout,
    )
    try:
        model.load_state_dict(run.state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:160]
        raise UserError(f"{run.checkpoint_path}: the model state does not fit ({first}).") from None
    model.to(dev).eval()
    if cfg.speed.channels_last:
        model.to(memory_format=torch.channels_last)
    return Predictor(model, loader, info, len(rows.ids), amp, cfg.speed.channels_last)


def _predict(
    info, run_dir, data_root, split, checkpoint, ids_csv, tta, at_least_one, out,
    part, thresholds, packed, batch_size, workers, loader_backend, progress,
) -> PredictResult | None:  # fmt: skip
    views = resolve_views(tta)
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1.")
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers}: must be >= 0.")
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise UserError(f"--out {out}: the submission must be a .csv file.")
    # every rank validates the same inputs, so a bad one stops all ranks alike (no rank hangs);
    # the Ids first: that check is cheap, the checkpoint's integrity digest is not
    cfg = load_run_config(run_dir)
    in_channels = 4 if cfg.data.channels == "rgby" else 3
    rows = select_rows(data_root, split, ids_csv, part, run_dir, in_channels, packed)
    run = load_run_inputs(run_dir, checkpoint, thresholds)
    predictor = build_predictor(run, rows, info, batch_size, workers, loader_backend)

    t0 = time.perf_counter()
    got = predictor.probs(views, progress)
    seconds = time.perf_counter() - t0
    if not info.is_main:
        return None
    _, probs = got  # rows come back sorted, and row r is ids[r]
    predicted = assign_labels(probs, run.thresholds, at_least_one)
    result = PredictResult(
        ids=rows.ids,
        probs=probs,
        predicted=predicted,
        thresholds=run.thresholds,
        labels=rows.labels,
        submission_path=out,
        probs_path=probs_path_for(out),
        images_per_sec=len(rows.ids) / max(seconds, 1e-9),
    )
    write_outputs(result)
    validate_submission(out, rows.ids, at_least_one)
    return result


def write_outputs(result: PredictResult) -> None:
    """Write the submission CSV and the probabilities .npz atomically."""
    from fasthpa.io import atomic_write_bytes, atomic_write_text

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


# ---------------------------------------------------------------------------- entry points


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        metavar="RUN_DIR",
        help="the trained run folder (spell it --run-dir under torchrun)",
    )
    parser.add_argument(
        "--data", required=True, metavar="ROOT", help="dataset root in the Kaggle layout"
    )
    parser.add_argument("--out", required=True, help="the submission CSV to write (Id,Predicted)")
    parser.add_argument(
        "--checkpoint",
        default="best",
        metavar="best|last|PATH",
        help="best.pt, last.pt (else last.prev.pt), or a checkpoint file",
    )
    parser.add_argument(
        "--split", default="test", choices=SPLITS, help="which image folder to predict"
    )
    parser.add_argument(
        "--part",
        default=None,
        choices=PARTS,
        help="with --split train: only this part of RUN_DIR/split.csv; None: all of train.csv",
    )
    parser.add_argument(
        "--ids",
        default=None,
        metavar="CSV",
        help="the Ids and their order; None: ROOT/sample_submission.csv, or train.csv",
    )
    parser.add_argument(
        "--tta", default="none", choices=tuple(TTA_VIEWS), help="average over these views"
    )
    parser.add_argument(
        "--at-least-one",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give a row with no label above its threshold its arg-max label",
    )
    parser.add_argument(
        "--thresholds", default=None, metavar="PATH", help="None: RUN_DIR/thresholds.json"
    )
    parser.add_argument(
        "--packed", default=None, metavar="DIR", help="read the split's pixels from this pack"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="per device; None: the run's")
    parser.add_argument(
        "--workers", type=int, default=None, help="loader workers per rank; None: the run's"
    )
    parser.add_argument(
        "--loader",
        default="auto",
        choices=("auto", "torch", "dali", "cache"),
        help="input pipeline: DALI if installed else PyTorch (auto), or forced",
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cuda", "cpu"), help="cuda when available"
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar"
    )


def run(args: argparse.Namespace) -> int:
    result = predict(
        args.run, args.data, args.split, args.checkpoint, args.ids, args.tta,
        args.at_least_one, args.out, part=args.part, thresholds=args.thresholds,
        packed=args.packed, batch_size=args.batch_size, workers=args.workers,
        loader=args.loader, device=args.device, progress=args.progress,
    )  # fmt: skip
    if result is not None:
        _print_summary(result, args)
    return 0


def _print_summary(result: PredictResult, args: argparse.Namespace) -> None:
    n = len(result.ids)
    per_row = result.predicted.sum(axis=1)
    above = assign_labels(result.probs, result.thresholds, at_least_one=False).any(axis=1)
    line = (
        f"wrote {result.submission_path} ({n} rows, {per_row.mean():.2f} labels per row, "
        f"{int((~above).sum())} rows with no label above its threshold"
        f"{', given their arg-max' if args.at_least_one else ''}) and {result.probs_path}; "
        f"tta {args.tta}, {result.images_per_sec:.1f} images/s"
    )
    if result.labels is not None:
        from fasthpa.thresholds import per_label_metrics

        at_thr = per_label_metrics(result.probs, result.labels, result.thresholds)["macro_f1"]
        line += f"; macro F1 at the thresholds {at_thr:.4f} (before --at-least-one)"
    print(line)


def main(argv: list[str] | None = None) -> int:
    return module_main("python -m fasthpa.predict", __doc__, configure_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
