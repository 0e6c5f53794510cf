"""Channel statistics: exact against a float64 reference, seeded sampling, the JSON round trip."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_tiny_dataset

from fasthpa.data.pack import pack_dataset
from fasthpa.data.source import open_source
from fasthpa.data.stats import (
    ChannelStats,
    channel_histograms,
    compute_channel_stats,
    load_stats,
    save_stats,
    stats_from_histograms,
)
from fasthpa.errors import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    ids, pixels = write_tiny_dataset(root, n=9, size=17, seed=21)
    pack_dataset(root, root / "npy", fmt="npy", workers=1, progress=False)
    return root, pixels


def _reference(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = pixels.astype(np.float64).reshape(-1, pixels.shape[-1]) / 255.0
    return x.mean(axis=0), x.std(axis=0)


@pytest.mark.parametrize("packed", [None, "npy"])
def test_stats_match_float64_reference(data, packed):
    root, pixels = data
    source = open_source(root, packed=root / packed if packed else None)
    rows = np.array([0, 2, 3, 5, 8])
    stats = compute_channel_stats(source, rows, workers=2)
    mean, std = _reference(pixels[rows])
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(stats.std, std, rtol=1e-10)


def test_stats_sample_is_seeded_and_within_the_rows(data):
    root, pixels = data
    source = open_source(root, packed=root / "npy")
    rows = np.array([1, 2, 4, 6, 7])
    a = compute_channel_stats(source, rows, max_samples=2, seed=3)
    b = compute_channel_stats(source, rows, max_samples=2, seed=3)
    assert a == b
    # the two sampled rows must be a pair from `rows`: one of the pairs' reference values
    pairs = [(i, j) for i in rows for j in rows if i < j]
    refs = [_reference(pixels[list(p)]) for p in pairs]
    assert any(
        np.allclose(a.mean, m, rtol=1e-12) and np.allclose(a.std, s, rtol=1e-10) for m, s in refs
    )
    seeds = {compute_channel_stats(source, rows, max_samples=2, seed=s).mean for s in range(6)}
    assert len(seeds) > 1, "different seeds pick different samples"


def test_histogram_stats_on_random_arrays():
    rng = np.random.default_rng()
    img = rng.integers(0, 256, size=(31, 7, 5), dtype=np.uint8)
    stats = stats_from_histograms(channel_histograms(img))
    mean, std = _reference(img)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(stats.std, std, rtol=1e-10)
    const = np.full((4, 4, 2), 9, dtype=np.uint8)
    flat = stats_from_histograms(channel_histograms(const))
    assert flat.std == (1 / 255, 1 / 255), "a constant channel gets one grey level, not zero"


def test_save_load_round_trip_and_errors(tmp_path):
    stats = ChannelStats((0.0807, 0.0526, 0.0549, 0.0828), (0.1370, 0.1015, 0.1531, 0.1381))
    path = save_stats(tmp_path / "run" / "channel_stats.json", stats)
    assert load_stats(path) == stats
    assert not list(path.parent.glob(".*.tmp")), "written atomically, no temporary left"
    assert stats.select(3) == ChannelStats(stats.mean[:3], stats.std[:3])
    path.write_text('{"mean": [0.1]}')
    with pytest.raises(UserError, match="channel_stats.json: not a valid channel statistics file"):
        load_stats(path)
    with pytest.raises(UserError, match="nope.json: channel statistics file not found"):
        load_stats(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        ChannelStats((0.1,), (0.0,))
    with pytest.raises(UserError, match="empty training split"):
        compute_channel_stats(None, np.array([], dtype=np.int64))
