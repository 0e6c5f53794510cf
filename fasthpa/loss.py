"""The training loss, built from the config: BCE, weighted BCE or focal, on fasthpa.kernels.

    loss_fn = make_loss(cfg.loss, train_targets, device)   # weights from the training split
    loss = loss_fn(logits.float(), targets)                # a scalar (mean over the batch)

The kernels compute loss and gradient in one fused Triton pass on CUDA and fall back to plain
PyTorch elsewhere (``fasthpa.kernels``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import fasthpa.kernels as K

LOSSES = ("bce", "wbce", "focal")
"""``--loss`` choices: plain BCE, BCE weighted by 1 - label frequency, or focal."""
FOCAL_VARIANTS = K.FOCAL_VARIANTS

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(cfg: Any, train_targets: np.ndarray, device: torch.device) -> LossFn:
    """The loss as a function of (fp32 logits, targets) for ``cfg`` (a fasthpa.config.LossConfig,
    which imports this module for its choices); label weights from ``train_targets`` (uint8
    [N, 28], the training split)."""
    if cfg.loss == "bce":
        return lambda logits, y: K.bce_with_logits(logits, y)
    if cfg.loss == "wbce":
        weight = torch.as_tensor(
            K.label_weights_from_frequency(train_targets), dtype=torch.float32, device=device
        )
        return lambda logits, y: K.bce_with_logits(logits, y, weight=weight)
    gamma, alpha, variant = cfg.focal_gamma, cfg.focal_alpha, cfg.focal_variant
    return lambda logits, y: K.focal_loss(logits, y, gamma=gamma, alpha=alpha, variant=variant)
