"""Checkpoints that survive a kill and refuse to load when damaged.

A checkpoint is a plain ``torch.save`` dict (``torch.load("best.pt")`` works anywhere) holding the
unwrapped, uncompiled model's state_dict, the optimiser, the grad scaler, the epoch/step, RNG states
and the config, plus ``integrity``: a SHA-256 over every tensor's bytes and every other value. A
flipped bit in a tensor (which torch.load does not notice: its zip reader skips CRCs) is detected.

Writes are atomic (temporary file, fsync, rename); ``last.pt`` is rotated to ``last.prev.pt``
first, so a damaged or half-renamed ``last.pt`` falls back to the previous one.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from fasthpa.errors import UserError
from fasthpa.io import atomic_write

INTEGRITY_KEY = "integrity"


def _digest(obj: Any, h: Any, path: str = "") -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{path}:T:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for k in obj:  # insertion order is preserved by torch.save/load
            if path == "" and k == INTEGRITY_KEY:
                continue
            _digest(obj[k], h, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{path}:{type(obj).__name__}{len(obj)}".encode())
        for i, v in enumerate(obj):
            _digest(v, h, f"{path}[{i}]")
    else:
        h.update(f"{path}={obj!r}".encode())


def state_digest(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    _digest(state, h)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], rotate: bool = False) -> Path:
    """Write ``state`` with its integrity digest atomically; ``rotate`` keeps the old file as
    ``<stem>.prev.pt``."""
    path = Path(path)
    state = {**state, INTEGRITY_KEY: state_digest(state)}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    tmp_final = path.with_name(path.name + ".new")
    atomic_write(tmp_final, lambda f: f.write(data))
    if rotate and path.exists():
        os.replace(path, path.with_name(path.stem + ".prev" + path.suffix))
    os.replace(tmp_final, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and verify one checkpoint; a damaged file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, a type weights_only refuses, ...
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"{path}: checkpoint is damaged and was not loaded ({type(e).__name__}: {first})."
        ) from None
    if not isinstance(state, dict) or INTEGRITY_KEY not in state:
        raise UserError(f"{path}: not a fasthpa checkpoint (no integrity digest).")
    if state_digest(state) != state[INTEGRITY_KEY]:
        raise UserError(
            f"{path}: checkpoint is damaged (integrity digest mismatch) and was not loaded."
        )
    return state


def load_latest(
    run_dir: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[dict[str, Any], Path, list[str]] | None:
    """The newest intact checkpoint of a run: last.pt, else last.prev.pt (with the reason why).

    Returns (state, path, warnings) or None when the run has no checkpoint; raises when every
    candidate is damaged.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / "last.pt", run_dir / "last.prev.pt", run_dir / "last.pt.new"]
    present = [p for p in candidates if p.exists()]
    if not present:
        return None
    warnings: list[str] = []
    for p in present:
        try:
            return load_checkpoint(p, map_location), p, warnings
        except UserError as e:
            warnings.append(str(e))
    raise UserError(f"{run_dir}: every checkpoint is damaged ({'; '.join(warnings)}).")
