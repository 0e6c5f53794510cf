"""Label-aware sampling: repeat factors, the epoch plan that uses them (same length, rare rows
more often, deterministic, the same global batches on any number of ranks), and every backend
following it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import write_tiny_dataset

from fasthpa.data.contract import AugmentConfig
from fasthpa.data.loader import build_loader
from fasthpa.data.sharding import epoch_plan, repeat_factors
from fasthpa.data.source import open_source
from fasthpa.data.stats import ChannelStats


def test_repeat_factors_follow_the_rarest_label_of_each_row():
    y = np.zeros((100, 3), dtype=np.uint8)
    y[:50, 0] = 1  # 50%: common
    y[:4, 1] = 1  # 4%
    y[10, 2] = 1  # 1%
    r = repeat_factors(y, below=0.16, power=0.5)
    assert r[0] == pytest.approx(2.0)  # rows 0-3 hold the 4% label: sqrt(0.16 / 0.04)
    assert r[10] == pytest.approx(4.0)  # sqrt(0.16 / 0.01)
    assert (r[11:] == 1).all() and r.min() == 1
    assert (repeat_factors(y, below=0.0) == 1).all()
    assert repeat_factors(y, below=0.16, power=1.0)[10] == pytest.approx(16.0)


def test_a_repeated_plan_keeps_its_length_and_draws_rare_rows_more_often():
    n, batch = 400, 8
    indices = np.arange(n)
    repeat = np.ones(n)
    repeat[:10] = 6.0
    counts = np.zeros(n)
    for epoch in range(20):
        plan = epoch_plan(indices, train=True, batch_size=batch, seed=3, epoch=epoch, repeat=repeat)
        assert plan.shape == (n // batch, batch)
        counts += np.bincount(plan.ravel(), minlength=n)
    rare, common = counts[:10].mean() / 20, counts[10:].mean() / 20
    # pool of 450 cut to 400: a rare row comes ~6 * 400/450 times per epoch, a common one ~0.89
    assert rare == pytest.approx(6 * 400 / 450, rel=0.15) and common == pytest.approx(
        400 / 450, rel=0.05
    )
    again = epoch_plan(indices, train=True, batch_size=batch, seed=3, epoch=19, repeat=repeat)
    assert np.array_equal(again, plan)
    # two ranks see the contiguous halves of the same global batches
    both = [
        epoch_plan(
            indices, train=True, batch_size=4, rank=r, world_size=2, seed=3, epoch=19, repeat=repeat
        )
        for r in (0, 1)
    ]
    assert np.array_equal(np.concatenate(both, axis=1), plan)


@pytest.mark.parametrize("backend", ["resident", pytest.param("dali", marks=pytest.mark.dali)])
def test_every_backend_follows_the_repeated_plan(tmp_path, backend):
    write_tiny_dataset(tmp_path, n=24, size=16)
    source = open_source(tmp_path)
    stats = ChannelStats((0.0,) * 4, (1.0 / 255.0,) * 4)
    repeat = np.where(np.arange(24) < 3, 5.0, 1.0)
    common = dict(
        train=True,
        batch_size=4,
        image_size=16,
        stats=stats,
        device=torch.device("cpu"),
        dtype=torch.float32,
        workers=0,
        repeat=repeat,
        augment=AugmentConfig(),
    )
    twin = build_loader(source, np.arange(24), backend="torch", **common)
    other = build_loader(source, np.arange(24), backend=backend, **common)
    for epoch in (0, 1):
        twin.set_epoch(epoch)
        other.set_epoch(epoch)
        for (xa, ya, ia), (xb, yb, ib) in zip(twin, other):
            assert torch.equal(ia, ib) and torch.equal(ya, yb)
            assert torch.equal(xa, xb) if backend == "resident" else (xa - xb).abs().max() <= 1
