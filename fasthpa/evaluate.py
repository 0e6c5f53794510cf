"""Probabilities for every row of an eval loader exactly once, gathered on rank 0.

Used by the trainer's dev/test evaluation and by `fasthpa predict` (with test-time augmentation
views), so both put predictions back in dataset order the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fasthpa.distributed import DistInfo, all_gather_cat
from fasthpa.labels import NUM_LABELS


@dataclass(frozen=True)
class Head:
    """The label columns a model's outputs are, in order, and its tier (see predict_probs)."""

    columns: tuple[int, ...]
    tier: int = 0


def _tiered(x, models, heads, views, channels_last: bool, autocast) -> torch.Tensor:
    """[B, 28]: per column, the mean over the views and the highest-tier models covering it."""
    sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for m, head in zip(models, heads):
        total = None
        for view in views:
            v = x if view is None else view(x)
            if view is not None and channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            with autocast():
                p = torch.sigmoid(m(v).float())
            total = p if total is None else total + p
        if head.tier not in sums:
            zeros = torch.zeros((x.shape[0], NUM_LABELS), device=x.device)
            sums[head.tier] = (zeros, torch.zeros(NUM_LABELS, device=x.device))
        s, c = sums[head.tier]
        cols = list(head.columns)
        s[:, cols] += total
        c[cols] += len(views)
    out = torch.zeros((x.shape[0], NUM_LABELS), device=x.device)
    for tier in sorted(sums):
        s, c = sums[tier]
        out = torch.where(c > 0, s / c.clamp_min(1), out)
    return out


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    loader: Any,
    info: DistInfo,
    n_rows: int,
    autocast: Callable[[], Any],
    views: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
    channels_last: bool = True,
    on_batch: Callable[[], None] | None = None,
    heads: Sequence[Head] | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean sigmoid probability over ``views`` (default: the batch as it is) and over the
    models (one, or an ensemble sharing the loader) for every row of ``loader`` exactly once.

    ``heads`` (one per model) say which of the 28 label columns a model predicts and with which
    tier: each column is the mean of the models of the highest tier that predict it (rare-label
    models, tier 1, replace the main ensemble's, tier 0, for their labels). Default: every
    model predicts all columns, tier 0.

    Returns (rows, probs float32 [len(rows), 28]) sorted by row on rank 0, None on other ranks.
    Padding entries (index -1) are dropped; a row seen twice or never is an error, not a skew.
    """
    models = [model] if isinstance(model, torch.nn.Module) else list(model)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    count = len(views or (None,)) * len(models)
    probs, index = [], []
    for x, _, idx in loader:
        if heads is not None:
            probs.append(_tiered(x, models, heads, views or (None,), channels_last, autocast))
            index.append(idx)
            if on_batch is not None:
                on_batch()
            continue
        total = None
        for view in views or (None,):
            v = x if view is None else view(x)
            if view is not None and channels_last:  # a transposed view loses channels_last
                v = v.contiguous(memory_format=torch.channels_last)
            for m in models:
                with autocast():
                    logits = m(v)
                p = torch.sigmoid(logits.float())
                total = p if total is None else total + p
        probs.append(total / count if count > 1 else total)
        index.append(idx)
        if on_batch is not None:
            on_batch()
    device = info.device
    p = torch.cat(probs) if probs else torch.zeros((0, NUM_LABELS), device=device)
    i = torch.cat(index) if index else torch.zeros((0,), dtype=torch.long, device=device)
    if info.enabled:  # ranks may hold different counts: pad to the largest, then gather
        counts = all_gather_cat(torch.tensor([len(i)], device=device), info)
        pad = int(counts.max()) - len(i)
        p = torch.cat([p, torch.zeros((pad, p.shape[1]), device=device)])
        i = torch.cat([i, torch.full((pad,), -1, dtype=torch.long, device=device)])
        p, i = all_gather_cat(p, info), all_gather_cat(i, info)
    for m, training in zip(models, was_training):
        m.train(training)
    if not info.is_main:
        return None
    p, i = p.cpu().numpy(), i.cpu().numpy()
    keep = i >= 0
    p, i = p[keep], i[keep]
    order = np.argsort(i, kind="stable")
    p, i = p[order], i[order]
    if len(np.unique(i)) != len(i) or len(i) != n_rows:
        raise RuntimeError(
            f"evaluation saw {len(i)} outputs for {len(np.unique(i))} distinct rows, expected "
            f"{n_rows} rows exactly once"
        )
    return i, p.astype(np.float32)
