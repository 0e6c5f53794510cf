"""The stacked head of a cross-validation: one classifier on every fold network's features.

    summary = fit_stack(Path("cv/hpa"))   # after collect_oof: stack.pt, stack_thresholds.json
    weight, bias = load_stack(cv_dir, folds)               # fasthpa.cv.manifest (predict reads it)
    net = StackedNet(fold_nets, weight, bias)              # fasthpa.model: what predict scores

Averaging the K fold networks' probabilities treats each network's classifier as final. The
stack instead reads the pooled features of all K networks side by side (K x F per image) and
fits one L2-regularised logistic regression per label on them over every train row
(``fasthpa.train.refit.fit_linear_heads``, C = the runs' ``--refit-c``); its thresholds come
from 5-fold out-of-fold scores of the same fit, with the runs' ``--threshold-rule``. A train
row's features come from K-1 networks that trained on it and one that did not, a test image's
from K that did not; the regularised fit on K x F features is what held up on held-out data
(README, "Measured results"). ``fasthpa predict --run CVDIR`` uses the stack when
``stack.pt`` is there (``--no-stack``: the plain average and ``thresholds.json``).

Files: ``stack.pt`` (weight [L, K*F], bias [L], the fold names, C) and
``stack_thresholds.json``; ``cv_summary.json`` gains ``stack_oof_macro_f1_tuned``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fasthpa.checkpoint import save_checkpoint
from fasthpa.config import load_config
from fasthpa.cv.manifest import STACK, STACK_THRESHOLDS, read_fold_dirs
from fasthpa.distributed import DistInfo
from fasthpa.labels import LABEL_NAMES
from fasthpa.model import StackedNet
from fasthpa.predict.inputs import load_run_inputs, select_rows
from fasthpa.predict.predictor import build_predictor
from fasthpa.runtime import intra_op_threads
from fasthpa.thresholds import per_label_metrics, write_thresholds_json
from fasthpa.thresholds.rules import decode, fit_configured
from fasthpa.train.refit import (
    REFIT_FOLDS,
    fit_with_oof,
    pooled_features,
)


def fit_stack(cv_dir: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Score every train row with the fold networks, fit the stack and its thresholds, write
    ``stack.pt`` and ``stack_thresholds.json``; returns the figures for cv_summary.json."""
    cv_dir = Path(cv_dir)
    folds = read_fold_dirs(cv_dir)
    cfg = load_config(folds[0] / "config.json")
    feats, labels = train_features(cv_dir, folds, cfg, torch.device(device))
    names = [LABEL_NAMES[i] for i in cfg.label_indices]
    l2 = 1.0 / (cfg.run.refit_c * len(labels))
    heads, oof = fit_with_oof(feats, labels, l2, REFIT_FOLDS, cfg.run.seed, device)
    with intra_op_threads(1):
        result, record = fit_configured(
            oof,
            labels,
            cfg.run.threshold_rule,
            labels.mean(0),
            cfg.run.seed,
            cfg.run.lpr_tolerance,
            names,
        )
    state = {
        "weight": heads.weight,
        "bias": heads.bias,
        "folds": [f.name for f in folds],
        "c": cfg.run.refit_c,
        "label_indices": list(cfg.label_indices),
    }
    save_checkpoint(cv_dir / STACK, state)
    extra = {"fitted_on": f"{REFIT_FOLDS}-fold out-of-fold scores of the stack", "rule": record}
    write_thresholds_json(cv_dir / STACK_THRESHOLDS, result, extra)
    tuned = per_label_metrics(oof, labels, result.thresholds)
    return {
        "stack_oof_macro_f1_tuned": float(tuned["macro_f1"]),
        "stack_threshold_rule": record.get("rule"),
        "stack_labels_per_row_predicted": float(decode(oof, result.thresholds).sum(1).mean()),
        "stack_features": int(feats.shape[1]),
    }


def train_features(cv_dir: Path, folds: list[Path], cfg, device: torch.device):
    """(float32 [N, K*F] features, uint8 [N, L] labels) of every train.csv row, in file order:
    each fold's best.pt, pooled features side by side (one loader, each batch decoded once)."""
    runs = [load_run_inputs(f, "best", cv_dir / "thresholds.json") for f in folds]
    rows = select_rows(
        cfg.data.data, "train", None, None, folds[0], cfg.in_channels, cfg.data.packed
    )
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    predictor = build_predictor(runs, rows, single)
    width = sum(m.fc.in_features for m in predictor.models)
    blank = torch.zeros(len(cfg.label_indices), width), torch.zeros(len(cfg.label_indices))
    net = StackedNet(predictor.models, *blank).eval()  # its fc unused: the features are fitted
    feats = pooled_features(net, predictor.loader, np.arange(len(rows.ids)), predictor.autocast)
    return feats, rows.labels[:, list(cfg.label_indices)]
