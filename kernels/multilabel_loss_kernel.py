"""Triton kernel: multi-label BCE / focal loss and its gradient in one pass over [N, C] logits.

Imported lazily by ``fasthpa.kernels.multilabel_loss`` the first time the Triton backend runs, so
``import fasthpa.kernels`` works where Triton is not installed. Call it through the public API
(``fasthpa.kernels.bce_with_logits`` / ``focal_loss``); the host launcher here is::

    loss, grad = multilabel_loss_triton(logits, targets, weight, pos_weight, focal=True,
                                        gamma=2.0, alpha=None, report_variant=False,
                                        reduction="mean", compute_grad=True)

On a CPU tensor the kernel runs under the Triton interpreter (numpy, slow; for tests). That
happens whether or not ``TRITON_INTERPRET=1`` was set before triton was first imported: when it
was not, a second copy of this module is executed with the interpreter switched on, for this
kernel only (see ``_interpreted_kernel``), so test order in one pytest process does not matter.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch
import triton
import triton.language as tl
from torch import Tensor

# tl.sum's own combine function: tl.reduce with it is tl.sum, and the interpreter recognises it
# (see step 7 of the kernel). Private to triton.language; an ImportError here would be loud.
from triton.language.standard import _sum_combine

# Elements per program. The loss is memory-bound and [8192, 28] is only 229k elements, so a
# moderate block keeps enough programs in flight on a big GPU; 4 warps x 32 lanes x 8 elements.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _log1p_unit(z):
    """log(1 + z) for z in [0, 1], accurate to float32 rounding for tiny z.

    2 * atanh(s) with s = z / (2 + z) in [0, 1/3], as a series: plain arithmetic, so it is as
    accurate on the GPU (where ``tl.log`` may use an approximate instruction whose absolute error
    swamps log(1 + 1e-13)) as under the interpreter.
    """
    s = z / (2.0 + z)
    s2 = s * s
    series = 1.0 / 15.0
    series = 1.0 / 13.0 + s2 * series
    series = 1.0 / 11.0 + s2 * series
    series = 1.0 / 9.0 + s2 * series
    series = 1.0 / 7.0 + s2 * series
    series = 1.0 / 5.0 + s2 * series
    series = 1.0 / 3.0 + s2 * series
    series = 1.0 + s2 * series
    return 2.0 * s * series


@triton.jit
def _multilabel_loss_kernel(
    logits_ptr,
    targets_ptr,
    weight_ptr,
    pos_weight_ptr,
    loss_ptr,
    grad_ptr,
    n_elements,
    n_labels,
    gamma,
    alpha,
    zero_pow,
    scale,
    FOCAL: tl.constexpr,
    REPORT_VARIANT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_POS_WEIGHT: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    REDUCE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program handles BLOCK_SIZE consecutive elements of the flattened [N, C] logits.

    logits_ptr:     [N * C] logits x, fp32/bf16/fp16, contiguous.
    targets_ptr:    [N * C] targets y in [0, 1] (any float or uint8 dtype).
    weight_ptr:     [C] per-label weight w (read only if HAS_WEIGHT).
    pos_weight_ptr: [C] per-label positive weight pw (read only if HAS_POS_WEIGHT; BCE only).
    loss_ptr:       REDUCE: [num_programs] fp32 partial sums of scale * loss;
                    else [N * C] per-element loss in the logits' dtype.
    grad_ptr:       [N * C] scale * d loss / d x in the logits' dtype (written if COMPUTE_GRAD).
    n_elements:     N * C.   n_labels: C (the label of element i is i % C).
    gamma:          focal exponent >= 0.   alpha: focal class balance (used if HAS_ALPHA).
    zero_pow:       0 ** gamma (1.0 when gamma == 0), so the power needs no log(0) * 0.
    scale:          1 / (N * C) for the mean reduction, else 1.
    FOCAL:          focal loss if true, else (weighted) BCE.
    REPORT_VARIANT: focal factor p_t ** gamma (the CS230 report) instead of (1 - p_t) ** gamma.
    """
    # 1. This program's slice; int64 offsets so huge batches cannot overflow.
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(targets_ptr + offsets, mask=mask, other=0).to(tl.float32)

    # 2. p = sigmoid(x) and q = 1 - p = sigmoid(-x), both from e = exp(-|x|) <= 1, so neither
    #    overflows nor cancels (q is not computed as 1 - p).
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    positive = x >= 0
    p = tl.where(positive, inv, e * inv)
    q = tl.where(positive, e * inv, inv)
    # softplus(x) = log(1 + e^x) = -log(q), softplus(-x) = -log(p)
    log1p_e = _log1p_unit(e)
    softplus_pos = tl.maximum(x, 0.0) + log1p_e
    softplus_neg = tl.maximum(-x, 0.0) + log1p_e

    # 3. BCE = pw * y * softplus(-x) + (1 - y) * softplus(x), each term free of cancellation;
    #    d BCE / dx = (1 - y) * p - pw * y * q  (= p - y without pw).
    if HAS_POS_WEIGHT:
        pw = tl.load(pos_weight_ptr + offsets % n_labels, mask=mask, other=1.0).to(tl.float32)
        loss = pw * y * softplus_neg + (1.0 - y) * softplus_pos
        grad = (1.0 - y) * p - pw * y * q
    else:
        loss = y * softplus_neg + (1.0 - y) * softplus_pos
        grad = (1.0 - y) * p - y * q

    # 4. Focal factor f = b ** gamma with b = 1 - p_t (standard) or p_t (report variant):
    #    1 - p_t = (1 - y) p + y q,  d(1 - p_t)/dx = (1 - 2y) p q,  and p_t's derivative is minus
    #    that. d f / dx = gamma * f * (db/dx) / b, with (db/dx) / b set to 0 where b == 0 (its limit
    #    times f is 0 there), so gamma < 1 never forms 0 ** (gamma - 1) = inf.
    #    f = exp2(gamma * log2(b)); for hard targets b is p or q, whose logs are exactly
    #    -softplus(-x) and -softplus(x): no log of a tiny number (tl.log2 may be an approximate
    #    instruction on the GPU, with relative error large enough to matter at p ~ 1e-13).
    if FOCAL:
        if REPORT_VARIANT:
            base = (1.0 - y) * q + y * p
            dbase = (2.0 * y - 1.0) * p * q
            log_base_hard = tl.where(y == 1.0, -softplus_neg, -softplus_pos)
        else:
            base = (1.0 - y) * p + y * q
            dbase = (1.0 - 2.0 * y) * p * q
            log_base_hard = tl.where(y == 1.0, -softplus_pos, -softplus_neg)
        has_base = base > 0.0
        safe_base = tl.where(has_base, base, 1.0)
        hard = (y == 0.0) | (y == 1.0)
        log2_base = tl.where(hard, log_base_hard * 1.4426950408889634, tl.log2(safe_base))
        factor = tl.where(has_base, tl.exp2(gamma * log2_base), zero_pow)
        ratio = tl.where(has_base, dbase / safe_base, 0.0)
        grad = grad * factor + loss * gamma * factor * ratio
        loss = loss * factor
        if HAS_ALPHA:
            alpha_t = alpha * y + (1.0 - alpha) * (1.0 - y)
            loss = loss * alpha_t
            grad = grad * alpha_t

    # 5. Per-label weight w (1 - label frequency by default, chosen by the caller).
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offsets % n_labels, mask=mask, other=0.0).to(tl.float32)
        loss = loss * w
        grad = grad * w

    # 6. The gradient, pre-scaled for the reduction; backward only multiplies by grad_output.
    if COMPUTE_GRAD:
        tl.store(grad_ptr + offsets, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)

    # 7. The loss: a per-program fp32 partial sum (summed by one tiny torch.sum on the host side,
    #    deterministic unlike atomics), or the per-element values. tl.reduce with the standard
    #    library's own combine function is exactly tl.sum, but it also runs in the interpreted copy
    #    of this kernel (see _interpreted_kernel), where the compiled tl.sum cannot be called.
    if REDUCE:
        partial = tl.reduce(tl.where(mask, loss * scale, 0.0), 0, _sum_combine)
        tl.store(loss_ptr + pid, partial)
    else:
        tl.store(loss_ptr + offsets, loss.to(loss_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _interpreted_kernel():
    """The kernel under the Triton interpreter, for CPU tensors when TRITON_INTERPRET was unset.

    ``triton.jit`` picks compiled or interpreted at decoration time, for the kernel and for its
    helpers alike, so this executes a second copy of this file with the interpreter switched on.
    """
    spec = importlib.util.spec_from_file_location(f"{__name__}_interpreted", __file__)
    module = importlib.util.module_from_spec(spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        spec.loader.exec_module(module)
    return module._multilabel_loss_kernel


def _kernel_for(device: torch.device):
    if device.type == "cpu" and isinstance(_multilabel_loss_kernel, triton.runtime.JITFunction):
        return _interpreted_kernel()
    return _multilabel_loss_kernel


def multilabel_loss_triton(
    logits: Tensor,
    targets: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    *,
    focal: bool,
    gamma: float,
    alpha: float | None,
    report_variant: bool,
    reduction: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Launch the kernel; returns (loss, grad).

    loss: 0-dim ("mean", "sum") or logits-shaped ("none"), in the logits' dtype.
    grad: logits-shaped d loss / d logits in the logits' dtype, already scaled by the reduction
          (1 / numel for "mean"); an empty tensor when ``compute_grad`` is false.
    Inputs are checked by the caller (shapes, dtypes, devices); nothing here syncs with the host.
    """
    x = logits.contiguous()
    y = targets.contiguous()
    if y.dtype == torch.bool:  # Triton has no bool loads; a free reinterpretation
        y = y.view(torch.uint8)
    n_elements = x.numel()
    n_labels = x.shape[-1]
    n_programs = triton.cdiv(n_elements, BLOCK)
    reduce = reduction != "none"
    scale = 1.0 / n_elements if reduction == "mean" else 1.0

    grad = torch.empty_like(x) if compute_grad else x.new_empty(0)
    if reduce:
        out = torch.empty(n_programs, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty_like(x)
    # Absent optional vectors: pass the logits as a never-read placeholder pointer.
    w = weight.contiguous() if weight is not None else x
    pw = pos_weight.contiguous() if pos_weight is not None else x

    # Triton launches on the current CUDA device; make it the tensors' one.
    device_guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device_guard:
        _kernel_for(x.device)[(n_programs,)](
            x,
            y,
            w,
            pw,
            out,
            grad if compute_grad else x,
            n_elements,
            n_labels,
            float(gamma),
            float(alpha) if alpha is not None else 0.0,
            1.0 if gamma == 0 else 0.0,
            scale,
            FOCAL=focal,
            REPORT_VARIANT=report_variant,
            HAS_WEIGHT=weight is not None,
            HAS_POS_WEIGHT=pos_weight is not None,
            HAS_ALPHA=alpha is not None,
            REDUCE=reduce,
            COMPUTE_GRAD=compute_grad,
            BLOCK_SIZE=BLOCK,
            num_warps=NUM_WARPS,
        )
    loss = out.sum().to(x.dtype) if reduce else out
    return loss, grad
