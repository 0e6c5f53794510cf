"""Pack the four stain PNGs of each sample into one file: an RGBA PNG, a decoded uint8 .npy or
the decoded pixels LZ4-compressed.

``--format png`` writes ``OUT/{Id}.png``, 8-bit RGBA with R, G, B, Y in that order, so a loader
opens one file instead of four. ``--format npy`` writes ``OUT/{Id}.npy``, uint8 [H, W, 4] (HWC),
optionally resized to ``--size``: the decoded cache for when PNG decoding cannot keep up (a CPU
core decodes ~150 samples/s at 512 px from PNG; reading .npy is 10-35x faster). ``--format lz4``
writes ``OUT/{Id}.lz4``: the same pixels as the npy cache (``--size`` too), compressed in the raw
LZ4 block format, which DALI's ``fn.decoders.inflate`` decodes on the GPU and the ``lz4`` package
on a CPU (file layout: :func:`encode_lz4`).

Multi-process, resumable (files already written and valid are skipped), every file written
atomically, and ``--verify`` decodes each packed file and compares it exactly with its sources.
``OUT/pack.json`` records what was packed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from fasthpa.data.dataset import load_sample, load_split, missing_files
from fasthpa.errors import UserError
from fasthpa.io import atomic_write, atomic_write_bytes, atomic_write_json, make_dir

FORMATS = ("png", "npy", "lz4")
MANIFEST = "pack.json"
LZ4_LAYOUTS = ("planar", "interleaved")
"""``--lz4-layout``: one LZ4 block per stain plane ([H, W] each; the default: 9% smaller than
interleaved on the synthetic stains at level 9, and ``--channels rgb`` skips the yellow block),
or one block of the interleaved HWC pixels (about 2x faster to decode on a CPU)."""
LZ4_DEFAULT_LEVEL = 9
_LZ4_MAGIC = b"FHPALZ4\x00"
_LZ4_VERSION = 1
# magic, crc32 of every byte after it; then version, layout, channels, height, width, blocks
_LZ4_PREFIX = struct.Struct("<8sI")
_LZ4_FIELDS = struct.Struct("<HBBIII")


@dataclass
class PackResult:
    out: str
    format: str
    size: int | None
    split: str
    source: str
    samples: int
    written: int
    skipped: int
    verified: int


def packed_path(out_dir: str | os.PathLike, sample_id: str, fmt: str) -> Path:
    return Path(out_dir) / f"{sample_id}.{fmt}"


def resize_sample(img: np.ndarray, size: int | None) -> np.ndarray:
    """Resize uint8 [H, W, C] to [size, size, C], channel by channel with PIL's antialiased
    bilinear filter (the same function the PyTorch loader uses, so both see identical pixels)."""
    if size is None or (img.shape[0] == size and img.shape[1] == size):
        return img
    from PIL import Image

    planes = [
        np.asarray(Image.fromarray(img[..., c]).resize((size, size), Image.Resampling.BILINEAR))
        for c in range(img.shape[-1])
    ]
    return np.stack(planes, axis=-1)


# ---------------------------------------------------------------- the LZ4 sample file


@dataclass(frozen=True)
class Lz4Header:
    """What an ``.lz4`` sample file says about itself (see :func:`encode_lz4`)."""

    layout: str
    channels: int
    height: int
    width: int
    sizes: tuple[int, ...]
    """compressed bytes of each block, in file order"""
    offset: int
    """where the first block starts in the file"""

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape one block inflates to: [H, W] (planar) or [H, W, C] (interleaved)."""
        if self.layout == "planar":
            return (self.height, self.width)
        return (self.height, self.width, self.channels)


def encode_lz4(img: np.ndarray, layout: str = "planar", level: int = LZ4_DEFAULT_LEVEL) -> bytes:
    """uint8 [H, W, C] -> the bytes of one ``.lz4`` sample file.

    Layout: an 8-byte magic, the CRC-32 of everything after it (u32), then version (u16),
    layout (u8: 0 planar, 1 interleaved), channels (u8), height, width and the number of blocks
    (u32 each), the compressed size of each block (u32 each), then the blocks back to back. Every
    block is in the raw LZ4 block format (no frame, no size prefix), as DALI's inflate reads it.
    ``level`` 0 is LZ4's fast mode, 1-12 its high-compression levels. Little-endian throughout.
    """
    import lz4.block

    if layout not in LZ4_LAYOUTS:
        raise UserError(f"--lz4-layout {layout!r} is not one of {', '.join(LZ4_LAYOUTS)}.")
    if not 0 <= level <= 12:
        raise UserError(f"--lz4-level {level}: must be 0 (fast) to 12.")
    kw = {"mode": "high_compression", "compression": level} if level > 0 else {}
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w, c = img.shape
    planes = [img[..., k] for k in range(c)] if layout == "planar" else [img]
    blocks = [lz4.block.compress(np.ascontiguousarray(p), store_size=False, **kw) for p in planes]
    body = _LZ4_FIELDS.pack(_LZ4_VERSION, LZ4_LAYOUTS.index(layout), c, h, w, len(blocks))
    body += struct.pack(f"<{len(blocks)}I", *(len(b) for b in blocks)) + b"".join(blocks)
    return _LZ4_PREFIX.pack(_LZ4_MAGIC, zlib.crc32(body)) + body


def _lz4_corrupt(path: Path, reason: str) -> UserError:
    return UserError(
        f"{path}: corrupt LZ4 sample ({reason}); re-run `fasthpa pack` on its dataset to "
        f"rewrite it."
    )


def parse_lz4(path: str | os.PathLike, data: bytes) -> Lz4Header:
    """Check the bytes of one ``.lz4`` file (magic, fields, length, CRC-32) and read its header.

    Raises a one-line UserError naming ``path`` when anything is wrong.
    """
    path = Path(path)
    pre = _LZ4_PREFIX.size
    if len(data) < pre + _LZ4_FIELDS.size or data[:8] != _LZ4_MAGIC:
        raise _lz4_corrupt(path, "not a fasthpa LZ4 file: bad magic or too short")
    _, crc = _LZ4_PREFIX.unpack_from(data)
    version, layout, c, h, w, n = _LZ4_FIELDS.unpack_from(data, pre)
    offset = pre + _LZ4_FIELDS.size + 4 * n
    if version != _LZ4_VERSION or layout >= len(LZ4_LAYOUTS) or n != (c if layout == 0 else 1):
        raise _lz4_corrupt(path, f"unknown version {version}, layout {layout} or {n} blocks")
    if len(data) < offset:
        raise _lz4_corrupt(path, f"truncated: {len(data)} bytes")
    sizes = struct.unpack_from(f"<{n}I", data, pre + _LZ4_FIELDS.size)
    if len(data) != offset + sum(sizes):
        what = "truncated" if len(data) < offset + sum(sizes) else "trailing bytes"
        raise _lz4_corrupt(
            path, f"{what}: {len(data)} bytes where the header says {offset + sum(sizes)}"
        )
    if zlib.crc32(memoryview(data)[pre:]) != crc:
        raise _lz4_corrupt(path, "checksum mismatch")
    return Lz4Header(LZ4_LAYOUTS[layout], c, h, w, tuple(sizes), offset)


def peek_lz4(path: str | os.PathLike) -> tuple[int, int, int]:
    """(channels, height, width) from one ``.lz4`` file's header, checking the magic and that
    the file is as long as the header says, without reading the pixel blocks (the preflight;
    the checksum is checked when the file is decoded)."""
    path = Path(path)
    pre, fields = _LZ4_PREFIX.size, _LZ4_FIELDS.size
    try:
        with open(path, "rb") as f:
            head = f.read(pre + fields + 4 * 16)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}).") from None
    if len(head) < pre + fields or head[:8] != _LZ4_MAGIC:
        raise _lz4_corrupt(path, "not a fasthpa LZ4 file: bad magic or too short")
    version, layout, c, h, w, n = _LZ4_FIELDS.unpack_from(head, pre)
    if version != _LZ4_VERSION or layout >= len(LZ4_LAYOUTS) or n != (c if layout == 0 else 1):
        raise _lz4_corrupt(path, f"unknown version {version}, layout {layout} or {n} blocks")
    if len(head) < pre + fields + 4 * n:
        raise _lz4_corrupt(path, f"truncated: {size} bytes")
    total = pre + fields + 4 * n + sum(struct.unpack_from(f"<{n}I", head, pre + fields))
    if size != total:
        what = "truncated" if size < total else "trailing bytes"
        raise _lz4_corrupt(path, f"{what}: {size} bytes where the header says {total}")
    return c, h, w


def read_lz4_file(path: str | os.PathLike) -> tuple[bytes, Lz4Header]:
    """The checked bytes and header of one ``.lz4`` sample file (what the GPU inflate is fed)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found.") from None
    return data, parse_lz4(path, data)


def read_lz4(path: str | os.PathLike, channels: int | None = None) -> np.ndarray:
    """Decode one ``.lz4`` sample file to uint8 [H, W, channels] (default: all it holds).

    Bit-identical to the pixels it was written from; a damaged file is a UserError naming it.
    """
    import lz4.block

    data, hd = read_lz4_file(path)
    c = hd.channels if channels is None else min(channels, hd.channels)
    out = np.empty((hd.height, hd.width, c), dtype=np.uint8)
    want = int(np.prod(hd.block_shape))
    view, start = memoryview(data), hd.offset
    for k, size in enumerate(hd.sizes[: c if hd.layout == "planar" else 1]):
        try:
            raw = lz4.block.decompress(view[start : start + size], uncompressed_size=want)
        except lz4.block.LZ4BlockError as e:
            raise _lz4_corrupt(Path(path), f"block {k}: {e}") from None
        if len(raw) != want:
            raise _lz4_corrupt(Path(path), f"block {k} inflates to {len(raw)} bytes, not {want}")
        block = np.frombuffer(raw, dtype=np.uint8).reshape(hd.block_shape)
        if hd.layout == "planar":
            out[..., k] = block
        else:
            out[...] = block[..., :c]
        start += size
    return out


def read_packed(path: str | os.PathLike) -> np.ndarray:
    """Read one packed file (.png RGBA, .npy or .lz4) into uint8 [H, W, 4]."""
    path = Path(path)
    try:
        arr = _read_packed(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found.") from None
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable packed sample ({e}).") from None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 4:
        raise UserError(
            f"{path}: packed sample has shape {arr.shape} {arr.dtype}, expected [H, W, 4] uint8."
        )
    return arr


def _read_packed(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".lz4":
        return read_lz4(path)
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format != "PNG" or img.mode != "RGBA":
                raise UserError(
                    f"{path}: packed file is {img.format} {img.mode}, expected an RGBA PNG."
                )
            return np.asarray(img)
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: too many pixels to decode safely ({e}).") from None


def check_packed_file(
    path: str | os.PathLike, size: int | None = None, lz4_layout: str | None = None
) -> None:
    """Check one packed file without decoding it all: its header (4 channels, ``size`` x ``size``
    when given, the LZ4 layout when given) and an intact body (PNG chunk CRCs, the LZ4 file's
    CRC-32, the npy data length). A one-line UserError names the file and what is wrong."""
    path = Path(path)
    if path.suffix == ".lz4":
        hd = read_lz4_file(path)[1]
        shape, extra = (hd.height, hd.width, hd.channels), hd.layout
        if lz4_layout is not None and hd.layout != lz4_layout:
            raise UserError(f"{path}: {hd.layout} LZ4 sample in a {lz4_layout} pack.")
    elif path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable .npy file ({e}).") from None
        if arr.dtype != np.uint8:
            raise UserError(f"{path}: packed sample is {arr.dtype}, expected uint8.")
        shape, extra = arr.shape, None
    else:
        from PIL import Image

        try:
            with Image.open(path) as img:
                shape, extra = (img.size[1], img.size[0], len(img.getbands())), img.mode
                img.verify()  # CRCs of every chunk: catches a truncated or damaged file
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"{path}: not a readable PNG ({e}).") from None
        if extra != "RGBA":
            raise UserError(f"{path}: packed PNG is {extra}, expected RGBA.")
    if len(shape) != 3 or shape[-1] != 4:
        raise UserError(f"{path}: packed sample has shape {tuple(shape)}, expected [H, W, 4].")
    if size is not None and tuple(shape[:2]) != (size, size):
        raise UserError(f"{path}: packed sample is {shape[1]}x{shape[0]}, the pack {size}x{size}.")


def _is_valid(path: Path, size: int | None, lz4_layout: str | None) -> bool:
    """Validity check for resuming: a header that matches and an intact file body."""
    try:
        check_packed_file(path, size, lz4_layout)
    except UserError:
        return False
    return True


@dataclass(frozen=True)
class _Job:
    """What every sample of one pack run is written with (sent to the worker processes)."""

    image_dir: str
    out: str
    fmt: str
    size: int | None
    verify: bool
    lz4_layout: str
    lz4_level: int

    def encode(self, img: np.ndarray) -> bytes:
        if self.fmt == "lz4":
            return encode_lz4(img, self.lz4_layout, self.lz4_level)
        buf = io.BytesIO()
        if self.fmt == "npy":
            np.save(buf, np.ascontiguousarray(img), allow_pickle=False)
        else:
            from PIL import Image

            Image.fromarray(img, mode="RGBA").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


def _pack_one(sample_id: str, job: _Job) -> tuple[int, int, int]:
    """Pack one sample; returns (written, skipped, verified) counts."""
    path = packed_path(job.out, sample_id, job.fmt)
    written = skipped = verified = 0
    source = None
    layout = job.lz4_layout if job.fmt == "lz4" else None
    if path.exists() and _is_valid(path, job.size, layout):
        skipped = 1
    else:
        source = resize_sample(load_sample(job.image_dir, sample_id), job.size)
        atomic_write_bytes(path, job.encode(source))
        written = 1
    if job.verify:
        if source is None:
            source = resize_sample(load_sample(job.image_dir, sample_id), job.size)
        packed = read_packed(path)
        if packed.shape != source.shape or not np.array_equal(packed, source):
            raise UserError(
                f"{path}: packed pixels differ from the sources in {job.image_dir} for Id "
                f"{sample_id}."
            )
        verified = 1
    return written, skipped, verified


def _manifest_extra(fmt: str, lz4_layout: str, lz4_level: int) -> dict:
    extra = {"channels": "RGBY", "layout": "HWC"}
    if fmt == "lz4":
        extra["lz4"] = {
            "layout": lz4_layout,
            "level": lz4_level,
            "block": "raw LZ4 block format (no frame, no size prefix)",
            "file": "fasthpa.data.pack.encode_lz4 documents the header",
        }
    return extra


def _check_request(out: Path, fmt: str, size: int | None, extra: dict) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if fmt == "png" and size is not None:
        raise UserError(
            "--size applies to --format npy and lz4 (the packed PNG keeps the source size)."
        )
    if size is not None and size < 8:
        raise UserError(f"--size {size}: must be at least 8 pixels.")
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        old_layout = (old.get("lz4") or {}).get("layout")
        new_layout = (extra.get("lz4") or {}).get("layout")
        if (old.get("format"), old.get("size"), old_layout) != (fmt, size, new_layout):
            kind = f"{old_layout} {old.get('format')}" if old_layout else old.get("format")
            raise UserError(
                f"{out}: already holds a {kind} pack at size {old.get('size')}; "
                f"choose another --out."
            )


def _run_jobs(ids: list[str], job: _Job, workers: int, label: str, progress: bool) -> np.ndarray:
    """Pack every Id (a process pool unless ``workers`` is 1); returns the summed counts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    fn = partial(_pack_one, job=job)
    totals = np.zeros(3, dtype=np.int64)
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=len(ids))
        if workers == 1:
            for r in map(fn, ids):
                totals += r
                bar.advance(task)
            return totals
        chunksize = max(1, min(64, len(ids) // (workers * 8) or 1))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(fn, ids, chunksize=chunksize):
                totals += r
                bar.advance(task)
    return totals


def pack_dataset(
    root: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    fmt: str = "png",
    size: int | None = None,
    workers: int = 0,
    verify: bool = False,
    progress: bool = True,
    lz4_layout: str = "planar",
    lz4_level: int = LZ4_DEFAULT_LEVEL,
) -> PackResult:
    """Pack ``root``'s ``split`` into ``out``; see the module docstring.

    ``lz4_layout`` and ``lz4_level`` apply to ``fmt="lz4"`` (see :func:`encode_lz4`).
    """
    out = Path(out)
    extra = _manifest_extra(fmt, lz4_layout, lz4_level)
    _check_request(out, fmt, size, extra)
    if fmt == "lz4":
        encode_lz4(np.zeros((1, 1, 4), np.uint8), lz4_layout, lz4_level)  # validates both now
    data = load_split(root, split)
    missing = missing_files(data)
    if missing:
        raise UserError(
            f"{data.image_dir}: {len(missing)} channel file(s) missing (first: {missing[0].name}); run `fasthpa check` for details."
        )
    make_dir(out)
    workers = workers or min(os.cpu_count() or 1, 16)
    job = _Job(str(data.image_dir), str(out), fmt, size, verify, lz4_layout, lz4_level)
    totals = _run_jobs(data.ids, job, workers, f"packing {split} -> {fmt}", progress)
    result = PackResult(
        out=str(out),
        format=fmt,
        size=size,
        split=split,
        source=str(Path(root).resolve()),
        samples=len(data),
        written=int(totals[0]),
        skipped=int(totals[1]),
        verified=int(totals[2]),
    )
    atomic_write_json(
        out / MANIFEST,
        {k: v for k, v in asdict(result).items() if k not in ("written", "skipped", "verified")}
        | extra,
    )
    # the id list, in the CSV's order, lets loaders find the files without listing the folder
    atomic_write(out / "ids.txt", lambda f: f.write(("\n".join(data.ids) + "\n").encode()))
    return result


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", type=Path, help="dataset folder (Kaggle layout)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the packed files")
    p.add_argument(
        "--split", choices=["train", "test"], default="train", help="which split to pack"
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="png",
        help="png: one RGBA PNG per sample; npy: decoded uint8 HWC cache; lz4: the decoded "
        "pixels LZ4-compressed (DALI inflates them on the GPU)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="resize to SIZE x SIZE (npy and lz4); default: source size",
    )
    p.add_argument(
        "--lz4-layout",
        choices=LZ4_LAYOUTS,
        default="planar",
        help="lz4: one block per stain plane, or one block of interleaved HWC pixels",
    )
    p.add_argument(
        "--lz4-level",
        type=int,
        default=LZ4_DEFAULT_LEVEL,
        help="lz4: 0 for LZ4's fast mode, 1-12 for its high-compression levels",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="processes (0: one per CPU core, at most 16)"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="decode every packed file and compare it exactly with its sources",
    )


def run(args: argparse.Namespace) -> int:
    r = pack_dataset(
        args.root,
        args.out,
        args.split,
        args.format,
        args.size,
        args.workers,
        args.verify,
        lz4_layout=args.lz4_layout,
        lz4_level=args.lz4_level,
    )
    msg = f"packed {r.samples} samples into {r.out} ({r.format}): {r.written} written, {r.skipped} already there"
    if args.verify:
        msg += f", {r.verified} verified exactly against the sources"
    print(msg)
    return 0
