"""The input pipeline's contract: where pixels come from, and batches ready for the model.

A batch is ``(images, labels, index)``:

- ``images``: [B, C, H, W] (C = 4 for RGBY, 3 for RGB) in channels_last memory format (the
  pipeline emits HWC and the batch is a zero-copy ``permute(0, 3, 1, 2)`` view), normalised with
  the run's :class:`ChannelStats`, in the training dtype, on the training device;
- ``labels``: [B, 28] float32 multi-hot on the device (zeros for an unlabelled split);
- ``index``: int64 [B] on the device, the dataset row of each sample; ``-1`` marks padding
  (eval only), which the evaluator masks out, so every real row is seen exactly once.

Sharding, shuffling and augmentation draws follow :mod:`fasthpa.data.sharding`, shared by every
backend, so the DALI pipelines and the PyTorch twin produce the same samples in the same order.

Backends (``build_loader(..., backend=)``, the ``--loader`` flag):

==========  =====================================================================================
auto        DALI when installed (GPU pipeline on a CUDA device, CPU pipeline otherwise), else the
            PyTorch twin with a one-line notice
torch       the PyTorch twin (:mod:`fasthpa.data.torch_loader`), always available
dali        DALI (:mod:`fasthpa.data.dali_loader`); a UserError if it is not installed
cache       the decoded .npy cache (``fasthpa pack --format npy``) through DALI's numpy reader,
            or through the twin without DALI
==========  =====================================================================================

Call::

    source = open_source("data/hpa", "train", packed="data/hpa_npy256")
    stats = compute_channel_stats(source, train_rows)
    loader = build_loader(source, train_rows, train=True, batch_size=64, image_size=256,
                          stats=stats, device=torch.device("cuda", rank), dtype=torch.bfloat16,
                          rank=rank, world_size=world)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels, index in loader:
            ...
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fasthpa.data.dataset import channel_paths, load_sample, load_split, missing_files
from fasthpa.data.pack import MANIFEST, packed_path, read_packed
from fasthpa.data.stats import ChannelStats, compute_channel_stats, load_stats, save_stats
from fasthpa.errors import UserError
from fasthpa.labels import CHANNELS

if TYPE_CHECKING:
    import torch

__all__ = [
    "AugmentConfig",
    "BatchLoader",
    "ChannelStats",
    "DataSource",
    "build_loader",
    "compute_channel_stats",
    "dali_available",
    "load_stats",
    "open_source",
    "read_sample",
    "save_stats",
    "stored_size",
]

BACKENDS = ("auto", "torch", "dali", "cache")
CHANNEL_SETS = {"rgby": 4, "rgb": 3}
SOURCE_KINDS = ("kaggle", "packed", "npy")


@dataclass
class AugmentConfig:
    """Training augmentations; evaluation applies none (only the centre crop, see below)."""

    hflip: bool = True
    """random horizontal flip (the reference recipe)"""
    vflip: bool = True
    """random vertical flip (the reference recipe)"""
    dihedral: bool = False
    """random view out of the 8 of the dihedral group: an H/W transposition and both flips, each
    drawn with ``flip_p`` (with 0.5 that is rot90 by k in 0..3, then an optional flip, uniformly);
    implies hflip and vflip; needs square images"""
    random_crop: int | None = None
    """side of a random square crop taken after the resize; eval takes the centred crop"""
    flip_p: float = 0.5
    """probability of each flip (and of the transposition); 1.0 forces them (tests)"""

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_p <= 1.0:
            raise UserError(f"flip probability {self.flip_p} is outside 0-1.")
        if self.random_crop is not None and self.random_crop < 1:
            raise UserError(f"--random-crop {self.random_crop}: must be at least 1 pixel.")

    def probabilities(self) -> tuple[float, float, float]:
        """(hflip, vflip, transpose) probabilities."""
        h = self.flip_p if (self.hflip or self.dihedral) else 0.0
        v = self.flip_p if (self.vflip or self.dihedral) else 0.0
        t = self.flip_p if self.dihedral else 0.0
        return h, v, t


@dataclass
class DataSource:
    """Where pixels come from: one of three layouts.

    ``kind`` is "kaggle" (4 stain PNGs per sample in ``root`` = ROOT/train), "packed" (one RGBA
    PNG per sample, ``fasthpa pack``) or "npy" (decoded uint8 HWC cache, ``--format npy``);
    ``targets`` is uint8 [N, 28] or None; ``size`` is the cache's side (npy only).
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
        return [packed_path(self.root, sample_id, "npy" if self.kind == "npy" else "png")]


class BatchLoader(Protocol):
    """What ``build_loader`` returns, whatever the backend."""

    backend: str

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (seeded by (seed, epoch); the same permutation on all ranks)."""

    def __len__(self) -> int:
        """Batches this rank yields per epoch (equal on all ranks)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (images, labels, index) batches; see the module docstring."""


def read_sample(source: DataSource, row: int, channels: int = 4) -> np.ndarray:
    """Decode dataset row ``row`` of ``source`` to uint8 [H, W, channels] as stored (no resize).

    The plain reference every backend is tested against: PNGs go through the dataset layer's
    exact-or-reject rule, packed files through ``read_packed``.
    """
    if source.kind == "kaggle":
        return load_sample(source.root, source.ids[row], CHANNELS[:channels])
    img = read_packed(source.sample_paths(row)[0])
    return img if channels == 4 else np.ascontiguousarray(img[..., :channels])


def stored_size(source: DataSource, row: int = 0) -> tuple[int, int]:
    """(height, width) of row ``row`` as stored, read from the file header (no decode)."""
    path = source.sample_paths(row, 1)[0]
    if source.kind == "npy":
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape[:2])
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

    ``packed`` is a folder written by ``fasthpa pack`` (its pack.json says png or npy); its Ids
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
    if fmt not in ("png", "npy"):
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
    kind = "npy" if fmt == "npy" else "packed"
    source = DataSource(kind, pack_dir, list(data.ids), data.targets, size)
    if kind == "npy" and size is None:
        source.size = stored_size(source)[0]
    return source


def dali_available() -> bool:
    """Whether NVIDIA DALI (``nvidia.dali``) can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # a broken install counts as missing: the twin still works
        return False
    return True


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a backend needs, validated once by :func:`build_loader`."""

    source: DataSource
    indices: np.ndarray
    train: bool
    batch_size: int
    channels: int
    image_size: int | None
    side: int
    """side of the (square) image after the resize, before the crop"""
    crop: int | None
    augment: AugmentConfig
    stats: ChannelStats
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    seed: int
    workers: int

    @property
    def out_side(self) -> int:
        return self.crop if self.crop is not None else self.side

    def draws(self, epoch: int, step: int):
        """This batch's augmentation draws (:func:`fasthpa.data.sharding.augment_draws`)."""
        from fasthpa.data.sharding import augment_draws

        h, v, t = self.augment.probabilities()
        return augment_draws(
            self.batch_size, seed=self.seed, epoch=epoch, rank=self.rank, step=step,
            world_size=self.world_size, train=self.train, hflip_p=h, vflip_p=v, transpose_p=t, image_size=self.side,
            crop=self.crop,
        )  # fmt: skip

    def plan(self, epoch: int) -> np.ndarray:
        from fasthpa.data.sharding import epoch_plan

        return epoch_plan(
            self.indices, train=self.train, batch_size=self.batch_size, rank=self.rank,
            world_size=self.world_size, seed=self.seed, epoch=epoch,
        )  # fmt: skip

    def batches(self) -> int:
        """Batches per epoch on this rank (the same every epoch and on every rank)."""
        from fasthpa.data.sharding import num_batches

        return num_batches(
            len(self.indices), train=self.train, batch_size=self.batch_size,
            world_size=self.world_size,
        )  # fmt: skip

    @property
    def pad_row(self) -> int:
        """The row whose pixels fill padding slots (their index is -1, so they are masked)."""
        return int(self.indices[0])


def build_loader(
    source: DataSource,
    indices: np.ndarray,
    *,
    train: bool,
    batch_size: int,
    image_size: int | None,
    channels: str = "rgby",
    augment: AugmentConfig | None = None,
    stats: ChannelStats,
    device: torch.device,
    dtype: torch.dtype,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    workers: int = 2,
    backend: str = "auto",
) -> BatchLoader:
    """Build the batch loader for rows ``indices`` of ``source``; see the module docstring.

    ``augment`` applies in train mode only (default: the reference flips); ``random_crop`` also
    sets the eval centre crop. ``workers`` is the number of decode processes (torch) or threads
    (DALI).
    """
    import torch

    if backend not in BACKENDS:
        raise UserError(f"--loader {backend!r} is not one of {', '.join(BACKENDS)}.")
    if channels not in CHANNEL_SETS:
        raise UserError(f"--channels {channels!r} is not one of {', '.join(CHANNEL_SETS)}.")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"dtype {dtype} is not one of float32, bfloat16, float16.")
    if image_size is not None and image_size < 8:
        raise UserError(f"--image-size {image_size}: must be at least 8 pixels.")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) == 0:
        raise UserError("the split part to load is empty (no rows).")
    if indices.min() < 0 or indices.max() >= len(source.ids):
        raise UserError(f"row indices must lie in 0-{len(source.ids) - 1}.")
    augment = augment if augment is not None else AugmentConfig()
    n_channels = CHANNEL_SETS[channels]
    if len(stats.mean) < n_channels:
        raise UserError(
            f"the channel statistics have {len(stats.mean)} channels; {channels} needs {n_channels}."
        )
    device = torch.device(device)
    h, w = (
        (image_size, image_size) if image_size is not None else stored_size(source, int(indices[0]))
    )
    if h != w and (augment.dihedral or augment.random_crop is not None):
        raise UserError(
            f"the images are {w}x{h}; --dihedral and --random-crop need square images: set --image-size."
        )
    crop = augment.random_crop
    if crop is not None and crop > h:
        raise UserError(f"--random-crop {crop} is larger than the {h}-pixel image.")
    if backend == "cache" and source.kind != "npy":
        raise UserError(
            "--loader cache reads the decoded .npy cache: run `fasthpa pack ROOT --out DIR "
            "--format npy` and pass --packed DIR."
        )
    spec = LoaderSpec(
        source=source, indices=indices, train=train, batch_size=batch_size, channels=n_channels,
        image_size=image_size, side=h, crop=crop, augment=augment,
        stats=stats.select(n_channels), device=device, dtype=dtype, rank=rank,
        world_size=world_size, seed=seed, workers=max(0, workers),
    )  # fmt: skip
    spec.plan(0)  # validates rank and batch size now rather than on the first epoch
    use_dali = backend == "dali"
    if backend == "dali" and not dali_available():
        raise UserError(
            "--loader dali: NVIDIA DALI is not installed (pip install 'fasthpa[dali]'); use --loader torch."
        )
    if backend in ("auto", "cache"):
        use_dali = dali_available()
        if not use_dali and rank == 0:
            print(
                "notice: NVIDIA DALI is not installed; using the PyTorch loader (--loader torch).",
                file=sys.stderr,
            )
    if use_dali:
        from fasthpa.data.dali_loader import DaliBatchLoader

        return DaliBatchLoader(spec)
    from fasthpa.data.torch_loader import TorchBatchLoader

    return TorchBatchLoader(spec)
