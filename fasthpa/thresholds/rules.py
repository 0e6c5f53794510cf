"""Threshold rules, and choosing one by how it scores on data it was not fitted on.

    fit = fit_default_rule(dev_probs, dev_labels)     # RuleFit: rule, result, crossfit_f1
    fit.result.thresholds                             # fitted on all the given rows

Rules: ``exact`` (the F1-optimal cut per label on the fitting rows) and ``prevalence`` (predict
each label's training frequency). Exact cuts overfit where a label has few positives; the
cross-fit score (fit on one half of the rows, score on the other, and the other way round)
measures that, and the rule with the best cross-fitted macro F1 is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fasthpa.thresholds.search import ThresholdResult, fit_thresholds, per_label_metrics

RULES = ("exact", "prevalence")


@dataclass
class RuleFit:
    rule: str
    result: ThresholdResult
    crossfit_f1: float
    scores: dict[str, float] = field(default_factory=dict)
    """every candidate rule's cross-fitted macro F1"""


def fit_rule(probs: Any, labels: Any, rule: str) -> ThresholdResult:
    assert rule in RULES, rule
    return fit_thresholds(probs, labels, method=rule)


def crossfit_f1(probs: np.ndarray, labels: np.ndarray, rule: str, seed: int = 0) -> float:
    """Mean macro F1 of ``rule`` fitted on one random half of the rows and scored on the other."""
    n = len(probs)
    order = np.random.default_rng([seed, 0xC0F1]).permutation(n)
    halves = (order[: n // 2], order[n // 2 :])
    scores = []
    for fit_rows, score_rows in (halves, halves[::-1]):
        thr = fit_rule(probs[fit_rows], labels[fit_rows], rule).thresholds
        scores.append(per_label_metrics(probs[score_rows], labels[score_rows], thr)["macro_f1"])
    return float(np.mean(scores))


def choose_rule(probs: Any, labels: Any, rules=RULES, seed: int = 0) -> RuleFit:
    probs, labels = np.asarray(probs), np.asarray(labels)
    scores = {rule: crossfit_f1(probs, labels, rule, seed) for rule in rules}
    best = max(rules, key=lambda r: scores[r])
    return RuleFit(best, fit_rule(probs, labels, best), scores[best], scores)


def fit_default_rule(probs: Any, labels: Any) -> RuleFit:
    """The default for the trainer's dev thresholds and the cv out-of-fold fit."""
    return choose_rule(probs, labels)
