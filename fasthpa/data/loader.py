"""The loader factory: ``build_loader`` validates a request once and picks a backend.

What a batch is, and the rules every backend follows, are in :mod:`fasthpa.data.contract`; where
pixels come from in :mod:`fasthpa.data.source`.

Backends (``build_loader(..., backend=)``, the ``--loader`` flag):

==========  =====================================================================================
auto        ``resident`` when the split fits (the GPU, else host memory with pinned copies, on
            a CUDA run; host memory on a CPU run); otherwise streaming: DALI when installed
            (GPU pipeline on a CUDA device, CPU pipeline otherwise), else the PyTorch twin. It
            says what it chose and why in one line on rank 0 (stderr), kept as ``loader.choice``.
torch       the PyTorch twin (:mod:`fasthpa.data.torch_loader`), always available
dali        DALI (:mod:`fasthpa.data.dali_loader`); a UserError if it is not installed
cache       the decoded .npy cache (``fasthpa pack --format npy``) through DALI's numpy reader,
            or through the twin without DALI
resident    the split decoded once and held in memory (:mod:`fasthpa.data.resident_loader`); a
            UserError saying what it needs and what is free when it fits nowhere
==========  =====================================================================================

Every layout of :mod:`fasthpa.data.source` (Kaggle PNGs, packed PNGs, the npy cache, the LZ4
pack) is read by every backend. Every loader has ``backend`` (the name) and ``placement`` (where
the pixels live: ``{"where": ..., "bytes": ...}``), for env.json and the run header.

Measured on a 2-core CPU at 512 px (``benchmarks/results/loader_*``), the resident store reads
far faster than any streaming path once decoded, which is why ``auto`` prefers it on a CPU too.

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

import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from fasthpa.data.contract import (
    BACKENDS,
    CHANNEL_SETS,
    AugmentConfig,
    BatchLoader,
    LoaderSpec,
)
from fasthpa.data.source import DataSource, stored_size
from fasthpa.data.stats import ChannelStats
from fasthpa.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["build_loader", "dali_available", "choose_backend"]


def cap_workers(workers: int, rank: int = 0) -> int:
    """``workers`` capped to the CPU cores this process may use, with a one-line note (rank 0):
    more decode processes than cores only add memory and switching, and a thousand of them
    can exhaust the machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if workers > cores:
        if rank == 0:
            print(
                f"note: --workers {workers} is more than the {cores} CPU cores here; using {cores}.",
                file=sys.stderr,
            )
        return cores
    return max(0, workers)


def dali_available() -> bool:
    """Whether NVIDIA DALI (``nvidia.dali``) can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # a broken install counts as missing: the twin still works
        return False
    return True


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
    repeat: np.ndarray | None = None,
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
        source=source,
        indices=indices,
        train=train,
        batch_size=batch_size,
        channels=n_channels,
        image_size=image_size,
        side=h,
        crop=crop,
        augment=augment,
        stats=stats.select(n_channels),
        device=device,
        dtype=dtype,
        rank=rank,
        world_size=world_size,
        seed=seed,
        workers=cap_workers(workers, rank),
        repeat=repeat,
    )
    spec.plan(0)  # validates rank and batch size now rather than on the first epoch
    return _build(spec, backend)


def choose_backend(spec: LoaderSpec, backend: str) -> tuple[str, str, str | None]:
    """``(module, account, placement)`` for a validated spec: the module is "resident", "dali" or
    "torch", the account the one line ``auto`` prints, the placement the resident store's."""
    from fasthpa.data.resident_loader import fit_placement

    if backend == "dali" and not dali_available():
        raise UserError(
            "--loader dali: NVIDIA DALI is not installed (pip install 'fasthpa[dali]'); use --loader torch."
        )
    why = ""
    if backend in ("auto", "resident"):
        where, account = fit_placement(spec)
        if where is not None:
            return "resident", f"loader {backend}: resident in {where} ({account})", where
        if backend == "resident":
            raise UserError(f"--loader resident: {account}.")
        why = f" (not resident: {account})"
    layout = f"streaming the {spec.source.kind} layout{why}"
    if backend == "torch":
        return "torch", f"loader torch: {layout}", None
    if dali_available():
        return "dali", f"loader {backend}: DALI, {layout}", None
    return (
        "torch",
        (
            f"loader {backend}: the PyTorch loader, {layout}; NVIDIA DALI is not installed "
            f"(--loader torch)"
        ),
        None,
    )


def _build(spec: LoaderSpec, backend: str) -> BatchLoader:
    module, account, where = choose_backend(spec, backend)
    if spec.rank == 0 and (backend == "auto" or (backend == "cache" and module == "torch")):
        print(f"notice: {account}.", file=sys.stderr)
    if module == "resident":
        from fasthpa.data.resident_loader import ResidentBatchLoader

        loader = ResidentBatchLoader(spec, where)
    elif module == "dali":
        from fasthpa.data.dali_loader import DaliBatchLoader

        loader = DaliBatchLoader(spec)
    else:
        from fasthpa.data.torch_loader import TorchBatchLoader

        loader = TorchBatchLoader(spec)
    loader.choice = account
    return loader
