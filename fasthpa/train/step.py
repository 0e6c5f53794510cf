"""One optimiser step: forward, loss and backward over the micro-batches, then the update.

    loss = train_step(net, optimizer, scaler, loss_fn, [(x, y)], autocast)   # a device scalar

No host sync: the loss comes back as a device tensor that the meter reads on log steps only.
Under DDP only the last micro-batch all-reduces the gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fasthpa.loss import LossFn
from fasthpa.noise_scale import NoiseScale
from fasthpa.runtime import no_sync

LossHook = Callable[[torch.Tensor], torch.Tensor]


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    loss_fn: LossFn,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    autocast: Callable[[], Any],
    loss_hook: LossHook | None = None,
    noise: NoiseScale | None = None,
) -> torch.Tensor:
    """One optimiser step over ``micro_batches``; returns the mean loss as a device tensor.

    ``loss_hook`` (tests: fault injection) maps each micro-batch's loss before the backward;
    ``noise`` (``--noise-scale``) reads the gradients after each micro-batch and the step.
    """
    accum = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        # every micro-batch but the last skips DDP's all-reduce
        sync = no_sync(net) if i < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast():
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            if loss_hook is not None:
                loss = loss_hook(loss)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if noise is not None:
            noise.after_micro()  # device ops only
        total = total + loss.detach() / accum
    if noise is not None:
        noise.after_backward()  # p.grad holds the step's gradient until the update
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total
