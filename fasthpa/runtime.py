"""Runtime glue: what turns a config into a model that runs fast on this process's device.

One place for the decisions the trainer, ``fasthpa predict`` and the benchmarks share::

    seed_everything(0)
    configure_backends(device)                       # cudnn autotuning, TF32 on CUDA
    dtype = amp_dtype("auto", device)                # bf16 where native (CUDA, AVX-512 BF16), else None
    autocast = autocast_factory(device, dtype)       # autocast() -> a context manager
    model = to_device(model, device, channels_last=True)
    optimizer = make_optimizer(model.parameters(), lr=1e-3, device=device)
    wrapped = wrap_model(model, device, ddp=True, compile=True)   # compile, then DDP
    with no_sync(wrapped): ...                       # a micro-batch without the all-reduce

``rng_state()`` / ``set_rng_state()`` capture every generator a run draws from (torch, CUDA,
numpy, Python), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import ast
import contextlib
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---------------------------------------------------------------------------- randomness


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global generator's state, as tensors and strings a checkpoint can hold."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------- precision


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA. PyTorch >= 2.9 has per-backend
    ``fp32_precision`` settings, and mixing them with the legacy ``allow_tf32`` flags can make
    inductor raise; use the new ones where they exist."""
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    except (AttributeError, RuntimeError):  # older PyTorch: the legacy flags
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def ieee_fp32_matmuls(device: torch.device):
    """Full float32 matrix products on CUDA for the duration, whatever :func:`enable_tf32` set
    (restored after; the same flag API as it). Nothing to change on a CPU, or inside a
    torch.compile trace (the flag is read when the graph is built)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        yield
        return
    m = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"
    before = getattr(m, name)
    setattr(m, name, "ieee" if name == "fp32_precision" else False)
    try:
        yield
    finally:
        setattr(m, name, before)


def configure_backends(device: torch.device) -> None:
    """cudnn autotuning and TF32 on CUDA (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        enable_tf32()


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an ``--amp`` choice; "auto" is bf16 where the device computes in
    bf16 natively (a CUDA device that has it; a CPU with AVX-512 BF16 or AMX, where it sped the
    training step at 128 px 1.8x, and emulated bf16 would be slower than fp32), else off."""
    assert amp in AMP_CHOICES, amp
    if amp == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = cpu_has_native_bf16()
        amp = "bf16" if native else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_factory(
    device: torch.device, dtype: torch.dtype | None
) -> Callable[[], contextlib.AbstractContextManager]:
    """A function returning a fresh autocast context (a no-op one when ``dtype`` is None)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 autocast (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type) if dtype is torch.float16 else None


# ---------------------------------------------------------------------------- model and optimiser


def to_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move ``model`` to ``device``, in channels_last memory format if asked."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    device: torch.device,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Adam (AdamW, decoupled, when ``weight_decay`` > 0); the fused kernel on CUDA."""
    kw: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps}
    if device.type == "cuda":
        kw["fused"] = True
    if weight_decay > 0:
        return torch.optim.AdamW(params, weight_decay=weight_decay, **kw)
    return torch.optim.Adam(params, **kw)


def wrap_model(
    model: nn.Module,
    device: torch.device,
    *,
    ddp: bool = False,
    sync_bn: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
    dynamic: bool | None = None,
) -> nn.Module:
    """SyncBatchNorm (CUDA under DDP), torch.compile, then DistributedDataParallel around the
    compiled module. In that order DDP's forward runs the compiled graph inside its active
    context, so DDPOptimizer splits it at bucket boundaries (communication overlaps the
    backward); compiling the DDP wrapper instead compiles nothing on PyTorch 2.14 (the outer
    forward is skipped by Dynamo and the model runs eagerly; tests/test_runtime.py checks
    this order). ``dynamic``: torch.compile's (False: one static graph per input shape, as a
    fixed-batch benchmark wants). Keep ``model`` itself for checkpoints: its keys are plain, the wrappers' are
    not."""
    assert compile_mode in COMPILE_MODES, compile_mode
    if sync_bn and ddp and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if compile:
        kw: dict[str, Any] = {} if compile_mode == "default" else {"mode": compile_mode}
        if dynamic is not None:
            kw["dynamic"] = dynamic
        model = torch.compile(model, **kw)
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync()`` through a compile wrapper; a no-op context for a plain module."""
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------- learning rate

LR_SCHEDULES = ("constant", "cosine", "onecycle")


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total``: a pure function of the
    step, so resuming needs no scheduler state. ``warmup`` steps rise linearly to ``peak``
    (onecycle: 30% of the run when 0); cosine decays to 0, onecycle to ``peak`` x 1e-4."""
    assert schedule in LR_SCHEDULES, schedule
    if schedule == "onecycle":
        warmup = warmup or max(1, int(0.3 * total))
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = peak * 1e-4 if schedule == "onecycle" else 0.0
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextlib.contextmanager
def intra_op_threads(n: int):
    """torch's intra-op CPU threads set to ``n`` inside the block (restored after). Many small
    ops (an L-BFGS fit, thousands of threshold fits) spend more time in the thread pool's
    hand-offs than in arithmetic; on a busy 2-core machine one thread was 25x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
