"""Fused multi-label loss kernels (installed as fasthpa.kernels).

Weighted BCE and focal loss computed with their gradient in one pass: a Triton kernel on CUDA, the
plain PyTorch twin elsewhere, both behind the ``torch.library`` ops ``fasthpa::*_fused``::

    from fasthpa.kernels import FocalLoss, bce_with_logits, focal_loss, label_weights_from_frequency

The float64 ground truth is ``fasthpa.kernels.reference``.
"""

from .multilabel_loss import (
    BACKENDS,
    BCEWithLogitsLoss,
    FocalLoss,
    WeightedBCELoss,
    bce_with_logits,
    focal_loss,
    label_weights_from_frequency,
)
from .reference import FOCAL_VARIANTS, REDUCTIONS

__all__ = [
    "BACKENDS",
    "FOCAL_VARIANTS",
    "REDUCTIONS",
    "BCEWithLogitsLoss",
    "FocalLoss",
    "WeightedBCELoss",
    "bce_with_logits",
    "focal_loss",
    "label_weights_from_frequency",
]
