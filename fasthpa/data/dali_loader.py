"""NVIDIA DALI backend: PNG decoding, the decoded .npy cache, and augmentation in one graph.

Graph (one pipeline per loader, ``device="mixed"`` decode and GPU ops on a CUDA device, a CPU
pipeline with ``device_id=None`` otherwise)::

    kaggle  4 (or 3) x encoded stain PNG --decoders.image(GRAY)--> cat(axis=2) --+
    packed  encoded RGBA PNG --decoders.image(ANY_DATA)--> [:, :, :C] -----------+
    npy     readers.numpy (uint8 HWC, one file per sample) --> [:, :, :C] -------+
    lz4     GPU: raw LZ4 blocks --decoders.inflate--> (planar: CHW -> HWC) ------+
            CPU: decoded by the lz4 package on the feeder threads (uint8 HWC) ---+
                                                                                 v
        resize (linear, antialiased; only when --image-size differs) -> slice (crop window)
        -> [transpose H/W if drawn] -> flip(vertical) -> crop_mirror_normalize(mirror=hflip,
        HWC, float32/float16) --> torch (bf16 cast there) --> permute(0, 3, 1, 2)

Order and randomness are ours, not DALI's: an ``external_source`` is fed, batch by batch, with
the rows of :func:`fasthpa.data.sharding.epoch_plan` (their file bytes, the row index and the
augmentation draws of :func:`fasthpa.data.sharding.augment_draws`), so the global reshuffle per
epoch, equal batch counts per rank, exactly-once evaluation (padding has index -1) and
replayable augmentation are the same as in the PyTorch twin, sample for sample. The feeder reads
the files on a thread pool (``workers`` threads, shared with nothing else), one batch ahead of the
batch DALI is decoding. Multi-hot labels
do not travel through DALI: the row index does, and labels are looked up on the device.
The cache is read by ``fn.readers.numpy`` over this rank's file list for the epoch (the pipeline
is rebuilt per epoch, since a reader's file list is fixed at build time; the index and the draws
still come through the external source, in the same order).

PNG kinds (the dataset layer's exact-or-reject rule, :mod:`fasthpa.data.dataset`): DALI's
decoder differs from that rule (it rescales any 16-bit PNG, converts colour to luminance and
fails on gray+alpha), so the feeder reads each PNG's header (IHDR, bytes 24-25): 8-bit
grayscale (interlaced or not; 8-bit RGBA for packed files) goes to DALI as is, and every other
kind is decoded by the dataset layer (``decode_png`` / ``read_packed``), which converts it
exactly or raises its UserError, and is handed to DALI re-encoded as a plain 8-bit PNG. Every
backend thus sees the same pixels or the same error; real HPA stains are all 8-bit gray.

LZ4 pack (``fasthpa pack --format lz4``): on a GPU the feeder threads read each file and check
its header and CRC-32 (a damaged file is a UserError naming it, as in every backend), then feed
the compressed blocks, their sizes and the block shape to ``fn.decoders.inflate``, which
decompresses them on the GPU (planar packs: one block per stain, inflated to [C, H, W] and
transposed to HWC; interleaved: one HWC block). DALI's inflate has no CPU implementation, so the
CPU pipeline decompresses on the feeder threads with the ``lz4`` package (``read_lz4``, the
twin's decoder) and feeds the uint8 HWC pixels.

Resize: DALI's antialiased linear filter is within one grey level of PIL's (the twin's and the
cache writer's), not bit-identical; for bit-identical inputs resize once with
``fasthpa pack --format npy --size S`` and train on the cache.

Call it through :func:`fasthpa.data.loader.build_loader` (``backend="dali"``, ``"auto"`` or
``"cache"``).
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fasthpa.data.contract import LoaderSpec, lookup_labels, targets_on_device
from fasthpa.data.dataset import check_png_chunks, decode_png
from fasthpa.data.pack import read_lz4, read_lz4_file, read_packed
from fasthpa.errors import UserError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRAY, _RGBA = 0, 6  # PNG colour types


def png_kind(data: np.ndarray) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk, or None if ``data`` is not a PNG."""
    if len(data) < 26 or data[:8].tobytes() != _PNG_SIGNATURE or data[12:16].tobytes() != b"IHDR":
        return None
    return int(data[24]), int(data[25])


def _encode_png(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, 4] -> bytes of a plain 8-bit PNG (fast, uncompressed deflate)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=0)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _read_encoded_tuple(path: Path, packed: bool) -> tuple[np.ndarray]:
    return (read_encoded(path, packed),)


def read_encoded(path: Path, packed: bool) -> np.ndarray:
    """The bytes DALI decodes for ``path``: the file itself when DALI decodes it exactly like the
    dataset layer, else the dataset layer's pixels re-encoded (or its UserError)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found.") from None
    if png_kind(data) == ((8, _RGBA) if packed else (8, _GRAY)):
        check_png_chunks(data, path)  # DALI's decoder does not name a damaged file
        return data
    return _encode_png(read_packed(path) if packed else decode_png(path))


def lz4_blocks(path: Path, channels: int, layout: str) -> tuple[np.ndarray, ...]:
    """What ``fn.decoders.inflate`` is fed for one ``.lz4`` file: (the blocks of the first
    ``channels`` stains back to back, their sizes, the shape each inflates to), after checking
    the file; a file of another layout than the pack's is a UserError naming it."""
    data, hd = read_lz4_file(path)
    if hd.layout != layout:
        raise UserError(
            f"{path}: {hd.layout} LZ4 sample in a {layout} pack; re-run `fasthpa pack`."
        )
    sizes = hd.sizes[:channels] if layout == "planar" else hd.sizes
    payload = np.frombuffer(data, dtype=np.uint8, count=sum(sizes), offset=hd.offset)
    return payload, np.array(sizes, dtype=np.int32), np.array(hd.block_shape, dtype=np.int32)


class _Feeder:
    """The external source: per batch, the encoded files, the draws and the rows of the plan.

    An iterable (``cycle="raise"``): DALI calls ``iter()`` again as soon as an epoch ends, before
    the next ``set_epoch``, so the plan is taken lazily at the first batch of an epoch, which
    DALI asks for only after ``DaliBatchLoader.__iter__`` has set the epoch and reset the pipe.
    """

    def __init__(self, spec: LoaderSpec, pool: ThreadPoolExecutor, read) -> None:
        self.spec = spec
        self.pool = pool
        self.read = read
        """path -> tuple of arrays fed for it (None: the pipeline reads the files itself)"""
        self.per_sample = spec.channels if spec.source.kind == "kaggle" else 1
        self.epoch = 0
        self.plan: np.ndarray | None = None
        self.step = 0
        self.reads: dict[int, list[Future]] = {}

    def __iter__(self) -> _Feeder:
        for futures in self.reads.values():
            for f in futures:
                f.cancel()
        self.plan, self.step, self.reads = None, 0, {}
        return self

    def _submit(self, step: int) -> None:
        """Start reading batch ``step``'s files on the thread pool (if it exists, once)."""
        if step in self.reads or step >= len(self.plan):
            return
        spec = self.spec
        self.reads[step] = [
            self.pool.submit(self.read, path)
            for r in self.plan[step]
            for path in spec.source.sample_paths(
                int(r) if r >= 0 else spec.pad_row, self.per_sample
            )
        ]

    def __next__(self) -> tuple[list[np.ndarray], ...]:
        if self.plan is None:
            self.plan = self.spec.plan(self.epoch)
        step = self.step
        if step >= len(self.plan):
            raise StopIteration
        self.step += 1
        out: list[list[np.ndarray]] = []
        if self.read is not None:
            self._submit(step)
            # the next batch's files are read while DALI decodes this one
            self._submit(step + 1)
            fed = [f.result() for f in self.reads.pop(step)]
            for c in range(self.per_sample):
                out += [[t[a] for t in fed[c :: self.per_sample]] for a in range(len(fed[0]))]
        out.append(list(self.spec.draws(self.epoch, step).as_array()))
        out.append([np.array([r], dtype=np.int64) for r in self.plan[step]])
        return tuple(out)


class DaliBatchLoader:
    """DALI backend; see the module docstring. Build with ``build_loader``."""

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self.cuda = spec.device.type == "cuda"
        self.backend = "dali-gpu" if self.cuda else "dali-cpu"
        self.targets = targets_on_device(spec)
        self.threads = max(1, spec.workers)
        self.pool = ThreadPoolExecutor(max_workers=self.threads)
        self.placement = {"where": "streamed", "bytes": 0, "source": spec.source.kind}
        self.cache = spec.source.kind == "npy"
        self.inputs = self._inputs()
        self.feeder = _Feeder(spec, self.pool, self.inputs[0])
        self.numpy_device = "gpu" if self.cuda else "cpu"
        self.pipe = None
        self.epoch = 0
        self.finished = True  # the pipeline has no batch of an unfinished epoch in flight

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.spec.batches()

    # ------------------------------------------------------------------ the graph

    def _inputs(self):
        """(per-file read function or None, DALI dtypes and ndims of what it returns)."""
        from nvidia.dali import types

        spec = self.spec
        kind, c = spec.source.kind, spec.channels
        if kind == "npy":
            return None, [], []
        if kind == "lz4" and self.cuda:
            self.lz4_layout = read_lz4_file(spec.source.sample_paths(spec.pad_row)[0])[1].layout
            read = functools.partial(lz4_blocks, channels=c, layout=self.lz4_layout)
            return read, [types.UINT8, types.INT32, types.INT32], [1, 1, 1]
        if kind == "lz4":  # DALI's inflate is GPU-only: decompress on the feeder threads
            return (lambda path: (read_lz4(path, c),)), [types.UINT8], [3]
        n = c if kind == "kaggle" else 1
        read = functools.partial(_read_encoded_tuple, packed=kind == "packed")
        return read, [types.UINT8] * n, [1] * n

    def _decode(self, fn, types, fed: list, files: list[str] | None):
        """The batch's uint8 HWC images, whatever the layout (the graph's first stage)."""
        spec = self.spec
        kind, c = spec.source.kind, spec.channels
        dev = "mixed" if self.cuda else "cpu"
        if kind == "kaggle":
            planes = [
                fn.decoders.image(fed[i], device=dev, output_type=types.GRAY) for i in range(c)
            ]
            return fn.cat(*planes, axis=2)
        if kind == "packed":
            img = fn.decoders.image(fed[0], device=dev, output_type=types.ANY_DATA)
        elif kind == "npy":
            img = fn.reshape(self._read_numpy(fn, files), layout="HWC")
        elif not self.cuda:  # lz4 decoded on the feeder threads, channels already selected
            return fn.reshape(fed[0], layout="HWC")
        elif self.lz4_layout == "planar":  # the first c stain blocks: [c, H, W]
            img = fn.decoders.inflate(
                fed[0].gpu(),
                shape=fed[2],
                chunk_sizes=fed[1],
                dtype=types.UINT8,
                layout="HW",
                sequence_axis_name="C",
            )
            return fn.transpose(img, perm=[1, 2, 0], output_layout="HWC")
        else:
            img = fn.decoders.inflate(fed[0].gpu(), shape=fed[2], dtype=types.UINT8, layout="HWC")
        return img[:, :, 0:c] if c < 4 else img

    def _build(self, files: list[str] | None):
        from nvidia.dali import fn, pipeline_def, types

        spec = self.spec
        h_p, v_p, t_p = spec.augment.probabilities() if spec.train else (0.0, 0.0, 0.0)
        _, file_dtypes, file_ndims = self.inputs
        n_files = len(file_dtypes)
        stored = spec.source.size if spec.source.kind in ("npy", "lz4") else None

        @pipeline_def(enable_conditionals=True)
        def graph():
            fed = fn.external_source(
                source=self.feeder,
                num_outputs=n_files + 2,
                batch=True,
                cycle="raise",
                dtype=file_dtypes + [types.INT32, types.INT64],
                ndim=file_ndims + [1, 1],
            )
            draws, rows = fed[n_files], fed[n_files + 1]
            img = self._decode(fn, types, fed, files)
            if spec.image_size is not None and stored != spec.side:
                # resizing to the stored size returns the pixels unchanged; a decoded pack knows
                # its size up front, so it skips the op
                img = fn.resize(
                    img,
                    size=[spec.side, spec.side],
                    interp_type=types.INTERP_LINEAR,
                    antialias=True,
                    dtype=types.UINT8,
                )
            if spec.crop is not None:
                img = fn.slice(
                    img,
                    draws[3:5],
                    np.array([spec.crop, spec.crop], dtype=np.int32),
                    axis_names="HW",
                )
            if t_p > 0:
                if draws[2] != 0:
                    # keep the HWC layout name: both branches must agree on it
                    img = fn.transpose(img, perm=[1, 0, 2], transpose_layout=False)
            if v_p > 0:
                img = fn.flip(img, horizontal=0, vertical=draws[1])
            mean = [255.0 * m for m in spec.stats.mean]
            std = [255.0 * s for s in spec.stats.std]
            out_type = types.FLOAT16 if spec.dtype == torch.float16 else types.FLOAT
            img = fn.crop_mirror_normalize(
                img,
                dtype=out_type,
                output_layout="HWC",
                mean=mean,
                std=std,
                mirror=draws[0] if h_p > 0 else 0,
            )
            return img, rows

        device_id = (spec.device.index or 0) if self.cuda else None
        pipe = graph(
            batch_size=spec.batch_size,
            num_threads=self.threads,
            device_id=device_id,
            prefetch_queue_depth=2,
            seed=spec.seed,
        )
        with warnings.catch_warnings():
            # the draws go unused when no augmentation or crop is on; feeding them is harmless
            warnings.filterwarnings("ignore", message="The external source node .* is not used")
            try:
                pipe.build()
            except RuntimeError:
                if not (self.cache and self.numpy_device == "gpu"):
                    raise
                # no GPUDirect Storage here: read the cache on the CPU and copy it over
                self.numpy_device = "cpu"
                return self._build(files)
        return pipe

    def _read_numpy(self, fn, files: list[str]):
        if self.numpy_device == "gpu":
            # GPUDirect Storage (or cuFile's compatibility mode) reads straight into the GPU
            return fn.readers.numpy(device="gpu", files=files, random_shuffle=False)
        img = fn.readers.numpy(device="cpu", files=files, random_shuffle=False)
        return img.gpu() if self.cuda else img

    def _cache_files(self) -> list[str]:
        spec = self.spec
        rows = spec.plan(self.epoch).ravel()
        rows = np.where(rows >= 0, rows, spec.pad_row)
        return [str(spec.source.sample_paths(int(r))[0]) for r in rows]

    # ------------------------------------------------------------------ iteration

    def _start_epoch(self) -> None:
        self.feeder.epoch = self.epoch
        if self.cache or self.pipe is None:
            # the reader's file list is this epoch's order, fixed at build time
            self.pipe = None
            self.pipe = self._build(self._cache_files() if self.cache else None)
        else:
            if not self.finished:
                self._drain()
            self.pipe.reset()  # calls iter(feeder): the plan of self.epoch

    def _drain(self) -> None:
        """Consume what an abandoned epoch left in flight so the pipeline can reset."""
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        spec, dev = self.spec, self.spec.device
        self._start_epoch()
        self.finished = False
        for step in range(spec.batches()):
            images_tl, rows_tl = self._run(step)
            rows = self._to_torch(rows_tl).view(-1).to(dev, non_blocking=True)
            images = self._to_torch(images_tl, rows)
            if images.dtype != spec.dtype:
                images = images.to(spec.dtype)
            labels = lookup_labels(self.targets, rows, spec.batch_size, dev)
            yield images.permute(0, 3, 1, 2), labels, rows
        self._drain()  # the feeder's StopIteration: the pipeline is ready for reset
        self.finished = True

    def _run(self, step: int):
        """One batch out of the pipeline; a decode failure inside DALI (whose message does not
        name the file) becomes one line naming the rows of the batches in flight."""
        try:
            return self.pipe.run()
        except RuntimeError as e:
            plan = self.spec.plan(self.epoch)
            rows = [int(r) for r in plan[step : step + 2].ravel() if r >= 0]
            first = self.spec.source.sample_paths(rows[0], 1)[0] if rows else "?"
            reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:200]
            raise UserError(
                f"DALI could not decode a file of epoch {self.epoch}, batch {step} or the next "
                f"(rows {rows[0] if rows else '?'}-{rows[-1] if rows else '?'}, first {first}): "
                f"{reason}; `fasthpa check --decode-all` names the file."
            ) from None

    def _to_torch(self, tl, rows: torch.Tensor | None = None) -> torch.Tensor:
        """A DALI TensorList as a torch tensor on the device it was produced on."""
        from nvidia.dali.backend import TensorListGPU
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        if not tl.is_dense_tensor():
            shapes = sorted({tuple(s) for s in tl.shape()})
            raise UserError(
                f"the samples of one batch differ in size ({shapes[0]} vs {shapes[-1]}, rows "
                f"{rows.tolist() if rows is not None else '?'}); set --image-size to load them "
                f"together."
            )
        t = tl.as_tensor()
        if self.pipe.exec_dynamic:
            # the dynamic executor's outputs are reference counted: a zero-copy DLPack view
            # stays valid after the next run (the same choice DALIGenericIterator makes)
            return torch.from_dlpack(t)
        gpu = isinstance(tl, TensorListGPU)
        out = torch.empty(
            t.shape(), dtype=to_torch_type[t.dtype], device=self.spec.device if gpu else "cpu"
        )
        stream = torch.cuda.current_stream(self.spec.device) if gpu else None
        return feed_ndarray(t, out, cuda_stream=stream)
