"""The loader contract: what every backend is given (LoaderSpec) and what it hands back.

A batch is ``(images, labels, index)``:

- ``images``: [B, C, H, W] (C = 4 for RGBY, 3 for RGB) in channels_last memory format (the
  pipeline emits HWC and the batch is a zero-copy ``permute(0, 3, 1, 2)`` view), normalised with
  the run's :class:`~fasthpa.data.stats.ChannelStats`, in the training dtype, on the device;
- ``labels``: [B, 28] float32 multi-hot on the device (zeros for an unlabelled split), looked up
  on the device from the row index (:func:`lookup_labels`);
- ``index``: int64 [B] on the device, the dataset row of each sample; ``-1`` marks padding
  (eval only), which the evaluator masks out, so every real row is seen exactly once.

Every backend normalises with :func:`normalise` (one float32 multiply and add, then the cast), so
equal uint8 pixels give bit-identical batches whichever backend produced them.

Sharding, shuffling and augmentation draws follow :mod:`fasthpa.data.sharding` through
:meth:`LoaderSpec.plan` and :meth:`LoaderSpec.draws`, so every backend produces the same samples
in the same order. Backends import this module and :mod:`fasthpa.data.source`, never each other
or the factory (:mod:`fasthpa.data.loader`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fasthpa.data.sharding import augment_draws, epoch_plan, num_batches
from fasthpa.data.source import DataSource
from fasthpa.data.stats import ChannelStats
from fasthpa.errors import UserError
from fasthpa.labels import NUM_LABELS

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "torch", "dali", "cache", "resident")
"""``--loader`` choices; see :mod:`fasthpa.data.loader`."""
CHANNEL_SETS = {"rgby": 4, "rgb": 3}
"""``--channels`` choices and the number of input channels each gives."""


def in_channels(channels: str) -> int:
    """Input channels of the model for a ``--channels`` choice (4 for rgby, 3 for rgb)."""
    try:
        return CHANNEL_SETS[channels]
    except KeyError:
        raise UserError(
            f"--channels {channels!r} is not one of {', '.join(CHANNEL_SETS)}."
        ) from None


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


class BatchLoader(Protocol):
    """What ``build_loader`` returns, whatever the backend."""

    backend: str
    placement: dict
    """where the pixels live, for env.json and the run header: ``{"where": "cuda:0" |
    "pinned-host" | "host" | "streamed", "bytes": resident bytes (0 when streamed), ...}``"""

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (seeded by (seed, epoch); the same permutation on all ranks)."""

    def __len__(self) -> int:
        """Batches this rank yields per epoch (equal on all ranks)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (images, labels, index) batches; see the module docstring."""


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
    repeat: np.ndarray | None = None
    """train only: label-aware sampling factors, one per index (:func:`epoch_plan`)"""

    @property
    def out_side(self) -> int:
        return self.crop if self.crop is not None else self.side

    def draws(self, epoch: int, step: int):
        """This batch's augmentation draws (:func:`fasthpa.data.sharding.augment_draws`)."""
        h, v, t = self.augment.probabilities()
        return augment_draws(
            self.batch_size,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            step=step,
            world_size=self.world_size,
            train=self.train,
            hflip_p=h,
            vflip_p=v,
            transpose_p=t,
            image_size=self.side,
            crop=self.crop,
        )

    def plan(self, epoch: int) -> np.ndarray:
        return epoch_plan(
            self.indices,
            train=self.train,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
            repeat=self.repeat if self.train else None,
        )

    def batches(self) -> int:
        """Batches per epoch on this rank (the same every epoch and on every rank)."""
        return num_batches(
            len(self.indices),
            train=self.train,
            batch_size=self.batch_size,
            world_size=self.world_size,
        )

    @property
    def pad_row(self) -> int:
        """The row whose pixels fill padding slots (their index is -1, so they are masked)."""
        return int(self.indices[0])


def targets_on_device(spec: LoaderSpec) -> torch.Tensor | None:
    """The source's multi-hot targets as float32 [N, 28] on the spec's device (None: unlabelled)."""
    import torch

    t = spec.source.targets
    if t is None:
        return None
    return torch.as_tensor(np.asarray(t), dtype=torch.float32).to(spec.device)


def lookup_labels(
    targets: torch.Tensor | None, rows: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """float32 [B, 28] labels of ``rows`` (int64 on the device); zeros for padding and no targets."""
    import torch

    if targets is None:
        return torch.zeros(batch_size, NUM_LABELS, dtype=torch.float32, device=device)
    real = rows >= 0
    labels = targets.index_select(0, rows.clamp(min=0))
    return labels * real[:, None].to(labels.dtype)


def normalise_constants(stats: ChannelStats, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (scale, shift) [C] with ``x * scale + shift == (x / 255 - mean) / std``."""
    import torch

    mean = torch.tensor(stats.mean, dtype=torch.float32, device=device)
    std = torch.tensor(stats.std, dtype=torch.float32, device=device)
    return 1.0 / (255.0 * std), -mean / std


def normalise_in_place(y: torch.Tensor, constants: tuple[torch.Tensor, torch.Tensor]):
    """float32 HWC pixel values ``y`` -> normalised, in place: one multiply, then one add (two
    roundings, the same on every device; a fused multiply-add would round once)."""
    scale, shift = constants
    return y.mul_(scale).add_(shift)


def normalise(pixels: torch.Tensor, spec: LoaderSpec) -> torch.Tensor:
    """uint8 [B, H, W, C] -> (x / 255 - mean) / std as [B, C, H, W] channels_last ``spec.dtype``."""
    import torch

    # contiguous HWC, whatever torch.where left: the permute below must be channels_last
    y = pixels.to(torch.float32, memory_format=torch.contiguous_format)
    y = normalise_in_place(y, normalise_constants(spec.stats, pixels.device))
    if spec.dtype != torch.float32:
        y = y.to(spec.dtype)
    return y.permute(0, 3, 1, 2)
