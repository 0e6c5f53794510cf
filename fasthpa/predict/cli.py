"""``fasthpa predict`` / ``python -m fasthpa.predict`` / ``torchrun ... -m fasthpa.predict``."""

from __future__ import annotations

import argparse

from fasthpa.data.contract import BACKENDS
from fasthpa.distributed import DEVICE_CHOICES
from fasthpa.errors import module_main
from fasthpa.predict.inputs import PARTS, SPLITS
from fasthpa.predict.submission import PredictResult, assign_labels
from fasthpa.predict.submit import predict
from fasthpa.predict.tta import TTA_VIEWS
from fasthpa.thresholds import per_label_metrics


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        nargs="+",
        metavar="RUN_DIR",
        help="the trained run folder, a `fasthpa cv` folder (its stack, else its folds averaged), or "
        "several folders (averaged); spell it --run-dir under torchrun",
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
        "--thresholds",
        default=None,
        metavar="PATH",
        help="None: RUN_DIR/thresholds.json (a cv folder: its out-of-fold fit; several runs: "
        "the mean of theirs)",
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
        choices=BACKENDS,
        help="input pipeline: DALI if installed else PyTorch (auto), or forced",
    )
    parser.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES, help="cuda when available"
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar"
    )
    parser.add_argument(
        "--rare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use the rare-label models of each run's rare/ folder (fasthpa rare) for their labels",
    )
    parser.add_argument(
        "--stack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a cv folder: score with its stack (stack.pt, one classifier on all folds' "
        "features) and stack_thresholds.json when present; --no-stack averages the folds",
    )


def run(args: argparse.Namespace) -> int:
    result = predict(
        args.run,
        args.data,
        args.split,
        args.checkpoint,
        args.ids,
        args.tta,
        args.at_least_one,
        args.out,
        part=args.part,
        thresholds=args.thresholds,
        packed=args.packed,
        batch_size=args.batch_size,
        workers=args.workers,
        loader=args.loader,
        device=args.device,
        progress=args.progress,
        rare=args.rare,
        stack=args.stack,
    )
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
        at_thr = per_label_metrics(result.probs, result.labels, result.thresholds)["macro_f1"]
        line += f"; macro F1 at the thresholds {at_thr:.4f} (before --at-least-one)"
    print(line)


def main(argv: list[str] | None = None) -> int:
    from fasthpa import predict as package

    return module_main("python -m fasthpa.predict", package.__doc__, configure_parser, run, argv)
