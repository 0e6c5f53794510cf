"""Threshold rules that hold on unseen data, and choosing one by cross-fitting.

Tuning one threshold per label for the best F1 on a small fitting set overfits: with 1-4
positives per label the exact cut follows noise, and a dev part of 150 images predicts 2-3 times
as many labels per image as the truth holds. The rules here trade that variance for bias, and
:func:`choose_rule` picks among them by how each scores on rows it was not fitted on::

    from fasthpa.thresholds.rules import choose_rule, fit_rule
    rates = train_targets.mean(0)                    # label frequencies of the training split
    thr = fit_rule(dev_probs, dev_labels, "shrink:10", rates=rates)        # float64 [L]
    choice = choose_rule(dev_probs, dev_labels, rates=rates, folds=2, repeats=8, seed=0)
    choice.rule, choice.cv_macro_f1, choice.thresholds                    # fitted on all rows
    choice.labels_per_row, choice.expected_labels_per_row

Rules (strings, so that configs and flags can name them):

- ``exact``: each label's F1-optimal cut on the fitting data (:func:`fasthpa.thresholds.
  fit_thresholds`); labels without positives keep 0.5.
- ``prevalence``: each label's threshold predicts the ``round(rate * N)`` highest fitting scores
  positive, ``rate`` the label's training frequency (``rates``; default: the fitting labels').
- ``global``: one threshold shared by all labels, the best macro F1 on a 0.01 grid.
- ``shrink:K``: the exact threshold moved toward the prevalence one by the weight
  ``w = n_pos / (n_pos + K)`` kept on the exact one (``n_pos``: the label's fitting positives),
  so labels with few positives lean on the prevalence rule and common labels keep their cut.
- ``shrink-global:K``: the same, shrunk toward the global threshold.

Predictions follow the submission's decision rule (:func:`decode`): score >= threshold, and a
row with no label above its threshold gets its arg-max label (``at_least_one``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fasthpa.labels import NUM_LABELS
from fasthpa.thresholds.search import (
    ThresholdResult,
    _default_names,
    fit_thresholds,
    per_label_metrics,
)

DEFAULT_RULES = (
    "exact",
    "prevalence",
    "global",
    "shrink:3",
    "shrink:10",
    "shrink:30",
    "shrink-global:3",
    "shrink-global:10",
    "shrink-global:30",
)
GRID_STEPS = 100  # the global threshold is one of j / GRID_STEPS, j = 0..GRID_STEPS


@dataclass(frozen=True)
class Rule:
    """A parsed rule name: ``kind`` and, for the shrinkage rules, the strength ``k``."""

    kind: str
    """"exact", "prevalence", "global", "shrink" or "shrink-global"."""
    k: float = 0.0
    """Shrinkage strength: the weight on the exact threshold is n_pos / (n_pos + k)."""


def parse_rule(name: str) -> Rule:
    """``"shrink:10"`` -> ``Rule("shrink", 10.0)``; ValueError naming the rule if malformed."""
    kind, _, arg = name.partition(":")
    if kind in ("exact", "prevalence", "global") and not arg:
        return Rule(kind)
    if kind in ("shrink", "shrink-global") and arg:
        try:
            k = float(arg)
        except ValueError:
            k = -1.0
        if k >= 0 and np.isfinite(k):
            return Rule(kind, k)
    raise ValueError(
        f"threshold rule {name!r}: expected exact, prevalence, global, shrink:K or "
        f"shrink-global:K with K >= 0"
    )


def decode(
    probs: np.ndarray, thresholds: np.ndarray, at_least_one: bool = True, max_labels: int = 0
) -> np.ndarray:
    """bool [N, L] predictions: ``probs >= thresholds`` (compared as the fit compares them);
    an empty row gets its arg-max with ``at_least_one``; with ``max_labels`` > 0 a row keeps
    only its ``max_labels`` highest-scoring predicted labels.

        pred = decode(test_probs, choice.thresholds)
    """
    from fasthpa.thresholds.search import apply_thresholds

    probs = np.asarray(probs)
    pred = np.array(apply_thresholds(probs, thresholds), dtype=bool)
    if at_least_one and len(probs):
        empty = ~pred.any(axis=1)
        pred[empty, probs[empty].argmax(axis=1)] = True
    if max_labels > 0 and probs.shape[1] > max_labels:
        # the max_labels-th highest score among the predicted labels of each row
        masked = np.where(pred, probs, -np.inf)
        kth = -np.partition(-masked, max_labels - 1, axis=1)[:, max_labels - 1 : max_labels]
        pred &= masked >= kth
    return pred


def macro_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Macro F1 of bool predictions [N, L] against 0/1 labels (zero_division = 0)."""
    return per_label_metrics(np.asarray(pred, np.float32), labels, 0.5)["macro_f1"]


def global_threshold(probs: np.ndarray, labels: np.ndarray, steps: int = GRID_STEPS) -> float:
    """The one threshold j / steps (j = 0..steps) with the best macro F1 on (probs, labels);
    ties go to the threshold nearest 0.5, then the lower one. All labels and grid points are
    counted at once from one sort per label."""
    import torch

    p = torch.as_tensor(np.asarray(probs, dtype=np.float64)).t().contiguous()
    y = torch.as_tensor(np.asarray(labels) != 0).t()
    scores, order = torch.sort(p, dim=1)  # ascending
    pos_below = torch.cumsum(torch.gather(y, 1, order).to(torch.int64), dim=1)
    pos_below = torch.cat([torch.zeros_like(pos_below[:, :1]), pos_below], dim=1)
    grid = torch.arange(steps + 1, dtype=torch.float64) / steps
    below = torch.searchsorted(scores, grid.expand(p.shape[0], -1).contiguous())  # scores < t
    predicted = p.shape[1] - below
    support = pos_below[:, -1:]
    tp = support - torch.gather(pos_below, 1, below)
    denom = (predicted + support).to(torch.float64)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom))
    macro = f1.mean(dim=0).numpy()
    j = np.arange(steps + 1)
    preference = np.abs(j - steps / 2) * 2 + (j > steps / 2)
    best = np.flatnonzero(macro == macro.max())
    return float(grid[best[np.argmin(preference[best])]])


def fit_rule(
    probs: np.ndarray, labels: np.ndarray, rule: str | Rule, rates: Any = None
) -> np.ndarray:
    """Thresholds, float64 [L], of ``rule`` (a name or a :class:`Rule`) fitted on (probs, labels).

    ``rates``: the [L] label frequencies the prevalence rule aims at (the training split's);
    None uses the fitting labels' own.

        thr = fit_rule(dev_probs, dev_labels, "shrink:10", rates=train_targets.mean(0))
    """
    rule = parse_rule(rule) if isinstance(rule, str) else rule
    labels = np.asarray(labels)
    if rule.kind == "global":
        return np.full(labels.shape[1], global_threshold(probs, labels))
    prevalence = "fit" if rates is None else np.asarray(rates, dtype=np.float64)
    if rule.kind == "prevalence":
        return fit_thresholds(probs, labels, "prevalence", prevalence=prevalence).thresholds
    exact = fit_thresholds(probs, labels, "exact")
    if rule.kind == "exact":
        return exact.thresholds
    if rule.kind == "shrink":
        target = fit_thresholds(probs, labels, "prevalence", prevalence=prevalence).thresholds
    else:
        target = np.full(labels.shape[1], global_threshold(probs, labels))
    w = exact.positives / (exact.positives + rule.k) if rule.k > 0 else np.ones(labels.shape[1])
    w = np.where(exact.positives > 0, w, 0.0)  # no positives: the exact cut means nothing
    return w * exact.thresholds + (1.0 - w) * target


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """int [N] fold of each row, spreading every label's positives evenly over the folds: rows
    are grouped by their rarest label (rarest groups first, random order within a group) and
    dealt round-robin, so the rows whose rarest label is l are spread as evenly as possible
    (a label with 2 such positives lands in 2 different folds)."""
    y = np.asarray(labels) != 0
    rng = np.random.default_rng(seed)
    counts = y.sum(axis=0)
    # key: the rarest label's count, then its index (ties between labels of equal count kept
    # apart); rows without labels last
    key = np.where(y, counts * (y.shape[1] + 1) + np.arange(y.shape[1]), np.iinfo(np.int64).max)
    rarest = key.min(axis=1)
    order = np.lexsort((rng.random(len(y)), rarest))
    fold = np.empty(len(y), dtype=np.int64)
    fold[order] = (np.arange(len(y)) + rng.integers(folds)) % folds
    return fold


def cross_fit_predictions(
    probs: np.ndarray,
    labels: np.ndarray,
    rule: str | Rule,
    fold: np.ndarray,
    rates: Any = None,
    at_least_one: bool = True,
) -> np.ndarray:
    """bool [N, L]: each row decoded with thresholds fitted on the other folds only."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    pred = np.zeros(probs.shape, dtype=bool)
    for f in np.unique(fold):
        held = fold == f
        thr = fit_rule(probs[~held], labels[~held], rule, rates)
        pred[held] = decode(probs[held], thr, at_least_one)
    return pred


@dataclass
class RuleChoice:
    """What :func:`choose_rule` found."""

    rule: str
    """The chosen rule's name."""
    cv_macro_f1: float
    """Its cross-fitted macro F1 (mean over repeats)."""
    thresholds: np.ndarray
    """float64 [L]: the chosen rule fitted on all the rows."""
    labels_per_row: float
    """Labels per row the chosen rule predicts on held-out folds (cross-fitted)."""
    expected_labels_per_row: float
    """Labels per row in the fitting labels."""
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)
    """rule -> (mean, standard deviation over repeats) of the cross-fitted macro F1."""
    rows_per_rule: dict[str, float] = field(default_factory=dict)
    """rule -> cross-fitted labels per row."""
    n_samples: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    """folds, repeats, seed, at_least_one."""

    def to_json(self) -> dict[str, Any]:
        """Plain-type summary for a run folder's JSON files."""
        return {
            "rule": self.rule,
            "cv_macro_f1": self.cv_macro_f1,
            "thresholds": [float(t) for t in self.thresholds],
            "labels_per_row": self.labels_per_row,
            "expected_labels_per_row": self.expected_labels_per_row,
            "scores": {
                k: {"mean": m, "std": s, "labels_per_row": self.rows_per_rule.get(k)}
                for k, (m, s) in self.scores.items()
            },
            "n_samples": self.n_samples,
            "options": self.options,
        }


def choose_rule(
    probs: np.ndarray,
    labels: np.ndarray,
    rules: tuple[str, ...] | list[str] = DEFAULT_RULES,
    folds: int = 2,
    repeats: int = 8,
    seed: int = 0,
    rates: Any = None,
    at_least_one: bool = True,
    lpr_tolerance: float | None = None,
) -> RuleChoice:
    """Score each rule by ``folds``-fold cross-fitting (fit on the other folds, decode the held
    one, macro F1 of the pooled predictions), averaged over ``repeats`` fold draws; return the
    best rule (the earlier one in ``rules`` on equal scores) refitted on all rows.

    ``lpr_tolerance`` (e.g. 0.3): only rules whose cross-fitted labels per row lie within that
    fraction of the fitting labels' own are eligible (all rules when none is). F1-optimal cuts of
    weak labels predict many labels per row; this trades a little F1 for plausible submissions.

        choice = choose_rule(dev_probs, dev_labels, rates=train_targets.mean(0), seed=0)
    """
    if folds < 2 or repeats < 1 or not rules:
        raise ValueError(f"need folds >= 2, repeats >= 1 and rules, got {folds}, {repeats}")
    probs, labels = np.asarray(probs), np.asarray(labels)
    parsed = [parse_rule(r) for r in rules]  # fail before any work on a bad name
    assignments = [fold_assignment(labels, folds, seed + r) for r in range(repeats)]
    scores: dict[str, tuple[float, float]] = {}
    per_row: dict[str, float] = {}
    for name, rule in zip(rules, parsed, strict=True):
        preds = [
            cross_fit_predictions(probs, labels, rule, a, rates, at_least_one) for a in assignments
        ]
        f1s = [macro_f1(p, labels) for p in preds]
        scores[name] = (float(np.mean(f1s)), float(np.std(f1s)))
        per_row[name] = float(np.mean([p.sum(axis=1).mean() for p in preds]))
    expected = float((labels != 0).sum(axis=1).mean())
    judged = lpr_tolerance is not None and expected > 0  # no positives: no rate to be near
    eligible = [r for r in rules if not judged or abs(per_row[r] / expected - 1) <= lpr_tolerance]
    best = max(eligible or list(rules), key=lambda r: (scores[r][0], -rules.index(r)))
    return RuleChoice(
        rule=best,
        cv_macro_f1=scores[best][0],
        thresholds=fit_rule(probs, labels, best, rates),
        labels_per_row=per_row[best],
        expected_labels_per_row=expected,
        scores=scores,
        rows_per_rule=per_row,
        n_samples=len(probs),
        options={
            "folds": folds,
            "repeats": repeats,
            "seed": seed,
            "at_least_one": at_least_one,
            "lpr_tolerance": lpr_tolerance,
        },
    )


AUTO_MIN_ROWS = 20
"""below this many fitting rows ``auto`` fits exact cuts (cross-fitting needs rows to hold out)"""
RULE_CHOICES = ("auto", *DEFAULT_RULES)
"""``--threshold-rule`` choices: a rule, or ``auto`` (the best of DEFAULT_RULES by cross-fitting)"""


def fit_configured(
    probs: np.ndarray,
    labels: np.ndarray,
    rule: str,
    rates: Any = None,
    seed: int = 0,
    lpr_tolerance: float | None = None,
    label_names: Any = None,
) -> tuple[ThresholdResult, dict[str, Any]]:
    """Thresholds by ``rule`` ("auto": :func:`choose_rule`) as a ThresholdResult (the
    thresholds.json payload: F1 at 0.5 and at the thresholds on the fitting rows), and what the
    choice found (the cross-fitted scores) for the record."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if rule == "auto" and len(probs) < AUTO_MIN_ROWS:  # too few rows to hold any out
        result = fit_thresholds(probs, labels, "exact", label_names=label_names)
        return result, {"rule": "exact", "note": f"auto needs {AUTO_MIN_ROWS} rows"}
    if rule == "exact":
        return fit_thresholds(probs, labels, "exact", label_names=label_names), {"rule": "exact"}
    if rule == "auto":
        # the at-least-one rule of a submission holds over all labels, not a rare-label model's
        full = labels.shape[1] == NUM_LABELS
        choice = choose_rule(
            probs, labels, rates=rates, seed=seed, at_least_one=full, lpr_tolerance=lpr_tolerance
        )
        thresholds, record = choice.thresholds, choice.to_json()
    else:
        thresholds, record = fit_rule(probs, labels, rule, rates), {"rule": rule}
    return result_at(probs, labels, thresholds, f"rule:{record['rule']}", label_names), record


def result_at(
    probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, method: str, label_names=None
) -> ThresholdResult:
    """A ThresholdResult for given thresholds: per-label F1 at 0.5 and at them."""
    at05 = per_label_metrics(probs, labels, 0.5)
    tuned = per_label_metrics(probs, labels, thresholds)
    n_labels = labels.shape[1]
    names = tuple(label_names) if label_names is not None else _default_names(n_labels)
    return ThresholdResult(
        method=method,
        label_names=names,
        thresholds=np.asarray(thresholds, dtype=np.float64),
        f1_at_05=at05["f1"],
        f1_tuned=tuned["f1"],
        macro_f1_at_05=at05["macro_f1"],
        macro_f1_tuned=tuned["macro_f1"],
        positives=at05["support"],
        n_samples=int(len(probs)),
    )
