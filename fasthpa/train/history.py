"""history.jsonl: one JSON line per log step and per epoch, written by rank 0.

history = History(run_dir / "history.jsonl")    # History(None) on other ranks: no-op
history.log(kind="step", step=50, loss=0.21)
history.truncate_after(step)                     # on resume: drop what will be logged again
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fasthpa.errors import UserError
from fasthpa.io import atomic_write_text


@dataclass
class History:
    path: Path | None
    tensorboard: Any = None
    """a fasthpa.train.tensorboard.TensorBoardLog that gets every row too (``--tensorboard``)"""

    def log(self, **row: Any) -> None:
        if self.path is None:
            return
        row = {"time": round(time.time(), 3), **row}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise UserError(f"{self.path}: cannot write it ({e.strerror}).") from None
        if self.tensorboard is not None:
            self.tensorboard.add_row(row)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
        if self.path is None or not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))
