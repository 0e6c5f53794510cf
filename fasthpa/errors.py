"""Errors a user can cause: one clear sentence and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2
EXIT_WORKER_DIED = 1

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(Exception):
    """Bad input the user can fix (a missing file, a bad label, a wrong flag).

    The message is one sentence naming the file, row or flag; the CLI prints it as
    ``error: <message>`` on stderr and exits with status 2.
    """


class CarriedError:
    """A UserError travelling as a value across a process boundary (what a DataLoader worker
    returns instead of raising, which torch would wrap in its worker's traceback); the
    receiving side calls :meth:`reraise` and the user sees the original one line."""

    def __init__(self, message: str) -> None:
        self.message = message

    def reraise(self) -> None:
        raise UserError(self.message)


def exit_on_user_error(fn: F) -> F:
    """Decorate a CLI entry point: a UserError becomes one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"{_rank_prefix()}error: {e}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except RuntimeError as e:
            if not str(e).startswith("DataLoader worker"):
                raise
            print(f"{_rank_prefix()}error: {worker_death_message(e)}", file=sys.stderr)
            raise SystemExit(EXIT_WORKER_DIED) from None

    return wrapper  # type: ignore[return-value]


def _rank_prefix() -> str:
    """Under torchrun an error may be met by one rank only: every rank says it, and ranks
    other than 0 say which they are."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"[rank {rank}] "


def worker_death_message(e: RuntimeError) -> str:
    """One sentence for torch's "DataLoader worker (pid N) is killed by signal: ..." (raised
    anywhere in the main process, by its SIGCHLD handler): what died and the usual cause."""
    what = str(e).strip().rstrip(".")
    return (
        f"a data loader worker process died ({what}); the usual cause is the out-of-memory "
        "killer: fewer --workers or a smaller --batch-size need less memory"
    )


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors (an unknown flag, a bad choice, a missing value)
    are one line and exit status 2, like every other user error, instead of the whole usage
    followed by the error."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        raise UserError(f"{self.prog}: {message}")


def module_main(prog: str, doc: str, configure_parser, run, argv: list[str] | None) -> int:
    """The body of ``python -m fasthpa.X`` (and torchrun ... -m fasthpa.X): the subcommand's own
    parser and runner, with user errors turned into one line and exit status 2."""

    @exit_on_user_error
    def main() -> int:
        parser = OneLineParser(
            prog=prog,
            description=doc.splitlines()[0],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        configure_parser(parser)
        return run(parser.parse_args(argv))

    return main()
