"""The resident backend against the PyTorch twin: the same batches bit for bit (pixels, labels,
order, index, padding), mid-epoch resume, two ranks against one process, the decode-once
handshake and its cache key, and the doesn't-fit error."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import write_tiny_dataset

import fasthpa.data.resident_loader as resident
from fasthpa.data.contract import AugmentConfig
from fasthpa.data.loader import build_loader
from fasthpa.data.pack import pack_dataset
from fasthpa.data.resident_cache import DecodeRequest, cache_dir, decoded_rows
from fasthpa.data.source import open_source
from fasthpa.data.stats import ChannelStats
from fasthpa.errors import UserError

CPU = torch.device("cpu")
N = 13  # prime: uneven last batch and rank split
STATS = ChannelStats((0.08, 0.05, 0.05, 0.08), (0.13, 0.10, 0.15, 0.13))
HAS_LZ4 = importlib.util.find_spec("lz4") is not None
LAYOUTS = [
    "kaggle",
    "npy",
    pytest.param("lz4", marks=pytest.mark.skipif(not HAS_LZ4, reason="needs the lz4 package")),
]
AUGMENTS = {
    "flips": AugmentConfig(),
    "dihedral": AugmentConfig(dihedral=True),
    "dihedral+crop": AugmentConfig(dihedral=True, random_crop=11),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resident")
    ids, pixels = write_tiny_dataset(root, n=N, size=18, seed=5)
    pack_dataset(root, root / "npy", fmt="npy", workers=1, progress=False)
    if HAS_LZ4:
        pack_dataset(root, root / "lz4", fmt="lz4", workers=1, progress=False)
    return {"root": root, "ids": ids, "pixels": pixels}


def _source(dataset, layout="kaggle"):
    return open_source(
        dataset["root"], packed=None if layout == "kaggle" else dataset["root"] / layout
    )


def _pair(source, rows=None, **kw):
    """(twin, resident) loaders built alike."""
    args = dict(
        train=True,
        batch_size=3,
        image_size=None,
        stats=STATS,
        device=CPU,
        dtype=torch.float32,
        workers=0,
        seed=7,
    )
    args.update(kw)
    rows = np.arange(N) if rows is None else np.asarray(rows)
    return (
        build_loader(source, rows, backend="torch", **args),
        build_loader(source, rows, backend="resident", **args),
    )


def _batches(loader, epoch, skip=0):
    loader.set_epoch(epoch)
    it = iter(loader)
    for _ in range(skip):
        next(it)
    return list(it)


def _assert_same(twin_batches, resident_batches):
    assert len(twin_batches) == len(resident_batches) > 0
    for (x, y, i), (x2, y2, i2) in zip(twin_batches, resident_batches):
        assert x2.is_contiguous(memory_format=torch.channels_last)
        assert x2.dtype == x.dtype and x2.shape == x.shape
        assert torch.equal(i2, i), (i2, i)
        assert torch.equal(y2, y)
        assert torch.equal(x2, x), (i, (x2.float() - x.float()).abs().max())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aug", list(AUGMENTS))
def test_train_batches_equal_the_twin(dataset, layout, aug):
    twin, res = _pair(_source(dataset, layout), augment=AUGMENTS[aug])
    assert res.backend == "resident" and res.placement["where"] == "host"
    for epoch in (0, 1):
        _assert_same(_batches(twin, epoch), _batches(res, epoch))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", ["rgby", "rgb"])
def test_dtypes_channels_resize_and_threads_equal_the_twin(dataset, dtype, channels):
    kw = dict(augment=AUGMENTS["dihedral+crop"], dtype=dtype, channels=channels, image_size=15)
    twin, _ = _pair(_source(dataset), **kw)
    res = build_loader(
        _source(dataset),
        np.arange(N),
        backend="resident",
        train=True,
        batch_size=3,
        stats=STATS,
        device=CPU,
        seed=7,
        workers=2,
        **kw,
    )
    _assert_same(_batches(twin, 3), _batches(res, 3))


def test_eval_padding_and_centre_crop_equal_the_twin(dataset):
    rows = [11, 2, 7, 0, 5, 9, 3]  # an arbitrary order: eval keeps it, pads the last batch
    twin, res = _pair(_source(dataset), rows, train=False, augment=AugmentConfig(random_crop=9))
    got = _batches(res, 0)
    _assert_same(_batches(twin, 0), got)
    index = torch.cat([i for _, _, i in got]).tolist()
    assert index == rows + [-1, -1]
    assert not got[-1][1][-2:].any(), "padding carries zero labels"


def test_resume_mid_epoch_gives_the_remaining_batches(dataset):
    twin, res = _pair(_source(dataset), augment=AUGMENTS["dihedral+crop"])
    full = _batches(twin, 4)
    fresh = build_loader(
        _source(dataset),
        np.arange(N),
        backend="resident",
        train=True,
        batch_size=3,
        image_size=None,
        stats=STATS,
        device=CPU,
        dtype=torch.float32,
        workers=0,
        seed=7,
        augment=AUGMENTS["dihedral+crop"],
    )
    _assert_same(full[2:], _batches(fresh, 4, skip=2))
    # an abandoned epoch does not shift the next one
    res.set_epoch(3)
    next(iter(res))
    _assert_same(_batches(twin, 5), _batches(res, 5))


def test_two_ranks_equal_one_process(dataset):
    """Rank r of 2 at step s holds what one process holds at step 2s + r (the sharding rule);
    eval: the two ranks together see every row once. Both ranks share one decoded file."""
    source, aug = _source(dataset), AUGMENTS["dihedral+crop"]
    common = dict(
        batch_size=2,
        image_size=None,
        stats=STATS,
        device=CPU,
        dtype=torch.float32,
        workers=0,
        seed=3,
        augment=aug,
    )
    before = set(cache_dir().glob("*.npy"))
    one = _batches(build_loader(source, np.arange(N), train=True, backend="torch", **common), 2)
    ranks = [
        _batches(
            build_loader(
                source, np.arange(N), train=True, backend="resident", rank=r, world_size=2, **common
            ),
            2,
        )
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(one) // 2
    for s in range(len(ranks[0])):
        for r in range(2):
            _assert_same([one[2 * s + r]], [ranks[r][s]])
    assert len(set(cache_dir().glob("*.npy")) - before) <= 1, "one decode for both ranks"
    evals = [
        _batches(
            build_loader(
                source,
                np.arange(N),
                train=False,
                backend="resident",
                rank=r,
                world_size=2,
                **common,
            ),
            0,
        )
        for r in range(2)
    ]
    seen = torch.cat([i for batches in evals for _, _, i in batches])
    assert sorted(seen[seen >= 0].tolist()) == list(range(N))


def test_gather_pixels_equals_numpy_views():
    """The GPU path's single index_select, run on the CPU, against the twin's numpy steps."""
    rng = np.random.default_rng()
    for c, side, crop in [(4, 17, 11), (3, 16, None), (4, 9, None)]:
        store = rng.integers(0, 256, size=(7, side, side, c), dtype=np.uint8)
        out = crop or side
        slots = rng.integers(0, 7, size=10)
        draws = np.zeros((10, 5), dtype=np.int32)
        draws[:, :3] = rng.integers(0, 2, size=(10, 3))
        draws[:4, :3] = [[0, 0, 0], [1, 1, 1], [1, 0, 1], [0, 1, 0]]
        draws[:, 3:] = rng.integers(0, side - out + 1, size=(10, 2))
        t = torch.from_numpy(store)
        got = resident.gather_pixels(
            resident._pixel_view(t), torch.from_numpy(slots), torch.from_numpy(draws), side, out, c
        )
        for k in range(10):
            ref = resident.sample_view(store, int(slots[k]), draws[k], crop)
            assert np.array_equal(got[k].numpy(), ref), (c, k, draws[k])
        # the pinned-host path's host side: the same samples into a staging buffer, 2 threads
        spec = SimpleNamespace(workers=2, stats=STATS, crop=crop)
        staged = np.zeros_like(got.numpy())
        resident._HostAssembler(store, spec, 2).staged(slots, draws, staged)
        assert np.array_equal(staged, got.numpy())


# ---------------------------------------------------------------- where it lives, and when not


def _spec(dataset, device="cpu"):
    _, res = _pair(_source(dataset))
    return dataclasses.replace(res.spec, device=torch.device(device))


def test_fit_placement_cpu_and_the_doesnt_fit_error(dataset, monkeypatch):
    spec = _spec(dataset)
    assert resident.fit_placement(spec)[0] == "host"
    monkeypatch.setattr(resident, "cache_room", lambda req: (True, 0))
    monkeypatch.setattr(resident, "host_available_bytes", lambda: 3 << 30)  # 1 GiB to spare
    monkeypatch.setattr(resident.DecodeRequest, "nbytes", property(lambda self: 5 << 30))
    where, why = resident.fit_placement(spec)
    assert where is None
    assert "need 5.00 GiB" in why and "the host has 1.0 GiB to spare" in why
    assert "--image-size" in why and "--format lz4" in why
    with pytest.raises(UserError) as err:
        _pair(_source(dataset))
    msg = str(err.value)
    assert msg.startswith("--loader resident: the 13 rows need 5.00 GiB") and "\n" not in msg


def test_fit_placement_on_a_gpu_prefers_the_gpu_then_pinned(dataset, monkeypatch):
    spec = _spec(dataset, "cuda:0")
    need = N * 18 * 18 * 4
    monkeypatch.setattr(resident, "host_available_bytes", lambda: 64 << 30)
    monkeypatch.setattr(resident, "cuda_free_bytes", lambda d: (40 << 30, 80 << 30))
    assert resident.fit_placement(spec)[0] == "cuda:0"  # 40 GiB free, 20 kept for the model
    monkeypatch.setattr(resident, "cuda_free_bytes", lambda d: (20 << 30, 80 << 30))
    where, why = resident.fit_placement(spec)
    assert where == "pinned-host" and "cuda:0 has 20.0 GiB free (20.0 kept for the model)" in why
    monkeypatch.setenv("FASTHPA_RESIDENT_RESERVE_GB", "1")
    assert resident.fit_placement(spec)[0] == "cuda:0"
    monkeypatch.setattr(resident, "host_available_bytes", lambda: 2 * need)
    monkeypatch.setattr(resident, "cuda_free_bytes", lambda d: (need, 80 << 30))
    where, why = resident.fit_placement(spec)
    assert where is None and "the host has 0.0 GiB to spare" in why and "--image-size" in why


# ---------------------------------------------------------------- decode once: key, handshake


def _request(dataset, image_size=None):
    source = _source(dataset)
    return DecodeRequest(source, np.arange(N), 4, image_size, image_size or 18)


def test_cache_key_follows_size_channels_and_files(dataset, tmp_path):
    req = _request(dataset)
    assert _request(dataset).key == req.key
    assert _request(dataset, image_size=12).key != req.key
    assert dataclasses.replace(req, channels=3).key != req.key
    # a rewritten stain file (new size/mtime) must not reuse the old array
    write_tiny_dataset(tmp_path, n=3, size=8, seed=1)
    src = open_source(tmp_path)
    before = DecodeRequest(src, np.arange(3), 4, None, 8).key
    path = src.sample_paths(1)[2]
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert DecodeRequest(src, np.arange(3), 4, None, 8).key != before


def test_one_decoder_the_others_wait(dataset, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTHPA_RESIDENT_DIR", str(tmp_path / "cache"))
    req = _request(dataset, image_size=10)
    got = {}
    waiter = threading.Thread(
        target=lambda: got.update(waiter=decoded_rows(req, processes=0, may_decode=False))
    )
    waiter.start()  # waits: no file yet, and it may not decode
    got["decoder"] = decoded_rows(req, processes=0)
    waiter.join(timeout=30)
    assert np.array_equal(got["waiter"][0], got["decoder"][0])
    assert got["waiter"][1] == got["decoder"][1]
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy"]


def test_waiter_times_out_and_stale_lock_is_taken_over(dataset, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTHPA_RESIDENT_DIR", str(tmp_path))
    monkeypatch.setenv("FASTHPA_RESIDENT_TIMEOUT", "0.3")
    req = _request(dataset, image_size=9)
    with pytest.raises(UserError, match="not written after 0 s of waiting .* delete that file"):
        decoded_rows(req, processes=0, may_decode=False)
    import socket
    import subprocess

    proc = subprocess.Popen(["true"])  # a process that has exited: its lock is stale
    proc.wait()
    (tmp_path / f"{req.key}.lock").write_text(f"{socket.gethostname()} {proc.pid}\n")
    array, _ = decoded_rows(req, processes=0)
    assert array.shape == (N, 9, 9, 4)


def test_decoder_error_reaches_the_waiters(dataset, monkeypatch, tmp_path):
    import fasthpa.data.resident_cache as cache

    monkeypatch.setenv("FASTHPA_RESIDENT_DIR", str(tmp_path / "c"))
    monkeypatch.setattr(cache, "_GRACE_S", 0.0)  # the error predates the waiter: no grace
    write_tiny_dataset(tmp_path / "ds", n=3, size=8, seed=2)
    bad = tmp_path / "ds" / "train" / "id0001_green.png"
    bad.write_bytes(b"not a png")
    req = DecodeRequest(open_source(tmp_path / "ds"), np.arange(3), 4, None, 8)
    with pytest.raises(UserError, match="id0001_green.png: not a readable PNG") as first:
        decoded_rows(req, processes=0)
    with pytest.raises(UserError) as second:
        decoded_rows(req, processes=0, may_decode=False)
    assert str(second.value) == str(first.value)
    assert not list((tmp_path / "c").glob("*.npy")) and not list((tmp_path / "c").glob(".*"))


def test_process_pool_decode_equals_in_process(dataset, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTHPA_RESIDENT_DIR", str(tmp_path / "a"))
    req = _request(dataset, image_size=14)
    one, _ = decoded_rows(req, processes=0)
    monkeypatch.setenv("FASTHPA_RESIDENT_DIR", str(tmp_path / "b"))
    pool, _ = decoded_rows(dataclasses.replace(req), processes=2)
    assert np.array_equal(one, pool)


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("pinned", [False, True], ids=["device", "pinned-host"])
def test_cuda_resident_equals_the_cpu_twin(dataset, monkeypatch, pinned):
    if pinned:
        monkeypatch.setattr(resident, "cuda_free_bytes", lambda d: (0, 80 << 30))
    kw = dict(
        train=True,
        batch_size=3,
        image_size=None,
        stats=STATS,
        seed=7,
        workers=2,
        augment=AUGMENTS["dihedral+crop"],
        dtype=torch.bfloat16,
    )
    cuda = build_loader(
        _source(dataset), np.arange(N), backend="resident", device=torch.device("cuda", 0), **kw
    )
    assert cuda.placement["where"] == ("pinned-host" if pinned else "cuda:0")
    assert cuda.placement["bytes"] == N * 18 * 18 * 4
    twin = build_loader(_source(dataset), np.arange(N), backend="torch", device=CPU, **kw)
    for epoch in (1, 2):
        batches = _batches(cuda, epoch)
        assert all(x.is_cuda and y.is_cuda and i.is_cuda for x, y, i in batches)
        got = [(x.cpu(), y.cpu(), i.cpu()) for x, y, i in batches]
        _assert_same(_batches(twin, epoch), got)
