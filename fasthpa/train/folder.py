"""The run folder: start a new run or resume one, decided on rank 0 for every rank.

A folder that holds ``config.json`` and a checkpoint resumes by itself with its saved config; a
few fields may change on resume (``RESUME_OVERRIDES``: more epochs, another loader, ...), any
other flag given explicitly is named in a warning and ignored. Nodes need not share the folder:
rank 0 reads it and every rank gets the same decision (``fasthpa.distributed.decide_on_main``).

    start = decide_start(cfg, explicit={"run.epochs"}, info=info)
    start.cfg, start.run_dir, start.resuming
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from fasthpa.config import TrainConfig, load_config
from fasthpa.distributed import DistInfo, decide_on_main
from fasthpa.errors import UserError
from fasthpa.io import make_dir

CHECKPOINT_NAMES = ("last.pt", "last.prev.pt", "last.pt.new")
LOCK_NAME = ".fasthpa.lock"

# Fields a resumed run may change; everything else comes from the run's own config.json.
RESUME_OVERRIDES = {
    ("run", "epochs"),
    ("run", "max_steps"),
    ("run", "progress"),
    ("run", "log_every"),
    ("run", "checkpoint_every"),
    ("run", "eval_every"),
    ("data", "workers"),
    ("data", "loader"),
    ("data", "data"),
    ("data", "packed"),
}


@dataclass
class Start:
    """How a run starts: its config (the saved one when resuming), folder and resume flag."""

    cfg: TrainConfig
    run_dir: Path
    resuming: bool
    ignored: list[str] = field(default_factory=list)
    """flags given explicitly that a resumed run ignores (its saved config wins)"""


def decide_start(cfg: TrainConfig, explicit: set[str] | None, info: DistInfo) -> Start:
    """:func:`resolve_start` on rank 0, its result (or its UserError) on every rank."""
    start = decide_on_main(lambda: resolve_start(cfg, explicit), info)
    if start.ignored and info.is_main:
        print(
            f"warning: resuming {start.run_dir} with its saved config.json; ignoring changed "
            f"{', '.join(sorted(start.ignored))} (start a new --out to change them)."
        )
    return start


def resolve_start(cfg: TrainConfig, explicit: set[str] | None) -> Start:
    """Decide the run folder and whether we resume; a resumed run keeps its saved config.

    ``explicit`` holds the ``section.field`` keys given on the command line; None (a library
    call) counts every field as given.
    """
    resume_dir = Path(cfg.run.resume) if cfg.run.resume else None
    out = resume_dir or Path(cfg.run.out)
    if resume_dir is not None and not (resume_dir / "config.json").is_file():
        raise UserError(f"--resume {resume_dir}: no config.json there; not a fasthpa run folder.")
    resuming = (out / "config.json").is_file() and any((out / n).exists() for n in CHECKPOINT_NAMES)
    if not resuming:
        if resume_dir is not None:
            raise UserError(f"--resume {resume_dir}: the folder holds no checkpoint (last.pt).")
        if not cfg.data.data:
            raise UserError("--data is required (the dataset root in the Kaggle layout).")
        return Start(cfg, out, resuming=False)
    saved = load_config(out / "config.json").to_dict()
    ignored = []
    for section, fields in cfg.to_dict().items():
        for name, value in fields.items():
            given = explicit is None or f"{section}.{name}" in explicit
            if not given or value in (None, "") or name in ("out", "resume"):
                continue
            if (section, name) in RESUME_OVERRIDES:
                saved[section][name] = value
            elif explicit is not None and value != saved[section][name]:
                ignored.append(f"--{name.replace('_', '-')}")
    saved["run"]["out"] = str(out)
    saved["run"]["resume"] = None
    return Start(TrainConfig.from_dict(saved), out, resuming=True, ignored=ignored)


class RunLock:
    """An exclusive lock on a run folder, held by the trainer (rank 0) for the whole run.

    A second trainer started into the same folder stops with one line naming the holder's pid
    and host. The lock is the kernel's (``flock`` on ``.fasthpa.lock``), so it dies with its
    process: a lock file left by a killed run is simply taken over.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> None:
        make_dir(self.run_dir)
        path = self.run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{self.run_dir}: another fasthpa run is using this folder ({holder}); wait for "
                f"it to finish or choose another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
