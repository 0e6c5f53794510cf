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
