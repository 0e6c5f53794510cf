"""Fit per-label decision thresholds on dev probabilities and report the macro F1 gain.

Command line (PROBS: a run's dev_probs.npz, an [N, 28] .npy, or a CSV of Id plus 28 columns;
LABELS: a train.csv-style Id,Target file matched by Id, or an [N, 28] multi-hot .npy/.npz)::

    fasthpa thresholds --probs runs/r1/dev_probs.npz --out runs/r1/thresholds_exact.json
    fasthpa thresholds --probs dev.csv --labels train.csv --method grid --out thresholds.json
    fasthpa thresholds --probs dev.npy --labels dev_labels.npy --rare-below 10 --out t.json

Python (numpy arrays or torch tensors, [N, L]; runs on the GPU when the tensors are there)::

    from fasthpa.thresholds import fit_thresholds, per_label_metrics, write_thresholds_json
    result = fit_thresholds(probs, labels, method="exact")      # "exact" | "grid" | "prevalence"
    result.thresholds, result.f1_tuned, result.macro_f1_tuned   # numpy [L], numpy [L], float
    write_thresholds_json("thresholds.json", result)
    per_label_metrics(probs, labels, result.thresholds)["macro_f1"]
    apply_thresholds(test_probs, load_thresholds("thresholds.json"))  # bool [N, L]

How: one sort per label (integer keys: numpy's SIMD argsort on the CPU, torch.sort on the GPU)
and a cumulative count of true positives give TP and predicted positives at any threshold, so
every method, the rare-label rules and the F1 before and after all come from that one sort.

Methods, all predicting a label positive when its score is >= its threshold:

- ``exact``: the cut that maximises F1 on the fitting data among all distinct score values, for
  every label at once (sort each column, cumulative true positives, F1 at the end of each tie
  group, argmax). The threshold returned is the midpoint between the chosen cut score and the next
  lower distinct score (so it classifies the fitting data exactly like the cut, and leaves a
  margin on both sides for unseen data), rounded to the probabilities' dtype; when the best cut
  keeps every sample it is the lowest score. Among cuts with equal F1 the highest one wins.
- ``grid``: the best of t = 0.00, 0.01, ..., 1.00 (what most public code did); F1 ties go to the
  t closest to 0.5, then to the lower t.
- ``prevalence``: predict the k = round(rate * N) highest scores positive, rate being the label's
  frequency (``prevalence="fit"``: in the fitting labels; ``"kaggle"``: in the Kaggle train.csv;
  or an array of L rates). Ties at the k-th score are all predicted positive; k = 0 gives a
  threshold just above the highest score.

Edge cases: a label with no positives in the fitting set keeps ``default`` (0.5) under ``exact``
and ``grid`` (no cut can do better than F1 = 0 there) and gets a note; labels with fewer than
``rare_below`` positives can be shrunk toward 0.5 or switched to the prevalence rule, because
tuned thresholds overfit rare labels. F1 follows scikit-learn's ``zero_division=0``: a label
with no positives and no positive predictions scores 0, and the macro F1 is the mean over all
labels.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fasthpa.errors import UserError
from fasthpa.io import atomic_write_json
from fasthpa.labels import KAGGLE_TRAIN_COUNTS, KAGGLE_TRAIN_SAMPLES, LABEL_NAMES, NUM_LABELS

if TYPE_CHECKING:
    import torch

METHODS = ("exact", "grid", "prevalence")
RARE_RULES = ("shrink", "prevalence")
DEFAULT_THRESHOLD = 0.5
GRID_STEPS = 100  # grid thresholds are j / GRID_STEPS for j = 0..GRID_STEPS


@dataclass
class ThresholdResult:
    """What ``fit_thresholds`` found: thresholds and F1 per label, before and after tuning."""

    method: str
    """"exact", "grid" or "prevalence"."""
    label_names: tuple[str, ...]
    """One name per label (column)."""
    thresholds: np.ndarray
    """float64 [L]: predict label l when its score is >= thresholds[l]."""
    f1_at_05: np.ndarray
    """float64 [L]: F1 per label at the fixed threshold 0.5."""
    f1_tuned: np.ndarray
    """float64 [L]: F1 per label at ``thresholds`` (on the fitting data)."""
    macro_f1_at_05: float
    """Mean of ``f1_at_05``."""
    macro_f1_tuned: float
    """Mean of ``f1_tuned``."""
    positives: np.ndarray
    """int64 [L]: positive samples per label in the fitting set."""
    n_samples: int
    """Rows in the fitting set."""
    notes: dict[int, str] = field(default_factory=dict)
    """label index -> why its threshold is not the plain tuned one (no positives, rare label)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The settings that produced the result (rare_below, rare_rule, shrink, prevalence, ...)."""

    @property
    def gain(self) -> np.ndarray:
        """float64 [L]: tuned F1 minus F1 at 0.5."""
        return self.f1_tuned - self.f1_at_05

    def to_json(self) -> dict[str, Any]:
        """The ``thresholds.json`` payload (plain Python types, stable key names)."""
        return {
            "method": self.method,
            "label_names": list(self.label_names),
            "thresholds": [float(t) for t in self.thresholds],
            "f1_at_0.5": [float(f) for f in self.f1_at_05],
            "f1_tuned": [float(f) for f in self.f1_tuned],
            "macro_f1_at_0.5": float(self.macro_f1_at_05),
            "macro_f1_tuned": float(self.macro_f1_tuned),
            "positives": [int(p) for p in self.positives],
            "n_samples": int(self.n_samples),
            "notes": {str(k): v for k, v in sorted(self.notes.items())},
            "options": self.options,
        }


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _from_numpy(array: Any) -> torch.Tensor:
    import torch

    array = np.asarray(array)
    if not array.flags.writeable:  # torch warns on read-only memory (np.load mmap, pandas)
        array = array.copy()
    return torch.as_tensor(array)


def _as_tensors(probs: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities as a float32/float64 tensor and labels as a bool tensor on the same device.

    float16/bfloat16 scores are widened to float32 (thresholds are then float32 values); float64
    stays float64 so thresholds fit the given scores exactly.
    """
    import torch

    p = probs if isinstance(probs, torch.Tensor) else _from_numpy(probs)
    if not (p.is_floating_point()):
        raise ValueError(f"probabilities must be floating point, got {p.dtype}")
    if p.dtype != torch.float64:
        p = p.to(torch.float32)
    y = labels if isinstance(labels, torch.Tensor) else _from_numpy(labels)
    y = y.to(p.device)
    if p.ndim != 2 or y.shape != p.shape:
        raise ValueError(
            f"probabilities and labels must both be [N, L] with the same shape, got "
            f"{tuple(p.shape)} and {tuple(y.shape)}"
        )
    if p.shape[0] == 0:
        raise ValueError("need at least one sample to fit thresholds")
    if y.dtype != torch.bool:
        lo, hi = torch.aminmax(y)
        if bool(lo < 0) or bool(hi > 1) or (y.is_floating_point() and bool((y != y.round()).any())):
            raise ValueError("labels must be 0/1 (multi-hot)")
        y = y != 0
    # one pass for NaN and range: aminmax propagates NaN, which fails both comparisons
    lo, hi = torch.aminmax(p)
    if not (bool(lo >= 0) and bool(hi <= 1)):
        raise ValueError("probabilities must lie in [0, 1] (found NaN or a value outside)")
    return p, y


def _thresholds_tensor(thresholds: Any, n_labels: int, device: Any) -> torch.Tensor:
    import torch

    t = torch.as_tensor(np.asarray(thresholds, dtype=np.float64), device=device)
    if t.ndim == 0:
        t = t.expand(n_labels)
    if t.shape != (n_labels,):
        raise ValueError(f"need one threshold per label ({n_labels}), got shape {tuple(t.shape)}")
    return t


def _predict(p: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``p >= thresholds`` compared exactly: in p's dtype when every threshold is representable
    there (always so for thresholds fitted here), else in float64."""
    import torch

    t_cast = thresholds.to(p.dtype)
    if torch.equal(t_cast.to(torch.float64), thresholds):
        return p >= t_cast
    return p.to(torch.float64) >= thresholds


def _f1_from_counts(tp: torch.Tensor, predicted: torch.Tensor, support: torch.Tensor):
    """F1 = 2 TP / (predicted + support), 0 where both are 0 (scikit-learn's zero_division=0)."""
    import torch

    tp, predicted, support = (x.to(torch.float64) for x in (tp, predicted, support))
    denom = predicted + support
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom))


def per_label_metrics(probs: Any, labels: Any, thresholds: Any) -> dict[str, Any]:
    """Precision, recall, F1 and support per label, and the macro F1, at the given thresholds.

    ``probs`` [N, L] floats in [0, 1], ``labels`` [N, L] 0/1 (numpy or torch, any device),
    ``thresholds`` one float or [L]. Predicts positive when score >= threshold. Returns numpy
    arrays ``precision``, ``recall``, ``f1`` (float64 [L]), ``support``, ``predicted``, ``tp``
    (int64 [L]) and the float ``macro_f1`` (mean F1 over all L labels). Zero divisions give 0,
    as scikit-learn's ``precision_recall_fscore_support(..., zero_division=0)``.

        m = per_label_metrics(dev_probs, dev_labels, 0.5); m["macro_f1"], m["f1"][27]
    """
    p, y = _as_tensors(probs, labels)
    return _metrics(p, y, thresholds)


def apply_thresholds(probs: Any, thresholds: Any) -> np.ndarray:
    """Multi-hot predictions, bool [N, L]: ``probs >= thresholds`` decided exactly as the fit
    decided it (a float32 score against a float64 threshold is compared in float64, never by
    rounding the threshold to float32). ``probs`` numpy or torch; ``thresholds`` a float or [L].

        keep = apply_thresholds(test_probs, load_thresholds(run_dir / "thresholds.json"))
    """
    import torch

    p = probs if isinstance(probs, torch.Tensor) else _from_numpy(probs)
    if p.ndim != 2 or not p.is_floating_point():
        raise ValueError(f"probabilities must be a float [N, L] array, got {tuple(p.shape)}")
    if p.dtype != torch.float64:
        p = p.to(torch.float32)
    return _predict(p, _thresholds_tensor(thresholds, p.shape[1], p.device)).cpu().numpy()


def _metrics(p: torch.Tensor, y: torch.Tensor, thresholds: Any) -> dict[str, Any]:
    import torch

    t = _thresholds_tensor(thresholds, p.shape[1], p.device)
    pred = _predict(p, t)
    count = _count_dtype(p.shape[0])
    tp = (pred & y).sum(0, dtype=count)
    predicted = pred.sum(0, dtype=count)
    support = y.sum(0, dtype=count)
    tp64, pr64, su64 = (x.to(torch.float64) for x in (tp, predicted, support))
    precision = torch.where(pr64 > 0, tp64 / pr64.clamp_min(1), torch.zeros_like(tp64))
    recall = torch.where(su64 > 0, tp64 / su64.clamp_min(1), torch.zeros_like(tp64))
    f1 = _f1_from_counts(tp, predicted, support)
    out = {
        "precision": precision.cpu().numpy(),
        "recall": recall.cpu().numpy(),
        "f1": f1.cpu().numpy(),
        "support": support.cpu().numpy().astype(np.int64),
        "predicted": predicted.cpu().numpy().astype(np.int64),
        "tp": tp.cpu().numpy().astype(np.int64),
    }
    out["macro_f1"] = float(out["f1"].mean())
    return out


# ---------------------------------------------------------------------------------------------
# The searches. One sort per label gives every count at every threshold: with the scores in
# descending order and the cumulative true positives, predicting "score >= t" means predicting
# the top k scores (k found by binary search), and TP is the cumulative count at k. Everything
# works on the [L, N] transposed layout (one contiguous row per label); no Python loop over
# labels or candidate thresholds.
# ---------------------------------------------------------------------------------------------


@dataclass
class _SortedScores:
    """Each label's scores high to low, as integer keys, with cumulative true positives."""

    keys: torch.Tensor
    """[L, N] int32 (float32 scores) or int64 (float64): ascending keys = descending scores."""
    tp: torch.Tensor
    """[L, N] int: true positives among the top i + 1 scores."""
    dtype: torch.dtype
    """The scores' dtype; thresholds found here are values of it."""

    @property
    def n(self) -> int:
        return self.keys.shape[1]

    @property
    def positives(self) -> torch.Tensor:
        return self.tp[:, -1]

    def scores(self, index: torch.Tensor) -> torch.Tensor:
        """The scores at positions ``index`` ([L] or [L, M]) of the descending order."""
        squeeze = index.ndim == 1
        keys = self.keys.gather(1, index.unsqueeze(1) if squeeze else index)
        out = _key_to_score(keys, self.dtype)
        return out.squeeze(1) if squeeze else out

    def counts_at(self, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted positives, true positives), int64 [L, M], for "score >= t" at float64
        thresholds [L, M], exactly as a float64 comparison would decide it."""
        import torch

        t = thresholds.to(self.keys.device).clamp_min(0.0)  # every score is >= 0
        # the smallest value of the scores' dtype that is >= t: the same test in that dtype
        t_d = t.to(self.dtype)
        t_d = torch.where(
            t_d.to(torch.float64) < t, torch.nextafter(t_d, torch.full_like(t_d, math.inf)), t_d
        )
        predicted = torch.searchsorted(self.keys, _score_to_key(t_d), right=True)
        tp = self.tp.gather(1, (predicted - 1).clamp_min(0)).to(torch.int64)
        return predicted, torch.where(predicted > 0, tp, torch.zeros_like(tp))


def _key_layout(dtype: torch.dtype):
    import torch

    if dtype == torch.float32:
        return torch.int32, 0x3F800000, 0x7FFFFFFF  # the bits of 1.0f; all but the sign bit
    return torch.int64, 0x3FF0000000000000, 0x7FFFFFFFFFFFFFFF


def _score_to_key(x: torch.Tensor) -> torch.Tensor:
    """Non-negative floats order like their bit patterns read as integers, so bits(1.0) - bits
    is an integer key whose ascending order is the descending order of scores in [0, 1]
    (integer sorts are the fastest sorts on both backends, and the scores come back exactly).
    The sign bit is cleared so that -0.0 is +0.0; values above 1 get negative keys."""
    int_dtype, one_bits, abs_mask = _key_layout(x.dtype)
    return one_bits - (x.contiguous().view(int_dtype) & abs_mask)


def _key_to_score(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _, one_bits, _ = _key_layout(dtype)
    return (one_bits - keys).view(dtype)


def _count_dtype(n: int):
    import torch

    # int32 counts are exact below 2**31 samples and their cumsum is ~5x faster than int64 on CPU
    return torch.int32 if n < 2**31 - 1 else torch.int64


def _sort_scores(p: torch.Tensor, y: torch.Tensor, backend: str | None = None) -> _SortedScores:
    """Sort every label's scores (one row each) and count true positives down the order.

    ``backend``: "numpy" (the default on CPU) or "torch" (the default elsewhere, e.g. CUDA).
    Both give the same keys; within a tie group the labels may come in another order, which
    nothing downstream looks at (counts are only read at the end of tie groups).
    """
    import torch

    keys = _score_to_key(p.t())
    if backend is None:
        backend = "numpy" if p.device.type == "cpu" else "torch"
    if backend == "numpy":
        # numpy's argsort uses x86-simd-sort (AVX-512/AVX2): several times faster than
        # torch.sort on the CPU at these sizes (benchmarks/thresholds.py times both).
        keys_np = keys.numpy()
        order_np = np.argsort(keys_np, axis=1)
        keys = torch.from_numpy(np.take_along_axis(keys_np, order_np, axis=1))
        order = torch.from_numpy(order_np)
    else:
        keys, order = torch.sort(keys, dim=1)
    ys = torch.gather(y.t(), 1, order)
    tp = torch.cumsum(ys, dim=1, dtype=_count_dtype(p.shape[0]))
    return _SortedScores(keys=keys, tp=tp, dtype=p.dtype)


def _midpoint_below(upper: torch.Tensor, lower: torch.Tensor, has_lower: torch.Tensor):
    """A threshold between a cut score and the next lower distinct score, in the scores' dtype.

    The midpoint is computed in float64 and rounded to the scores' dtype so that comparing
    scores in their own dtype (or in float64) gives the same answer; if rounding lands on
    ``lower`` the cut score itself is used. Where there is no lower score, the cut score.
    """
    import torch

    mid = ((upper.to(torch.float64) + lower.to(torch.float64)) / 2).to(upper.dtype)
    ok = has_lower & (mid > lower)
    return torch.where(ok, mid, upper).to(torch.float64)


def _exact_search(s: _SortedScores) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact F1-optimal thresholds for every label: (thresholds float64 [L], best F1 [L])."""
    import torch

    n = s.n
    # 1. F1 when the top k scores are predicted = 2 TP / (k + positives). Integers below 2**53
    #    are exact in float64 and two different fractions with denominators <= 2N differ by at
    #    least 1/(4N^2), far above float64 rounding: the argmax is the exact one. True division
    #    (correctly rounded) also makes equal fractions equal floats, which the tie rule in
    #    step 3 relies on; the * 2 is exact.
    k = torch.arange(1, n + 1, device=s.keys.device, dtype=torch.float64)
    f1 = k + s.tp[:, -1:]
    torch.div(s.tp, f1, out=f1).mul_(2)
    # 2. a cut is only possible at the end of a tie group (the next score is lower, or none)
    f1[:, :-1].masked_fill_(s.keys[:, :-1] == s.keys[:, 1:], -1.0)
    # 3. argmax returns the first maximum: the highest threshold among equally good cuts
    best = f1.argmax(dim=1)
    best_f1 = f1.gather(1, best.unsqueeze(1)).squeeze(1)
    upper = s.scores(best)
    lower = s.scores((best + 1).clamp_max(n - 1))
    return _midpoint_below(upper, lower, best + 1 < n), best_f1


def _grid_search(s: _SortedScores, steps: int = GRID_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Best of t = j / steps (j = 0..steps) per label: (thresholds float64 [L], F1 [L]).

    The counts at all grid points come from one batched binary search in the sorted scores.
    """
    import torch

    n_labels = s.keys.shape[0]
    grid = torch.arange(steps + 1, device=s.keys.device, dtype=torch.float64) / steps
    predicted, tp = s.counts_at(grid.expand(n_labels, -1))
    f1 = _f1_from_counts(tp, predicted, s.positives.unsqueeze(1).expand_as(tp))
    # ties: closest to 0.5 first, then the lower threshold
    j = torch.arange(steps + 1, device=s.keys.device)
    half = steps // 2
    preference = (j - half).abs() * 2 + (j > half).long()
    is_best = f1 == f1.max(dim=1, keepdim=True).values
    choice = torch.where(is_best, preference, preference.max() + 1).argmin(dim=1, keepdim=True)
    return grid[choice.squeeze(1)], f1.gather(1, choice).squeeze(1)


def _prevalence_rates(prevalence: Any, y: torch.Tensor) -> torch.Tensor:
    import torch

    n_labels = y.shape[1]
    if isinstance(prevalence, str):
        if prevalence == "fit":
            return y.to(torch.float64).mean(0)
        if prevalence == "kaggle":
            if n_labels != NUM_LABELS:
                raise ValueError("prevalence='kaggle' needs the 28 HPA labels")
            counts = torch.tensor(KAGGLE_TRAIN_COUNTS, dtype=torch.float64, device=y.device)
            return counts / KAGGLE_TRAIN_SAMPLES
        raise ValueError(f"prevalence must be 'fit', 'kaggle' or an array of rates: {prevalence!r}")
    rates = torch.as_tensor(np.asarray(prevalence, dtype=np.float64), device=y.device)
    if rates.shape != (n_labels,) or not bool(((rates >= 0) & (rates <= 1)).all()):
        raise ValueError(f"prevalence needs {n_labels} rates in [0, 1]")
    return rates


def _prevalence_thresholds(s: _SortedScores, rates: torch.Tensor):
    """Thresholds that predict the round(rate * N) highest scores of each label positive:
    (thresholds float64 [L], k [L])."""
    import torch

    n = s.n
    # round half up, deterministically (torch.round rounds half to even)
    k = torch.floor(rates.to(s.keys.device) * n + 0.5).long().clamp(0, n)
    upper = s.scores((k - 1).clamp(0, n - 1))
    lower = s.scores(k.clamp_max(n - 1))
    thresholds = _midpoint_below(upper, lower, (k < n) & (k > 0))
    # k = 0: nothing predicted on the fitting data, so a threshold just above the top score
    top = s.scores(torch.zeros_like(k))
    above_top = torch.nextafter(top, torch.full_like(top, math.inf)).to(torch.float64)
    return torch.where(k == 0, above_top, thresholds), k


def fit_thresholds(
    probs: Any,
    labels: Any,
    method: str = "exact",
    *,
    rare_below: int = 0,
    rare_rule: str = "shrink",
    shrink: float = 0.5,
    prevalence: Any = "fit",
    default: float = DEFAULT_THRESHOLD,
    label_names: tuple[str, ...] | list[str] | None = None,
) -> ThresholdResult:
    """Fit one decision threshold per label on (probs, labels) and measure F1 before and after.

    ``probs`` [N, L] scores in [0, 1] and ``labels`` [N, L] 0/1, numpy or torch (the search runs
    on the tensors' device). ``method``: "exact" | "grid" | "prevalence" (see the module doc).
    Labels with fewer than ``rare_below`` positives (but at least one) are adjusted by
    ``rare_rule``: "shrink" moves the tuned threshold the fraction ``shrink`` of the way to 0.5,
    "prevalence" uses the prevalence rule. ``prevalence`` ("fit", "kaggle" or L rates) feeds the
    prevalence rule. Labels without positives keep ``default`` under exact and grid.

        r = fit_thresholds(dev_probs, dev_labels)                      # exact
        r = fit_thresholds(dev_probs, dev_labels, rare_below=10, rare_rule="prevalence")
    """
    import torch

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if rare_rule not in RARE_RULES:
        raise ValueError(f"rare_rule must be one of {RARE_RULES}, got {rare_rule!r}")
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink must lie in [0, 1], got {shrink}")
    if rare_below < 0:
        raise ValueError(f"rare_below must be >= 0, got {rare_below}")
    if not math.isfinite(default):
        raise ValueError(f"default must be a finite threshold, got {default}")

    p, y = _as_tensors(probs, labels)
    n, n_labels = p.shape
    names = tuple(label_names) if label_names is not None else _default_names(n_labels)
    if len(names) != n_labels:
        raise ValueError(f"need {n_labels} label names, got {len(names)}")
    # one sort serves the search, the rare-label rules and the F1 before and after
    s = _sort_scores(p, y)
    positives = s.positives

    if method == "exact":
        thresholds, _ = _exact_search(s)
    elif method == "grid":
        thresholds, _ = _grid_search(s)
    else:
        thresholds, _ = _prevalence_thresholds(s, _prevalence_rates(prevalence, y))

    # host copies of small [L] vectors: one sync, after the heavy work
    pos_np = positives.cpu().numpy().astype(np.int64)
    thr_np = thresholds.cpu().numpy().astype(np.float64)
    notes: dict[int, str] = {}
    if method != "prevalence":
        rare = [i for i in range(n_labels) if 0 < pos_np[i] < rare_below]
        if rare and rare_rule == "shrink":
            for i in rare:
                tuned = thr_np[i]
                thr_np[i] = (1.0 - shrink) * tuned + shrink * DEFAULT_THRESHOLD
                notes[i] = (
                    f"{_positives(pos_np[i])}, fewer than {rare_below}: tuned threshold "
                    f"{tuned:.4f} shrunk toward {DEFAULT_THRESHOLD:g} (weight {shrink:g})"
                )
        elif rare:
            rates = _prevalence_rates(prevalence, y)
            prev_thr, k = _prevalence_thresholds(s, rates)
            prev_np, k_np = prev_thr.cpu().numpy(), k.cpu().numpy()
            for i in rare:
                thr_np[i] = prev_np[i]
                notes[i] = (
                    f"{_positives(pos_np[i])}, fewer than {rare_below}: prevalence rule, "
                    f"top {k_np[i]} of {n} scores positive"
                )
        for i in np.flatnonzero(pos_np == 0):
            thr_np[i] = default
            notes[int(i)] = (
                f"no positives in the fitting set: kept the default threshold {default:g}"
            )

    # F1 at 0.5 and at the final thresholds, read off the sorted scores (O(L log N))
    both = torch.tensor([[DEFAULT_THRESHOLD] * n_labels, thr_np.tolist()], dtype=torch.float64)
    predicted, tp = s.counts_at(both.t())
    f1 = _f1_from_counts(tp, predicted, positives.unsqueeze(1).expand_as(tp)).cpu().numpy()
    f1_at_05, f1_tuned = f1[:, 0].copy(), f1[:, 1].copy()
    return ThresholdResult(
        method=method,
        label_names=names,
        thresholds=thr_np,
        f1_at_05=f1_at_05,
        f1_tuned=f1_tuned,
        macro_f1_at_05=float(f1_at_05.mean()),
        macro_f1_tuned=float(f1_tuned.mean()),
        positives=pos_np,
        n_samples=int(n),
        notes=notes,
        options={
            "rare_below": int(rare_below),
            "rare_rule": rare_rule,
            "shrink": float(shrink),
            "prevalence": prevalence if isinstance(prevalence, str) else "given",
            "default": float(default),
            "probs_dtype": str(p.dtype).removeprefix("torch."),
        },
    )


def _positives(count: int) -> str:
    return f"only {count} positive" + ("" if count == 1 else "s")


def _default_names(n_labels: int) -> tuple[str, ...]:
    return LABEL_NAMES if n_labels == NUM_LABELS else tuple(f"label_{i}" for i in range(n_labels))


# ---------------------------------------------------------------------------------------------
# thresholds.json
# ---------------------------------------------------------------------------------------------


def write_thresholds_json(
    path: str | os.PathLike, result: ThresholdResult, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``result`` as thresholds.json, atomically; ``extra`` keys (e.g. the source file or
    the run's checkpoint) are added at the top level.

        write_thresholds_json(run_dir / "thresholds.json", fit_thresholds(p, y), {"epoch": 12})
    """
    payload = result.to_json()
    if extra:
        clash = set(extra) & set(payload)
        if clash:
            raise ValueError(f"extra keys would overwrite result keys: {sorted(clash)}")
        payload.update(extra)
    return atomic_write_json(path, payload)


def load_thresholds(path: str | os.PathLike, n_labels: int = NUM_LABELS) -> np.ndarray:
    """The ``thresholds`` of a thresholds.json as float64 [n_labels]; UserError if unusable.

    thr = load_thresholds(run_dir / "thresholds.json"); preds = probs >= thr
    """
    import json

    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"thresholds file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"thresholds file {path} is not readable JSON ({e}).") from None
    values = payload.get("thresholds") if isinstance(payload, dict) else None
    try:
        thr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        thr = np.empty(0)
    if thr.shape != (n_labels,) or not np.isfinite(thr).all():
        raise UserError(f"thresholds file {path} needs a 'thresholds' list of {n_labels} numbers.")
    return thr


# ---------------------------------------------------------------------------------------------
# Reading the command's input files (every problem is a UserError naming the file and row)
# ---------------------------------------------------------------------------------------------


@dataclass
class _Table:
    """Rows read from a file: optional Ids and an [N, L] array."""

    ids: list[str] | None
    values: np.ndarray
    path: Path
    first_line: int | None = None
    """For a text file: the line number of the first row (names rows by line, not index)."""

    def row(self, i: int) -> str:
        """How to name row ``i`` in a message."""
        where = f"line {i + self.first_line}" if self.first_line else f"row {i}"
        return where + (f" (Id {self.ids[i]})" if self.ids is not None else "")


def _load_npz(path: Path, key: str) -> tuple[list[str] | None, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            ids = [str(i) for i in z["ids"]] if "ids" in z.files else None
            values = z[key] if key in z.files else None
    except ValueError as e:
        raise UserError(f"{path} cannot be read without pickle ({e}); save ids as str.") from None
    except (OSError, KeyError) as e:
        raise UserError(f"{path} is not a readable .npz file ({e}).") from None
    return ids, values


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .npy array ({e}).") from None


def _read_probs(path: Path, n_labels: int) -> tuple[_Table, _Table | None]:
    """PROBS as a table, plus the labels stored beside them in a dev_probs.npz (if any)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserError(f"--probs file not found: {path}")
    labels = None
    if suffix == ".npz":
        ids, probs = _load_npz(path, "probs")
        if probs is None:
            raise UserError(f"--probs {path} has no 'probs' array.")
        _, y = _load_npz(path, "labels")
        if y is not None:
            labels = _Table(ids, y, path)
        table = _Table(ids, probs, path)
    elif suffix == ".npy":
        table = _Table(None, _load_npy(path), path)
    elif suffix == ".csv":
        table = _read_probs_csv(path, n_labels)
    else:
        raise UserError(f"--probs {path} must be a .npz, .npy or .csv file.")
    _check_probs(table, n_labels)
    return table, labels


def _read_probs_csv(path: Path, n_labels: int) -> _Table:
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype={"Id": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise UserError(f"--probs {path} is not a readable CSV ({e}).") from None
    if "Id" not in df.columns or len(df.columns) != n_labels + 1:
        raise UserError(
            f"--probs {path} needs a header 'Id' plus {n_labels} probability columns, "
            f"got {len(df.columns)} columns."
        )
    cols = [c for c in df.columns if c != "Id"]
    # columns named 0..L-1 (in any order) are put in label order; other names are taken in order
    if all(str(c).strip().isdigit() for c in cols):
        idx = [int(c) for c in cols]
        if sorted(idx) != list(range(n_labels)):
            raise UserError(f"--probs {path} numbered columns must be 0..{n_labels - 1}.")
        cols = [cols[idx.index(i)] for i in range(n_labels)]
    values = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.argwhere(np.isnan(values))
    if len(bad):
        r, c = bad[0]
        raise UserError(
            f"--probs {path} line {r + 2} (Id {df['Id'].iloc[r]}) column {cols[c]!r} "
            f"is not a number."
        )
    return _Table([str(i) for i in df["Id"]], values, path, first_line=2)


def _check_probs(table: _Table, n_labels: int) -> None:
    p, path = table.values, table.path
    if p.ndim != 2 or p.shape[1] != n_labels or p.shape[0] == 0:
        raise UserError(f"--probs {path} must hold an [N, {n_labels}] array, got {p.shape}.")
    if not np.issubdtype(p.dtype, np.floating):
        raise UserError(f"--probs {path} must hold floating-point probabilities, got {p.dtype}.")
    if table.ids is not None and len(table.ids) != p.shape[0]:
        raise UserError(f"--probs {path} has {len(table.ids)} ids for {p.shape[0]} rows.")
    bad = np.argwhere(~((p >= 0) & (p <= 1)))
    if len(bad):
        r, c = bad[0]
        raise UserError(
            f"--probs {path} {table.row(r)} label {c} holds {float(p[r, c])!r}, not a "
            f"probability in [0, 1]."
        )
    if table.ids is not None:
        seen: dict[str, int] = {}
        for i, name in enumerate(table.ids):
            if name in seen:
                raise UserError(
                    f"--probs {path} lists Id {name} twice ({table.row(seen[name])}, "
                    f"{table.row(i)})."
                )
            seen[name] = i


def _read_targets_csv(path: str | os.PathLike, n_labels: int = NUM_LABELS):
    """A train.csv-style file as (ids, uint8 multi-hot [N, 28]): the dataset layer's parser, so
    every command reads Kaggle labels the same way (UserError naming the line of a bad row)."""
    from fasthpa.data.dataset import read_targets_csv

    if n_labels != NUM_LABELS:
        raise ValueError(f"train.csv-style labels have {NUM_LABELS} columns, not {n_labels}")
    return read_targets_csv(path)


def _read_labels(path: Path, n_labels: int) -> _Table:
    if not path.is_file():
        raise UserError(f"--labels file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        ids, y = _read_targets_csv(path, n_labels)
        return _Table(ids, y, path)
    if suffix == ".npz":
        ids, y = _load_npz(path, "labels")
        if y is None:
            raise UserError(f"--labels {path} has no 'labels' array.")
    elif suffix == ".npy":
        ids, y = None, _load_npy(path)
    else:
        raise UserError(f"--labels {path} must be a train.csv-style .csv, a .npy or a .npz file.")
    if y.ndim != 2 or y.shape[1] != n_labels:
        raise UserError(f"--labels {path} must hold an [N, {n_labels}] array, got {y.shape}.")
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        raise UserError(f"--labels {path} must be multi-hot: every entry 0 or 1.")
    return _Table(ids, y.astype(np.uint8), path)


def _align(probs: _Table, labels: _Table) -> np.ndarray:
    """Labels in the row order of the probabilities: by Id when the probs have Ids and the labels
    are a train.csv (which may list more samples); else by row, requiring equal lengths."""
    if probs.ids is not None and labels.ids is not None:
        index = {name: i for i, name in enumerate(labels.ids)}
        missing = [name for name in probs.ids if name not in index]
        if missing:
            raise UserError(
                f"--labels {labels.path} lacks {len(missing)} Id(s) of --probs {probs.path}, "
                f"e.g. {missing[0]}."
            )
        return labels.values[[index[name] for name in probs.ids]]
    if labels.ids is not None and probs.ids is None:
        raise UserError(
            f"--probs {probs.path} has no Ids to match --labels {labels.path} by; give the "
            f"probabilities as a dev_probs.npz or an Id CSV, or the labels as a .npy."
        )
    if labels.values.shape[0] != probs.values.shape[0]:
        raise UserError(
            f"--labels {labels.path} has {labels.values.shape[0]} rows but --probs "
            f"{probs.path} has {probs.values.shape[0]}."
        )
    return labels.values


def _read_prevalence(spec: str, n_labels: int) -> Any:
    if spec in ("fit", "kaggle"):
        return spec
    if not Path(spec).is_file():
        raise UserError(f"--prevalence must be fit, kaggle or a train.csv-style file: {spec!r}.")
    ids, y = _read_targets_csv(spec, n_labels)
    if not ids:
        raise UserError(f"--prevalence {spec} lists no samples.")
    return y.mean(0, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fasthpa thresholds``."""
    parser.add_argument(
        "--probs",
        required=True,
        type=Path,
        help="dev probabilities: a run's dev_probs.npz (ids, probs, labels), an [N, 28] .npy, "
        "or a CSV with an Id column and 28 probability columns",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="true labels: a train.csv-style Id,Target file (matched by Id) or an [N, 28] "
        "multi-hot .npy/.npz (matched by row); may be left out when --probs is a dev_probs.npz "
        "with labels",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="exact",
        help="exact F1 search, a 0.01 grid, or the prevalence rule",
    )
    parser.add_argument("--out", required=True, type=Path, help="thresholds.json to write")
    parser.add_argument(
        "--rare-below",
        type=int,
        default=0,
        metavar="K",
        help="labels with fewer than K positives (but some) get --rare-rule instead of the "
        "tuned threshold; 0 turns this off",
    )
    parser.add_argument(
        "--rare-rule",
        choices=RARE_RULES,
        default="shrink",
        help="for rare labels: shrink the tuned threshold toward 0.5, or use the prevalence rule",
    )
    parser.add_argument(
        "--shrink",
        type=float,
        default=0.5,
        help="fraction of the way a rare label's threshold moves toward 0.5",
    )
    parser.add_argument(
        "--prevalence",
        default="fit",
        metavar="fit|kaggle|TRAIN_CSV",
        help="label frequencies for the prevalence rule: those of the fitting labels, of the "
        "Kaggle train.csv, or of a train.csv-style file",
    )
    parser.add_argument(
        "--default",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="threshold kept for labels without positives (exact and grid)",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device for the search (cpu, cuda, cuda:1)"
    )


def run(args: argparse.Namespace) -> int:
    """``fasthpa thresholds``: read, fit, print the per-label table, write thresholds.json."""
    import torch

    if args.rare_below < 0:
        raise UserError(f"--rare-below must be >= 0, got {args.rare_below}.")
    if not 0.0 <= args.shrink <= 1.0:
        raise UserError(f"--shrink must lie in [0, 1], got {args.shrink}.")
    if not 0.0 <= args.default <= 1.0:
        raise UserError(f"--default must lie in [0, 1], got {args.default}.")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a torch device.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} asked for, but no CUDA GPU is available.")

    probs, npz_labels = _read_probs(args.probs, NUM_LABELS)
    if args.labels is not None:
        labels = _read_labels(args.labels, NUM_LABELS)
    elif npz_labels is not None:
        labels = npz_labels
        if labels.values.shape != probs.values.shape:
            raise UserError(
                f"--probs {args.probs} holds labels of shape {labels.values.shape} for probs of "
                f"shape {probs.values.shape}."
            )
        if not np.isin(labels.values, (0, 1)).all():
            raise UserError(f"--probs {args.probs} 'labels' must be multi-hot: every entry 0 or 1.")
    else:
        raise UserError(f"--labels is needed: --probs {args.probs} holds no labels.")
    y = _align(probs, labels)
    prevalence = _read_prevalence(args.prevalence, NUM_LABELS)

    p_t = _from_numpy(probs.values).to(device)
    y_t = _from_numpy(y.astype(np.bool_)).to(device)
    result = fit_thresholds(
        p_t,
        y_t,
        args.method,
        rare_below=args.rare_below,
        rare_rule=args.rare_rule,
        shrink=args.shrink,
        prevalence=prevalence,
        default=args.default,
    )
    result.options["prevalence"] = args.prevalence
    write_thresholds_json(
        args.out,
        result,
        {"probs": str(args.probs), "labels": str(args.labels or args.probs)},
    )
    print_result(result)
    print(f"wrote {args.out}")
    return 0


def print_result(result: ThresholdResult) -> None:
    """A rich table: label, positives, threshold, F1 at 0.5, tuned F1, gain; then macro F1s and
    the per-label notes (marked * in the table)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a pipe or a log file: no reason to squeeze into 80 columns
        console = Console(width=120)
    table = Table(title=f"per-label thresholds ({result.method}, N = {result.n_samples})")
    table.add_column("#", justify="right")
    table.add_column("label", no_wrap=True, overflow="ellipsis", min_width=12)
    for name in ("positives", "threshold", "F1 @ 0.5", "F1 tuned", "gain"):
        table.add_column(name, justify="right", no_wrap=True)
    for i, name in enumerate(result.label_names):
        gain = result.gain[i]
        colour = "green" if gain > 0 else "red" if gain < 0 else "dim"
        table.add_row(
            str(i),
            name + (" *" if i in result.notes else ""),
            str(result.positives[i]),
            f"{result.thresholds[i]:.4f}",
            f"{result.f1_at_05[i]:.4f}",
            f"{result.f1_tuned[i]:.4f}",
            f"[{colour}]{gain:+.4f}[/]",
        )
    table.add_section()
    table.add_row(
        "",
        "macro F1",
        str(int(result.positives.sum())),
        "",
        f"{result.macro_f1_at_05:.4f}",
        f"{result.macro_f1_tuned:.4f}",
        f"{result.macro_f1_tuned - result.macro_f1_at_05:+.4f}",
    )
    console.print(table)
    for i, note in sorted(result.notes.items()):
        console.print(f"* {i} {result.label_names[i]}: {note}", highlight=False)
