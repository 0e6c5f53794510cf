"""The pixel source: which files hold a dataset row, and the plain decode every backend matches.

Four layouts (``DataSource.kind``): the Kaggle folder (four stain PNGs per sample), a pack of
RGBA PNGs (``fasthpa pack``), the decoded uint8 ``.npy`` cache (``fasthpa pack --format npy``) and
the LZ4-compressed decoded pixels (``fasthpa pack --format lz4``).
Ids, their order and the targets always come from the split's CSV.

Call::

    source = open_source("data/hpa", "train", packed="data/hpa_npy256")
    img = read_sample(source, row=0)          # uint8 [H, W, 4] as stored, the reference pixels
    h, w = stored_size(source, row=0)         # from the file header, no decode
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasthpa.data.dataset import channel_paths, load_sample, load_split, missing_files
from fasthpa.data.pack import MANIFEST, packed_path, read_lz4, read_lz4_file, read_packed
from fasthpa.errors import UserError
from fasthpa.labels import CHANNELS

SOURCE_KINDS = ("kaggle", "packed", "npy", "lz4")
_PACK_KINDS = {"png": "packed", "npy": "npy", "lz4": "lz4"}
"""pack.json format -> DataSource.kind"""
_EXTENSIONS = {"packed": "png", "npy": "npy", "lz4": "lz4"}


@dataclass
class DataSource:
    """Where pixels come from: one of four layouts.

    ``kind`` is "kaggle" (4 stain PNGs per sample in ``root`` = ROOT/train), "packed" (one RGBA
    PNG per sample, ``fasthpa pack``), "npy" (decoded uint8 HWC cache, ``--format npy``) or "lz4"
    (the decoded pixels LZ4-compressed, ``--format lz4``); ``targets`` is uint8 [N, 28] or None;
    ``size`` is the side of a decoded pack (npy, lz4: ``--size``, else the first sample's).
    """

    kind: str
    root: Path
    ids: list[str]
    targets: np.ndarray | None
    size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"DataSource.kind {self.kind!r} is not one of {SOURCE_KINDS}.")
        self.root = Path(self.root)

    def __len__(self) -> int:
        return len(self.ids)

    def sample_paths(self, row: int, channels: int = 4) -> list[Path]:
        """The file(s) holding dataset row ``row``: C stain PNGs, or one packed file."""
        sample_id = self.ids[row]
        if self.kind == "kaggle":
            return channel_paths(self.root, sample_id, CHANNELS[:channels])
        return [packed_path(self.root, sample_id, _EXTENSIONS[self.kind])]


def read_sample(source: DataSource, row: int, channels: int = 4) -> np.ndarray:
    """Decode dataset row ``row`` of ``source`` to uint8 [H, W, channels] as stored (no resize).

    The plain reference every backend is tested against: PNGs go through the dataset layer's
    exact-or-reject rule, packed files through ``read_packed`` (LZ4 files decode only the
    planes asked for).
    """
    if source.kind == "kaggle":
        return load_sample(source.root, source.ids[row], CHANNELS[:channels])
    if source.kind == "lz4":
        return read_lz4(source.sample_paths(row)[0], channels)
    img = read_packed(source.sample_paths(row)[0])
    return img if channels == 4 else np.ascontiguousarray(img[..., :channels])


def stored_size(source: DataSource, row: int = 0) -> tuple[int, int]:
    """(height, width) of row ``row`` as stored, read from the file header (no decode)."""
    path = source.sample_paths(row, 1)[0]
    if source.kind == "npy":
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape[:2])
    if source.kind == "lz4":
        header = read_lz4_file(path)[1]
        return header.height, header.width
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except FileNotFoundError:
        raise UserError(f"{path}: file not found.") from None
    except OSError as e:
        raise UserError(f"{path}: not a readable PNG ({e}).") from None


def open_source(
    data_root: str | os.PathLike, split: str = "train", packed: str | os.PathLike | None = None
) -> DataSource:
    """Index ``split`` of the Kaggle-layout dataset at ``data_root``, optionally read from a pack.

    ``packed`` is a folder written by ``fasthpa pack`` (its pack.json says png, npy or lz4); its Ids
    must cover the split's Ids. Ids, order and targets always come from the split's CSV.
    """
    data = load_split(data_root, split)
    if packed is None:
        missing = missing_files(data)
        if missing:
            raise UserError(
                f"{data.image_dir}: {len(missing)} channel file(s) missing (first: "
                f"{missing[0].name}); run `fasthpa check` for details."
            )
        return DataSource("kaggle", data.image_dir, list(data.ids), data.targets, None)
    pack_dir = Path(packed)
    manifest_path = pack_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        fmt, size = manifest["format"], manifest.get("size")
    except FileNotFoundError:
        raise UserError(
            f"--packed {pack_dir}: no {MANIFEST} there; write the pack with `fasthpa pack`."
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{manifest_path}: not a valid pack manifest ({e}).") from None
    if fmt not in _PACK_KINDS:
        raise UserError(f"{manifest_path}: unknown pack format {fmt!r}.")
    if manifest.get("split", split) != split:
        raise UserError(
            f"--packed {pack_dir} holds the {manifest.get('split')!r} split, not {split!r}."
        )
    present = {e.name for e in os.scandir(pack_dir)}
    absent = [i for i in data.ids if f"{i}.{fmt}" not in present]
    if absent:
        raise UserError(
            f"--packed {pack_dir}: {len(absent)} of the {len(data.ids)} {split} Ids are not in the "
            f"pack (first: {absent[0]}); re-run `fasthpa pack` on {data.root}."
        )
    kind = _PACK_KINDS[fmt]
    source = DataSource(kind, pack_dir, list(data.ids), data.targets, size)
    if kind in ("npy", "lz4") and size is None:
        source.size = stored_size(source)[0]
    return source
