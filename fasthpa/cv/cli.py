"""``fasthpa cv`` / ``python -m fasthpa.cv`` / ``torchrun ... -m fasthpa.cv``: K-fold
cross-validation with out-of-fold thresholds (every ``fasthpa train`` flag applies to the folds)."""

from __future__ import annotations

import argparse

from fasthpa.config import add_config_arguments, config_from_args, print_config
from fasthpa.cv.folds import run_cv
from fasthpa.errors import UserError, module_main
from fasthpa.train import TrainHooks


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--folds",
        type=int,
        default=5,
        metavar="K",
        help="number of multi-label stratified folds (K fold runs, one after another)",
    )
    parser.add_argument(
        "--stack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the folds, fit one classifier on all fold networks' features (stack.pt; "
        "fasthpa predict --run CVDIR uses it)",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace, hooks: TrainHooks | None = None) -> int:
    cfg, explicit = config_from_args(args)
    if args.print_config:
        print_config(cfg)
        return 0
    if "run.out" not in explicit:
        raise UserError("--out is required: the cross-validation folder (it holds the fold runs).")
    run_cv(cfg, args.folds, explicit=explicit, hooks=hooks, stack=args.stack)
    return 0


def main(argv: list[str] | None = None, hooks: TrainHooks | None = None) -> int:
    """The command line; ``hooks`` for tests that inject faults into the fold runs."""
    from fasthpa import cv as package

    return module_main(
        "python -m fasthpa.cv", package.__doc__, configure_parser, lambda a: run(a, hooks), argv
    )
