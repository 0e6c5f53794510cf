"""Refitting the classifier after training, on the trained network's features.

    summary = refit_heads(run, state)      # rank 0, after the last epoch (``--refit-heads``)

After a short run the last Linear layer lags the features it reads: it chased them while they
moved. Refitting it to convergence on the final features of the training part -- one
L2-regularised logistic regression per label, a dedicated binary model per label on fixed
features -- costs one evaluation pass over the training part (all of it for a rare-label
model, whose network trained on an enriched subsample) and a few seconds of L-BFGS, and
K-fold out-of-fold scores of the same fit give the thresholds a fit on every training row
instead of a 5% dev part. ``best.pt`` then holds the refitted classifier (the trained one kept
under ``fc_before_refit``), ``thresholds.json`` the thresholds of the out-of-fold scores,
``dev_probs.npz`` the dev part scored by the refitted model, and ``refit.json`` what was done.

The fit (``fit_linear_heads``): all labels at once (their losses are independent, so one
L-BFGS on the sum fits each), features standardised inside the fit and the scaling folded back
into the returned weights, so the result replaces ``model.fc`` as it is.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fasthpa.checkpoint import load_checkpoint, save_checkpoint
from fasthpa.distributed import DistInfo
from fasthpa.evaluate import predict_probs
from fasthpa.io import atomic_write_bytes, atomic_write_json
from fasthpa.labels import LABEL_NAMES
from fasthpa.model import add_location_for
from fasthpa.runtime import intra_op_threads
from fasthpa.thresholds import write_thresholds_json
from fasthpa.thresholds.rules import fit_configured, fold_assignment
from fasthpa.train.build import Run, part_loader

REFIT_FOLDS = 5


@dataclass
class LinearHeads:
    """A fitted classifier: logits = feats @ weight.T + bias."""

    weight: torch.Tensor
    """float32 [L, F]"""
    bias: torch.Tensor
    """float32 [L]"""

    def probs(self, feats: torch.Tensor) -> torch.Tensor:
        """Sigmoid scores [N, L] of features [N, F]."""
        return torch.sigmoid(feats.float() @ self.weight.T + self.bias)


def fit_linear_heads(
    feats: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    l2: float = 6e-4,
    max_iter: int = 200,
    device: torch.device | str = "cpu",
) -> LinearHeads:
    """Minimise mean BCE + l2 / 2 * ||w||^2 per label (bias not penalised) on [N, F] features.

    ``l2`` = 1 / (C N) in scikit-learn's LogisticRegression terms. Labels without positives
    get a large negative bias (their scores stay near 0). The fit runs on ``device`` (the run's
    GPU: the L-BFGS iterations are matrix products over every training row) in float32, the
    standardisation and its folding back in float64; the returned heads are float32 on the CPU.
    """
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float64).to(device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float32).to(device)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = ((x - mu) / sd).float()  # standardised: float32 holds it, and its products run 3x faster
    prior = y.double().mean(0).clamp(1e-4, 1 - 1e-4)
    w = torch.zeros((x.shape[1], y.shape[1]), dtype=torch.float32, device=x.device)
    w.requires_grad_(True)
    b = torch.log(prior / (1 - prior)).float().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        logits = z @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        # sum over labels of each label's objective: the labels' problems stay independent
        total = loss.mean(0).sum() + 0.5 * l2 * (w * w).sum()
        total.backward()
        return total

    opt.step(closure)
    with torch.no_grad():
        w, b = w.double(), b.double()
        weight = (w / sd[:, None]).T  # fold the standardisation back in
        bias = b - (mu[:, None] * w / sd[:, None]).sum(0)
    return LinearHeads(weight.float().cpu().contiguous(), bias.float().cpu().contiguous())


def oof_linear_heads(
    feats: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    l2: float = 6e-4,
    folds: int = 5,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """float32 [N, L] out-of-fold scores: each row scored by heads fitted on the other folds
    (folds from :func:`fasthpa.thresholds.rules.fold_assignment`, spreading rare positives)."""
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float32)
    y = np.asarray(labels)
    fold = fold_assignment(y, folds, seed)
    out = np.zeros(y.shape, dtype=np.float32)
    for f in range(folds):
        held = fold == f
        heads = fit_linear_heads(x[~held], y[~held], l2, device=device)
        out[held] = heads.probs(x[held]).numpy()
    return out


def fit_with_oof(
    feats: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    l2: float,
    folds: int = REFIT_FOLDS,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[LinearHeads, np.ndarray]:
    """:func:`fit_linear_heads` on every row and :func:`oof_linear_heads`, the same numbers,
    with the ``folds + 1`` independent fits spread over the CPU's threads (one intra-op thread
    each: L-BFGS's matrix products are too small to split well, but the fits run side by side).
    On a GPU they run one after another."""
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float32)
    y = np.asarray(labels)
    fold = fold_assignment(y, folds, seed)
    workers = 1 if torch.device(device).type == "cuda" else max(1, torch.get_num_threads())
    masks = [np.ones(len(y), bool)] + [fold != f for f in range(folds)]
    with intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
        fits = list(pool.map(lambda m: fit_linear_heads(x[m], y[m], l2, device=device), masks))
        out = np.zeros(y.shape, dtype=np.float32)
        for f, heads in enumerate(fits[1:]):
            out[fold == f] = heads.probs(x[fold == f]).numpy()
    return fits[0], out


@torch.no_grad()
def pooled_features(model, loader, rows: np.ndarray, autocast) -> torch.Tensor:
    """float32 [len(rows), F]: the pooled features (``model.features``, what ``model.fc`` reads)
    of every row of an eval loader over ``rows``, in the order of ``rows``."""
    model.eval()
    where = {int(r): k for k, r in enumerate(rows)}
    out = torch.zeros((len(rows), model.fc.in_features))
    for x, _, idx in loader:
        with autocast():
            f = model.features(x)
        keep = (idx >= 0).cpu()
        slots = torch.tensor([where[int(i)] for i in idx.cpu()[keep]], dtype=torch.long)
        out[slots] = f[keep.to(f.device)].float().cpu()
    return out


def refit_heads(run: Run, seed: int) -> dict[str, Any]:
    """Refit best.pt's classifier on the training part's features (rank 0; see the module
    docstring); returns the summary also written to refit.json."""
    cfg, rows = run.cfg, run.data.part_idx  # a rare-label model: all of it, at the real rate
    best = load_checkpoint(run.run_dir / "best.pt")
    add_location_for(run.model, best["model"]).load_state_dict(best["model"])
    if cfg.run.location_features and run.model.location is None:
        stats = run.data.stats.select(cfg.in_channels)
        run.model.add_location(stats.mean, stats.std)
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=run.device)
    loader = part_loader(cfg, run.data, rows, False, run.augment, run.amp, single)
    clock = [time.perf_counter()]
    feats = pooled_features(run.model, loader, rows, run.autocast)
    clock.append(time.perf_counter())
    labels = run.data.targets[rows]
    l2 = 1.0 / (cfg.run.refit_c * len(rows))
    names = [LABEL_NAMES[i] for i in cfg.label_indices]
    heads, oof = fit_with_oof(feats, labels, l2, REFIT_FOLDS, seed, run.device)
    clock.append(time.perf_counter())
    with intra_op_threads(1):  # small ops: thread hand-offs would cost more than the arithmetic
        result, record = fit_configured(
            oof, labels, cfg.run.threshold_rule, labels.mean(0), seed, cfg.run.lpr_tolerance, names
        )
    clock.append(time.perf_counter())
    with torch.no_grad():
        run.model.fc.weight.copy_(heads.weight.to(run.model.fc.weight))
        run.model.fc.bias.copy_(heads.bias.to(run.model.fc.bias))
    fc = {k: v for k, v in best["model"].items() if k.startswith("fc.")}
    best.setdefault("fc_before_refit", fc)  # a second refit keeps the trained classifier
    best["model"] = run.model.state_dict()
    save_checkpoint(run.run_dir / "best.pt", best)
    write_thresholds_json(run.run_dir / "thresholds.json", result, {"fitted_on": "refit oof"})
    _save_npz(run.run_dir / "train_oof_probs.npz", [run.data.ids[r] for r in rows], oof, labels)
    _rescore_dev(run, single)
    summary = {
        "rule": record.get("rule"),
        "cv_macro_f1": record.get("cv_macro_f1"),
        "oof_macro_f1_tuned": result.macro_f1_tuned,
        "c": cfg.run.refit_c,
        "location_features": cfg.run.location_features,
        "features": int(feats.shape[1]),
        "folds": REFIT_FOLDS,
        "train_rows": int(len(rows)),
        "seconds": dict(
            zip(("features", "fits", "thresholds"), np.diff(clock).round(2).tolist(), strict=True)
        ),
    }
    atomic_write_json(run.run_dir / "refit.json", summary | {"choice": record})
    return summary


def _rescore_dev(run: Run, single: DistInfo) -> None:
    """dev_probs.npz from the refitted model (what cv's out-of-fold fit and predict see)."""
    rows = run.data.dev_idx
    loader = part_loader(run.cfg, run.data, rows, False, run.augment, run.amp, single)
    got = predict_probs(run.model, loader, single, len(rows), run.autocast)
    rows, probs = got
    _save_npz(
        run.run_dir / "dev_probs.npz",
        [run.data.ids[r] for r in rows],
        probs,
        run.data.targets[rows],
    )


def _save_npz(path, ids, probs, labels) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=np.asarray(ids),
        probs=np.asarray(probs, np.float32),
        labels=np.asarray(labels).astype(np.uint8),
    )
    atomic_write_bytes(path, buf.getvalue())
