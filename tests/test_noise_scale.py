"""The gradient-noise-scale meter (fasthpa.noise_scale): the estimator's algebra, a least-squares
problem with an analytic answer, the micro-batch norms against a float64 reference, the DDP comm
hook (2 gloo ranks: DDP's default gradients, and the one-process micro-batch estimate on the same
samples), and no host sync on the update path."""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fasthpa.errors import UserError
from fasthpa.noise_scale import (
    NOISE_SCALE_REQUIREMENT,
    MicroBatchNorms,
    NoiseScaleMeter,
    build_noise_scale,
    noise_parts,
    noise_scale_unsupported,
)

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")  # shown by pytest on failure
    return seed


# ---------------------------------------------------------------------------- the estimator


def test_parts_recover_the_true_values_from_expected_norms():
    g = torch.Generator().manual_seed(_fresh_seed())
    for _ in range(20):
        grad_sq, trace = (float(v) for v in torch.rand(2, generator=g, dtype=torch.float64) * 10)
        b_small = int(torch.randint(1, 64, (), generator=g))
        b_big = b_small * int(torch.randint(2, 9, (), generator=g))
        # E|G_B|² = |G|² + tr(Σ)/B
        got = noise_parts(grad_sq + trace / b_small, grad_sq + trace / b_big, b_small, b_big)
        assert got == pytest.approx((grad_sq, trace), rel=1e-9, abs=1e-12)


def test_parts_need_two_distinct_batch_sizes():
    with pytest.raises(ValueError):
        noise_parts(1.0, 1.0, 8, 8)
    with pytest.raises(ValueError):
        NoiseScaleMeter(16, 8, "cpu")


def test_meter_averages_each_part_and_divides_only_at_read():
    g = torch.Generator().manual_seed(_fresh_seed())
    meter = NoiseScaleMeter(8, 32, "cpu", beta=0.9)
    assert meter.read()["b_simple"] is None  # nothing seen yet
    smalls = torch.rand(50, generator=g, dtype=torch.float64) + 1.0
    bigs = torch.rand(50, generator=g, dtype=torch.float64) * 0.5 + 0.5
    for s, b in zip(smalls, bigs):
        meter.update(s.float(), b.float())
    # reference: the bias-corrected EMA of each per-step part, in float64, then the ratio
    weights = 0.1 * 0.9 ** torch.arange(49, -1, -1, dtype=torch.float64)
    weights = weights / weights.sum()
    parts = [noise_parts(float(s), float(b), 8, 32) for s, b in zip(smalls, bigs)]
    grad_sq = float(sum(w * p[0] for w, p in zip(weights, parts)))
    trace = float(sum(w * p[1] for w, p in zip(weights, parts)))
    row = meter.read()
    assert row["grad_sq_ema"] == pytest.approx(grad_sq, rel=1e-5)
    assert row["trace_sigma_ema"] == pytest.approx(trace, rel=1e-5)
    if grad_sq > 0:
        assert row["b_simple"] == pytest.approx(trace / grad_sq, rel=1e-4)
    else:
        assert row["b_simple"] is None
    assert (row["b_small"], row["b_big"], row["noise_samples"]) == (8, 32, 50 * 32)
    json.dumps(row, allow_nan=False)  # a valid history.jsonl line


def test_meter_leaves_non_finite_steps_out():
    meter, clean = NoiseScaleMeter(4, 8, "cpu"), NoiseScaleMeter(4, 8, "cpu")
    for small, big in [(3.0, 2.0), (float("inf"), 5.0), (2.5, float("nan")), (3.5, 2.5)]:
        meter.update(torch.tensor(small), torch.tensor(big))
    for small, big in [(3.0, 2.0), (3.5, 2.5)]:
        clean.update(torch.tensor(small), torch.tensor(big))
    got, want = meter.read(), clean.read()
    for key in ("b_simple", "grad_sq_ema", "trace_sigma_ema"):
        assert got[key] == pytest.approx(want[key], rel=1e-6)
    assert got["noise_samples"] == 4 * 8  # samples seen counts every step


def test_one_device_without_accumulation_is_a_user_error():
    model = nn.Linear(3, 2)
    assert noise_scale_unsupported(1, 1) == NOISE_SCALE_REQUIREMENT
    assert noise_scale_unsupported(1, 2) is None and noise_scale_unsupported(4, 1) is None
    with pytest.raises(UserError, match="--noise-scale needs --grad-accum >= 2 on one device"):
        build_noise_scale(model, batch_size=8, grad_accum=1, world_size=1)
    with pytest.raises(TypeError):  # several ranks but no DDP module to hook
        build_noise_scale(model, batch_size=8, grad_accum=1, world_size=2)


# ---------------------------------------------------------------------------- a known answer


def test_least_squares_noise_scale_matches_the_analytic_value():
    """y = x·w* + σε with x ~ N(0, I_d), per-sample loss ½(x·w - y)², δ = w - w*: the per-sample
    gradient is g = x(x·δ - σε), so G = δ and Σ = (|δ|² + σ²) I + δδᵀ, giving |G|² = |δ|²,
    tr(Σ) = d(|δ|² + σ²) + |δ|². Tolerance: over 30 seeds the relative spread of the three
    figures was 1.4-2.1 % (1000 steps, beta 0.999); 10 % is about 5 standard deviations."""
    g = torch.Generator().manual_seed(_fresh_seed())
    d, sigma, b, k, steps = 8, 1.0, 8, 4, 1000
    w_star = torch.randn(d, generator=g)
    delta = torch.randn(d, generator=g)
    delta = delta / delta.norm()  # |G|² = 1
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    noise = build_noise_scale(model, batch_size=b, grad_accum=k, world_size=1, beta=0.999)
    for _ in range(steps):  # w stays fixed: G and Σ are those of one point
        model.zero_grad(set_to_none=True)
        for _ in range(k):
            x = torch.randn(b, d, generator=g)
            y = x @ w_star + sigma * torch.randn(b, generator=g)
            loss = 0.5 * (model(x).squeeze(1) - y).square().mean()
            (loss / k).backward()  # as the trainer does
            noise.after_micro()
        noise.after_backward()
    row = noise.read()
    trace = d * (1.0 + sigma**2) + 1.0
    assert row["grad_sq_ema"] == pytest.approx(1.0, rel=0.10)
    assert row["trace_sigma_ema"] == pytest.approx(trace, rel=0.10)
    assert row["b_simple"] == pytest.approx(trace, rel=0.10)
    assert (row["b_small"], row["b_big"], row["noise_samples"]) == (b, b * k, steps * b * k)


# ---------------------------------------------------------------------------- micro-batch norms


def _tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 5 * 5, 7),
        nn.Tanh(),
        nn.Linear(7, 4),
    )


def test_micro_batch_norms_match_a_float64_reference_and_leave_grads_alone():
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    k, b = 3, 5
    xs = [torch.randn(b, 3, 7, 7, generator=g) for _ in range(k)]
    ys = [torch.rand(b, 4, generator=g) for _ in range(k)]
    loss_fn = nn.functional.binary_cross_entropy_with_logits
    model, plain = _tiny_model(seed), _tiny_model(seed)
    ref = copy.deepcopy(model).double()
    source = MicroBatchNorms(list(model.parameters()), k)
    for x, y in zip(xs, ys):
        (loss_fn(model(x), y) / k).backward()
        source.after_micro()
        (loss_fn(plain(x), y) / k).backward()
    small, big = source.step_norms()
    # the meter only reads p.grad: the accumulated gradients are bitwise those without it
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), plain.parameters()))
    per_micro = []
    for x, y in zip(xs, ys):
        ref.zero_grad()
        loss_fn(ref(x.double()), y.double()).backward()
        per_micro.append(torch.cat([p.grad.flatten() for p in ref.parameters()]))
    want_small = torch.stack([v.square().sum() for v in per_micro]).mean()
    want_big = torch.stack(per_micro).mean(0).square().sum()
    assert float(small) == pytest.approx(float(want_small), rel=1e-4)
    assert float(big) == pytest.approx(float(want_big), rel=1e-5)
    with pytest.raises(RuntimeError, match="after_micro"):
        source.step_norms()  # the step was reset; a second call without micro-batches is a bug


def test_fp16_loss_scale_is_divided_out():
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(4, 3, 7, 7, generator=g), torch.rand(4, 4, generator=g)) for _ in range(6)]
    loss_fn = nn.functional.binary_cross_entropy_with_logits
    rows = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model = _tiny_model(seed)
        noise = build_noise_scale(model, batch_size=4, grad_accum=2, world_size=1, scaler=scaler)
        for i in range(0, len(data), 2):
            model.zero_grad(set_to_none=True)
            for x, y in data[i : i + 2]:
                loss = loss_fn(model(x), y) / 2
                (scaler.scale(loss) if scaler is not None else loss).backward()
                noise.after_micro()
            noise.after_backward()
        rows.append(noise.read())
    for key in ("grad_sq_ema", "trace_sigma_ema"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-4)


# ---------------------------------------------------------------------------- no host sync


class _SyncSpy:
    """Replaces the Tensor methods that copy a value to the host with ones that record the call
    and raise, so code under test cannot sync without the test seeing it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.monkeypatch = monkeypatch

    def __enter__(self) -> _SyncSpy:
        for name in SYNC_METHODS:
            self.monkeypatch.setattr(torch.Tensor, name, self._raiser(name))
        return self

    def __exit__(self, *exc) -> None:
        self.monkeypatch.undo()

    def _raiser(self, name: str):
        def sync(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"host sync: Tensor.{name} on the update path")

        return sync


def test_update_path_makes_no_host_sync(monkeypatch):
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    model = _tiny_model(seed)
    noise = build_noise_scale(model, batch_size=4, grad_accum=2, world_size=1)
    loss_fn = nn.functional.binary_cross_entropy_with_logits
    batches = [
        (torch.randn(4, 3, 7, 7, generator=g), torch.rand(4, 4, generator=g)) for _ in range(6)
    ]
    with _SyncSpy(monkeypatch) as spy:
        with pytest.raises(AssertionError):  # the spy itself works
            torch.ones(()).item()
        spy.calls.clear()
        for i in range(0, len(batches), 2):
            model.zero_grad(set_to_none=True)
            for x, y in batches[i : i + 2]:
                (loss_fn(model(x), y) / 2).backward()
                noise.after_micro()
            noise.after_backward()
        assert spy.calls == []
    row = noise.read()  # the log step syncs, once the spy is gone
    assert row["noise_samples"] == 3 * 8 and row["grad_sq_ema"] is not None


@pytest.mark.gpu
def test_update_path_makes_no_host_sync_on_cuda():
    seed = _fresh_seed()
    device = torch.device("cuda")
    model = _tiny_model(seed).to(device)
    noise = build_noise_scale(model, batch_size=4, grad_accum=2, world_size=1)
    loss_fn = nn.functional.binary_cross_entropy_with_logits
    batches = [(torch.randn(4, 3, 7, 7, device=device), torch.rand(4, 4, device=device))] * 4
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(0, len(batches), 2):
            model.zero_grad(set_to_none=True)
            for x, y in batches[i : i + 2]:
                (loss_fn(model(x), y) / 2).backward()
                noise.after_micro()
            noise.after_backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert noise.read()["grad_sq_ema"] is not None


# ---------------------------------------------------------------------------- DDP over gloo

DDP_STEPS, DDP_BATCH = 6, 5


def _ddp_data(seed: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per step: rank 0's and rank 1's (x, y); the one-process run uses them as micro-batches."""
    g = torch.Generator().manual_seed(seed)
    teacher = _tiny_model(seed + 1)  # learnable targets: a clear true gradient at the start
    steps = []
    for _ in range(DDP_STEPS):
        xs = [torch.randn(DDP_BATCH, 3, 7, 7, generator=g) for _ in range(2)]
        with torch.no_grad():
            steps.append((xs, [torch.sigmoid(3 * teacher(x)) for x in xs]))
    return steps


def _ddp_worker(rank: int, world_size: int, port: int, seed: int, out_dir: str) -> None:
    import pytest as _pytest
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist = torch.distributed
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        loss_fn = nn.functional.binary_cross_entropy_with_logits
        # tiny buckets: the hook must add up several buckets per backward
        hooked = DDP(_tiny_model(seed), bucket_cap_mb=0.001)
        default = DDP(_tiny_model(seed), bucket_cap_mb=0.001)
        noise = build_noise_scale(hooked, batch_size=DDP_BATCH, grad_accum=1, world_size=2)
        opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (hooked, default)]
        same_grads, syncs = [], []
        monkeypatch = _pytest.MonkeyPatch()
        for xs, ys in _ddp_data(seed):
            x, y = xs[rank], ys[rank]
            for model, opt in zip((hooked, default), opts):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                if model is not hooked:
                    loss.backward()
                    continue
                with _SyncSpy(monkeypatch) as spy:
                    try:
                        loss.backward()  # the hook runs in here
                        noise.after_backward()
                    except Exception:  # a sync in the hook reaches us wrapped by autograd
                        pass
                    syncs.extend(spy.calls)
            if syncs:  # the reducer is left mid-iteration: stop and report
                break
            same_grads.append(
                all(
                    torch.equal(p.grad, q.grad)
                    for p, q in zip(hooked.parameters(), default.parameters())
                )
            )
            for opt in opts:
                opt.step()
        row = noise.read() if not syncs else {}
        result = {"same_grads": same_grads, "syncs": syncs, "row": row}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    import torch.multiprocessing as mp

    seed = _fresh_seed() % 2**31
    out_dir = tmp_path_factory.mktemp("noise_ddp")
    mp.spawn(_ddp_worker, args=(2, _free_port(), seed, str(out_dir)), nprocs=2, join=True)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return seed, ranks


@pytest.mark.slow
def test_ddp_hook_gives_exactly_the_default_ddp_gradients(ddp_run):
    _, ranks = ddp_run
    for r in ranks:
        assert r["same_grads"] == [True] * DDP_STEPS


@pytest.mark.slow
def test_ddp_hook_path_makes_no_host_sync(ddp_run):
    _, ranks = ddp_run
    assert [r["syncs"] for r in ranks] == [[], []]


@pytest.mark.slow
def test_ddp_estimate_equals_the_one_process_micro_batch_estimate(ddp_run):
    seed, ranks = ddp_run
    assert ranks[0]["row"] == ranks[1]["row"]  # the read averaged the local part over ranks
    # one process, the two ranks' batches as two accumulated micro-batches, the same SGD steps
    model = _tiny_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    noise = build_noise_scale(model, batch_size=DDP_BATCH, grad_accum=2, world_size=1)
    loss_fn = nn.functional.binary_cross_entropy_with_logits
    for xs, ys in _ddp_data(seed):
        opt.zero_grad(set_to_none=True)
        for x, y in zip(xs, ys):
            (loss_fn(model(x), y) / 2).backward()
            noise.after_micro()
        noise.after_backward()
        opt.step()
    want, got = noise.read(), ranks[0]["row"]
    print("one process:", want, "\nDDP:", got)
    assert (got["b_small"], got["b_big"], got["noise_samples"]) == (
        want["b_small"],
        want["b_big"],
        want["noise_samples"],
    )
    # float32 rounding differs (a difference of running sums against per-rank gradients),
    # and the estimator's subtraction amplifies it
    for key in ("grad_sq_ema", "trace_sigma_ema"):
        assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-7)
    assert want["b_simple"] is not None and want["b_simple"] > 0
    assert got["b_simple"] == pytest.approx(want["b_simple"], rel=1e-2)
