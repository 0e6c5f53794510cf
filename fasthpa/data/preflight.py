"""Cheap checks of every file a run will read, before it trains or predicts anything.

    preflight(source, rows, channels=4)       # a UserError naming the first bad file

Decoding is where a damaged file would otherwise surface: in a DataLoader worker, inside DALI's
pipeline (whose errors do not name the file), or only when the dev part is evaluated after a
whole epoch of training. Reading each file's header and tail instead costs tens of microseconds
per file and catches, with one line naming the file:

- a file that cannot be opened (missing, no permission, a symlink loop) or is empty;
- a file that is not a PNG (a JPEG named .png would decode lossily; the rule is exact-or-reject);
- a truncated PNG (no IEND chunk at its end);
- an image larger than ``MAX_PIXELS`` (a decompression bomb) or smaller than ``MIN_SIDE``;
- stains of one sample with different sizes;
- a cache file (.npy) that is not uint8 [H, W, 4], an LZ4 file whose header is damaged.

What a header cannot show (corrupt compressed data inside an intact-looking file) is still
caught where it is decoded, by the dataset layer's exact-or-reject rule.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fasthpa.data.pack import peek_lz4
from fasthpa.data.source import DataSource
from fasthpa.errors import UserError

MAX_PIXELS = 89_478_485
"""the pixel count PIL's decompression-bomb guard allows (Image.MAX_IMAGE_PIXELS)"""
MIN_SIDE = 16
"""no HPA stain is smaller; a 1x1 file among 512 px ones is damaged, not an image to resize"""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG = b"\xff\xd8\xff"


def preflight(source: DataSource, rows: Sequence[int], channels: int = 4, workers: int = 16) -> int:
    """Check every file of ``rows`` of ``source`` (see the module docstring); returns how many
    files were checked. Raises a UserError naming the first bad file (in row order)."""
    rows = [int(r) for r in rows]
    if not rows:
        return 0
    check = _check_png_sample if source.kind == "kaggle" else _check_packed
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        errors = list(pool.map(lambda r: _error_of(check, source, r, channels), rows))
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise UserError(first)
    return len(rows) * (channels if source.kind == "kaggle" else 1)


def _error_of(check, source: DataSource, row: int, channels: int) -> str | None:
    try:
        check(source, row, channels)
    except UserError as e:
        return str(e)
    return None


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR after checking it is a whole PNG (signature, IEND at
    the end); a UserError naming ``path`` otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(33)
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - len(_IEND)))
            tail = f.read(len(_IEND))
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}).") from None
    if not head:
        raise UserError(f"{path}: the file is empty.")
    if head.startswith(_JPEG):
        raise UserError(f"{path}: is a JPEG file, not a PNG; lossy data is rejected.")
    if not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise UserError(f"{path}: not a PNG file (no PNG signature).")
    if tail != _IEND:
        raise UserError(f"{path}: the PNG is truncated (it does not end with IEND).")
    width, height = struct.unpack(">II", head[16:24])
    _check_size(path, width, height)
    return width, height


def _check_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise UserError(
            f"{path}: claims {width} x {height} pixels, over the {MAX_PIXELS:,}-pixel limit "
            f"(a decompression bomb, or not an HPA stain)."
        )
    if min(width, height) < MIN_SIDE:
        raise UserError(
            f"{path}: is {width} x {height} pixels, under {MIN_SIDE} px: a damaged file, not a "
            f"stain to resize."
        )


def _check_png_sample(source: DataSource, row: int, channels: int) -> None:
    paths = source.sample_paths(row, channels)
    sizes = [png_size(p) for p in paths]
    if len(set(sizes)) > 1:
        found = ", ".join(f"{p.name} {w}x{h}" for p, (w, h) in zip(paths, sizes))
        raise UserError(f"Id {source.ids[row]}: its stains differ in size ({found}).")


def _check_packed(source: DataSource, row: int, channels: int) -> None:
    (path,) = source.sample_paths(row, channels)
    if source.kind == "packed":
        png_size(path)
        return
    if source.kind == "lz4":
        _, h, w = peek_lz4(path)  # magic, header and length; the checksum when decoded
        _check_size(path, w, h)
        return
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy cache file ({e}).") from None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 4:
        raise UserError(f"{path}: the cache holds {arr.dtype} {arr.shape}, not uint8 [H, W, 4].")
    _check_size(path, arr.shape[1], arr.shape[0])
