"""Reading the Kaggle HPA layout: label CSVs, per-stain PNGs, and the exact 8-bit decode rule.

Layout (the Kaggle competition's)::

    ROOT/train.csv                 Id,Target   (Target = space-separated label indices 0-27)
    ROOT/train/{Id}_{red,green,blue,yellow}.png
    ROOT/sample_submission.csv     Id,Predicted
    ROOT/test/{Id}_{red,green,blue,yellow}.png

Every reader raises :class:`fasthpa.errors.UserError` with one sentence naming the file and row.

PNG kinds other than 8-bit grayscale are converted only where the conversion is exact and
otherwise rejected, so every backend (PIL here, DALI, the packed and cached layouts) sees the
same pixels:

==========================  ================================================================
found                       decision
==========================  ================================================================
8-bit gray (L)              used as is
1-bit (bilevel)             exact: 0 -> 0, 1 -> 255
16-bit gray                 exact when every value is v * 257 (8-bit data stored as 16-bit),
                            giving v; otherwise rejected (scaling would invent a choice)
gray + alpha (LA)           exact when alpha is fully opaque; otherwise rejected
RGB / RGBA                  exact when R == G == B (and alpha opaque); otherwise rejected
palette (P)                 expanded through the palette, then the RGB/RGBA rule
anything else               rejected, naming the mode
==========================  ================================================================
"""

from __future__ import annotations

import csv
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasthpa.errors import UserError
from fasthpa.labels import CHANNELS, NUM_LABELS

SPLIT_CSV = {"train": "train.csv", "test": "sample_submission.csv"}


@dataclass(frozen=True)
class HPASplit:
    """The rows of one split of a Kaggle-layout dataset.

    ``targets`` is a uint8 multi-hot matrix [N, 28], or None for an unlabelled split (test).
    """

    root: Path
    split: str
    ids: list[str]
    targets: np.ndarray | None

    @property
    def image_dir(self) -> Path:
        return self.root / self.split

    def __len__(self) -> int:
        return len(self.ids)

    def channel_paths(self, i: int) -> list[Path]:
        return channel_paths(self.image_dir, self.ids[i])


def channel_paths(image_dir: str | os.PathLike, sample_id: str, channels=CHANNELS) -> list[Path]:
    """The per-stain PNG paths of one sample, in R, G, B, Y order."""
    image_dir = Path(image_dir)
    return [image_dir / f"{sample_id}_{c}.png" for c in channels]


def _read_csv_rows(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise UserError(f"{path}: file not found.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # newline="": CRLF accepted
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV file ({e}).") from None
    if not rows:
        raise UserError(f"{path}: the file is empty; expected a header {','.join(required)}.")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(
            f"{path}: line 1: the header {','.join(header)!r} lacks column(s) "
            f"{', '.join(missing)}; expected {','.join(required)}."
        )
    return header, rows[1:]


def _check_id(path: Path, line: int, sample_id: str) -> None:
    if not sample_id:
        raise UserError(f"{path}: line {line}: empty Id.")
    if "/" in sample_id or "\\" in sample_id or sample_id in (".", ".."):
        raise UserError(f"{path}: line {line}: Id {sample_id!r} contains a path separator.")


def parse_target(text: str) -> list[int] | None:
    """Parse a Target cell ("16 0") into label indices; None if a token is not an integer."""
    labels = []
    for token in text.split():
        try:
            labels.append(int(token))
        except ValueError:
            return None
    return labels


def read_targets_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a train.csv-style file (Id,Target) into Ids and a uint8 multi-hot matrix [N, 28].

    CRLF line endings and extra columns are accepted; an empty Target, a label outside 0-27, a
    non-integer label, a duplicate Id or a malformed row is a UserError naming the line.
    """
    path = Path(path)
    header, rows = _read_csv_rows(path, ("Id", "Target"))
    id_col, target_col = header.index("Id"), header.index("Target")
    ids: list[str] = []
    targets = np.zeros((len(rows), NUM_LABELS), dtype=np.uint8)
    seen: dict[str, int] = {}
    n = 0
    for offset, row in enumerate(rows):
        line = offset + 2
        if not row or all(not cell.strip() for cell in row):
            continue  # a blank line, e.g. a trailing one
        if len(row) < len(header):
            raise UserError(
                f"{path}: line {line}: {len(row)} field(s) where the header has {len(header)}."
            )
        sample_id, target = row[id_col].strip(), row[target_col].strip()
        _check_id(path, line, sample_id)
        if sample_id in seen:
            raise UserError(
                f"{path}: line {line}: duplicate Id {sample_id} (first seen on line {seen[sample_id]})."
            )
        seen[sample_id] = line
        if not target:
            raise UserError(f"{path}: line {line}: empty Target for Id {sample_id}.")
        labels = parse_target(target)
        if labels is None:
            raise UserError(
                f"{path}: line {line}: Target {target!r} for Id {sample_id} is not a list of "
                f"integers."
            )
        bad = [lab for lab in labels if not 0 <= lab < NUM_LABELS]
        if bad:
            raise UserError(
                f"{path}: line {line}: label {bad[0]} for Id {sample_id} is outside 0-{NUM_LABELS - 1}."
            )
        targets[n, labels] = 1
        ids.append(sample_id)
        n += 1
    if n == 0:
        raise UserError(f"{path}: no data rows after the header.")
    return ids, targets[:n]


def read_ids_csv(path: str | os.PathLike) -> list[str]:
    """Read the Id column of a CSV (sample_submission.csv, or any file with an Id column)."""
    path = Path(path)
    header, rows = _read_csv_rows(path, ("Id",))
    id_col = header.index("Id")
    ids: list[str] = []
    seen: dict[str, int] = {}
    for offset, row in enumerate(rows):
        line = offset + 2
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) <= id_col:
            raise UserError(f"{path}: line {line}: no Id field.")
        sample_id = row[id_col].strip()
        _check_id(path, line, sample_id)
        if sample_id in seen:
            raise UserError(
                f"{path}: line {line}: duplicate Id {sample_id} (first seen on line {seen[sample_id]})."
            )
        seen[sample_id] = line
        ids.append(sample_id)
    if not ids:
        raise UserError(f"{path}: no data rows after the header.")
    return ids


def load_split(root: str | os.PathLike, split: str = "train") -> HPASplit:
    """Index one split of a Kaggle-layout dataset (reads the CSV; does not touch the images)."""
    root = Path(root)
    if split not in SPLIT_CSV:
        raise UserError(f"--split {split!r} is not one of {', '.join(SPLIT_CSV)}.")
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found.")
    csv_path = root / SPLIT_CSV[split]
    if split == "train":
        ids, targets = read_targets_csv(csv_path)
    else:
        ids, targets = read_ids_csv(csv_path), None
    image_dir = root / split
    if not image_dir.is_dir():
        raise UserError(
            f"{image_dir}: image folder not found (expected {split}/ beside {csv_path.name})."
        )
    return HPASplit(root=root, split=split, ids=ids, targets=targets)


def missing_files(split: HPASplit) -> list[Path]:
    """Every expected channel PNG that does not exist (one directory listing, not N stat calls)."""
    try:
        present = {entry.name for entry in os.scandir(split.image_dir)}
    except FileNotFoundError:
        raise UserError(f"{split.image_dir}: image folder not found.") from None
    return [
        p
        for sample_id in split.ids
        for p in channel_paths(split.image_dir, sample_id)
        if p.name not in present
    ]


def _to_gray8(arr: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """Apply the exact-or-reject rule of the module docstring to a decoded PIL array."""
    if mode == "L":
        return arr
    if mode == "1":
        return arr.astype(np.uint8) * np.uint8(255)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = arr.astype(np.int64)
        if wide.min() < 0 or wide.max() > 65535 or np.any(wide % 257):
            raise UserError(
                f"{path}: 16-bit PNG whose values are not 8-bit data (max {int(wide.max())}); "
                f"fasthpa reads 8-bit stains: convert it to 8-bit first."
            )
        return (wide // 257).astype(np.uint8)
    if mode in ("LA", "RGBA"):
        if np.any(arr[..., -1] != 255):
            raise UserError(
                f"{path}: {mode} PNG with transparent pixels; fasthpa reads opaque 8-bit grayscale stains."
            )
        arr = arr[..., :-1]
        if mode == "LA":
            return arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if np.any(arr[..., 0] != arr[..., 1]) or np.any(arr[..., 0] != arr[..., 2]):
            raise UserError(
                f"{path}: colour PNG with different R, G, B values; each stain must be one "
                f"grayscale image."
            )
        return np.ascontiguousarray(arr[..., 0])
    raise UserError(f"{path}: PNG mode {mode!r} is not supported; expected 8-bit grayscale.")


def decode_png(path: str | os.PathLike) -> np.ndarray:
    """Decode one stain PNG to uint8 [H, W], converting exactly or rejecting (module docstring)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.format != "PNG":  # PIL reads by content: a JPEG named .png would decode lossily
                raise UserError(
                    f"{path}: is a {img.format} file, not a PNG; lossy data is rejected."
                )
            img.load()
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                mode = img.mode
            arr = np.asarray(img)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found.") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: too many pixels to decode safely ({e}).") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable PNG ({e}).") from None
    return _to_gray8(arr, mode, path)


def check_png_chunks(data: bytes | memoryview, path: str | os.PathLike) -> None:
    """Walk a PNG's chunks and check each one's CRC-32 (a few GB/s): a damaged file is a
    UserError naming ``path``, found before a decoder that does not name files (DALI) sees it."""
    data = memoryview(data)
    pos, n = 8, len(data)
    while pos + 12 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > n:
            break
        kind = bytes(data[pos + 4 : pos + 8])
        crc = int.from_bytes(data[end - 4 : end], "big")
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            name = kind.decode("latin-1")
            raise UserError(
                f"{path}: not a readable PNG (chunk {name} fails its CRC check: the file is "
                f"damaged)."
            )
        if kind == b"IEND":
            return
        pos = end
    raise UserError(f"{path}: not a readable PNG (truncated: no IEND chunk).")


def load_sample(image_dir: str | os.PathLike, sample_id: str, channels=CHANNELS) -> np.ndarray:
    """Decode the stains of one sample into uint8 [H, W, C] (C = len(channels), RGBY order)."""
    planes = [decode_png(p) for p in channel_paths(image_dir, sample_id, channels)]
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        sizes = ", ".join(f"{c}={s[1]}x{s[0]}" for c, s in zip(channels, (p.shape for p in planes)))
        raise UserError(f"{Path(image_dir) / sample_id}: the channels differ in size ({sizes}).")
    return np.stack(planes, axis=-1)
