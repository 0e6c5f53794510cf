"""The input pipeline: every backend against the plain numpy/PIL reference, sharding, fallbacks.

Each backend (the PyTorch twin; DALI's CPU pipeline where DALI is installed) must return, for the
same rows, the pixels the dataset layer decodes (``read_sample``), flipped/transposed/cropped as
``np.flip``/``np.swapaxes``/slicing say, normalised as the float64 formula says; on every layout,
the LZ4 pack included where the ``lz4`` package is installed. The resident backend is tested
against the twin in test_resident.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_tiny_dataset
from PIL import Image

from fasthpa.data.contract import AugmentConfig
from fasthpa.data.loader import build_loader
from fasthpa.data.pack import pack_dataset, resize_sample
from fasthpa.data.sharding import augment_draws, epoch_plan, num_batches
from fasthpa.data.source import DataSource, open_source, read_sample
from fasthpa.data.stats import ChannelStats
from fasthpa.errors import UserError
from fasthpa.labels import NUM_LABELS

CPU = torch.device("cpu")
# mean 0, std 1/255: normalisation becomes x * 1.0 + 0.0, so float32 output holds the exact pixels
IDENTITY = ChannelStats((0.0,) * 4, (1.0 / 255.0,) * 4)
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("dali", id="dali-cpu", marks=pytest.mark.dali),
]
HAS_LZ4 = importlib.util.find_spec("lz4") is not None
LAYOUTS = [
    "kaggle",
    "packed",
    "npy",
    pytest.param("lz4", marks=pytest.mark.skipif(not HAS_LZ4, reason="needs the lz4 package")),
]
N = 11  # prime: the last batch and the rank split are both uneven


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """A tiny Kaggle-layout dataset (N samples, 20 px) and its png, npy (and lz4) packs."""
    root = tmp_path_factory.mktemp("hpa")
    ids, pixels = write_tiny_dataset(root, n=N, size=20, seed=11)
    pack_dataset(root, root / "png", fmt="png", workers=1, progress=False)
    pack_dataset(root, root / "npy", fmt="npy", workers=1, progress=False)
    if HAS_LZ4:
        pack_dataset(root, root / "lz4", fmt="lz4", workers=1, progress=False)
    return {"root": root, "ids": ids, "pixels": pixels}


def _source(dataset: dict, layout: str) -> DataSource:
    packed = {"kaggle": None, "packed": dataset["root"] / "png", "npy": dataset["root"] / "npy"}
    packed["lz4"] = dataset["root"] / "lz4"
    return open_source(dataset["root"], "train", packed=packed[layout])


def _load(source, rows, backend, **kw):
    args = dict(
        train=False,
        batch_size=4,
        image_size=None,
        stats=IDENTITY,
        device=CPU,
        dtype=torch.float32,
        workers=0,
        backend=backend,
    )
    args.update(kw)
    return build_loader(source, np.asarray(rows), **args)


def _collect(loader, epoch: int = 0):
    """All batches of one epoch as numpy: images NHWC float, labels, index."""
    loader.set_epoch(epoch)
    imgs, labels, index = [], [], []
    for x, y, i in loader:
        assert x.is_contiguous(memory_format=torch.channels_last)
        imgs.append(x.permute(0, 2, 3, 1).float().numpy())
        labels.append(y.numpy())
        index.append(i.numpy())
    return np.concatenate(imgs), np.concatenate(labels), np.concatenate(index)


def _as_uint8(x: np.ndarray) -> np.ndarray:
    assert np.array_equal(x, np.round(x)), "identity normalisation must give whole numbers"
    return x.astype(np.uint8)


# ---------------------------------------------------------------- pixels equal the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_pixels_labels_and_index_equal_reference(dataset, layout, backend):
    source = _source(dataset, layout)
    rows = np.array([7, 2, 9, 0, 5, 3, 10])  # an arbitrary order: eval keeps it
    x, y, idx = _collect(_load(source, rows, backend))
    assert x.shape == (8, 20, 20, 4) and y.shape == (8, NUM_LABELS)
    assert idx.tolist() == rows.tolist() + [-1]
    for k, r in enumerate(rows):
        assert np.array_equal(_as_uint8(x[k]), dataset["pixels"][r]), f"row {r}"
        assert np.array_equal(y[k], source.targets[r].astype(np.float32))
    assert not y[-1].any(), "padding carries zero labels"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rgb_selects_the_first_three_channels(dataset, backend):
    source = _source(dataset, "packed")
    x, _, idx = _collect(_load(source, [4, 1, 8, 6], backend, channels="rgb"))
    assert x.shape == (4, 20, 20, 3)
    for k, r in enumerate(idx):
        assert np.array_equal(_as_uint8(x[k]), dataset["pixels"][r][..., :3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forced_flips_and_transpose_equal_numpy(dataset, layout, backend):
    source = _source(dataset, layout)
    rows = np.arange(N)
    cases = {
        "h": (AugmentConfig(hflip=True, vflip=False, flip_p=1.0), lambda a: np.flip(a, 1)),
        "v": (AugmentConfig(hflip=False, vflip=True, flip_p=1.0), lambda a: np.flip(a, 0)),
        "hv": (AugmentConfig(flip_p=1.0), lambda a: np.flip(np.flip(a, 0), 1)),
        "dihedral": (
            AugmentConfig(dihedral=True, flip_p=1.0),
            lambda a: np.flip(np.flip(np.swapaxes(a, 0, 1), 0), 1),
        ),
        "none": (AugmentConfig(flip_p=0.0), lambda a: a),
    }
    for name, (aug, ref) in cases.items():
        loader = _load(source, rows, backend, train=True, augment=aug, batch_size=3)
        x, _, idx = _collect(loader, epoch=1)
        assert len(idx) == 9 and len(set(idx.tolist())) == 9  # 3 full batches, tail dropped
        for k, r in enumerate(idx):
            assert np.array_equal(_as_uint8(x[k]), ref(dataset["pixels"][r])), (name, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_augmentations_follow_the_seeded_draws(dataset, backend):
    """Random flips, transposition and crops: each sample equals numpy applied with its draw."""
    source = _source(dataset, "npy")
    aug = AugmentConfig(dihedral=True, random_crop=13)
    loader = _load(source, np.arange(N), backend, train=True, augment=aug, batch_size=5, seed=3)
    x, _, idx = _collect(loader, epoch=2)
    assert x.shape == (10, 13, 13, 4)
    draws = [
        augment_draws(
            5,
            seed=3,
            epoch=2,
            rank=0,
            step=s,
            train=True,
            hflip_p=0.5,
            vflip_p=0.5,
            transpose_p=0.5,
            image_size=20,
            crop=13,
        )
        for s in range(2)
    ]
    seen = set()
    for k, r in enumerate(idx):
        d = draws[k // 5].as_array()[k % 5]
        ref = dataset["pixels"][r][d[3] : d[3] + 13, d[4] : d[4] + 13]
        if d[2]:
            ref = np.swapaxes(ref, 0, 1)
        if d[0]:
            ref = np.flip(ref, 1)
        if d[1]:
            ref = np.flip(ref, 0)
        seen.add(tuple(d[:3]))
        assert np.array_equal(_as_uint8(x[k]), ref), (r, d)
    assert len(seen) > 2, "the draws should vary over ten samples"


def test_device_side_augmentation_equals_numpy(dataset):
    """The twin's CUDA path (uint8 copied, then torch.where flips on the device), run on the CPU."""
    from fasthpa.data.torch_loader import augment_and_normalise

    aug = AugmentConfig(dihedral=True)
    spec = _load(_source(dataset, "npy"), np.arange(N), "torch", train=True, augment=aug).spec
    rng = np.random.default_rng()
    pixels = rng.integers(0, 256, size=(7, 9, 9, 3), dtype=np.uint8)
    draws = np.zeros((7, 5), dtype=np.int32)
    draws[:, :3] = rng.integers(0, 2, size=(7, 3))
    draws[:4, :3] = [[0, 0, 0], [1, 1, 1], [1, 0, 1], [0, 1, 0]]  # some certain cases
    spec = dataclasses.replace(spec, channels=3, stats=IDENTITY.select(3))
    out = augment_and_normalise(torch.from_numpy(pixels), torch.from_numpy(draws), spec)
    assert out.shape == (7, 3, 9, 9) and out.is_contiguous(memory_format=torch.channels_last)
    for k, (h, v, t) in enumerate(draws[:, :3]):
        ref = pixels[k]
        ref = np.swapaxes(ref, 0, 1) if t else ref
        ref = np.flip(ref, 1) if h else ref
        ref = np.flip(ref, 0) if v else ref
        assert np.array_equal(out[k].permute(1, 2, 0).numpy(), ref.astype(np.float32)), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_centre_crop(dataset, backend):
    source = _source(dataset, "kaggle")
    aug = AugmentConfig(random_crop=11)
    x, _, idx = _collect(_load(source, [3, 8], backend, augment=aug, batch_size=2))
    for k, r in enumerate(idx):  # (20 - 11) // 2 = 4
        assert np.array_equal(_as_uint8(x[k]), dataset["pixels"][r][4:15, 4:15])


def test_torch_resize_equals_pil_reference(dataset):
    """The twin resizes with the function the npy cache is written with: exact equality."""
    source = _source(dataset, "kaggle")
    x, _, idx = _collect(_load(source, np.arange(N), "torch", image_size=13))
    for k, r in enumerate(idx[:N]):
        assert np.array_equal(_as_uint8(x[k]), resize_sample(dataset["pixels"][r], 13))


@pytest.mark.dali
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dali_resize_close_to_pil_reference(dataset, layout):
    """DALI's antialiased linear resize is PIL's filter away from the edges, not bit for bit:
    within one grey level inside, the outermost pixel ring differs (edge handling)."""
    source = _source(dataset, layout)
    x, _, idx = _collect(_load(source, np.arange(N), "dali", image_size=13))
    ref = np.stack([resize_sample(dataset["pixels"][r], 13) for r in idx[:N]])
    diff = np.abs(_as_uint8(x[:N]).astype(np.int16) - ref)
    inner = diff[:, 1:-1, 1:-1]
    assert inner.max() <= 1 and (inner == 0).mean() > 0.5, (inner.max(), (inner == 0).mean())
    assert diff.mean() < 2.0, diff.mean()


# ---------------------------------------------------------------- normalisation and dtypes

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_normalisation_matches_float64(dataset, backend, dtype):
    rng = np.random.default_rng()
    stats = ChannelStats(tuple(rng.uniform(0.02, 0.2, 4)), tuple(rng.uniform(0.05, 0.3, 4)))
    source = _source(dataset, "packed")
    loader = _load(source, np.arange(N), backend, stats=stats, dtype=dtype, batch_size=6)
    images = []
    for x, _, _ in loader:
        assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
        images.append(x.permute(0, 2, 3, 1).to(torch.float64).numpy())
    got = np.concatenate(images)[:N]
    ref = (dataset["pixels"].astype(np.float64) / 255.0 - np.array(stats.mean)) / np.array(
        stats.std
    )
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n,batch", [(11, 4), (12, 3), (2, 4), (25, 1)])
def test_eval_plan_covers_every_row_once(world, n, batch):
    rows = np.random.default_rng(n).permutation(100)[:n]
    plans = [
        epoch_plan(rows, train=False, batch_size=batch, rank=r, world_size=world)
        for r in range(world)
    ]
    assert len({p.shape for p in plans}) == 1, "every rank the same number of full batches"
    flat = np.concatenate([p.ravel() for p in plans])
    real = flat[flat >= 0]
    assert sorted(real.tolist()) == sorted(rows.tolist())
    assert len(real) == n, "no duplicates"
    for r, p in enumerate(plans):  # each rank keeps the given order
        mine = p.ravel()[p.ravel() >= 0]
        assert mine.tolist() == rows[r::world].tolist()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_plan_equal_batches_disjoint_seeded(world):
    rows = np.arange(40, 87)
    plans = {
        (r, e, s): epoch_plan(
            rows, train=True, batch_size=5, rank=r, world_size=world, seed=s, epoch=e
        )
        for r in range(world)
        for e in (0, 1)
        for s in (0, 1)
    }
    nb = num_batches(47, train=True, batch_size=5, world_size=world)
    for p in plans.values():
        assert p.shape == (nb, 5) and (p >= 40).all()
    for e in (0, 1):
        epoch_rows = np.concatenate([plans[(r, e, 0)].ravel() for r in range(world)])
        assert len(set(epoch_rows.tolist())) == len(epoch_rows), "ranks disjoint"
    assert not np.array_equal(plans[(0, 0, 0)], plans[(0, 1, 0)]), "reshuffled per epoch"
    assert not np.array_equal(plans[(0, 0, 0)], plans[(0, 0, 1)]), "seed matters"
    again = epoch_plan(rows, train=True, batch_size=5, rank=0, world_size=world, seed=0, epoch=1)
    assert np.array_equal(again, plans[(0, 1, 0)]), "reproducible"


def test_plan_errors():
    with pytest.raises(UserError, match="--batch-size 8: the 10 training rows give no full batch"):
        epoch_plan(np.arange(10), train=True, batch_size=8, world_size=2)
    with pytest.raises(UserError, match="rank 2 is outside 0-1"):
        epoch_plan(np.arange(10), train=False, batch_size=8, rank=2, world_size=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_loaders_shard_like_the_plan(dataset, backend, world):
    source = _source(dataset, "kaggle")
    rows = np.arange(1, N)  # 10 rows
    ev, tr = [], []
    for rank in range(world):
        kw = dict(rank=rank, world_size=world, batch_size=2, seed=5)
        e_loader = _load(source, rows, backend, **kw)
        t_loader = _load(source, rows, backend, train=True, augment=AugmentConfig(flip_p=0), **kw)
        _, _, idx = _collect(e_loader)
        assert len(e_loader) * 2 == len(idx)
        ev.append(idx)
        _, _, idx1 = _collect(t_loader, epoch=1)
        _, _, idx2 = _collect(t_loader, epoch=2)
        assert idx1.tolist() == epoch_plan(rows, train=True, epoch=1, **kw).ravel().tolist()
        assert idx1.tolist() != idx2.tolist()
        assert len(t_loader) == (10 // world) // 2
        tr.append(idx1)
    assert len({len(i) for i in ev}) == 1 and len({len(i) for i in tr}) == 1
    real = np.concatenate(ev)
    assert sorted(real[real >= 0].tolist()) == rows.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_abandoned_epoch_then_next_epoch_follows_the_plan(dataset, backend):
    """Breaking out of an epoch (e.g. a time limit) must not shift the next epoch's order."""
    source = _source(dataset, "packed")
    loader = _load(source, np.arange(N), backend, train=True, batch_size=2, seed=9)
    loader.set_epoch(1)
    next(iter(loader))
    for epoch in (2, 3):
        _, _, idx = _collect(loader, epoch)
        plan = epoch_plan(np.arange(N), train=True, batch_size=2, seed=9, epoch=epoch)
        assert idx.tolist() == plan.ravel().tolist()


def test_torch_workers_match_in_process(dataset):
    source = _source(dataset, "packed")
    aug = AugmentConfig(dihedral=True)
    a = _collect(_load(source, np.arange(N), "torch", train=True, augment=aug, workers=0), 4)
    loader = _load(source, np.arange(N), "torch", train=True, augment=aug, workers=2)
    b = _collect(loader, 4)
    c = _collect(loader, 4)  # persistent workers, second pass
    for u, v, w in zip(a, b, c):
        assert np.array_equal(u, v) and np.array_equal(u, w)


def test_torch_worker_signalled_as_it_starts_survives(dataset, monkeypatch):
    """A scheduler's SIGTERM to the process group can reach a worker between its fork and its
    worker_init_fn; the worker must not die of it (the main process saves and stops)."""
    import multiprocessing.process
    import os
    import signal

    start = multiprocessing.process.BaseProcess.start
    signalled = []

    def start_then_signal(self):
        start(self)
        os.kill(self.pid, signal.SIGTERM)  # the child is still starting up
        signalled.append(self.pid)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start_then_signal)
    source = _source(dataset, "packed")
    want = _collect(_load(source, np.arange(N), "torch", workers=0))
    got = _collect(_load(source, np.arange(N), "torch", workers=2))
    assert len(signalled) == 2
    for u, v in zip(want, got):
        assert np.array_equal(u, v)


# ---------------------------------------------------------------- awkward PNG kinds


def _interlaced_gray_png(a: np.ndarray) -> bytes:
    """Adam7-interlaced 8-bit grayscale PNG (PIL cannot write one), filter type 0 everywhere."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b""
    for x0, y0, dx, dy in [
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ]:
        sub = a[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 8, 0, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _write_kind(path: Path, a: np.ndarray, kind: str) -> None:
    """Write gray plane ``a`` as PNG of ``kind``; the ``bad_*`` kinds must be rejected."""
    if kind == "interlaced":
        path.write_bytes(_interlaced_gray_png(a))
    elif kind in ("16bit", "bad_16bit"):
        wide = a.astype(np.uint16) * 257
        if kind == "bad_16bit":
            wide[0, 0] = 1000
        Image.fromarray(wide).save(path)
    elif kind in ("la", "bad_la"):
        la = np.stack([a, np.full_like(a, 255)], axis=-1)
        if kind == "bad_la":
            la[1, 1, 1] = 7
        Image.fromarray(la, mode="LA").save(path)
    elif kind in ("palette", "bad_palette"):
        img = Image.fromarray(a).convert("P")
        if kind == "bad_palette":
            img.putpalette([10, 20, 30] * 256)
        img.save(path)
    elif kind == "rgb":
        Image.fromarray(np.repeat(a[..., None], 3, axis=-1)).save(path)
    else:
        raise ValueError(kind)


KINDS = ["interlaced", "16bit", "la", "palette", "rgb"]
BAD_KINDS = {
    "bad_16bit": "16-bit PNG whose values are not 8-bit data",
    "bad_la": "LA PNG with transparent pixels",
    "bad_palette": "colour PNG",
}


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> dict:
    """One sample per PNG kind: each sample's green stain is written in that kind."""
    root = tmp_path_factory.mktemp("awkward")
    kinds = KINDS + list(BAD_KINDS)
    targets = [str(i) for i in range(len(kinds))]
    ids, pixels = write_tiny_dataset(root, n=len(kinds), size=16, seed=4, targets=targets)
    for i, kind in enumerate(kinds):
        _write_kind(root / "train" / f"{ids[i]}_green.png", pixels[i, ..., 1], kind)
    return {"root": root, "kinds": kinds, "pixels": pixels}


@pytest.mark.parametrize("backend", BACKENDS)
def test_awkward_png_kinds_same_as_dataset_layer(awkward, backend):
    source = open_source(awkward["root"])
    for row, kind in enumerate(awkward["kinds"]):
        if kind in BAD_KINDS:
            with pytest.raises(UserError, match=BAD_KINDS[kind]) as ref_err:
                read_sample(source, row)
            with pytest.raises(UserError) as err:
                _collect(_load(source, [row], backend, batch_size=1))
            assert str(err.value) == str(ref_err.value), kind
        else:
            reference = read_sample(source, row)
            assert np.array_equal(reference, awkward["pixels"][row]), kind
            x, _, _ = _collect(_load(source, [row], backend, batch_size=1))
            assert np.array_equal(_as_uint8(x[0]), reference), kind


# ---------------------------------------------------------------- backend choice and errors


def _no_room_for_resident(monkeypatch) -> None:
    """Make the resident store fit nowhere, so auto streams."""
    import fasthpa.data.resident_loader as resident

    monkeypatch.setattr(resident, "host_available_bytes", lambda: 0)


def test_auto_without_dali_falls_back_with_one_notice(dataset, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    _no_room_for_resident(monkeypatch)
    loader = _load(_source(dataset, "kaggle"), np.arange(N), "auto")
    assert loader.backend == "torch" and loader.placement["where"] == "streamed"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DALI is not installed" in err and "--loader torch" in err
    assert "not resident: the 11 rows need" in err and loader.choice in err
    loader = _load(_source(dataset, "npy"), np.arange(N), "cache", rank=1, world_size=2)
    assert loader.backend == "torch"
    assert capsys.readouterr().err == "", "only rank 0 prints the notice"
    with pytest.raises(UserError, match="--loader dali: NVIDIA DALI is not installed"):
        _load(_source(dataset, "kaggle"), np.arange(N), "dali")


def test_auto_picks_resident_when_it_fits(dataset, capsys):
    loader = _load(_source(dataset, "packed"), np.arange(N), "auto")
    assert loader.backend == "resident" and loader.placement["where"] == "host"
    assert loader.placement["bytes"] == N * 20 * 20 * 4
    err = capsys.readouterr().err
    assert "notice: loader auto: resident in host (the 11 rows need" in err


@pytest.mark.dali
def test_auto_and_cache_pick_dali_when_installed(dataset, monkeypatch, capsys):
    _no_room_for_resident(monkeypatch)
    assert _load(_source(dataset, "kaggle"), np.arange(N), "auto").backend == "dali-cpu"
    assert "loader auto: DALI, streaming the kaggle layout" in capsys.readouterr().err
    assert _load(_source(dataset, "npy"), np.arange(N), "cache").backend == "dali-cpu"
    assert _load(_source(dataset, "npy"), np.arange(N), "torch").backend == "torch"
    assert capsys.readouterr().err == ""


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_batches_equal_the_cpu_twin(dataset, layout, backend):
    """On a GPU (DALI's mixed decode + GPU ops, or the twin's device-side augmentation) the
    batches equal the CPU twin's, which the tests above tie to the numpy reference."""
    source = _source(dataset, layout)
    aug = AugmentConfig(dihedral=True, random_crop=15)
    kw = dict(train=True, augment=aug, batch_size=3, seed=1, dtype=torch.bfloat16)
    cuda = _load(source, np.arange(N), backend, device=torch.device("cuda"), **kw)
    assert cuda.backend == {"torch": "torch", "dali": "dali-gpu"}[backend]
    cuda.set_epoch(2)
    got = [(x.cpu(), y.cpu(), i.cpu()) for x, y, i in cuda]
    assert got[0][0].is_contiguous(memory_format=torch.channels_last)
    twin = _load(source, np.arange(N), "torch", **kw)
    twin.set_epoch(2)
    for (x, y, i), (x0, y0, i0) in zip(got, twin, strict=True):
        assert torch.equal(i, i0) and torch.equal(y, y0) and torch.equal(x, x0)


def test_build_loader_rejects_bad_arguments(dataset):
    source = _source(dataset, "kaggle")
    with pytest.raises(
        UserError, match="--loader cache reads the decoded .npy cache: run `fasthpa pack"
    ):
        _load(source, np.arange(N), "cache")
    with pytest.raises(UserError, match="--loader 'fast' is not one of"):
        _load(source, np.arange(N), "fast")
    with pytest.raises(UserError, match="--channels 'rg'"):
        _load(source, np.arange(N), "torch", channels="rg")
    with pytest.raises(UserError, match="--random-crop 21 is larger"):
        _load(source, np.arange(N), "torch", augment=AugmentConfig(random_crop=21))
    with pytest.raises(UserError, match="--batch-size 12: the 11 training rows"):
        _load(source, np.arange(N), "torch", train=True, batch_size=12)


def test_open_source_validates_the_pack(dataset, tmp_path):
    src = _source(dataset, "npy")
    assert (src.kind, src.size, len(src.ids)) == ("npy", 20, N)
    assert _source(dataset, "packed").kind == "packed"
    partial = tmp_path / "partial"
    pack_dataset(dataset["root"], partial, fmt="png", workers=1, progress=False)
    (partial / f"{dataset['ids'][3]}.png").unlink()
    with pytest.raises(
        UserError,
        match=f"1 of the {N} train Ids are not in the pack \\(first: {dataset['ids'][3]}\\)",
    ):
        open_source(dataset["root"], packed=partial)
    with pytest.raises(UserError, match="no pack.json there"):
        open_source(dataset["root"], packed=tmp_path)


def test_unlabelled_source_gives_zero_labels(dataset):
    source = _source(dataset, "kaggle")
    source = DataSource(source.kind, source.root, source.ids, None)
    _, y, _ = _collect(_load(source, np.arange(4), "torch"))
    assert y.shape == (4, NUM_LABELS) and not y.any()
