"""Training throughput: the optimisation ladder, end to end through the real loader, and a
batch-size sweep with MFU, all measured in one run on one device.

    python benchmarks/throughput.py --quick                              # CPU smoke run, < 2 min
    python benchmarks/throughput.py --device cuda --image-size 512       # ladder + doubling sweep
    python benchmarks/throughput.py --device cuda --batch-sizes 32,64,128 --arch resnet34
    python benchmarks/throughput.py --device cuda --data /data/hpa       # e2e on real images

The ladder (each rung adds one thing to the one before; same arch, batch and image size):
fp32 eager NCHW -> + channels_last -> + AMP (bf16) -> + torch.compile -> + fused loss. Each rung
runs the trainer's own ``fasthpa.train.step.train_step`` (forward, weighted BCE, backward, Adam) and
reports two figures, as the NVIDIA reference trainers do:

- model only ("compute"): inputs already resident on the device, images/sec of the step alone;
- end to end ("total"): batches from the real loader (``fasthpa.data.loader.build_loader``,
  backend auto: DALI when installed, else the PyTorch twin) over a synthetic Kaggle-layout
  dataset written to a temporary folder (or ``--data ROOT``), with the share of wall time the
  step loop spent waiting for data.

The batch-size sweep runs the trainer's default configuration for the device (CUDA: channels_last
+ bf16 + compile + fused loss; CPU: channels_last, eager, bf16 where the CPU has native bf16,
else fp32) at each batch size (CUDA: 8,
doubling until out of memory, then one step back between the last fit and the failure; or the
``--batch-sizes`` list), a fresh model per size, reporting images/sec, efficiency relative to the
best batch, step time, peak memory and MFU: training FLOPs per image counted with
``torch.utils.flop_counter`` (convs and matmuls, forward and backward) x images/sec / the
matrix-multiply peak measured in this same run on this device (bf16 for AMP rungs, fp32
otherwise; TF32 allowed on CUDA as in the trainer). On CUDA each size is compiled statically:
``torch._dynamo.reset()`` and a fresh ``torch.compile(dynamic=False)``, the graph a fixed-batch
trainer runs (reusing one compiled model would recompile it with dynamic shapes), at the price of
a cold compile per size; ``--sweep-compile off`` sweeps eager instead. The output says which.

The result files are rewritten after every rung and every batch size, so a run stopped at a time
limit keeps every figure it measured (``"complete": false`` in the JSON until the end).

Timing: the first step (which includes compilation) is timed on its own and reported as
``first_step_s``; then ``--warmup`` more steps, then ``--repeats`` synchronised timings (CUDA
events on a GPU) of ``--inner`` steps each; the tables give the median and the spread
((max - min) / median). Results go to ``benchmarks/results/throughput_<device>_<date>.{json,md}``
(or ``--out``) with the device, CPU threads, torch/triton/DALI versions and git commit.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    ResultFiles,
    markdown_table,
    positive_int_list,
    synchronize,
    time_fn,
    wide_console,
)

from fasthpa.data.contract import CHANNEL_SETS
from fasthpa.weights import ARCHS

COMPILE_CHOICES = ("auto", "on", "off")
SWEEP_COMPILE_CHOICES = ("static", "off")


@dataclass(frozen=True)
class StepConfig:
    """One rung of the ladder: how the training step is built."""

    name: str
    channels_last: bool
    amp: bool
    """bf16 autocast around the forward pass (and bf16 inputs, as the trainer feeds them)"""
    compile: bool
    fused_loss: bool
    """fasthpa.kernels.bce_with_logits (Triton on CUDA) instead of F.binary_cross_entropy_with_logits"""


def ladder(compile_step: bool) -> list[StepConfig]:
    """The ladder's rungs in order; without ``compile_step`` the compile rung is left out and the
    fused loss is added to the AMP rung instead."""
    rungs = [
        StepConfig("fp32 eager NCHW", False, False, False, False),
        StepConfig("+ channels_last", True, False, False, False),
        StepConfig("+ AMP (bf16)", True, True, False, False),
    ]
    if compile_step:
        rungs.append(StepConfig("+ torch.compile", True, True, True, False))
        rungs.append(StepConfig("+ fused loss", True, True, True, True))
    else:
        rungs.append(StepConfig("+ fused loss (no compile)", True, True, False, True))
    return rungs


def default_config(device_type: str, compile_on: bool) -> StepConfig:
    """What ``fasthpa train`` runs by default on this device type (used for the sweep);
    ``compile_on`` False leaves the compile out (``--compile off`` or ``--sweep-compile off``)."""
    if device_type == "cuda":
        name = "trainer default (cuda)" if compile_on else "trainer default (cuda), eager"
        return StepConfig(name, True, True, compile_on, True)
    # on CPU the default recipe's --amp auto is bf16 where the CPU has native bf16; no compile
    from fasthpa.runtime import cpu_has_native_bf16

    bf16 = cpu_has_native_bf16()
    name = "trainer default (cpu, bf16)" if bf16 else "trainer default (cpu, fp32)"
    return StepConfig(name, True, bf16, False, True)


@dataclass
class Options:
    """Everything one benchmark run needs; ``parse_options`` builds it from the command line."""

    device: str = "auto"
    arch: str = "resnet18"
    image_size: int = 512
    channels: str = "rgby"
    ladder_batch: int | None = None
    """batch size of the ladder rungs (default: 64 on CUDA, 8 on CPU)"""
    batch_sizes: list[int] | None = None
    """the sweep's batch sizes; None: doubling from 8 until OOM on CUDA, [8, 16] on CPU"""
    max_batch: int = 2048
    warmup: int = 3
    repeats: int = 5
    inner: int = 1
    e2e_steps: int = 10
    """training steps per timed end-to-end repeat"""
    compile: str = "auto"
    """the compile rung: on/auto (included) or off (left out, and noted)"""
    sweep_compile: str = "static"
    """the CUDA sweep: static (Dynamo reset and a fresh ``dynamic=False`` compile per batch size,
    a cold compile each) or off (eager: channels_last + bf16 + fused loss, no compile)"""
    skip_e2e: bool = False
    data: str | None = None
    """Kaggle-layout root for the end-to-end rungs; None: a synthetic dataset in a temp folder"""
    synth_n: int | None = None
    stored_size: int | None = None
    """side of the generated PNGs (default: 512 like Kaggle, the image size with --quick)"""
    workers: int | None = None
    loader: str = "auto"
    matmul_n: int | None = None
    out: str | None = None
    quick: bool = False
    save: bool = True
    seed: int = 0
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ measurements


def resolve_device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        from fasthpa.errors import UserError

        raise UserError("--device cuda: no CUDA device is available; use --device cpu.")
    return device


def matmul_peak(device, dtype, n: int, repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of an n x n x n matrix multiply in ``dtype`` on ``device``: the MFU denominator.

    Measured, not looked up, so MFU is relative to what this device reaches in this run; the
    fastest repeat is the peak (a slower one only means something else held the device).
    """
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=2, repeats=repeats)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "flops_per_s": 2.0 * n**3 / t["min_s"],
        "spread": t["spread"],
    }


def count_train_flops(model, x, y, loss_fn: Callable) -> int:
    """FLOPs of one forward + backward of ``model`` on ``x`` (torch.utils.flop_counter: convs and
    matmuls); gradients are cleared afterwards. Call it on an eager (uncompiled) model."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_fn(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def kaggle_label_frequency():
    import torch

    from fasthpa.labels import KAGGLE_TRAIN_COUNTS, KAGGLE_TRAIN_SAMPLES

    return torch.tensor(KAGGLE_TRAIN_COUNTS, dtype=torch.float32) / KAGGLE_TRAIN_SAMPLES


def random_batch(batch: int, channels: int, size: int, device, dtype, channels_last: bool, seed=0):
    """Normalised-looking inputs and Kaggle-frequency multi-hot labels, resident on ``device``."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 28, generator=g) < kaggle_label_frequency()).float().to(device)
    return x, y


class TrainStep:
    """The trainer's training step (``fasthpa.train.step.train_step``) built for one StepConfig.

    ``step(x, y)`` runs forward, weighted BCE (weights 1 - Kaggle label frequency, as
    ``--loss wbce``), backward and an Adam step; it returns the loss as a device tensor. A
    compiled step is compiled with ``dynamic=False``: one static graph per input shape, what a
    fixed-batch trainer runs (a second shape would recompile, never turn the graph dynamic).
    """

    def __init__(self, cfg: StepConfig, arch: str, in_channels: int, device, seed: int = 0):
        import torch

        from fasthpa.model import build_model
        from fasthpa.runtime import autocast_factory, make_optimizer, to_device, wrap_model

        self.cfg, self.device = cfg, device
        torch.manual_seed(seed)
        model, _ = build_model(arch, in_channels=in_channels, pretrained="none")
        self.raw_model = to_device(model, device, cfg.channels_last)
        self.optimizer = make_optimizer(model.parameters(), lr=1e-3, device=device)
        self.model = wrap_model(model, device, compile=cfg.compile, dynamic=False)
        self.loss_fn = _loss_fn(cfg.fused_loss, device)
        self.input_dtype = torch.bfloat16 if cfg.amp else torch.float32
        self.autocast = autocast_factory(device, torch.bfloat16 if cfg.amp else None)

    def with_loss_of(self, cfg: StepConfig) -> TrainStep:
        """This step (same model, compiled code and optimiser) with ``cfg``'s loss: the loss runs
        outside the compiled model, so swapping it needs no recompilation."""
        if not _same_model(self.cfg, cfg):
            raise ValueError(f"{cfg.name!r} needs another model than {self.cfg.name!r}")
        other = copy.copy(self)
        other.cfg, other.loss_fn = cfg, _loss_fn(cfg.fused_loss, self.device)
        return other

    def __call__(self, x, y):
        from fasthpa.train.step import train_step

        if not self.cfg.channels_last and not x.is_contiguous():
            x = x.contiguous()  # an NCHW pipeline hands the model a contiguous batch
        return train_step(self.model, self.optimizer, None, self.loss_fn, [(x, y)], self.autocast)


def _loss_fn(fused: bool, device) -> Callable:
    """Weighted BCE, weights 1 - Kaggle label frequency: fasthpa's fused kernel or PyTorch's."""
    import fasthpa.kernels as K
    import torch.nn.functional as F

    weight = (1.0 - kaggle_label_frequency()).to(device)
    if fused:
        return lambda logits, y: K.bce_with_logits(logits, y, weight=weight)
    return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y, weight=weight)


def timed_first_step(fn: Callable[[], Any], device) -> float:
    """Seconds of the first call, synchronised: compilation and lazy initialisation live here."""
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def measure_model_only(step: TrainStep, batch: int, opts: Options, channels: int) -> dict:
    """images/sec of ``step`` with inputs resident on the device."""
    x, y = random_batch(
        batch,
        channels,
        opts.image_size,
        step.device,
        step.input_dtype,
        step.cfg.channels_last,
        opts.seed,
    )
    first = timed_first_step(lambda: step(x, y), step.device)
    t = time_fn(
        lambda: step(x, y), step.device, warmup=opts.warmup, repeats=opts.repeats, inner=opts.inner
    )
    return {
        "first_step_s": first,
        "step_ms": 1e3 * t["median_s"],
        "images_per_s": batch / t["median_s"],
        "best_images_per_s": batch / t["min_s"],
        "spread": t["spread"],
    }


class _Batches:
    """Endless batches from a loader: a new epoch (set_epoch) whenever one ends."""

    def __init__(self, loader) -> None:
        self.loader, self.epoch, self.it = loader, 0, None

    def next(self):
        while True:
            if self.it is None:
                self.loader.set_epoch(self.epoch)
                self.it = iter(self.loader)
                self.epoch += 1
            try:
                return next(self.it)
            except StopIteration:
                self.it = None


def measure_end_to_end(step: TrainStep, loader, opts: Options) -> dict:
    """images/sec of the training loop fed by the real loader, and the data-wait share.

    The clock is read around each repeat of ``e2e_steps`` steps, after a device synchronise;
    data wait is the host time spent in ``next()`` (as the trainer measures it).
    """
    import statistics

    batches = _Batches(loader)
    t0 = time.perf_counter()
    for _ in range(max(1, opts.warmup)):  # worker start, pipeline build, compilation
        x, y, _ = batches.next()
        step(x, y)
    synchronize(step.device)
    warmup_s = time.perf_counter() - t0
    rates, shares = [], []
    for _ in range(opts.repeats):
        wait = 0.0
        images = 0
        start = time.perf_counter()
        for _ in range(opts.e2e_steps):
            a = time.perf_counter()
            x, y, _ = batches.next()
            wait += time.perf_counter() - a
            images += x.shape[0]
            step(x, y)
        synchronize(step.device)
        elapsed = time.perf_counter() - start
        rates.append(images / elapsed)
        shares.append(wait / elapsed)
    med = statistics.median(rates)
    return {
        "e2e_images_per_s": med,
        "e2e_best_images_per_s": max(rates),
        "e2e_spread": (max(rates) - min(rates)) / med if med > 0 else 0.0,
        "data_wait_share": statistics.median(shares),
        "e2e_warmup_s": warmup_s,
    }


def peak_memory_gib(device) -> float | None:
    """CUDA: the allocator's peak since the last reset. CPU: the process's maximum RSS so far
    (a high-water mark over the whole run, so an upper bound for the current batch)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except (ImportError, OSError):
        return None


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep_batches(
    measure: Callable[[int], dict],
    batch_sizes: list[int] | None,
    *,
    start: int = 8,
    max_batch: int = 2048,
    on_oom: Callable[[], None] = lambda: None,
    on_row: Callable[[dict], None] = lambda row: None,
) -> list[dict]:
    """Run ``measure(batch)`` over a batch-size list, or double from ``start`` until out of memory.

    Doubling: after an OOM at B (last fit P = B / 2), one step back tries the multiple of 8
    halfway between P and B, then stops. A listed sweep stops at its first OOM. Every attempt
    gives a row; an OOM row has ``oom=True`` and no figures. ``on_oom`` frees memory;
    ``on_row(row)`` is called as each row is added (to write partial results).
    """
    rows: list[dict] = []

    def attempt(batch: int) -> bool:
        try:
            row = measure(batch)
        except Exception as e:  # only OOM is a sweep result; anything else is a bug
            if not is_oom(e):
                raise
            on_oom()
            rows.append({"batch": batch, "oom": True})
            on_row(rows[-1])
            return False
        rows.append({"batch": batch, "oom": False, **row})
        on_row(rows[-1])
        return True

    if batch_sizes is not None:
        for b in batch_sizes:
            if not attempt(b):
                break
        return rows
    b, last_ok = start, None
    while b <= max_batch:
        if not attempt(b):
            if last_ok is not None:
                back = (last_ok + (b - last_ok) // 2) // 8 * 8
                if last_ok < back < b:
                    attempt(back)
            break
        last_ok, b = b, b * 2
    return rows


def add_efficiency(rows: list[dict]) -> None:
    """efficiency = images/sec relative to the best batch of the sweep (1.0 for the best)."""
    ok = [r for r in rows if not r.get("oom")]
    best = max((r["images_per_s"] for r in ok), default=0.0)
    for r in ok:
        r["efficiency"] = r["images_per_s"] / best if best > 0 else 0.0


# ------------------------------------------------------------------------------ the run


def _synthetic_data(opts: Options, batch: int, work: Path) -> tuple[Path, str]:
    from fasthpa.data.synth import generate

    n = opts.synth_n or max(4 * batch, 64)
    size = opts.stored_size or (opts.image_size if opts.quick else max(512, opts.image_size))
    root = work / "data"
    # a process pool starts in seconds: worth it only for a real amount of pixels
    workers = (os.cpu_count() or 1) if n * size * size > 64 * 256 * 256 else 1
    generate(root, n=n, size=size, seed=opts.seed, workers=workers)
    return root, f"fasthpa.data.synth, {n} samples stored at {size} px"


def _e2e_loader(root: Path, step: TrainStep, batch: int, opts: Options, stats):
    import numpy as np

    from fasthpa.data.loader import build_loader
    from fasthpa.data.source import open_source

    source = open_source(root, "train")
    return build_loader(
        source,
        np.arange(len(source)),
        train=True,
        batch_size=batch,
        image_size=opts.image_size,
        channels=opts.channels,
        stats=stats,
        device=step.device,
        dtype=step.input_dtype,
        seed=opts.seed,
        workers=opts.workers if opts.workers is not None else min(4, os.cpu_count() or 1),
        backend=opts.loader,
    )


class _Run:
    """One benchmark run's state: what is measured so far, written out after every row."""

    def __init__(self, opts: Options) -> None:
        import torch

        from fasthpa.runtime import enable_tf32

        self.opts = opts
        self.device = resolve_device(opts.device)
        if self.device.type == "cuda":  # the trainer's settings, so the figures match a real run
            torch.backends.cudnn.benchmark = True
            enable_tf32()
        self.in_channels = CHANNEL_SETS[opts.channels]
        self.batch = opts.ladder_batch or (64 if self.device.type == "cuda" else 8)
        self.compile_on = opts.compile != "off"
        # the sweep compiles only where the trainer's default does (CUDA) and --sweep-compile
        # static asks for it: then each batch size is a cold compile (Dynamo reset in between)
        self.sweep_cfg = default_config(
            self.device.type, self.compile_on and opts.sweep_compile == "static"
        )
        self.notes = list(opts.notes) + _notes(self)
        self.load = os.getloadavg() if hasattr(os, "getloadavg") else None
        self.ladder_rows: list[dict] = []
        self.sweep_rows: list[dict] = []
        self.peaks: dict[str, dict] = {}
        self.flops_per_image = 0.0
        self.data_desc: str | None = None
        self.files = None
        if opts.save:
            self.files = ResultFiles("throughput", self.device, opts.out)

    @property
    def sweep_compile(self) -> str:
        if self.sweep_cfg.compile:
            return "static: torch._dynamo.reset() and a fresh torch.compile(dynamic=False) per size"
        why = "--compile off" if not self.compile_on else "--sweep-compile off"
        if self.device.type != "cuda":
            why = "the CPU default config does not compile"
        return f"off (eager; {why})"

    def mfu(self, cfg: StepConfig, images_per_s: float) -> float:
        peak = self.peaks["bfloat16" if cfg.amp else "float32"]["flops_per_s"]
        return self.flops_per_image * images_per_s / peak

    def measure_peaks_and_flops(self) -> None:
        """The matmul peaks (MFU denominators), measured first on the idle device, and the
        training FLOPs per image (eager model, batch 2: train-mode BatchNorm needs > 1)."""
        import torch

        device, opts = self.device, self.opts
        mm_n = opts.matmul_n or (8192 if device.type == "cuda" else (1024 if opts.quick else 2048))
        for dtype in (torch.float32, torch.bfloat16):
            self.peaks[str(dtype).replace("torch.", "")] = matmul_peak(
                device, dtype, mm_n, repeats=opts.repeats
            )
        counter = TrainStep(
            StepConfig("count", False, False, False, False), opts.arch, self.in_channels, device
        )
        x2, y2 = random_batch(2, self.in_channels, opts.image_size, device, torch.float32, False)
        self.flops_per_image = count_train_flops(counter.raw_model, x2, y2, counter.loss_fn) / 2
        del counter, x2, y2
        free_memory(device)

    def rung(self, cfg: StepConfig, step: TrainStep, root: Path | None, stats) -> None:
        """Measure one ladder rung (model only, then end to end) and record its row."""
        row: dict[str, Any] = {
            "section": "ladder",
            "step": cfg.name,
            "batch": self.batch,
            "channels_last": cfg.channels_last,
            "amp": "bf16" if cfg.amp else "off",
            "compile": cfg.compile,
            "fused_loss": cfg.fused_loss,
        }
        row |= measure_model_only(step, self.batch, self.opts, self.in_channels)
        row["mfu"] = self.mfu(cfg, row["images_per_s"])
        if root is not None:
            loader = _e2e_loader(root, step, self.batch, self.opts, stats)
            row["loader"] = loader.backend
            row |= measure_end_to_end(step, loader, self.opts)
            del loader
        self.ladder_rows.append(row)
        base = self.ladder_rows[0]  # the first rung: fp32 eager
        row["speedup"] = row["images_per_s"] / base["images_per_s"]
        if "e2e_images_per_s" in row:
            row["e2e_speedup"] = row["e2e_images_per_s"] / base["e2e_images_per_s"]
        e2e = f", e2e {row['e2e_images_per_s']:.0f} img/s" if "e2e_images_per_s" in row else ""
        first = f"first step {row['first_step_s']:.1f} s"
        print(f"ladder {cfg.name}: {row['images_per_s']:.0f} img/s{e2e}, {first}", flush=True)
        self.save(complete=False)

    def ladder(self, cfgs: list[StepConfig], root: Path | None, stats) -> None:
        """The rungs in order; a rung that only swaps the loss keeps the previous rung's model
        (and so its compiled code: no second compile of the same graph)."""
        step: TrainStep | None = None
        for cfg in cfgs:
            if step is not None and _same_model(step.cfg, cfg):
                step = step.with_loss_of(cfg)
            else:
                step = None
                free_memory(self.device)
                step = TrainStep(cfg, self.opts.arch, self.in_channels, self.device, self.opts.seed)
            self.rung(cfg, step, root, stats)
        step = None
        free_memory(self.device)

    def sweep(self) -> None:
        """The batch-size sweep of the trainer's default config; a fresh model per size."""
        import torch

        cfg, device, opts = self.sweep_cfg, self.device, self.opts
        held: dict[str, TrainStep] = {}

        def release() -> None:
            held.clear()
            free_memory(device)

        def measure(b: int) -> dict:
            release()
            if cfg.compile:  # forget every compiled graph: this size compiles cold and static
                torch._dynamo.reset()
            held["step"] = TrainStep(cfg, opts.arch, self.in_channels, device, opts.seed)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            r = measure_model_only(held["step"], b, opts, self.in_channels)
            r["peak_mem_gib"] = peak_memory_gib(device)
            r["mfu"] = self.mfu(cfg, r["images_per_s"])
            return r

        def on_row(row: dict) -> None:
            row |= {"section": "sweep", "config": cfg.name, "sweep_compile": self.sweep_compile}
            self.sweep_rows.append(row)
            add_efficiency(self.sweep_rows)
            shown = "out of memory" if row["oom"] else f"{row['images_per_s']:.0f} img/s"
            print(f"sweep batch {row['batch']}: {shown}", flush=True)
            self.save(complete=False)

        sizes = opts.batch_sizes
        if sizes is None and device.type != "cuda":
            sizes = [8, 16]
        sweep_batches(measure, sizes, max_batch=opts.max_batch, on_oom=release, on_row=on_row)
        release()

    def result(self) -> dict[str, Any]:
        from fasthpa.envinfo import device_name

        mm_n = next(iter(self.peaks.values()))["n"] if self.peaks else None
        notes = list(self.notes)
        if any(r.get("mfu", 0) > 1 for r in self.ladder_rows + self.sweep_rows):
            notes.append(
                f"MFU above 100%: the {mm_n} x {mm_n} matmul did not reach this device's peak, "
                "so MFU is overstated here; pass a larger --matmul-n."
            )
        opts = self.opts
        return {
            "device": device_name(self.device),
            "device_type": self.device.type,
            "arch": opts.arch,
            "image_size": opts.image_size,
            "channels": opts.channels,
            "ladder": self.ladder_rows,
            "sweep": self.sweep_rows,
            "sweep_config": self.sweep_cfg.name,
            "sweep_compile": self.sweep_compile,
            "peaks": self.peaks,
            "flops_per_image": self.flops_per_image,
            "data": self.data_desc,
            "compile_in_ladder": self.compile_on,
            "timing": {
                "warmup": opts.warmup,
                "repeats": opts.repeats,
                "inner": opts.inner,
                "e2e_steps": opts.e2e_steps,
            },
            "load_average": self.load,
            "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "notes": notes,
            "paths": [],
        }

    def save(self, complete: bool) -> list[str]:
        """Rewrite the result files (atomically) with every row so far."""
        if self.files is None or not self.peaks:
            return []
        result = self.result()
        extra = {k: v for k, v in result.items() if k not in ("ladder", "sweep", "paths")}
        extra["options"] = {k: v for k, v in dataclasses.asdict(self.opts).items() if k != "notes"}
        rows = self.ladder_rows + self.sweep_rows
        paths = self.files.write(rows, markdown_report(result), extra=extra, complete=complete)
        return [str(p) for p in paths]


def _same_model(a: StepConfig, b: StepConfig) -> bool:
    """Whether two rungs differ in the loss alone (so they can share one model)."""
    return dataclasses.replace(a, name="", fused_loss=False) == dataclasses.replace(
        b, name="", fused_loss=False
    )


def _notes(run: _Run) -> list[str]:
    from fasthpa.runtime import cpu_has_native_bf16

    notes = []
    if not run.compile_on:
        notes.append("torch.compile rung skipped: --compile off.")
    else:
        notes.append(
            "compile rung's first step: inductor's on-disk cache may already hold this graph from "
            "an earlier run (then it is short); TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 times a cold "
            "compile. The fused-loss rung keeps the compile rung's model and compiled code (the "
            "loss runs outside the compiled model), so its first step compiles nothing."
        )
    notes.append(f"sweep compile: {run.sweep_compile}.")
    if run.device.type == "cpu":
        notes.append(
            "fused loss on CPU: fasthpa.kernels runs its PyTorch twin (Triton only on CUDA), so "
            "no gain is expected from that rung here."
        )
        notes.append(
            "AMP on CPU: the default recipe's --amp auto is bf16 on a CPU with native bf16 "
            f"(AVX-512 BF16 or AMX; this one: {'yes' if cpu_has_native_bf16() else 'no'}), "
            "fp32 otherwise; the bf16 rung shows what --amp bf16 gives on this CPU."
        )
    return notes


def run_benchmark(opts: Options) -> dict[str, Any]:
    """Measure the ladder and the sweep; print the tables; write the result files (if
    ``opts.save``). Returns {"ladder", "sweep", "peaks", "flops_per_image", "paths", ...}.

    The ladder comes first (its compile rung is the figure that matters most), then the sweep;
    the result files are rewritten after every rung and batch size, so a run stopped at a time
    limit keeps every figure it measured."""
    from fasthpa.data.stats import ChannelStats

    run = _Run(opts)
    run.measure_peaks_and_flops()
    run.save(complete=False)
    work = Path(tempfile.mkdtemp(prefix="fasthpa_throughput_"))
    try:
        root = None
        if not opts.skip_e2e:
            if opts.data:
                root, run.data_desc = Path(opts.data), f"dataset {opts.data}"
            else:
                root, run.data_desc = _synthetic_data(opts, run.batch, work)
        # throughput does not depend on the statistics' values: use the reference ones
        stats = ChannelStats((0.0807, 0.0526, 0.0549, 0.0828), (0.1370, 0.1015, 0.1531, 0.1381))
        run.ladder(ladder(run.compile_on), root, stats)
        run.sweep()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = run.result()
    print_tables(result)
    result["paths"] = run.save(complete=True)
    if result["paths"]:
        print("wrote", *result["paths"])
    return result


# ------------------------------------------------------------------------------ output

LADDER_COLUMNS = [
    ("step", "step"),
    ("images_per_s", "model img/s"),
    ("best_images_per_s", "best"),
    ("spread", "spread"),
    ("speedup", "x base"),
    ("step_ms", "step ms"),
    ("mfu", "MFU"),
    ("first_step_s", "first step s"),
    ("e2e_images_per_s", "e2e img/s"),
    ("e2e_best_images_per_s", "e2e best"),
    ("e2e_spread", "e2e spread"),
    ("data_wait_share", "data wait"),
    ("e2e_speedup", "e2e x base"),
    ("loader", "loader"),
]
SWEEP_COLUMNS = [
    ("batch", "batch"),
    ("images_per_s", "img/s"),
    ("best_images_per_s", "best"),
    ("spread", "spread"),
    ("efficiency", "efficiency"),
    ("step_ms", "step ms"),
    ("peak_mem_gib", "peak mem GiB"),
    ("mfu", "MFU"),
    ("first_step_s", "first step s"),
]


def _fmt(key: str, v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if key in ("spread", "e2e_spread", "data_wait_share", "mfu", "efficiency"):
            return f"{100 * v:.1f}%"
        if key in ("speedup", "e2e_speedup"):
            return f"{v:.2f}x"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _header(result: dict) -> str:
    from fasthpa.envinfo import environment

    env = environment(result["device_type"])
    return (
        f"{result['arch']} at {result['image_size']} px ({result['channels']}) on {env['device']}; "
        f"torch {env['torch']}, triton {env['triton']}, DALI {env['dali']}, "
        f"{env['cpu_threads']} CPU threads, commit {env['git_commit']}"
    )


def print_tables(result: dict) -> None:
    from rich.table import Table

    console = wide_console()
    console.print(_header(result))
    t = Table(title="ladder: model only (inputs on device) and end to end (real loader)")
    for _, title in LADDER_COLUMNS:
        t.add_column(title, justify="right")
    for r in result["ladder"]:
        t.add_row(*(_fmt(k, r.get(k)) for k, _ in LADDER_COLUMNS))
    console.print(t)
    s = Table(
        title=f"batch-size sweep: {result['sweep_config']}; compile {result['sweep_compile']}"
    )
    for _, title in SWEEP_COLUMNS:
        s.add_column(title, justify="right")
    for r in result["sweep"]:
        if r.get("oom"):
            s.add_row(str(r["batch"]), "out of memory", *["-"] * (len(SWEEP_COLUMNS) - 2))
        else:
            s.add_row(*(_fmt(k, r.get(k)) for k, _ in SWEEP_COLUMNS))
    console.print(s)
    peaks = ", ".join(
        f"{k} {v['flops_per_s'] / 1e12:.3g} TFLOP/s (n={v['n']})"
        for k, v in result["peaks"].items()
    )
    console.print(
        f"matmul peak measured in this run: {peaks}; training FLOPs per image "
        f"{result['flops_per_image'] / 1e9:.3g} GFLOP"
    )
    for n in result["notes"]:
        console.print(f"[yellow]note:[/] {n}")


def _md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    shown = []
    for r in rows:
        if r.get("oom"):
            shown.append({columns[0][1]: r["batch"], columns[1][1]: "out of memory"})
        else:
            shown.append({title: _fmt(k, r.get(k)) for k, title in columns})
    return markdown_table(shown, [title for _, title in columns])


def markdown_report(result: dict) -> str:
    t = result["timing"]
    parts = [
        _header(result) + "\n",
        f"Timing: first step (compilation included) reported apart; then {t['warmup']} warm-up "
        f"steps and {t['repeats']} synchronised repeats of {t['inner']} step(s) (model only) or "
        f"{t['e2e_steps']} steps (end to end); medians, spread = (max - min) / median. "
        f"End-to-end data: {result['data'] or 'skipped'}.\n",
        "## Ladder\n",
        _md_table(result["ladder"], LADDER_COLUMNS) + "\n",
        f"## Batch-size sweep ({result['sweep_config']}; compile {result['sweep_compile']})\n",
        _md_table(result["sweep"], SWEEP_COLUMNS) + "\n",
        "MFU = training FLOPs per image (torch.utils.flop_counter, forward + backward, "
        f"{result['flops_per_image'] / 1e9:.4g} GFLOP) x images/sec / matmul peak measured in "
        "this run: "
        + ", ".join(
            f"{k} {v['flops_per_s'] / 1e12:.4g} TFLOP/s (n={v['n']}, spread {100 * v['spread']:.1f}%)"
            for k, v in result["peaks"].items()
        )
        + ". Peak memory: CUDA allocator peak; on CPU the process's maximum RSS so far.\n",
    ]
    if result.get("load_average"):
        la = ", ".join(f"{x:.2f}" for x in result["load_average"])
        end = ", ".join(f"{x:.2f}" for x in result.get("load_average_end") or ())
        parts.append(
            f"Load average (1, 5, 15 min) at start {la}; at end {end}. Above the CPU count, "
            "other processes shared the device: medians carry that interference, and the best "
            "repeat ('best' columns) is the closer estimate of the uncontended speed.\n"
        )
    parts += [f"- note: {n}" for n in result["notes"]]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--arch", default="resnet18", choices=ARCHS)
    p.add_argument("--image-size", type=int, default=None, help="default 512 (64 with --quick)")
    p.add_argument("--channels", default="rgby", choices=("rgby", "rgb"))
    p.add_argument(
        "--batch-size", type=int, default=None, help="ladder batch (default 64 CUDA, 8 CPU)"
    )
    p.add_argument(
        "--batch-sizes",
        type=positive_int_list,
        default=None,
        help="sweep batch sizes, e.g. 8,16,32 (default: CUDA doubles from 8 until OOM; CPU 8,16)",
    )
    p.add_argument("--max-batch", type=int, default=2048, help="largest batch the doubling tries")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps after the first")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median, spread)")
    p.add_argument("--inner", type=int, default=None, help="steps per model-only repeat")
    p.add_argument("--e2e-steps", type=int, default=None, help="steps per end-to-end repeat")
    p.add_argument("--compile", default="auto", choices=COMPILE_CHOICES, help="compile rung")
    p.add_argument(
        "--sweep-compile",
        default="static",
        choices=SWEEP_COMPILE_CHOICES,
        help="CUDA sweep: static (Dynamo reset + fresh dynamic=False compile per size: one cold "
        "compile each) or off (eager)",
    )
    p.add_argument("--skip-e2e", action="store_true", help="model-only figures")
    p.add_argument("--data", default=None, help="Kaggle-layout root (default: synthetic)")
    p.add_argument("--synth-n", type=int, default=None, help="synthetic samples to generate")
    p.add_argument("--stored-size", type=int, default=None, help="side of the generated PNGs")
    p.add_argument("--workers", type=int, default=None, help="loader workers / DALI threads")
    p.add_argument("--loader", default="auto", choices=("auto", "torch", "dali"))
    p.add_argument("--matmul-n", type=int, default=None, help="side of the peak matmul")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run in under two minutes")
    p.add_argument("--no-save", action="store_true", help="print only, write no files")
    return p


def parse_options(argv: list[str] | None = None) -> Options:
    a = build_parser().parse_args(argv)
    q = a.quick
    return Options(
        device="cpu" if q and a.device == "auto" else a.device,
        arch=a.arch,
        image_size=a.image_size or (64 if q else 512),
        channels=a.channels,
        ladder_batch=a.batch_size,
        batch_sizes=a.batch_sizes,
        max_batch=a.max_batch,
        warmup=a.warmup if a.warmup is not None else (0 if q else 3),
        repeats=a.repeats or (3 if q else 5),
        inner=a.inner or 1,
        e2e_steps=a.e2e_steps or (2 if q else 10),
        compile=a.compile,
        sweep_compile=a.sweep_compile,
        skip_e2e=a.skip_e2e,
        data=a.data,
        synth_n=a.synth_n or (32 if q else None),
        stored_size=a.stored_size,
        workers=a.workers if a.workers is not None else (1 if q else None),
        loader=a.loader,
        matmul_n=a.matmul_n,
        out=a.out,
        quick=q,
        save=not a.no_save,
    )


def main(argv: list[str] | None = None) -> int:
    from fasthpa.errors import UserError

    try:
        opts = parse_options(argv)
        if opts.image_size < 16:
            raise UserError(f"--image-size {opts.image_size}: must be at least 16.")
        t0 = time.perf_counter()
        run_benchmark(opts)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
