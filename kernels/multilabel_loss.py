"""Fused multi-label losses: (weighted) BCE with logits and focal loss, loss and gradient in one pass.

Usage (what the trainer calls; signatures are stable)::

    import fasthpa.kernels as K

    w = K.label_weights_from_frequency(train_targets)        # 1 - f_l from the training split
    loss = K.bce_with_logits(logits, targets, weight=w)      # weighted BCE, mean over all elements
    loss = K.focal_loss(logits, targets, gamma=2.0)          # (1 - p_t)^gamma * BCE, torchvision's
    criterion = K.FocalLoss(gamma=2.0).to(device)            # nn.Module wrappers, weights as buffers

Backends (keyword ``backend``): "auto" runs the Triton kernel on fp32/bf16/fp16 CUDA tensors and
the plain PyTorch twin everywhere else; "triton" forces the kernel (on a CPU tensor it runs
under the Triton interpreter: a correctness tool for tests, slow, never a speed measurement);
"torch" forces the twin.

Anatomy: the Triton kernel and its launcher live in ``multilabel_loss_kernel.py`` (imported on
first use, so this module imports without Triton); this file holds the PyTorch twin, the
``torch.library`` ops ``fasthpa::bce_with_logits_fused`` and ``fasthpa::focal_loss_fused``
(each returns the loss and the pre-scaled gradient; a fake kernel for tracing;
``register_autograd`` whose backward is ``grad_output * saved_gradient``), then the public API.
``torch.compile(fullgraph=True)`` traces through the ops and DDP sees an ordinary autograd op.

Nothing in forward or backward synchronises with the host: the checks look at shapes, dtypes and
devices only, and the mean divides by numel as a Python number.

Loss definitions, their float64 ground truth, and the focal "reference_report" variant
(p_t^gamma as printed in the CS230 report, the opposite emphasis to the standard (1 - p_t)^gamma)
are documented in ``fasthpa.kernels.reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reference import FOCAL_VARIANTS, REDUCTIONS

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# The plain PyTorch twin: the same formulas as the kernel, in fp32, for any device.
# --------------------------------------------------------------------------------------------


def _torch_loss_and_grad(
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
    """(loss, scaled d loss / d logits), computed in fp32 (fp64 for fp64 logits).

    Same formulas as the kernel (see multilabel_loss_kernel.py for the derivation), so the op
    returns the same outputs on every device. Outputs are contiguous in the logits' dtype.
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.contiguous().to(compute_dtype)
    y = targets.contiguous().to(compute_dtype)
    p, q = torch.sigmoid(x), torch.sigmoid(-x)  # q = 1 - p without cancellation
    softplus_pos, softplus_neg = F.softplus(x), F.softplus(-x)  # -log(q), -log(p)
    pw = 1.0 if pos_weight is None else pos_weight.to(compute_dtype)
    loss = pw * y * softplus_neg + (1 - y) * softplus_pos
    grad = (1 - y) * p - pw * y * q
    if focal:
        if report_variant:
            base, dbase = (1 - y) * q + y * p, (2 * y - 1) * p * q
        else:
            base, dbase = (1 - y) * p + y * q, (1 - 2 * y) * p * q
        has_base = base > 0
        safe_base = torch.where(has_base, base, torch.ones_like(base))
        factor = torch.where(has_base, safe_base**gamma, torch.zeros_like(base) ** gamma)
        ratio = torch.where(has_base, dbase / safe_base, torch.zeros_like(base))
        grad = grad * factor + loss * gamma * factor * ratio
        loss = loss * factor
        if alpha is not None:
            alpha_t = alpha * y + (1 - alpha) * (1 - y)
            loss, grad = loss * alpha_t, grad * alpha_t
    if weight is not None:
        w = weight.to(compute_dtype)
        loss, grad = loss * w, grad * w
    if reduction == "mean":
        loss, grad = loss.mean(), grad * (1.0 / x.numel())
    elif reduction == "sum":
        loss = loss.sum()
    grad = grad.to(logits.dtype) if compute_grad else logits.new_empty(0)
    return loss.to(logits.dtype), grad


def _loss_and_grad(use_triton: bool, *args, **kwargs) -> tuple[Tensor, Tensor]:
    if use_triton:
        from .multilabel_loss_kernel import multilabel_loss_triton

        return multilabel_loss_triton(*args, **kwargs)
    return _torch_loss_and_grad(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# torch.library registration: ops, fake kernels, autograd.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fasthpa::bce_with_logits_fused", mutates_args=())
def _bce_op(
    logits: Tensor,
    targets: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: str,
    compute_grad: bool,
    use_triton: bool,
) -> tuple[Tensor, Tensor]:
    """(loss, gradient w.r.t. logits already scaled by the reduction; empty if not compute_grad)."""
    return _loss_and_grad(
        use_triton,
        logits,
        targets,
        weight,
        pos_weight,
        focal=False,
        gamma=0.0,
        alpha=None,
        report_variant=False,
        reduction=reduction,
        compute_grad=compute_grad,
    )


@torch.library.custom_op("fasthpa::focal_loss_fused", mutates_args=())
def _focal_op(
    logits: Tensor,
    targets: Tensor,
    weight: Tensor | None,
    gamma: float,
    alpha: float | None,
    variant: str,
    reduction: str,
    compute_grad: bool,
    use_triton: bool,
) -> tuple[Tensor, Tensor]:
    """(loss, gradient w.r.t. logits already scaled by the reduction; empty if not compute_grad)."""
    return _loss_and_grad(
        use_triton,
        logits,
        targets,
        weight,
        None,
        focal=True,
        gamma=gamma,
        alpha=alpha,
        report_variant=variant == "reference_report",
        reduction=reduction,
        compute_grad=compute_grad,
    )


def _fake_outputs(logits: Tensor, reduction: str, compute_grad: bool) -> tuple[Tensor, Tensor]:
    loss = logits.new_empty(()) if reduction != "none" else logits.new_empty(logits.shape)
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    return loss, grad


@_bce_op.register_fake
def _bce_fake(logits, targets, weight, pos_weight, reduction, compute_grad, use_triton):
    return _fake_outputs(logits, reduction, compute_grad)


@_focal_op.register_fake
def _focal_fake(
    logits, targets, weight, gamma, alpha, variant, reduction, compute_grad, use_triton
):
    return _fake_outputs(logits, reduction, compute_grad)


def _setup_context(ctx, inputs, output) -> None:
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)


def _make_backward(n_inputs: int):
    def backward(ctx, grad_loss: Tensor, _grad_of_grad: Tensor | None):
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0:  # a shape, not a value: no host sync
            raise RuntimeError(
                "the fused loss was called with compute_grad=False; call it through "
                "fasthpa.kernels.bce_with_logits/focal_loss, which set it from requires_grad."
            )
        # The kernel already applied the reduction's scale; only the upstream gradient is left.
        # No gradient flows to targets or the weights (constants of the loss).
        return (grad_loss * grad,) + (None,) * (n_inputs - 1)

    return backward


_bce_op.register_autograd(_make_backward(7), setup_context=_setup_context)
_focal_op.register_autograd(_make_backward(9), setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def _use_triton(logits: Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if logits.dtype not in TRITON_DTYPES:
            raise ValueError(
                f"backend='triton' supports fp32, bf16 and fp16 logits, not {logits.dtype}."
            )
        return True
    if backend == "auto":
        return logits.is_cuda and logits.dtype in TRITON_DTYPES and _triton_available()
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")


_TRITON_AVAILABLE: bool | None = None


def _triton_available() -> bool:
    global _TRITON_AVAILABLE  # checked once: an import attempt per step would cost time
    if _TRITON_AVAILABLE is None:
        try:
            # the kernel module itself, not only triton: it uses a private triton name that a
            # future Triton may move, and training must then fall back, not stop
            from . import multilabel_loss_kernel  # noqa: F401

            _TRITON_AVAILABLE = True
        except ImportError as e:
            import warnings

            warnings.warn(
                f"fasthpa.kernels: the Triton loss kernel cannot be imported ({e}); using the "
                f"PyTorch implementation.",
                stacklevel=2,
            )
            _TRITON_AVAILABLE = False
    return _TRITON_AVAILABLE


def _label_vector(v: Tensor | Sequence[float] | None, logits: Tensor, name: str) -> Tensor | None:
    """Validate a per-label vector (shape [C], logits' device); a sequence becomes a tensor."""
    if v is None:
        return None
    if not isinstance(v, Tensor):
        v = torch.tensor(list(v), dtype=torch.float32, device=logits.device)
    n_labels = logits.shape[-1]
    if v.shape != (n_labels,):
        raise ValueError(
            f"{name} must have shape ({n_labels},), one value per label, got {tuple(v.shape)}."
        )
    if v.device != logits.device:
        raise ValueError(
            f"{name} is on {v.device} but logits are on {logits.device}; move it once (the loss "
            f"modules keep it as a buffer) instead of copying it every step."
        )
    return v


def _check_common(logits: Tensor, targets: Tensor, reduction: str) -> None:
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}.")
    if logits.ndim == 0 or logits.numel() == 0:
        raise ValueError(
            f"logits must be a non-empty [batch, labels] tensor, got {tuple(logits.shape)}."
        )
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets have shape {tuple(targets.shape)} but logits {tuple(logits.shape)}; "
            f"they must match."
        )
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits on {logits.device}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def _check_focal(gamma: float, alpha: float | None, variant: str) -> None:
    if not gamma >= 0:
        raise ValueError(f"gamma must be a number >= 0, got {gamma!r}.")
    if alpha is not None and not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be None or in [0, 1], got {alpha!r}.")
    if variant not in FOCAL_VARIANTS:
        raise ValueError(f"variant must be one of {FOCAL_VARIANTS}, got {variant!r}.")


def _needs_grad(logits: Tensor) -> bool:
    return logits.requires_grad and torch.is_grad_enabled()


def bce_with_logits(
    logits: Tensor,
    targets: Tensor,
    weight: Tensor | Sequence[float] | None = None,
    pos_weight: Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> Tensor:
    """Binary cross-entropy with logits, optionally weighted per label; finite for any logit.

    logits: [..., C] fp32/bf16/fp16 (fp64 on the torch backend); targets: same shape, values in
    [0, 1] (float, bool or uint8). weight: per-label w [C] (e.g. label_weights_from_frequency);
    pos_weight: per-label weight of the positive term [C]. reduction: "mean" (over all
    elements, like torch), "sum" or "none". Equals ``F.binary_cross_entropy_with_logits`` with the
    same arguments. Accumulates in fp32, returns the loss and the gradient in the logits' dtype.
    """
    _check_common(logits, targets, reduction)
    weight = _label_vector(weight, logits, "weight")
    pos_weight = _label_vector(pos_weight, logits, "pos_weight")
    loss, _ = torch.ops.fasthpa.bce_with_logits_fused(
        logits,
        targets,
        weight,
        pos_weight,
        reduction,
        _needs_grad(logits),
        _use_triton(logits, backend),
    )
    return loss


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    gamma: float = 2.0,
    alpha: float | None = None,
    weight: Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
    variant: str = "standard",
    *,
    backend: str = "auto",
) -> Tensor:
    """Sigmoid focal loss: (1 - p_t)^gamma * BCE, torchvision's ``sigmoid_focal_loss`` definition.

    gamma >= 0 (0 gives BCE); alpha in [0, 1] or None (off; torchvision's default is 0.25);
    weight: per-label w [C]; reduction as in ``bce_with_logits``. variant="reference_report"
    uses p_t^gamma as printed in the CS230 report (it emphasises easy examples instead of hard
    ones) to reproduce that experiment; "standard" is the focal loss of Lin et al.
    """
    _check_common(logits, targets, reduction)
    _check_focal(gamma, alpha, variant)
    weight = _label_vector(weight, logits, "weight")
    loss, _ = torch.ops.fasthpa.focal_loss_fused(
        logits,
        targets,
        weight,
        float(gamma),
        None if alpha is None else float(alpha),
        variant,
        reduction,
        _needs_grad(logits),
        _use_triton(logits, backend),
    )
    return loss


def label_weights_from_frequency(targets: Tensor) -> Tensor:
    """Per-label weights 1 - f_l, f_l = the label's frequency in a training split.

    targets: the split's multi-hot matrix [samples, labels] (tensor or numpy array, values in
    [0, 1]). Returns a float32 tensor [labels] on the targets' device. Call it once per run,
    not per step (it checks the values, which reads them on the host).
    """
    t = torch.as_tensor(targets)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(
            f"targets must be a non-empty [samples, labels] multi-hot matrix, got shape {tuple(t.shape)}."
        )
    t = t.to(torch.float64)
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError("targets must be multi-hot: every value in [0, 1].")
    return (1.0 - t.mean(dim=0)).to(torch.float32)


# --------------------------------------------------------------------------------------------
# nn.Module wrappers. Weights are non-persistent buffers: they follow .to(device) but stay out
# of checkpoints (they are recomputed from the training split).
# --------------------------------------------------------------------------------------------


def _buffer(v: Tensor | Sequence[float] | None) -> Tensor | None:
    return None if v is None else torch.as_tensor(v, dtype=torch.float32).detach().clone()


class BCEWithLogitsLoss(nn.Module):
    """``nn.BCEWithLogitsLoss`` on the fused op: ``BCEWithLogitsLoss(weight=w)(logits, targets)``."""

    def __init__(
        self,
        weight: Tensor | Sequence[float] | None = None,
        pos_weight: Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        self.register_buffer("weight", _buffer(weight), persistent=False)
        self.register_buffer("pos_weight", _buffer(pos_weight), persistent=False)
        self.reduction, self.backend = reduction, backend

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return bce_with_logits(
            logits, targets, self.weight, self.pos_weight, self.reduction, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"


class WeightedBCELoss(BCEWithLogitsLoss):
    """BCE with a per-label weight, by default 1 - f_l from the training split.

    ``WeightedBCELoss.from_targets(train_targets)`` or ``WeightedBCELoss(weight=w)``.
    """

    def __init__(
        self,
        weight: Tensor | Sequence[float],
        pos_weight: Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__(weight, pos_weight, reduction, backend)

    @classmethod
    def from_targets(cls, train_targets: Tensor, **kwargs) -> WeightedBCELoss:
        """Weights 1 - f_l from the training split's multi-hot matrix [samples, labels]."""
        return cls(label_weights_from_frequency(train_targets), **kwargs)


class FocalLoss(nn.Module):
    """Sigmoid focal loss module: ``FocalLoss(gamma=2.0)(logits, targets)``; see ``focal_loss``."""

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | None = None,
        weight: Tensor | Sequence[float] | None = None,
        reduction: str = "mean",
        variant: str = "standard",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_focal(gamma, alpha, variant)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        self.register_buffer("weight", _buffer(weight), persistent=False)
        self.gamma, self.alpha, self.variant = float(gamma), alpha, variant
        self.reduction, self.backend = reduction, backend

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return focal_loss(
            logits,
            targets,
            self.gamma,
            self.alpha,
            self.weight,
            self.reduction,
            self.variant,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, alpha={self.alpha}, variant={self.variant!r}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
