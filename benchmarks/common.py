"""Shared pieces of the benchmark scripts: honest timing, the environment record, result files.

Every benchmark warms up first, synchronises before reading a clock (CUDA events on a GPU),
repeats, reports the median and spread, and writes
``benchmarks/results/<theme>_<device>_<date>.{json,md}`` with the device, versions and commit.
"""

from __future__ import annotations

import datetime as _dt
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

from fasthpa.envinfo import environment  # noqa: E402
from fasthpa.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"


def synchronize(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any], device: Any = "cpu", warmup: int = 3, repeats: int = 10, inner: int = 1
) -> dict[str, float]:
    """Seconds per call of ``fn``: median, min, max and relative spread over ``repeats``.

    Each repeat runs ``fn`` ``inner`` times between two synchronised clock reads (CUDA events on
    a GPU), so very short calls are timed in groups.
    """
    import torch

    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    med = statistics.median(times)
    return {
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "spread": (max(times) - min(times)) / med if med > 0 else 0.0,
        "repeats": repeats,
    }


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "device"


class ResultFiles:
    """The ``<theme>_<device>_<date>.{json,md}`` pair of one benchmark run.

    ``write(rows, markdown)`` rewrites both files atomically; a benchmark calls it after every
    row with ``complete=False`` and once at the end with ``complete=True``, so a run killed at
    its time limit still leaves every figure it measured (the JSON says ``"complete": false``
    and the markdown says "partial"). The environment record is taken once, at construction.
    """

    def __init__(self, theme: str, device: Any, out_dir: str | Path | None = None) -> None:
        self.theme = theme
        self.env = environment(device)
        self.out = Path(out_dir) if out_dir else RESULTS_DIR
        self.stem = f"{theme}_{device_slug(self.env['device'])}_{_dt.date.today().isoformat()}"
        self.started = _dt.datetime.now().isoformat(timespec="seconds")

    def write(
        self,
        rows: list[dict[str, Any]],
        markdown: str,
        extra: dict | None = None,
        complete: bool = True,
    ) -> tuple[Path, Path]:
        """Write the JSON (environment, rows, ``extra``) and the markdown; returns their paths."""
        env = self.env
        payload = {
            "theme": self.theme,
            "date": self.started,
            "complete": complete,
            "environment": env,
            "rows": rows,
            **(extra or {}),
        }
        jp = atomic_write_json(self.out / f"{self.stem}.json", payload)
        partial = (
            ""
            if complete
            else f"**partial**: {len(rows)} rows so far; the run had not finished when this was "
            "written (it may have been stopped at its time limit).\n\n"
        )
        header = (
            f"# {self.theme}\n\n"
            f"- device: {env['device']}\n- cpu threads: {env['cpu_threads']}\n"
            f"- torch {env['torch']}, triton {env['triton']}, DALI {env['dali']}, "
            f"python {env['python']}\n- commit: {env['git_commit']}\n- date: {self.started}\n\n"
        )
        mp = atomic_write_text(self.out / f"{self.stem}.md", header + partial + markdown + "\n")
        return jp, mp


def write_results(
    theme: str,
    device: Any,
    rows: list[dict[str, Any]],
    markdown: str,
    extra: dict | None = None,
    out_dir: str | Path | None = None,
) -> tuple[Path, Path]:
    """Write ``<theme>_<device>_<date>.json`` and ``.md`` with the environment record, once."""
    return ResultFiles(theme, device, out_dir).write(rows, markdown, extra)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def positive_int_list(text: str) -> list[int]:
    """An argparse type for '8,16,32': comma-separated integers, each >= 1."""
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def wide_console():
    """A rich Console; 200 columns wide when writing to a log file, so no column is cut."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def print_rows(title: str, rows: list[dict[str, Any]], columns: list[str], digits: int = 4) -> None:
    """Print ``rows`` as a rich table: floats to ``digits`` significant digits, None as '-'."""
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            *(
                "-"
                if r.get(c) is None
                else (f"{r[c]:.{digits}g}" if isinstance(r[c], float) else str(r[c]))
                for c in columns
            )
        )
    wide_console().print(t)
