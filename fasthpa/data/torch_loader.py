"""The PyTorch twin of the DALI pipelines: the fallback without DALI and the baseline for its figures.

Worker processes (``torch.utils.data.DataLoader``, persistent, pinned memory on CUDA) each build
whole batches: decode through the dataset layer (the exact-or-reject PNG rule, ``read_packed``,
``np.load`` for the cache, the ``lz4`` package for the LZ4 pack), resize with PIL (``fasthpa.data.pack.resize_sample``, the
function the npy cache was written with) and crop, then stack uint8 HWC. The main process copies
the uint8 batch to the device (4x less traffic than float) and there applies the transposition,
the flips and the normalisation, then views the HWC batch as NCHW (channels_last, no copy).

The sampler walks :func:`fasthpa.data.sharding.epoch_plan`; the augmentation draws come from
:func:`fasthpa.data.sharding.augment_draws`, so this loader and the DALI one agree sample for
sample.

Call it through :func:`fasthpa.data.loader.build_loader` (``backend="torch"``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import numpy as np
import torch

from fasthpa.data.contract import LoaderSpec, lookup_labels, normalise, targets_on_device
from fasthpa.data.pack import resize_sample
from fasthpa.data.source import read_sample
from fasthpa.errors import CarriedError, UserError


class _BatchReader(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: ``(rows, draws) -> (pixels, rows, draws)``.

    Sent to the worker processes; holds only the source description and sizes.
    """

    def __init__(self, spec: LoaderSpec) -> None:
        self.source = spec.source
        self.channels = spec.channels
        self.image_size = spec.image_size
        self.side = spec.side
        self.crop = spec.crop
        self.pad_row = spec.pad_row
        # on a CPU device the workers finish the batch: the main process is the training
        # process, and its intra-op threads would fight the workers for the same cores
        self.finish_in_worker = spec.device.type == "cpu"
        self.spec = spec

    def __len__(self) -> int:  # items come from the sampler; the length is never used
        return 0

    def load(self, row: int, draw: np.ndarray) -> np.ndarray:
        """One sample, resized and cropped; flipped too (as free numpy views) on a CPU device."""
        img = read_sample(self.source, row, self.channels)
        img = resize_sample(img, self.image_size)
        if img.shape[0] != self.side or img.shape[1] != self.side:
            raise UserError(
                f"{self.source.sample_paths(row)[0]}: Id {self.source.ids[row]} is "
                f"{img.shape[1]}x{img.shape[0]}, other samples {self.side}x{self.side}; "
                f"set --image-size to load them together."
            )
        if self.crop is not None:
            y, x = int(draw[3]), int(draw[4])
            img = img[y : y + self.crop, x : x + self.crop]
        if self.finish_in_worker:  # the same order as augment_on_device
            if draw[2]:
                img = np.swapaxes(img, 0, 1)
            if draw[0]:
                img = img[:, ::-1]
            if draw[1]:
                img = img[::-1]
        return img

    def __getitem__(self, job: tuple[np.ndarray, np.ndarray]):
        try:
            return self._batch(*job)
        except UserError as e:  # crosses to the main process as its one line (see __iter__)
            return CarriedError(str(e))

    def _batch(self, rows: np.ndarray, draws: np.ndarray):
        imgs = [self.load(int(r) if r >= 0 else self.pad_row, d) for r, d in zip(rows, draws)]
        # the one copy, through the flipped views, into C order (np.stack alone would keep the
        # transposed views' memory order)
        batch = np.empty((len(imgs), *imgs[0].shape), dtype=np.uint8)
        pixels = torch.from_numpy(np.stack(imgs, out=batch))
        if self.finish_in_worker:
            pixels = normalise(pixels, self.spec)
        return pixels, torch.from_numpy(rows), torch.from_numpy(draws)


class _PlanSampler(torch.utils.data.Sampler):
    """Yields one ``(rows, draws)`` job per batch of this rank's plan for the current epoch.

    Lives in the main process, so ``set_epoch`` takes effect even with persistent workers.
    """

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self.epoch = 0

    def __len__(self) -> int:
        return self.spec.batches()

    def __iter__(self):
        plan = self.spec.plan(self.epoch)
        for step, rows in enumerate(plan):
            yield rows, self.spec.draws(self.epoch, step).as_array()


def augment_on_device(pixels: torch.Tensor, draws: torch.Tensor, spec: LoaderSpec) -> torch.Tensor:
    """Per-sample transposition, then horizontal and vertical flips of uint8 [B, H, W, C].

    ``draws`` is int32 [B, 5] (hflip, vflip, transpose, crop_y, crop_x) on the same device (the
    crop was taken before the copy). Nothing is applied in eval mode.
    """
    h_p, v_p, t_p = spec.augment.probabilities() if spec.train else (0.0, 0.0, 0.0)
    x = pixels
    # torch.where over both candidates avoids a host sync to ask which samples flip
    if t_p > 0:
        x = torch.where(draws[:, 2, None, None, None].bool(), x.transpose(1, 2), x)
    if h_p > 0:
        x = torch.where(draws[:, 0, None, None, None].bool(), x.flip(2), x)
    if v_p > 0:
        x = torch.where(draws[:, 1, None, None, None].bool(), x.flip(1), x)
    return x


def augment_and_normalise(
    pixels: torch.Tensor, draws: torch.Tensor, spec: LoaderSpec
) -> torch.Tensor:
    """:func:`augment_on_device` then :func:`normalise` (the CUDA path, after the copy)."""
    return normalise(augment_on_device(pixels, draws, spec), spec)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM on this thread while the loader forks its workers: a child starts
    with its parent's signal mask, so one signalled between its fork and
    :func:`ignore_stop_signals` keeps the signal pending instead of dying of it. The main
    process receives what arrived once the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 (DataLoader's signature)
    """In each worker: leave SIGINT/SIGTERM to the main process. A scheduler or a Ctrl-C sends
    them to the whole process group; a worker that died of them first would take the main
    process down with a traceback before it could save its checkpoint. The workers exit when
    the main process shuts the loader down (or dies: they watch their parent). Ignoring
    first, then unblocking, drops what arrived while the worker started (held by
    :func:`stop_signals_held`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class TorchBatchLoader:
    """PyTorch DataLoader backend; see the module docstring. Build with ``build_loader``."""

    backend = "torch"

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self.placement = {"where": "streamed", "bytes": 0, "source": spec.source.kind}
        self.sampler = _PlanSampler(spec)
        self.targets = targets_on_device(spec)
        reader = _BatchReader(spec)
        self.finish_in_worker = reader.finish_in_worker
        cuda = spec.device.type == "cuda"
        kwargs = {}
        if spec.workers > 0:
            # two batches in flight per worker keep the device fed without hoarding memory
            kwargs = {"persistent_workers": True, "prefetch_factor": 2}
            kwargs["worker_init_fn"] = ignore_stop_signals
        self.loader = torch.utils.data.DataLoader(
            reader,
            batch_size=None,
            sampler=self.sampler,
            num_workers=spec.workers,
            pin_memory=cuda,
            **kwargs,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        spec, dev = self.spec, self.spec.device
        with stop_signals_held():  # the first iter() forks the (persistent) workers
            items = iter(self.loader)
        for item in items:
            if isinstance(item, CarriedError):
                item.reraise()
            pixels, rows, draws = item
            rows = rows.to(dev, non_blocking=True)
            if self.finish_in_worker:
                images = pixels  # already [B, C, H, W] channels_last, normalised
            else:  # uint8 to the device, then augment there: 4x less to transfer than float
                pixels = pixels.to(dev, non_blocking=True)
                images = augment_and_normalise(pixels, draws.to(dev, non_blocking=True), spec)
            labels = lookup_labels(self.targets, rows, spec.batch_size, dev)
            yield images, labels, rows
