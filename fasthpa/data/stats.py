"""Per-channel mean and standard deviation of the training images, computed once and cached.

The statistics come from the training split of each run (never hard-coded; the values in
``shared/reference/hpa.md`` are only sanity checks), are written to the run folder as JSON and
re-read by evaluation and prediction, so every stage normalises identically.

Call::

    stats = compute_channel_stats(source, train_rows)        # ChannelStats, 0-1 scale, RGBY
    save_stats(run_dir / "channel_stats.json", stats)
    stats = load_stats(run_dir / "channel_stats.json")

The computation is exact: a 256-bin histogram per channel (integer counts), then the mean and
the population standard deviation in float64, over the stored pixels (before any resize).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fasthpa.errors import UserError
from fasthpa.io import atomic_write_json

if TYPE_CHECKING:
    from fasthpa.data.source import DataSource


@dataclass
class ChannelStats:
    """Per-channel normalisation constants on a 0-1 scale, one per stored channel (R, G, B, Y)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"ChannelStats: {len(self.mean)} means but {len(self.std)} stds.")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"ChannelStats: every std must be finite and > 0, got {self.std}.")

    def select(self, channels: int) -> ChannelStats:
        """The statistics of the first ``channels`` channels (3 for RGB from RGBY stats)."""
        if channels > len(self.mean):
            raise ValueError(f"ChannelStats has {len(self.mean)} channels, {channels} requested.")
        return ChannelStats(self.mean[:channels], self.std[:channels])


def channel_histograms(img: np.ndarray) -> np.ndarray:
    """int64 [C, 256]: how many pixels of each channel of uint8 [H, W, C] take each value."""
    flat = img.reshape(-1, img.shape[-1])
    return np.stack([np.bincount(flat[:, c], minlength=256) for c in range(flat.shape[1])])


def stats_from_histograms(hist: np.ndarray) -> ChannelStats:
    """Mean and population std (0-1 scale, float64) from per-channel value counts [C, 256]."""
    counts = hist.astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum(axis=1)
    mean = counts @ values / n
    var = counts @ (values**2) / n - mean**2
    # a constant channel has zero spread; 1/255 (one grey level) keeps the division finite
    std = np.sqrt(np.maximum(var, 0.0))
    std = np.where(std > 0, std, 1.0 / 255.0)
    return ChannelStats(tuple(mean.tolist()), tuple(std.tolist()))


def compute_channel_stats(
    source: DataSource,
    indices: np.ndarray,
    max_samples: int = 512,
    seed: int = 0,
    workers: int = 0,
) -> ChannelStats:
    """Mean and std per stored channel over (a seeded sample of) the rows ``indices``.

    At most ``max_samples`` rows are read, chosen without replacement with ``seed``; ``workers``
    threads decode in parallel (0: one per CPU core, at most 8).
    """
    from fasthpa.data.source import read_sample

    rows = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(rows) == 0:
        raise UserError("cannot compute channel statistics from an empty training split.")
    if len(rows) > max_samples:
        rng = np.random.default_rng([seed, 0x57A7])
        rows = np.sort(rng.choice(rows, size=max_samples, replace=False))
    workers = workers or min(os.cpu_count() or 1, 8)

    def one(row: int) -> np.ndarray:
        return channel_histograms(read_sample(source, int(row)))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        hist = sum(pool.map(one, rows.tolist()))
    return stats_from_histograms(hist)


def save_stats(path: str | os.PathLike, stats: ChannelStats) -> Path:
    """Write ``stats`` as JSON (atomically): {"mean": [...], "std": [...], "scale": "0-1"}."""
    return atomic_write_json(
        path, {"mean": list(stats.mean), "std": list(stats.std), "scale": "0-1"}
    )


def load_stats(path: str | os.PathLike) -> ChannelStats:
    """Read statistics written by :func:`save_stats`; a missing or damaged file is a UserError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return ChannelStats(tuple(data["mean"]), tuple(data["std"]))
    except FileNotFoundError:
        raise UserError(f"{path}: channel statistics file not found.") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a valid channel statistics file ({e}).") from None
