"""Predict a Kaggle submission (Id,Predicted) from a trained run, with optional flip/dihedral TTA.

Single process (CPU or one GPU)::

    fasthpa predict --run runs/r18 --data ROOT --out submission.csv
    python -m fasthpa.predict --run runs/r18 --data ROOT --tta dihedral --out submission.csv

Ensembles: a `fasthpa cv` folder (its fold runs averaged, the thresholds fitted on their
out-of-fold probabilities applied), or several run folders (averaged; thresholds from
``--thresholds``, else the mean of the members')::

    fasthpa predict --run cv/hpa --data ROOT --tta flips --out submission.csv
    fasthpa predict --run runs/a runs/b --data ROOT --out submission.csv

Many GPUs (every Id is predicted exactly once over the ranks; rank 0 writes the files). Spell
the run flag ``--run-dir`` there: torchrun's own parser rejects ``--run`` anywhere on its command
line as an ambiguous abbreviation of its ``--run-path``::

    torchrun --nproc_per_node=8 -m fasthpa.predict --run-dir runs/r18 --data ROOT --out sub.csv

Check that prediction reproduces the trainer (the dev part of the run's split.csv, best.pt)::

    fasthpa predict --run runs/r18 --data ROOT --split train --part dev --out dev.csv

Python::

    from fasthpa.predict import predict
    result = predict("runs/r18", "data/hpa", tta="flips", out="submission.csv")
    result.probs, result.predicted, result.submission_path

What it uses from the run folder: config.json (arch, channels, image size, the eval centre crop of
--random-crop, amp, channels_last), channel_stats.json (normalisation), thresholds.json (per-label
thresholds, fitted on dev at the best epoch; ``--thresholds`` overrides) and the chosen
checkpoint's model state (best.pt by default).

Outputs, both written atomically:

- ``OUT`` (the submission): header ``Id,Predicted``, one row per Id of the ids file in that
  file's order, Predicted = the label indices with probability >= threshold, space-separated and
  ascending. With ``--at-least-one`` (the default) a row with no such label gets its arg-max
  label; with ``--no-at-least-one`` it is an empty string. The file is read back and checked
  against the ids file after writing.
- ``<OUT stem>_probs.npz``: ``ids`` [N] str, ``probs`` [N, 28] float32 (the TTA-averaged
  sigmoid outputs, exact, unlike a rounded CSV), ``thresholds`` [28] float64, and for
  ``--split train`` also ``labels`` [N, 28] uint8, so ``fasthpa thresholds --probs`` reads it
  like the run's dev_probs.npz.

TTA (``--tta``) averages probabilities over views of the normalised batch, applied on the
device: ``none``; ``flips`` = identity, horizontal, vertical and both flips; ``dihedral`` = the 8
views of the dihedral group (a transposition or not, times the 4 flip combinations, which is the
same set as rot90 by 0-3 with and without a flip).

The package: ``inputs`` (run folders, checkpoints, the rows), ``tta`` (views), ``predictor``
(models and their shared loader), ``submission`` (labels, the CSV, its probabilities), ``submit``
(``predict()`` end to end), ``cli``.
"""

from fasthpa.predict.inputs import RunInputs, expand_runs, load_run_inputs, select_rows
from fasthpa.predict.predictor import Predictor, build_predictor, build_predictors
from fasthpa.predict.submission import (
    PredictResult,
    assign_labels,
    format_labels,
    probs_path_for,
    validate_submission,
    write_outputs,
)
from fasthpa.predict.submit import PredictRequest, predict
from fasthpa.predict.tta import DIHEDRAL_VIEWS, FLIP_VIEWS, IDENTITY, TTA_VIEWS, View, resolve_views

__all__ = [
    "DIHEDRAL_VIEWS",
    "FLIP_VIEWS",
    "IDENTITY",
    "TTA_VIEWS",
    "PredictRequest",
    "PredictResult",
    "Predictor",
    "RunInputs",
    "View",
    "assign_labels",
    "build_predictor",
    "build_predictors",
    "expand_runs",
    "format_labels",
    "load_run_inputs",
    "predict",
    "probs_path_for",
    "resolve_views",
    "select_rows",
    "validate_submission",
    "write_outputs",
]
