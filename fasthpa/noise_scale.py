"""The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, "An Empirical Model
of Large-Batch Training", arXiv:1812.06162, appendix A.1), measured during training from gradient
norms at two batch sizes, with no host sync outside log steps.

The mean gradient of a batch of B samples has E|G_B|² = |G|² + tr(Σ)/B (Σ the per-sample gradient
covariance, G the true gradient), so two batch sizes B_small < B_big give unbiased estimates

    |G|²  ≈ (B_big |G_big|² - B_small |G_small|²) / (B_big - B_small)
    tr(Σ) ≈ (|G_small|² - |G_big|²) / (1/B_small - 1/B_big)

Both are linear in the two norms, so the meter keeps a bias-corrected EMA of |G_small|² and
|G_big|² (device tensors) and forms the two parts and their ratio only in ``read()``: the same
figures as smoothing each part, and under DDP the local norms need averaging over ranks only then.

Where the two norms come from (``build_noise_scale`` picks the source):

- several ranks (DDP): |G_small|² is this rank's gradient norm before the all-reduce, added up
  bucket by bucket in a DDP communication hook that then does DDP's own averaging all-reduce (the
  backward stays overlapped and the gradients are bitwise those of DDP's default); |G_big|² is the
  norm of the averaged p.grad after backward. B_small = batch x grad-accum, B_big = x ranks.
- one device with ``--grad-accum K >= 2``: the trainer backpropagates loss/K per micro-batch, so
  after micro-batch i p.grad is a_i = (g_1 + ... + g_i)/K and micro-batch i's own gradient is
  g_i = K (a_i - a_{i-1}); a snapshot of p.grad (one gradient-sized buffer, foreach ops, only
  when the meter is on) gives each |g_i|². |G_small|² is their mean, |G_big|² = |a_K|².
  B_small = batch, B_big = batch x K.
- one device with K = 1: no second batch size; ``build_noise_scale`` raises a UserError with
  ``NOISE_SCALE_REQUIREMENT``.

Trainer integration (``fasthpa.train``)::

    # setup, after wrapping in DDP and before torch.compile (the hook goes on the DDP module)
    noise = None
    if cfg.run.noise_scale:
        noise = build_noise_scale(model, batch_size=cfg.run.batch_size, grad_accum=accum,
                                  world_size=info.world_size, scaler=scaler)

    # train_step(..., noise=noise): after each micro-batch's backward, then before the step
    for i, (x, y) in enumerate(micro_batches):
        ...
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if noise is not None:
            noise.after_micro()          # device ops only (a no-op under DDP)
    if noise is not None:
        noise.after_backward()           # p.grad still holds the step's gradient
    optimizer.step()

    # log steps, on every rank (read() all-reduces under DDP), then one host sync
    if noise is not None:
        row |= noise.read()    # b_simple, grad_sq_ema, trace_sigma_ema, b_small, b_big, ...

The EMA restarts on resume (it is bias-corrected, so the first reads are plain means). Overflowed
fp16 steps (non-finite norms) are left out of the EMA on the device, without a sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

NOISE_SCALE_REQUIREMENT = (
    "--noise-scale needs --grad-accum >= 2 on one device, or several ranks "
    "(it compares gradients at two batch sizes)."
)


def noise_scale_unsupported(world_size: int, grad_accum: int) -> str | None:
    """The UserError message when the run has no second batch size to compare, else None."""
    return NOISE_SCALE_REQUIREMENT if world_size <= 1 and grad_accum < 2 else None


def noise_parts(
    small_sq: float, big_sq: float, b_small: float, b_big: float
) -> tuple[float, float]:
    """(|G|², tr(Σ)) from the squared gradient norms at batch sizes ``b_small < b_big``."""
    if not b_big > b_small > 0:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace_sigma = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_sigma


def sum_sq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ |t|² over ``tensors`` as a float32 device scalar (foreach norms; no host sync)."""
    if not tensors:
        raise ValueError("no gradients to measure (did backward run?)")
    norms = torch._foreach_norm(tensors)
    return torch.stack([n.float() for n in norms]).square().sum()


class NoiseScaleMeter:
    """Bias-corrected EMAs of |G_small|² and |G_big|², kept on the device.

    ``update(small_sq, big_sq)`` every step (device scalars in, device ops only);
    ``read()`` on log steps: one host sync (and under DDP one all_reduce, on every rank).
    ``average_small_over_ranks``: |G_small|² is per rank (the DDP source) and is averaged at read.
    """

    def __init__(
        self,
        b_small: int,
        b_big: int,
        device: torch.device | str,
        beta: float = 0.99,
        average_small_over_ranks: bool = False,
        process_group: Any = None,
    ) -> None:
        if not b_big > b_small > 0:
            raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.b_small, self.b_big, self.beta = int(b_small), int(b_big), float(beta)
        self.average_small_over_ranks = average_small_over_ranks
        self.process_group = process_group
        # [EMA of |G_small|², EMA of |G_big|², EMA weight (for the bias correction)]
        self.state = torch.zeros(3, device=device, dtype=torch.float32)
        self._one = torch.ones((), device=device, dtype=torch.float32)
        self.updates = 0  # host-side count: knowing it costs no sync

    def update(self, small_sq: torch.Tensor, big_sq: torch.Tensor) -> None:
        """Fold one step's squared norms (device scalars) into the EMAs; skips non-finite ones."""
        x = torch.stack([small_sq.float().reshape(()), big_sq.float().reshape(()), self._one])
        finite = torch.isfinite(x).all()
        ema = self.state * self.beta + x * (1.0 - self.beta)
        self.state.copy_(torch.where(finite, ema, self.state))
        self.updates += 1

    def read(self) -> dict[str, Any]:
        """The figures for history.jsonl (call on every rank under DDP). ``b_simple`` is None
        while the |G|² estimate is not positive (too few steps to average out the noise)."""
        small = self.state[0:1].clone()
        if self.average_small_over_ranks and dist.is_available() and dist.is_initialized():
            dist.all_reduce(small, group=self.process_group)
            small = small / dist.get_world_size(self.process_group)
        small_ema, big_ema, weight = torch.cat([small, self.state[1:]]).tolist()  # the sync
        row: dict[str, Any] = {
            "b_simple": None,
            "grad_sq_ema": None,
            "trace_sigma_ema": None,
            "b_small": self.b_small,
            "b_big": self.b_big,
            "noise_samples": self.updates * self.b_big,
        }
        if weight <= 0.0:
            return row
        grad_sq, trace = noise_parts(small_ema / weight, big_ema / weight, self.b_small, self.b_big)
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            return row
        row |= {"grad_sq_ema": grad_sq, "trace_sigma_ema": trace}
        if grad_sq > 0.0:
            row["b_simple"] = trace / grad_sq
        return row


# ---------------------------------------------------------------------------- norm sources


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


class MicroBatchNorms:
    """One device: each micro-batch's own gradient norm from a p.grad snapshot, against the sum.

    Call ``after_micro()`` after each of the ``accum`` backward passes of a step, then
    ``step_norms()`` before the optimiser step; the trainer's backward of loss/accum is assumed.
    """

    def __init__(self, params: list[nn.Parameter], accum: int) -> None:
        if accum < 2:
            raise ValueError(f"micro-batch norms need accum >= 2, got {accum}")
        self.params, self.accum = list(params), accum
        self._prev: list[torch.Tensor] | None = None  # a_{i-1}, allocated once
        self._diff_sq: torch.Tensor | None = None  # Σ_i |a_i - a_{i-1}|² so far this step
        self._seen = 0

    def after_micro(self) -> None:
        grads = _grads(self.params)
        if self._seen == 0:
            self._diff_sq = sum_sq(grads)
        else:
            if len(grads) != len(self._prev):
                raise RuntimeError("the set of parameters with gradients changed within a step")
            # in place (prev becomes a_{i-1} - a_i): no second gradient-sized buffer
            torch._foreach_sub_(self._prev, grads)
            self._diff_sq = self._diff_sq + sum_sq(self._prev)
        self._seen += 1
        if self._seen < self.accum:  # the last micro-batch needs no snapshot
            if self._prev is None or len(self._prev) != len(grads):
                self._prev = [g.detach().clone() for g in grads]
            else:
                torch._foreach_copy_(self._prev, grads)

    def step_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean over micro-batches of |g_i|², |sum/accum|²) as device scalars; resets the step."""
        if self._seen != self.accum:
            raise RuntimeError(
                f"after_micro() ran {self._seen} times this step; expected {self.accum}"
            )
        k = self.accum
        # |g_i|² = k² |a_i - a_{i-1}|², and their mean over k micro-batches is k Σ|a_i - a_{i-1}|²
        small = self._diff_sq * k
        big = sum_sq(_grads(self.params))
        self._seen, self._diff_sq = 0, None
        return small, big


@dataclass
class LocalNormState:
    """The DDP hook's state: the process group and the device accumulator of local |g|²."""

    process_group: Any
    local_sq: torch.Tensor


# no annotations on bucket and the result: DDP checks them against dist.GradBucket and
# Future[Tensor], and this module's postponed (string) annotations would fail that check
def local_norm_allreduce_hook(state: LocalNormState, bucket):
    """A DDP communication hook: add the bucket's local squared norm to ``state.local_sq``, then
    DDP's default averaging all-reduce (``default_hooks.allreduce_hook``: divide by the world
    size, all-reduce the sum). Register with ``ddp_model.register_comm_hook(state, this)``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()  # with a hook registered, DDP copies the undivided local gradient here
    state.local_sq.add_(torch.linalg.vector_norm(buf, dtype=torch.float32).square())
    return default_hooks.allreduce_hook(state.process_group, bucket)


class DDPNorms:
    """Several ranks: the local norm from the comm hook against the averaged p.grad's norm."""

    def __init__(
        self, ddp_model: nn.parallel.DistributedDataParallel, process_group: Any = None
    ) -> None:
        self.params = [p for p in ddp_model.module.parameters() if p.requires_grad]
        device = self.params[0].device
        self.state = LocalNormState(process_group, torch.zeros((), device=device))
        ddp_model.register_comm_hook(self.state, local_norm_allreduce_hook)

    def after_micro(self) -> None:
        """Nothing to do: the hook sees the step's gradient when DDP syncs it."""

    def step_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        local = self.state.local_sq.clone()
        self.state.local_sq.zero_()
        return local, sum_sq(_grads(self.params))


# ---------------------------------------------------------------------------- the trainer's view


class NoiseScale:
    """What the trainer holds: a norm source and the meter (see the module docstring)."""

    def __init__(
        self, source: MicroBatchNorms | DDPNorms, meter: NoiseScaleMeter, scaler: Any = None
    ) -> None:
        self.source, self.meter, self.scaler = source, meter, scaler

    def after_micro(self) -> None:
        """After each micro-batch's backward (device ops only)."""
        self.source.after_micro()

    def after_backward(self) -> None:
        """After the step's last backward, before ``optimizer.step()`` (device ops only)."""
        small, big = self.source.step_norms()
        if self.scaler is not None and self.scaler.is_enabled():
            # fp16: the gradients carry the loss scale; _get_scale_async is the scale tensor
            # itself (get_scale() would sync)
            inv = self.scaler._get_scale_async().float().reciprocal().square()
            small, big = small * inv, big * inv
        self.meter.update(small, big)

    def read(self) -> dict[str, Any]:
        """History figures; on log steps only, on every rank."""
        return self.meter.read()

    def describe(self) -> dict[str, Any]:
        """Static facts for env.json: where the norms come from and the two batch sizes."""
        kind = "ddp_comm_hook" if isinstance(self.source, DDPNorms) else "grad_accum_micro_batches"
        return {
            "source": kind,
            "b_small": self.meter.b_small,
            "b_big": self.meter.b_big,
            "ema_beta": self.meter.beta,
        }


def build_noise_scale(
    model: nn.Module,
    *,
    batch_size: int,
    grad_accum: int,
    world_size: int,
    scaler: Any = None,
    beta: float = 0.99,
    process_group: Any = None,
) -> NoiseScale:
    """The meter for this run: ``model`` is the DDP-wrapped module when ``world_size > 1`` (wrap
    in DDP, build this, then compile), else the plain module. Raises a UserError with
    ``NOISE_SCALE_REQUIREMENT`` for one device without accumulation."""
    message = noise_scale_unsupported(world_size, grad_accum)
    if message is not None:
        from fasthpa.errors import UserError

        raise UserError(message)
    b_small = batch_size * grad_accum
    if world_size > 1:
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("several ranks: pass the DistributedDataParallel module")
        source: MicroBatchNorms | DDPNorms = DDPNorms(model, process_group)
        meter = NoiseScaleMeter(
            b_small, b_small * world_size, source.params[0].device, beta, True, process_group
        )
        return NoiseScale(source, meter, scaler)
    params = [p for p in model.parameters() if p.requires_grad]
    meter = NoiseScaleMeter(batch_size, b_small, params[0].device, beta)
    return NoiseScale(MicroBatchNorms(params, grad_accum), meter, scaler)
