"""The `fasthpa` command line: one subcommand per step of the data flow.

Each subcommand lives in its own module, which exposes ``configure_parser(parser)`` and
``run(args) -> int``; this file only wires them together, so ``fasthpa X --help`` documents X.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fasthpa import __version__
from fasthpa.errors import OneLineParser, UserError, exit_on_user_error

# name -> (module, one-line help). Order follows the data flow.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("fasthpa.data.synth", "write a synthetic dataset in the Kaggle HPA layout"),
    "check": ("fasthpa.data.check", "validate a Kaggle-layout dataset and print a summary"),
    "pack": ("fasthpa.data.pack", "pack 4 stain PNGs into one RGBA PNG (or a decoded .npy cache)"),
    "train": ("fasthpa.train.cli", "train a classifier (also: python -m fasthpa.train, torchrun)"),
    "cv": ("fasthpa.cv.cli", "K-fold cross-validation: fold runs, out-of-fold thresholds"),
    "rare": (
        "fasthpa.rare.cli",
        "binary models for a run's rare labels (the report's future work)",
    ),
    "thresholds": ("fasthpa.thresholds.cli", "fit per-label thresholds on saved probabilities"),
    "predict": ("fasthpa.predict.cli", "predict a Kaggle submission from a trained run"),
    "report": ("fasthpa.report", "write plots and report.md for one or more runs"),
    "weights": ("fasthpa.weights", "fetch or list cached ImageNet checkpoints"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fasthpa",
        description="Train multi-label protein-localisation classifiers on HPA images, fast.",
    )
    parser.add_argument("--version", action="version", version=f"fasthpa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip().splitlines()[0],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.configure_parser(p)
        p.set_defaults(_run=module.run)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args._run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as e:
        raise UserError(f"file not found: {e.filename}") from None
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
