"""What rank 0 shows in the terminal: a progress bar per epoch and a table after each epoch.

Host-side only: it never reads a device value outside log steps.
"""

from __future__ import annotations

from typing import Any


class EpochProgress:
    """A rich progress bar per epoch (a no-op when disabled or on ranks other than 0)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def start_epoch(self, epoch: int, total: int, done: int = 0) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn(f"epoch {epoch}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def update(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task,
                info=f"loss {row['loss']:.4f} | {row['images_per_sec']:.1f} img/s "
                f"({row['images_per_sec_per_device']:.1f}/dev) | "
                f"data {100 * row['data_wait_share']:.0f}%",
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def print_epoch(row: dict, best_f1: float) -> None:
    """The epoch's line as a small table: train loss, dev F1 at 0.5 and tuned, best, time."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"epoch {row['epoch']} (step {row['step']})", show_header=True)
    for c in ("train loss", "dev F1 @0.5", "dev F1 tuned", "best tuned", "elapsed s"):
        t.add_column(c, justify="right")
    f05 = row.get("dev_macro_f1_at_0.5")
    ft = row.get("dev_macro_f1_tuned")
    t.add_row(
        f"{row['train_loss']:.4f}",
        "-" if f05 is None else f"{f05:.4f}",
        "-" if ft is None else f"{ft:.4f}",
        f"{best_f1:.4f}",
        f"{row['elapsed_s']:.1f}",
    )
    Console().print(t)
