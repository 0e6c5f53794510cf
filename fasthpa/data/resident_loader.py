"""The resident backend: the split decoded once, held as one uint8 tensor, each batch a gather.

Every row of the split is decoded once per node (:mod:`fasthpa.data.resident_cache`: all cores,
a progress bar on rank 0, from PNGs or any pack, resized exactly as the PyTorch twin resizes) and
held as one uint8 [N, S, S, C] tensor where it fits, in this order of preference:

==============  ================================================================================
``cuda:K``      on the GPU itself (free memory from ``torch.cuda.mem_get_info`` less a reserve
                for the model: ``max(8 GiB, 25%)`` of the GPU, or ``$FASTHPA_RESIDENT_RESERVE_GB``)
``pinned-host`` host memory on a CUDA run (MemAvailable less ``max(2 GiB, 10%)``): the cache
                file memory-mapped (one copy per node, in the page cache); each batch is
                assembled on the host into one of two pinned staging buffers and copied to the
                GPU asynchronously
``host``        a CPU run: the cache file memory-mapped (one copy per node, in the page cache)
==============  ================================================================================

On the GPU a batch is one ``index_select`` of whole pixels: the linear index of every output
pixel combines the row, the crop window, the transposition and both flips of each sample
(:func:`gather_pixels`), so the uint8 batch comes out already augmented, then
:func:`fasthpa.data.contract.normalise` makes it the normalised channels_last batch; nothing in
the loop waits for the GPU. On the host each sample is a numpy view (crop, transposition and
flips are strides, :func:`sample_view`, the twin's own steps) copied once: straight into the
float batch, normalised while it is in cache, in the loop's own thread (a CPU run, whose compute
holds every core), or into a pinned staging buffer by ``workers`` threads (a CUDA run). Rows and draws follow :meth:`LoaderSpec.plan` and
:meth:`LoaderSpec.draws`, so the batches equal the PyTorch twin's bit for bit: the same pixels,
labels, order, index and padding.

Call it through :func:`fasthpa.data.loader.build_loader` (``backend="resident"`` or ``"auto"``);
:func:`fit_placement` is the factory's question "does it fit, and where?".
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fasthpa.data.contract import (
    LoaderSpec,
    lookup_labels,
    normalise,
    normalise_constants,
    normalise_in_place,
    targets_on_device,
)
from fasthpa.data.resident_cache import (
    DIR_ENV,
    GIB,
    DecodeRequest,
    cache_dir,
    cache_room,
    decoded_rows,
    host_available_bytes,
    stderr_line,
)

RESERVE_ENV = "FASTHPA_RESIDENT_RESERVE_GB"
_COPY_CHUNK = 256 << 20  # bytes per host-to-device copy while loading the store


def decode_request(spec: LoaderSpec) -> DecodeRequest:
    """What the resident store of ``spec`` holds: every row of the split, in ascending order."""
    rows = np.unique(spec.indices)
    return DecodeRequest(spec.source, rows, spec.channels, spec.image_size, spec.side)


def cuda_free_bytes(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the GPU ``device``."""
    return torch.cuda.mem_get_info(device)


def gpu_reserve_bytes(total: int) -> int:
    """Bytes left free on the GPU for the model, activations and the batches."""
    if os.environ.get(RESERVE_ENV):
        return int(float(os.environ[RESERVE_ENV]) * GIB)
    return max(8 * GIB, total // 4)


def host_budget_bytes() -> int:
    """Host bytes a resident store may take: MemAvailable less a margin (the store is the
    memory-mapped cache file, one copy per node whatever the number of ranks)."""
    avail = host_available_bytes()
    return max(0, avail - max(2 * GIB, avail // 10))


def fit_placement(spec: LoaderSpec) -> tuple[str | None, str]:
    """Where the resident store of ``spec`` would live, and a one-line account of the numbers.

    Returns ``("cuda:K" | "pinned-host" | "host", account)`` or ``(None, why not)``; "why not"
    says what is needed, what is free and what to do.
    """
    req = decode_request(spec)
    need = req.nbytes
    what = f"the {len(req.rows)} rows need {need / GIB:.2f} GiB ({'x'.join(map(str, req.shape))} uint8)"
    room, disk_free = cache_room(req)
    if not room:
        return None, (
            f"{what} in {cache_dir()} and {disk_free / GIB:.1f} GiB are free there; set "
            f"{DIR_ENV} to a larger folder"
        )
    fixes = (
        "lower --image-size (half the side needs a quarter of the memory) or stream a pack "
        "(`fasthpa pack ROOT --out DIR --format lz4 --size S`, then --packed DIR)"
    )
    dev = spec.device
    if dev.type == "cuda":
        free, total = cuda_free_bytes(dev)
        reserve = gpu_reserve_bytes(total)
        name = f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
        gpu = f"{name} has {free / GIB:.1f} GiB free ({reserve / GIB:.1f} kept for the model)"
        if need <= free - reserve:
            return name, f"{what}; {gpu}"
        host = host_budget_bytes()
        if need <= host:
            return "pinned-host", f"{what}; {gpu}, the host has {host / GIB:.1f} GiB to spare"
        return None, f"{what}; {gpu} and the host has {host / GIB:.1f} GiB to spare; {fixes}"
    host = host_budget_bytes()
    if need <= host:
        return "host", f"{what}; the host has {host / GIB:.1f} GiB to spare"
    return None, f"{what} and the host has {host / GIB:.1f} GiB to spare; {fixes}"


def gather_pixels(
    flat: torch.Tensor,
    slots: torch.Tensor,
    draws: torch.Tensor,
    side: int,
    out_side: int,
    channels: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One augmented uint8 batch [B, S, S, C] gathered from the store, in a single index_select.

    ``flat`` is the store [N, side, side, C] viewed as one element per pixel (int32 [N*side*side]
    for 4 channels, uint8 [N*side*side, C] otherwise); ``slots`` int [B] the store rows;
    ``draws`` int32 [B, 5] (hflip, vflip, transpose, crop_y, crop_x), applied in the twin's order
    (crop, transpose, hflip, vflip). Output pixel (i, j) of a sample reads
    ``(i', j') = (S-1-i if vflip else i, S-1-j if hflip else j)`` of the transposed-or-not crop,
    so its linear index is ``a[i] + b[j]``: separable, whatever the draws. ``out``: write there
    (a pinned staging buffer).
    """
    dt = torch.int32 if flat.shape[0] < 2**31 else torch.int64
    s = out_side
    ar = torch.arange(s, device=flat.device, dtype=dt)
    d = draws.to(device=flat.device, dtype=dt)
    hflip, vflip, transpose = d[:, 0:1].bool(), d[:, 1:2].bool(), d[:, 2:3].bool()
    y, x = d[:, 3:4], d[:, 4:5]
    i_src = torch.where(vflip, s - 1 - ar, ar)
    j_src = torch.where(hflip, s - 1 - ar, ar)
    base = slots.to(device=flat.device, dtype=dt)[:, None] * (side * side)
    a = torch.where(transpose, x + i_src, (y + i_src) * side) + base
    b = torch.where(transpose, (y + j_src) * side, x + j_src)
    index = (a[:, :, None] + b[:, None, :]).view(-1)
    n = slots.shape[0]
    if channels == 4:
        dst = None if out is None else out.view(torch.int32).view(-1)
        got = torch.index_select(flat, 0, index, out=dst)
        return got.view(torch.uint8).view(n, s, s, 4)
    dst = None if out is None else out.view(-1, channels)
    return torch.index_select(flat, 0, index, out=dst).view(n, s, s, channels)


def sample_view(array: np.ndarray, slot: int, draw: np.ndarray, crop: int | None) -> np.ndarray:
    """Sample ``slot`` of ``array`` [N, S, S, C] augmented as the twin does it, as a numpy view:
    the crop window, then the transposition, the horizontal and the vertical flip of ``draw``."""
    img = array[slot]
    if crop is not None:
        y, x = int(draw[3]), int(draw[4])
        img = img[y : y + crop, x : x + crop]
    if draw[2]:
        img = np.swapaxes(img, 0, 1)
    if draw[0]:
        img = img[:, ::-1]
    if draw[1]:
        img = img[::-1]
    return img


def _empty_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new batch tensor allocated by numpy, which asks for huge pages: most of the cost of a
    fresh 64 MB float batch on a CPU is page faults, 3-4x fewer this way."""
    if dtype.itemsize == 4:
        return torch.from_numpy(np.empty(shape, dtype=np.float32)).view(dtype)
    return torch.from_numpy(np.empty(shape, dtype=np.uint16)).view(dtype)


class _HostAssembler:
    """Per-sample copies out of a host array, on ``threads`` threads (numpy and torch release
    the GIL): normalised float batches (a CPU run) or uint8 batches into pinned staging."""

    def __init__(self, array: np.ndarray, spec: LoaderSpec, threads: int) -> None:
        self.array, self.spec = array, spec
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.constants = normalise_constants(spec.stats, "cpu")
        self.scratch = threading.local()  # one float32 sample per thread (bf16/fp16 batches)

    def _map(self, fn, n: int) -> None:
        if self.pool is None:
            for k in range(n):
                fn(k)
        else:
            for _ in self.pool.map(fn, range(n)):
                pass

    def normalised(self, slots: np.ndarray, draws: np.ndarray) -> torch.Tensor:
        """[B, C, S, S] channels_last ``spec.dtype``: each sample normalised while in cache."""
        spec = self.spec
        shape = (len(slots), spec.out_side, spec.out_side, spec.channels)
        out = _empty_batch(shape, spec.dtype)
        direct = spec.dtype == torch.float32

        def one(k: int) -> None:
            view = sample_view(self.array, int(slots[k]), draws[k], spec.crop)
            if direct:
                y = out[k]
            else:
                y = getattr(self.scratch, "y", None)
                if y is None:
                    y = self.scratch.y = torch.empty(shape[1:], dtype=torch.float32)
            np.copyto(y.numpy(), view, casting="unsafe")  # uint8 -> float32 is exact
            normalise_in_place(y, self.constants)
            if not direct:
                out[k].copy_(y)  # the rounding of normalise's .to(dtype)

        self._map(one, len(slots))
        return out.permute(0, 3, 1, 2)

    def staged(self, slots: np.ndarray, draws: np.ndarray, out: np.ndarray) -> None:
        """The augmented uint8 samples into ``out`` [B, S, S, C] (a pinned staging buffer)."""

        def one(k: int) -> None:
            np.copyto(out[k], sample_view(self.array, int(slots[k]), draws[k], self.spec.crop))

        self._map(one, len(slots))


def _to_gpu(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A GPU copy of the decoded array, copied in chunks (the memory map is read once)."""
    store = torch.empty(array.shape, dtype=torch.uint8, device=device)
    rows = max(1, _COPY_CHUNK // max(1, int(np.prod(array.shape[1:]))))
    for a in range(0, len(array), rows):
        store[a : a + rows].copy_(torch.from_numpy(np.ascontiguousarray(array[a : a + rows])))
    return store


def _pixel_view(store: torch.Tensor) -> torch.Tensor:
    """The store as one element per pixel (see :func:`gather_pixels`)."""
    c = store.shape[-1]
    if c == 4:
        return store.view(torch.int32).view(-1)
    return store.view(-1, c)


class ResidentBatchLoader:
    """Resident backend; see the module docstring. Build with ``build_loader``."""

    backend = "resident"

    def __init__(self, spec: LoaderSpec, where: str) -> None:
        self.spec = spec
        req = decode_request(spec)
        say = stderr_line if spec.rank == 0 else None
        processes = 0 if spec.workers == 0 else len(os.sched_getaffinity(0))
        array, path = decoded_rows(req, processes=processes, progress=spec.rank == 0, say=say)
        self.on_gpu, self.pinned = where.startswith("cuda"), where == "pinned-host"
        if self.on_gpu:
            self.flat = _pixel_view(_to_gpu(array, spec.device))
            del array  # the memory map: the GPU copy is the store now
        else:
            # the memory map itself is the store. A CPU run copies in its own thread: its
            # compute holds every core, and copy threads beside it slowed the 2-core CPU's
            # training steps by 5-8% (measured with --workers 2 against 0)
            threads = spec.workers if self.pinned else 0
            self.host = _HostAssembler(array, spec, threads)
        if self.pinned:
            shape = (spec.batch_size, spec.out_side, spec.out_side, spec.channels)
            self.staging = [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in "ab"]
            self.copied: list[torch.cuda.Event | None] = [None, None]
        self.slot_of_row = np.full(len(spec.source), -1, dtype=np.int64)
        self.slot_of_row[req.rows] = np.arange(len(req.rows))
        self.targets = targets_on_device(spec)
        self.placement = {
            "where": where,
            "bytes": req.nbytes,
            "shape": list(req.shape),
            "cache": str(path),
        }
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.spec.batches()

    def _epoch_plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This epoch's rows [nb, B], store slots [nb, B] and draws [nb, B, 5], on the host."""
        spec = self.spec
        plan = spec.plan(self.epoch)
        slots = self.slot_of_row[np.where(plan >= 0, plan, spec.pad_row)]
        draws = np.zeros((len(plan), spec.batch_size, 5), dtype=np.int32)
        for step in range(len(plan)):
            draws[step] = spec.draws(self.epoch, step).as_array()
        return plan, slots, draws

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        spec, dev = self.spec, self.spec.device
        plan, slots, draws = self._epoch_plan()
        rows = _upload(torch.from_numpy(plan), dev)  # once per epoch: no copy per batch
        if self.on_gpu:
            slots_d, draws_d = (
                _upload(torch.from_numpy(slots), dev),
                _upload(torch.from_numpy(draws), dev),
            )
        for step in range(len(plan)):
            if not (self.on_gpu or self.pinned):
                images = self.host.normalised(slots[step], draws[step])
            elif self.on_gpu:
                pixels = gather_pixels(
                    self.flat, slots_d[step], draws_d[step], spec.side, spec.out_side, spec.channels
                )
                images = normalise(pixels, spec)
            else:
                images = normalise(self._staged(slots[step], draws[step], step), spec)
            index = rows[step]
            yield images, lookup_labels(self.targets, index, spec.batch_size, dev), index

    def _staged(self, slots: np.ndarray, draws: np.ndarray, step: int) -> torch.Tensor:
        """Pinned host -> GPU: assemble into one of two staging buffers, copy asynchronously."""
        k = step % 2
        if self.copied[k] is not None:
            self.copied[k].synchronize()  # the copy out of this buffer, two batches ago
        self.host.staged(slots, draws, self.staging[k].numpy())
        pixels = self.staging[k].to(self.spec.device, non_blocking=True)
        self.copied[k] = torch.cuda.Event()
        self.copied[k].record(torch.cuda.current_stream(self.spec.device))
        return pixels


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; to a GPU through pinned memory, so the copy does not wait for it."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
