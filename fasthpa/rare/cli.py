"""``fasthpa rare``: binary models for a run's rare labels (see fasthpa.rare)."""

from __future__ import annotations

import argparse

from fasthpa.config import parse_labels
from fasthpa.data.contract import BACKENDS
from fasthpa.errors import UserError
from fasthpa.rare.models import train_rare_models


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run folder")
    parser.add_argument(
        "--below", type=float, default=0.05, help="labels under this training frequency"
    )
    parser.add_argument(
        "--share", type=float, default=0.2, help="positives' share of each model's training set"
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each rare-label model")
    parser.add_argument(
        "--labels", default=None, help="these labels (e.g. 8,9,27) instead of --below's"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="loader workers (default: the run's)"
    )
    parser.add_argument("--loader", default=None, choices=BACKENDS, help="default: the run's")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.below <= 1:
        raise UserError(f"--below {args.below}: must be in (0, 1].")
    if not 0 < args.share < 1:
        raise UserError(f"--share {args.share}: must be in (0, 1).")
    if args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: must be >= 1.")
    labels = list(parse_labels(args.labels)) if args.labels else None
    data = {k: v for k, v in (("workers", args.workers), ("loader", args.loader)) if v is not None}
    train_rare_models(args.run, args.below, args.share, args.epochs, labels, {"data": data})
    return 0
