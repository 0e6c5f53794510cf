"""The resident loader's decoded array: a split's rows decoded once per node into one uint8 .npy.

The resident backend (:mod:`fasthpa.data.resident_loader`) holds every row of its split decoded
in memory. Decoding is the slow part (PNG: ~100 samples/s per core at 512 px), so one process
per node does it, on every core, into ``DIR/<key>.npy`` (uint8 [N, S, S, C], rows in ascending
dataset order, resized exactly as the PyTorch twin resizes: :func:`fasthpa.data.pack.resize_sample`),
and every process of the node memory-maps that file; later runs with the same key reuse it.

- ``DIR``: ``$FASTHPA_RESIDENT_DIR``, else ``$XDG_CACHE_HOME/fasthpa/resident`` (default
  ``~/.cache/fasthpa/resident``). A folder in ``/dev/shm`` keeps it in RAM; on disk it survives
  reboots and the page cache still shares it between the ranks. Files are never deleted for you:
  ``rm -r DIR`` frees them (``DIR/<key>.json`` says what each one holds).
- ``key``: a hash of the source (kind, resolved folder, the Ids of the rows), the channels, the
  side and ``--image-size``, and the size and modification time of every file read, so a
  changed dataset, size or channel set never reuses a stale array.
- Who decodes: a process whose ``LOCAL_RANK`` is 0 (or unset) creates ``DIR/<key>.lock``
  exclusively (``O_CREAT | O_EXCL``, holding ``host pid``); the winner decodes into a temporary
  file and renames it into place (atomic), the others poll until the file appears. A decoder
  that fails writes its one-line error to ``DIR/<key>.error``, which the waiters raise (one
  from before they began waiting only once no decoder has appeared for 30 s); a lock
  whose process is gone (same host) is taken over; a waiter gives up after
  ``$FASTHPA_RESIDENT_TIMEOUT`` seconds (default 3600) with an error naming the lock file.

Call::

    request = DecodeRequest(source, rows=np.unique(indices), channels=4, image_size=512, side=512)
    array, path = decoded_rows(request, processes=16, progress=True)   # uint8 [N, S, S, C]
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasthpa.data.pack import resize_sample
from fasthpa.data.source import DataSource, read_sample
from fasthpa.errors import UserError
from fasthpa.io import atomic_write_json, atomic_write_text

DIR_ENV = "FASTHPA_RESIDENT_DIR"
TIMEOUT_ENV = "FASTHPA_RESIDENT_TIMEOUT"
_KEY_VERSION = 1
_POLL_S = 0.2
_GRACE_S = 30.0
"""an error left by a decoder before this process began waiting counts once no process has
held the lock for this long (a new decoder takes it within seconds of its start)"""
GIB = 1 << 30


@dataclass(frozen=True)
class DecodeRequest:
    """Which rows to decode, and to what: uint8 [len(rows), side, side, channels]."""

    source: DataSource
    rows: np.ndarray
    """dataset rows, ascending and unique: slot k of the array holds row ``rows[k]``"""
    channels: int
    image_size: int | None
    side: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.side, self.side, self.channels)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    @functools.cached_property
    def key(self) -> str:
        """A hash of everything the pixels depend on (see the module docstring); stats every
        file once per request."""
        src = self.source
        desc = {
            "version": _KEY_VERSION,
            "kind": src.kind,
            "root": str(src.root.resolve()),
            "ids": [src.ids[int(r)] for r in self.rows],
            "channels": self.channels,
            "image_size": self.image_size,
            "side": self.side,
        }
        h = hashlib.sha256(json.dumps(desc).encode())
        stamps = []
        for r in self.rows:
            for path in src.sample_paths(int(r), self.channels):
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    raise UserError(f"{path}: file not found.") from None
                stamps.append((st.st_size, st.st_mtime_ns))
        h.update(np.asarray(stamps, dtype=np.int64).tobytes())
        return (
            f"{src.kind}-{self.side}px-{self.channels}ch-{len(self.rows)}rows-{h.hexdigest()[:20]}"
        )


def cache_dir() -> Path:
    """Where decoded arrays live (see the module docstring)."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return base / "fasthpa" / "resident"


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can hand out without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_room(request: DecodeRequest) -> tuple[bool, int]:
    """(whether ``cache_dir()`` can take the decoded array, its free bytes); True when the array
    is already there."""
    folder = cache_dir()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if (folder / f"{request.key}.npy").exists():
        return True, free
    return request.nbytes + GIB <= free, free


def decode_row(request: DecodeRequest, row: int) -> np.ndarray:
    """Row ``row`` as the PyTorch twin decodes it: read, resize, and the same size check."""
    src = request.source
    img = resize_sample(read_sample(src, row, request.channels), request.image_size)
    side = request.side
    if img.shape[0] != side or img.shape[1] != side:
        raise UserError(
            f"{src.sample_paths(row)[0]}: Id {src.ids[row]} is {img.shape[1]}x{img.shape[0]}, "
            f"other samples {side}x{side}; set --image-size to load them together."
        )
    return img


# ---------------------------------------------------------------- decoding (worker processes)

_WORKER: dict = {}


def _init_worker(request: DecodeRequest, path: str) -> None:
    _WORKER["request"] = request
    _WORKER["out"] = np.load(path, mmap_mode="r+")


def _decode_span(span: tuple[int, int]) -> int:
    """Decode slots ``span`` into the worker's memory-mapped output; returns how many."""
    request, out = _WORKER["request"], _WORKER["out"]
    for k in range(*span):
        out[k] = decode_row(request, int(request.rows[k]))
    out.flush()
    return span[1] - span[0]


def _spans_done(request: DecodeRequest, spans: list, tmp: Path, out: np.ndarray, processes: int):
    """Decode ``spans`` (in this process, or on a pool); yields each span's row count."""
    if processes <= 1:
        _WORKER.update(request=request, out=out)
        try:
            yield from map(_decode_span, spans)
        finally:
            _WORKER.clear()
        return
    import multiprocessing

    # forkserver: the parent may hold CUDA and thread pools, which a fork would copy
    ctx = multiprocessing.get_context("forkserver")
    init = (request, str(tmp))
    with ProcessPoolExecutor(processes, ctx, initializer=_init_worker, initargs=init) as pool:
        yield from pool.map(_decode_span, spans)


def _decode(request: DecodeRequest, final: Path, processes: int, progress: bool) -> None:
    """Decode every row into a temporary file beside ``final``, then rename it into place."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    room, free = cache_room(request)
    if not room:
        raise UserError(
            f"{final.parent}: the decoded rows need {request.nbytes / GIB:.1f} GiB and "
            f"{free / GIB:.1f} GiB are free; set {DIR_ENV} to a larger folder or lower "
            f"--image-size."
        )
    tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp.npy")
    n = len(request.rows)
    step = max(1, min(64, n // (max(processes, 1) * 8) or 1))
    spans = [(a, min(a + step, n)) for a in range(0, n, step)]
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=request.shape)
        # a bar only on a terminal: in a log file it would leave a blank line
        shown = progress and sys.stderr.isatty()
        with Progress(
            *columns, console=Console(stderr=True), disable=not shown, transient=True
        ) as bar:
            task = bar.add_task(f"decoding {n} rows for --loader resident", total=n)
            for count in _spans_done(request, spans, tmp, out, processes):
                bar.advance(task, count)
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        atomic_write_json(final.with_suffix(".json"), _description(request))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _description(request: DecodeRequest) -> dict:
    src = request.source
    return {
        "source": str(src.root.resolve()),
        "kind": src.kind,
        "rows": len(request.rows),
        "shape": list(request.shape),
        "bytes": request.nbytes,
        "image_size": request.image_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": socket.gethostname(),
    }


# ---------------------------------------------------------------- the handshake


def _take_lock(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _lock_is_stale(lock: Path) -> bool:
    """The lock names a process on this host that no longer exists."""
    try:
        host, pid = lock.read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False  # gone, or being written: not ours to judge yet
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def decoded_rows(
    request: DecodeRequest,
    *,
    processes: int,
    progress: bool = False,
    may_decode: bool | None = None,
    say=None,
) -> tuple[np.ndarray, Path]:
    """The rows' pixels, uint8 [N, S, S, C], memory-mapped (copy-on-write) from the cache file.

    Decodes them first (``processes`` worker processes, 0 or 1: in this process) unless the file
    exists; see the module docstring for who decodes and who waits. ``may_decode`` defaults to
    ``LOCAL_RANK`` being 0 or unset. ``say`` (e.g. ``print``) gets one line per decode.
    """
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = request.key
    final, lock, failed = (folder / f"{key}{ext}" for ext in (".npy", ".lock", ".error"))
    if may_decode is None:
        may_decode = os.environ.get("LOCAL_RANK", "0") == "0"
    timeout = float(os.environ.get(TIMEOUT_ENV, "3600"))
    started = time.time()
    while not final.exists():
        if may_decode and _take_lock(lock):
            try:
                if not final.exists():
                    failed.unlink(missing_ok=True)
                    _decode_reporting(request, final, processes, progress, failed, say)
            finally:
                lock.unlink(missing_ok=True)
            break
        if failed.exists() and (
            failed.stat().st_mtime >= started
            or (not lock.exists() and time.time() - started > _GRACE_S)
        ):
            raise UserError(failed.read_text().strip())
        if may_decode and _lock_is_stale(lock):
            lock.unlink(missing_ok=True)
            continue
        if time.time() - started > timeout:
            raise UserError(
                f"{final}: not written after {timeout:.0f} s of waiting for the process named in "
                f"{lock}; if none is decoding, delete that file (or raise {TIMEOUT_ENV})."
            )
        time.sleep(_POLL_S)
    return _open(final, request), final


def _decode_reporting(request, final, processes, progress, failed, say) -> None:
    """:func:`_decode`, saying what it does, and leaving its error for the waiting ranks."""
    t0 = time.perf_counter()
    if say is not None:
        say(
            f"resident: decoding {len(request.rows)} rows ({request.nbytes / GIB:.2f} GiB at "
            f"{request.side} px) from the {request.source.kind} layout into {final} with "
            f"{max(processes, 1)} process(es)"
        )
    try:
        _decode(request, final, processes, progress)
    except UserError as e:
        atomic_write_text(failed, f"{e}\n")
        raise
    if say is not None:
        say(f"resident: decoded in {time.perf_counter() - t0:.1f} s")


def _open(final: Path, request: DecodeRequest) -> np.ndarray:
    try:
        array = np.load(final, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{final}: unreadable decoded array ({e}); delete it.") from None
    if array.dtype != np.uint8 or array.shape != request.shape:
        raise UserError(
            f"{final}: holds {array.dtype} {array.shape}, expected uint8 {request.shape}; delete it."
        )
    return array


def stderr_line(text: str) -> None:
    """One line on stderr (what ``say`` is given by the loaders)."""
    print(text, file=sys.stderr, flush=True)
