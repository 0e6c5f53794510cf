"""Atomic file writes: a temporary name in the same folder, fsync, then rename.

A reader (or a killed run) sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from fasthpa.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, and rename it over ``path``.

    A failure of the file system (no space left, no permission, a parent that is a file) is a
    UserError naming ``path``; the file it would have replaced is untouched.
    """
    path = Path(path)
    try:
        return _atomic_write(path, write)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"{path}: cannot write it ({reason}); nothing was replaced.") from None


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 less umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # fsync the folder so the rename itself survives a power cut
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def make_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create folder ``path`` (and its parents) if needed; a UserError naming ``flag`` and the
    path when it cannot be (it is a file, a parent is a file, no permission, no space)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{flag} {path}: is a file, not a folder.") from None
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the folder ({e.strerror}).") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the folder is not writable.")
    return path
