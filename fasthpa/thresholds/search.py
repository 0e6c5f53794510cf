"""The per-label threshold search and the metrics it is judged by (the library; the command is
fasthpa.thresholds.cli).

Usage: :mod:`fasthpa.thresholds`.

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

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

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


def from_numpy(array: Any) -> torch.Tensor:
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

    p = probs if isinstance(probs, torch.Tensor) else from_numpy(probs)
    if not (p.is_floating_point()):
        raise ValueError(f"probabilities must be floating point, got {p.dtype}")
    if p.dtype != torch.float64:
        p = p.to(torch.float32)
    y = labels if isinstance(labels, torch.Tensor) else from_numpy(labels)
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

    p = probs if isinstance(probs, torch.Tensor) else from_numpy(probs)
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
        rules = _RareRules(rare_below, rare_rule, shrink, prevalence, default)
        rules.apply(s, y, pos_np, thr_np, notes)

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


@dataclass(frozen=True)
class _RareRules:
    """What exact and grid fits do to labels with few or no positives (see fit_thresholds)."""

    rare_below: int
    rare_rule: str
    shrink: float
    prevalence: Any
    default: float

    def apply(self, s, y, pos_np: np.ndarray, thr_np: np.ndarray, notes: dict[int, str]) -> None:
        """Adjust ``thr_np`` in place; say why in ``notes``."""
        rare = [i for i in range(len(pos_np)) if 0 < pos_np[i] < self.rare_below]
        if rare and self.rare_rule == "shrink":
            for i in rare:
                tuned = thr_np[i]
                thr_np[i] = (1.0 - self.shrink) * tuned + self.shrink * DEFAULT_THRESHOLD
                notes[i] = (
                    f"{_positives(pos_np[i])}, fewer than {self.rare_below}: tuned threshold "
                    f"{tuned:.4f} shrunk toward {DEFAULT_THRESHOLD:g} (weight {self.shrink:g})"
                )
        elif rare:
            prev_thr, k = _prevalence_thresholds(s, _prevalence_rates(self.prevalence, y))
            prev_np, k_np = prev_thr.cpu().numpy(), k.cpu().numpy()
            for i in rare:
                thr_np[i] = prev_np[i]
                notes[i] = (
                    f"{_positives(pos_np[i])}, fewer than {self.rare_below}: prevalence rule, "
                    f"top {k_np[i]} of {s.n} scores positive"
                )
        for i in np.flatnonzero(pos_np == 0):
            thr_np[i] = self.default
            notes[int(i)] = (
                f"no positives in the fitting set: kept the default threshold {self.default:g}"
            )


def _positives(count: int) -> str:
    return f"only {count} positive" + ("" if count == 1 else "s")


def _default_names(n_labels: int) -> tuple[str, ...]:
    return LABEL_NAMES if n_labels == NUM_LABELS else tuple(f"label_{i}" for i in range(n_labels))
