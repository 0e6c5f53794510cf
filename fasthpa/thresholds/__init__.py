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

How the search works, its methods and edge cases: :mod:`fasthpa.thresholds.search`.
"""

from fasthpa.thresholds.files import load_thresholds, write_thresholds_json
from fasthpa.thresholds.search import (
    DEFAULT_THRESHOLD,
    METHODS,
    RARE_RULES,
    ThresholdResult,
    apply_thresholds,
    fit_thresholds,
    per_label_metrics,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "METHODS",
    "RARE_RULES",
    "ThresholdResult",
    "apply_thresholds",
    "fit_thresholds",
    "load_thresholds",
    "per_label_metrics",
    "write_thresholds_json",
]
