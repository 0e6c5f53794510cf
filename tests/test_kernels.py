"""fasthpa.kernels: the fused loss kernel (Triton) and its PyTorch twin against the float64 reference.

Run: ``.venv/bin/python -m pytest tests/test_kernels.py`` (CPU: under a minute on 2 cores, a
cold ``torch.compile`` in the ``slow`` test included). GPU-only cases are marked ``gpu`` and skipped without CUDA.

How the Triton kernel runs here: ``backend="triton"`` on a CPU tensor executes the real kernel
source under the Triton interpreter. We do not set ``TRITON_INTERPRET=1`` in this file: it would be
too late (``import torch`` already imports triton, and in one pytest process other test files
import torch first) and too broad (process-wide, it would turn every Triton kernel, inductor's on a
GPU included, into interpreted numpy). Instead the launcher runs CPU launches through an
interpreted copy of the kernel module, scoped to that one kernel
(``multilabel_loss_kernel._interpreted_kernel``), so these tests check the kernel code in any
test order, and with ``TRITON_INTERPRET=1`` set from the start as well.

Tolerances, float32 against the float64 reference computed from the same float32 inputs:
  relative error under 1e-5 for every element, plus absolute floors for values near zero:
  losses 1e-30 (values under float32's normal range, 1.2e-38, keep no relative precision; GPUs
  flush them to zero); gradients 1e-6 x the largest |gradient| of the case (in the p_t^gamma
  variant a gradient near zero is the difference of two O(max) terms, so float32 leaves it an
  absolute, not a relative, precision).
Per-dtype tolerances of the GPU tests: see DTYPE_TOLERANCES.
"""

from __future__ import annotations

import zlib

import fasthpa.kernels as K
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fasthpa.kernels.reference import bce_with_logits_reference, focal_loss_reference

RTOL_FP32 = 1e-5
LOSS_ATOL_FP32 = 1e-30
GRAD_ATOL_FRACTION_FP32 = 1e-6

# dtype -> (rtol, loss atol, gradient atol as a fraction of the largest |gradient|, gradient atol
# floor). bf16 keeps 8 significant bits (half an ulp = 2e-3) and fp16 11 (2.4e-4); loss and
# gradient are each rounded once at the store and the gradient once more by grad_output * grad.
# fp16's subnormals (below 6.1e-5, spacing 6e-8) hold small losses and the mean-reduced gradients
# of big batches: absolute floors of one spacing for a loss, two for a gradient (rounded at the
# store, then again after the multiply by grad_output, which reaches 2 here).
DTYPE_TOLERANCES = {
    torch.float32: (1e-5, 1e-30, 1e-6, 0.0),
    torch.bfloat16: (1e-2, 1e-30, 1e-2, 0.0),
    torch.float16: (2e-3, 6e-8, 2e-3, 1.2e-7),
}

SHAPES = [(1, 28), (7, 28), (257, 28), (1000, 28), (13, 5)]
REDUCTIONS = ["mean", "sum", "none"]
BACKENDS = ["triton", "torch"]
EXTREMES = (30.0, -30.0, 1e4, -1e4)

# Loss configurations of the main grid: every gamma the issue names, both focal variants, alpha,
# per-label weights and positive weights.
CONFIGS = {
    "bce": dict(family="bce"),
    "bce_weight": dict(family="bce", weight=True),
    "bce_weight_posweight": dict(family="bce", weight=True, pos_weight=True),
    "focal_g0": dict(family="focal", gamma=0.0),
    "focal_g0.5_alpha": dict(family="focal", gamma=0.5, alpha=0.25),
    "focal_g2_weight": dict(family="focal", gamma=2.0, weight=True),
    "focal_g5": dict(family="focal", gamma=5.0),
    "report_g2": dict(family="focal", gamma=2.0, variant="reference_report"),
    "report_g0.5_weight_alpha": dict(
        family="focal", gamma=0.5, alpha=0.75, weight=True, variant="reference_report"
    ),
}


# ---------------------------------------------------------------------------------- helpers


def _generator(request) -> torch.Generator:
    """Fresh random inputs per test, reproducible from the test's id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _logits(shape, gen, kind: str = "random", dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(shape, generator=gen) * 4
    if kind == "extreme":  # about a quarter of the elements at +-30 or +-1e4
        pick = torch.rand(shape, generator=gen) < 0.25
        values = torch.tensor(EXTREMES)[torch.randint(0, len(EXTREMES), shape, generator=gen)]
        x = torch.where(pick, values, x)
    return x.to(dtype)


def _targets(shape, gen) -> torch.Tensor:
    """Multi-hot targets; with 3 or more rows, row 0 is all zeros and row 1 all ones."""
    y = (torch.rand(shape, generator=gen) < 0.3).float()
    if shape[0] >= 3:
        y[0], y[1] = 0.0, 1.0
    return y


def _upstream(loss: torch.Tensor, gen) -> torch.Tensor:
    """A random upstream gradient (grad_output) of the loss's shape, away from zero."""
    g = torch.empty(loss.shape).uniform_(0.5, 2.0, generator=gen)
    sign = torch.randint(0, 2, loss.shape, generator=gen) * 2 - 1
    return (g * sign).to(loss.dtype)


def _label_vectors(config, n_labels, gen):
    w = torch.rand(n_labels, generator=gen) if config.get("weight") else None
    pw = torch.rand(n_labels, generator=gen) * 3 + 0.1 if config.get("pos_weight") else None
    return w, pw


def _fused(config, x, y, w, pw, reduction, backend):
    if config["family"] == "bce":
        return K.bce_with_logits(x, y, w, pw, reduction, backend=backend)
    return K.focal_loss(
        x,
        y,
        config["gamma"],
        config.get("alpha"),
        w,
        reduction,
        config.get("variant", "standard"),
        backend=backend,
    )


def _reference(config, x, y, w, pw, reduction):
    d = torch.float64
    w = None if w is None else w.to(d)
    if config["family"] == "bce":
        pw = None if pw is None else pw.to(d)
        return bce_with_logits_reference(x.to(d), y.to(d), w, pw, reduction)
    return focal_loss_reference(
        x.to(d),
        y.to(d),
        config["gamma"],
        config.get("alpha"),
        w,
        reduction,
        config.get("variant", "standard"),
    )


def _loss_and_grad(fn, x, upstream):
    """Loss value and d(loss)/dx for the upstream gradient, via autograd."""
    leaf = x.detach().requires_grad_()
    loss = fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf, upstream.to(device=loss.device, dtype=loss.dtype))
    return loss.detach(), grad


def assert_close_to_reference(got, ref, rtol, atol, what: str) -> None:
    """|got - ref| <= rtol * |ref| + atol elementwise, with both finite."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{what}: the reference is not finite"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    got64 = got.to(torch.float64)
    err = (got64 - ref).abs()
    bad = err > rtol * ref.abs() + atol
    if bad.any():
        i = int(torch.argmax((err - rtol * ref.abs()).flatten()))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {ref.numel()} elements outside rtol={rtol}, "
            f"atol={atol:.3g}; worst got {got64.flatten()[i].item()!r}, "
            f"expected {ref.flatten()[i].item()!r}"
        )


def check_against_reference(config, x, y, w, pw, reduction, backend, gen, tol=None) -> None:
    rtol, loss_atol, grad_frac, grad_floor = tol or DTYPE_TOLERANCES[torch.float32]
    ref_loss = _reference(config, x, y, w, pw, reduction)
    upstream = _upstream(ref_loss, gen).to(x.dtype)
    loss, grad = _loss_and_grad(
        lambda t: _fused(config, t, y, w, pw, reduction, backend), x, upstream
    )
    ref_loss, ref_grad = _loss_and_grad(
        lambda t: _reference(config, t, y, w, pw, reduction), x.to(torch.float64), upstream
    )
    assert loss.dtype == x.dtype and grad.dtype == x.dtype
    assert_close_to_reference(loss, ref_loss, rtol, loss_atol, "loss")
    grad_atol = max(grad_frac * ref_grad.abs().max().item(), grad_floor)
    assert_close_to_reference(grad, ref_grad, rtol, grad_atol, "gradient")


# ------------------------------------------------------------ kernel and twin vs reference


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("logits_kind", ["random", "extreme"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_gradient_match_float64_reference(
    request, backend, shape, reduction, logits_kind, config
):
    gen = _generator(request)
    cfg = CONFIGS[config]
    x, y = _logits(shape, gen, logits_kind), _targets(shape, gen)
    w, pw = _label_vectors(cfg, shape[-1], gen)
    check_against_reference(cfg, x, y, w, pw, reduction, backend, gen)


@pytest.mark.parametrize("targets_kind", ["all_zero", "all_one", "soft"])
@pytest.mark.parametrize("config", ["bce_weight_posweight", "focal_g0.5_alpha", "report_g2"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_batch_all_zero_all_one_and_soft_targets(
    request, backend, reduction, config, targets_kind
):
    gen = _generator(request)
    shape = (257, 28)
    x = _logits(shape, gen, "extreme")
    if targets_kind == "soft":  # label-smoothed or probabilistic targets are allowed too
        y = torch.rand(shape, generator=gen)
    else:
        y = torch.full(shape, 0.0 if targets_kind == "all_zero" else 1.0)
    w, pw = _label_vectors(CONFIGS[config], shape[-1], gen)
    check_against_reference(CONFIGS[config], x, y, w, pw, reduction, backend, gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_dim_and_non_contiguous_logits(request, backend):
    gen = _generator(request)
    cfg = CONFIGS["focal_g2_weight"]
    x3 = _logits((4, 3, 28), gen)  # [..., C] inputs: the label is the last dimension
    y3 = _targets((4, 3, 28), gen)
    w, _ = _label_vectors(cfg, 28, gen)
    check_against_reference(cfg, x3, y3, w, None, "none", backend, gen)
    xt = _logits((28, 9), gen).t()  # a transposed view, not contiguous
    yt = _targets((28, 9), gen).t()
    assert not xt.is_contiguous()
    check_against_reference(cfg, xt, yt, w, None, "mean", backend, gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_give_finite_loss_and_gradient(backend):
    x = torch.tensor([[1e4, -1e4, 30.0, -30.0, 0.0, 88.0, -88.0, 1e38]] * 2, requires_grad=True)
    y = torch.tensor([[1.0] * 8, [0.0] * 8])
    for loss in (
        K.bce_with_logits(x, y, pos_weight=torch.full((8,), 3.0), backend=backend),
        K.focal_loss(x, y, gamma=0.5, alpha=0.25, backend=backend),
        K.focal_loss(x, y, gamma=2.0, variant="reference_report", backend=backend),
    ):
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_bool_and_half_targets_equal_float_targets(request, backend, target_dtype):
    gen = _generator(request)
    x, y = _logits((33, 28), gen), _targets((33, 28), gen)
    expected = K.focal_loss(x, y, reduction="none", backend=backend)
    got = K.focal_loss(x, y.to(target_dtype), reduction="none", backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_path_gives_the_same_loss(request, backend):
    gen = _generator(request)
    x, y = _logits((50, 28), gen), _targets((50, 28), gen)
    with_grad = K.bce_with_logits(x.clone().requires_grad_(), y, backend=backend)
    with torch.no_grad():  # compute_grad=False: the kernel skips the gradient store
        without = K.bce_with_logits(x.clone().requires_grad_(), y, backend=backend)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)


def test_triton_and_torch_backends_agree(request):
    from fasthpa.kernels import multilabel_loss

    gen = _generator(request)
    assert not multilabel_loss._use_triton(torch.zeros(2, 28), "auto")  # auto: twin off CUDA
    x, y = _logits((300, 28), gen, "extreme"), _targets((300, 28), gen)
    w = torch.rand(28, generator=gen)
    for reduction in REDUCTIONS:
        a, ga = _loss_and_grad(
            lambda t, r=reduction: K.focal_loss(t, y, 2.0, 0.25, w, r, backend="triton"),
            x,
            torch.ones(()) if reduction != "none" else torch.ones(x.shape),
        )
        b, gb = _loss_and_grad(
            lambda t, r=reduction: K.focal_loss(t, y, 2.0, 0.25, w, r, backend="torch"),
            x,
            torch.ones(()) if reduction != "none" else torch.ones(x.shape),
        )
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-30)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6 * gb.abs().max().item())


# ------------------------------------------------------------------------- identities


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_with_gamma_zero_equals_bce(request, backend, reduction):
    gen = _generator(request)
    x, y = _logits((64, 28), gen, "extreme"), _targets((64, 28), gen)
    w = torch.rand(28, generator=gen)
    up = _upstream(torch.empty(() if reduction != "none" else x.shape), gen)
    for variant in K.FOCAL_VARIANTS:
        focal, g_focal = _loss_and_grad(
            lambda t, v=variant: K.focal_loss(t, y, 0.0, None, w, reduction, v, backend=backend),
            x,
            up,
        )
        bce, g_bce = _loss_and_grad(
            lambda t: K.bce_with_logits(t, y, w, None, reduction, backend=backend), x, up
        )
        torch.testing.assert_close(focal, bce, rtol=1e-6, atol=0)
        torch.testing.assert_close(g_focal, g_bce, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_weights_equal_scaled_bce(request, backend):
    gen = _generator(request)
    x, y = _logits((40, 28), gen), _targets((40, 28), gen)
    plain = K.bce_with_logits(x, y, backend=backend)
    ones = K.bce_with_logits(x, y, weight=torch.ones(28), backend=backend)
    torch.testing.assert_close(ones, plain, rtol=1e-6, atol=0)
    scaled = K.bce_with_logits(x, y, weight=[0.3] * 28, backend=backend)
    torch.testing.assert_close(scaled, 0.3 * plain, rtol=1e-6, atol=0)


def test_reference_bce_is_torch_bce_with_logits(request):
    gen = _generator(request)
    x = torch.randn(20, 28, generator=gen, dtype=torch.float64) * 3
    y = _targets((20, 28), gen).double()
    w = torch.rand(28, generator=gen, dtype=torch.float64)
    pw = torch.rand(28, generator=gen, dtype=torch.float64) * 3
    for reduction in REDUCTIONS:
        torch.testing.assert_close(
            bce_with_logits_reference(x, y, w, pw, reduction),
            F.binary_cross_entropy_with_logits(x, y, w, pos_weight=pw, reduction=reduction),
            rtol=1e-10,
            atol=1e-12,
        )


def test_reference_focal_is_torchvision_sigmoid_focal_loss(request):
    from torchvision.ops import sigmoid_focal_loss

    gen = _generator(request)
    x = torch.randn(20, 28, generator=gen, dtype=torch.float64) * 3
    y = _targets((20, 28), gen).double()
    for gamma in (0.0, 0.5, 2.0, 5.0):
        for alpha in (None, 0.25):
            for reduction in REDUCTIONS:
                torch.testing.assert_close(
                    focal_loss_reference(x, y, gamma, alpha, reduction=reduction),
                    sigmoid_focal_loss(
                        x, y, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction=reduction
                    ),
                    rtol=1e-10,
                    atol=1e-12,
                )


def test_reference_is_accurate_where_logits_and_targets_disagree_strongly():
    # log(1 + e^-30) = 9.357622968840175e-14; the cancelling formula loses its digits here.
    x = torch.tensor([-30.0, 30.0], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0], dtype=torch.float64)
    expected = torch.full((2,), np.log1p(np.exp(-30.0)), dtype=torch.float64)
    torch.testing.assert_close(
        bce_with_logits_reference(x, y, reduction="none"), expected, rtol=1e-14, atol=0
    )


def test_report_variant_emphasises_easy_examples_standard_hard_ones():
    """(1 - p_t)^gamma shrinks the loss of an easy example most; p_t^gamma shrinks a hard one's."""
    x = torch.tensor([4.0, -4.0], dtype=torch.float64)  # positive label: easy, then hard
    y = torch.ones(2, dtype=torch.float64)
    bce = bce_with_logits_reference(x, y, reduction="none")
    standard = focal_loss_reference(x, y, 2.0, reduction="none") / bce
    report = focal_loss_reference(x, y, 2.0, reduction="none", variant="reference_report") / bce
    p = torch.sigmoid(x)
    torch.testing.assert_close(standard, (1 - p) ** 2)
    torch.testing.assert_close(report, p**2)
    assert standard[0] < standard[1] and report[0] > report[1]


# -------------------------------------------------------------------- autograd and ops


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_reference(request, reduction):
    gen = _generator(request)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = _targets((3, 5), gen).double()
    w = torch.rand(5, generator=gen, dtype=torch.float64)
    pw = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda t: bce_with_logits_reference(t, y, w, pw, reduction), x)
    for gamma, alpha, variant in [(0.5, 0.25, "standard"), (2.0, None, "reference_report")]:
        assert torch.autograd.gradcheck(
            lambda t, g=gamma, a=alpha, v=variant: focal_loss_reference(
                t, y, g, a, w, reduction, v
            ),
            x,
        )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_registered_op_backward(request, reduction):
    """The op's analytic gradient (its torch kernel in float64) against finite differences."""
    gen = _generator(request)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(3, 5, generator=gen, dtype=torch.float64)  # soft targets: the general formula
    w = torch.rand(5, generator=gen, dtype=torch.float64)
    pw = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda t: K.bce_with_logits(t, y, w, pw, reduction, backend="torch"), x
    )
    for gamma, alpha, variant in [(0.5, 0.25, "standard"), (2.0, None, "reference_report")]:
        assert torch.autograd.gradcheck(
            lambda t, g=gamma, a=alpha, v=variant: K.focal_loss(
                t, y, g, a, w, reduction, v, backend="torch"
            ),
            x,
        )


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_registered_ops(request, reduction, use_triton):
    gen = _generator(request)
    compute_grad = reduction != "sum"  # also check the forward-only variant of the op
    x = _logits((7, 28), gen).requires_grad_(compute_grad)
    y, w = _targets((7, 28), gen), torch.rand(28, generator=gen)
    pw = torch.rand(28, generator=gen) + 0.5
    torch.library.opcheck(
        torch.ops.fasthpa.bce_with_logits_fused.default,
        (x, y, w, pw, reduction, compute_grad, use_triton),
    )
    torch.library.opcheck(
        torch.ops.fasthpa.focal_loss_fused.default,
        (x, y, w, 2.0, 0.25, "standard", reduction, compute_grad, use_triton),
    )


@pytest.mark.slow
def test_torch_compile_fullgraph_gives_the_eager_result(request):
    gen = _generator(request)
    model = torch.nn.Linear(16, 28)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    criterion = K.FocalLoss(gamma=2.0, weight=torch.rand(28, generator=gen), backend="triton")

    def loss_fn(inputs, targets):
        return criterion(model(inputs), targets)

    inputs = torch.randn(8, 16, generator=gen)
    targets = _targets((8, 28), gen)
    eager = loss_fn(inputs, targets)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(loss_fn, fullgraph=True)(inputs, targets)
    compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------- weights, modules, errors


def test_label_weights_from_frequency_is_one_minus_label_frequency(request):
    gen = _generator(request)
    train = (torch.rand(500, 28, generator=gen) < torch.linspace(0.01, 0.6, 28)).to(torch.uint8)
    expected = 1.0 - train.numpy().astype(np.float64).mean(axis=0)
    got = K.label_weights_from_frequency(train)
    assert got.dtype == torch.float32 and got.shape == (28,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(
        K.label_weights_from_frequency(train.numpy()).numpy(), expected, rtol=1e-6
    )


def test_modules_match_the_functions(request):
    gen = _generator(request)
    x, y = _logits((16, 28), gen), _targets((16, 28), gen)
    train = _targets((200, 28), gen)
    w = K.label_weights_from_frequency(train)
    weighted = K.WeightedBCELoss.from_targets(train, backend="triton")
    torch.testing.assert_close(weighted(x, y), K.bce_with_logits(x, y, weight=w), rtol=1e-5, atol=0)
    focal = K.FocalLoss(gamma=2.0, alpha=0.25, weight=w, reduction="sum", backend="triton")
    torch.testing.assert_close(
        focal(x, y), K.focal_loss(x, y, 2.0, 0.25, w, "sum", backend="torch"), rtol=1e-5, atol=0
    )
    plain = K.BCEWithLogitsLoss(pos_weight=[2.0] * 28)
    torch.testing.assert_close(
        plain(x, y), F.binary_cross_entropy_with_logits(x, y, pos_weight=torch.full((28,), 2.0))
    )
    # Weights follow .to() but stay out of checkpoints: they are recomputed from the split.
    assert focal.state_dict() == {} and weighted.state_dict() == {}
    assert focal.double().weight.dtype == torch.float64


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x, y: K.bce_with_logits(x, y[:, :5]), "targets have shape"),
        (lambda x, y: K.bce_with_logits(x, y, weight=torch.ones(5)), "weight must have shape"),
        (lambda x, y: K.bce_with_logits(x, y, pos_weight=[1.0] * 3), "pos_weight must have shape"),
        (lambda x, y: K.bce_with_logits(x, y, reduction="avg"), "reduction must be one of"),
        (lambda x, y: K.bce_with_logits(x, y, backend="cuda"), "backend must be one of"),
        (lambda x, y: K.bce_with_logits(x.long(), y), "floating-point"),
        (lambda x, y: K.bce_with_logits(x[:0], y[:0]), "non-empty"),
        (lambda x, y: K.bce_with_logits(x.double(), y, backend="triton"), "backend='triton'"),
        (lambda x, y: K.focal_loss(x, y, gamma=-1.0), "gamma must be"),
        (lambda x, y: K.focal_loss(x, y, alpha=1.5), "alpha must be"),
        (lambda x, y: K.focal_loss(x, y, variant="report"), "variant must be one of"),
        (lambda x, y: K.FocalLoss(gamma=float("nan")), "gamma must be"),
        (lambda x, y: K.label_weights_from_frequency(y[0]), "[samples, labels]"),
        (lambda x, y: K.label_weights_from_frequency(y * 2), "multi-hot"),
    ],
)
def test_bad_arguments_raise_one_clear_sentence(call, message):
    x, y = torch.randn(4, 28), (torch.rand(4, 28) < 0.5).float()
    y[0, 0] = 1.0
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(x, y)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("config", ["bce_weight_posweight", "focal_g0.5_alpha", "report_g2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_kernel_under_the_interpreter(request, dtype, config, reduction):
    """bf16/fp16 loads and stores of the kernel on CPU (the interpreter emulates them with numpy;
    the GPU tests below repeat this on the hardware's own conversions)."""
    gen = _generator(request)
    cfg = CONFIGS[config]
    for shape in [(7, 28), (257, 28)]:
        x = _logits(shape, gen, "random", dtype)
        x[0, :4] = torch.tensor([30.0, -30.0, 12.0, -12.0], dtype=dtype)
        y = _targets(shape, gen)
        w, pw = _label_vectors(cfg, shape[-1], gen)
        check_against_reference(
            cfg, x, y, w, pw, reduction, "triton", gen, tol=DTYPE_TOLERANCES[dtype]
        )


# ------------------------------------------------------------------------------ GPU only

GPU_CONFIGS = ["bce_weight_posweight", "focal_g0.5_alpha", "focal_g5", "report_g2"]


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("config", GPU_CONFIGS)
@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCES), ids=str)
def test_cuda_kernel_matches_reference_per_dtype(request, dtype, config, reduction):
    gen = _generator(request)
    cfg = CONFIGS[config]
    for shape in [(7, 28), (1000, 28), (8192, 28), (13, 5)]:
        if dtype == torch.float16 and reduction == "sum" and shape[0] * shape[1] > 2048:
            continue  # the sum of that many losses passes fp16's maximum, 65504 (in torch too)
        # Rounded to the dtype first, so the reference sees exactly the kernel's inputs; +-30 but
        # not +-1e4 here, whose sums overflow fp16 (as they would in PyTorch).
        x = _logits(shape, gen, "random", dtype).cuda()
        x[0, : min(4, shape[1])] = torch.tensor([30.0, -30.0, 12.0, -12.0][: shape[1]], dtype=dtype)
        y = _targets(shape, gen).cuda()
        w, pw = (v if v is None else v.cuda() for v in _label_vectors(cfg, shape[-1], gen))
        check_against_reference(
            cfg, x, y, w, pw, reduction, "auto", gen, tol=DTYPE_TOLERANCES[dtype]
        )


@pytest.mark.gpu
def test_cuda_auto_backend_is_the_triton_kernel_and_never_syncs(request):
    from fasthpa.kernels import multilabel_loss

    gen = _generator(request)
    x = _logits((512, 28), gen).cuda().requires_grad_()
    y, w = _targets((512, 28), gen).cuda(), torch.rand(28, generator=gen).cuda()
    assert multilabel_loss._use_triton(x, "auto")
    K.focal_loss(x, y, weight=w).backward()  # warm up: compile the kernel outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in forward or backward raises
    try:
        for reduction in REDUCTIONS:
            loss = K.focal_loss(x, y, weight=w, reduction=reduction)
            loss.backward(torch.ones_like(loss))
            loss = K.bce_with_logits(x, y, weight=w, reduction=reduction)
            loss.backward(torch.ones_like(loss))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()
