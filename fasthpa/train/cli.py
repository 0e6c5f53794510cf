"""``fasthpa train`` / ``python -m fasthpa.train`` / ``torchrun ... -m fasthpa.train``.

The flags are generated from the config (fasthpa.config); the flags given explicitly are known
from the parse itself (they are the only ones in the namespace), which a resumed run needs.
"""

from __future__ import annotations

import argparse

from fasthpa.config import add_config_arguments, config_from_args, print_config
from fasthpa.errors import module_main
from fasthpa.train.trainer import TrainHooks, train


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace, hooks: TrainHooks | None = None) -> int:
    cfg, explicit = config_from_args(args)
    if args.print_config:
        print_config(cfg)
        return 0
    train(cfg, explicit=explicit, hooks=hooks)
    return 0


def main(argv: list[str] | None = None, hooks: TrainHooks | None = None) -> int:
    """The command line; ``hooks`` for tests that inject faults into a real run."""
    from fasthpa import train as package

    return module_main(
        "python -m fasthpa.train",
        package.__doc__,
        configure_parser,
        lambda args: run(args, hooks),
        argv,
    )
