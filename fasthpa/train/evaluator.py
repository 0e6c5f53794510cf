"""Evaluation during training: the dev part after each epoch, the held-out test part at the end.

    evaluator = Evaluator(run)
    if evaluator.due(epoch, is_last):
        metrics, improved = evaluator.evaluate_dev(state)     # every rank; rank 0 scores
    final = evaluator.test_metrics()                          # rank 0, with best.pt

Every rank predicts its share of the dev rows and rank 0 gathers them, each row exactly once
(fasthpa.evaluate). Rank 0 fits per-label thresholds on the dev probabilities and, when the
tuned macro F1 beats the best so far, writes ``thresholds.json`` and ``dev_probs.npz``. The test
part is scored with the best checkpoint and the thresholds fitted on dev.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from fasthpa.checkpoint import load_checkpoint
from fasthpa.distributed import DistInfo, broadcast_object
from fasthpa.evaluate import predict_probs
from fasthpa.io import atomic_write_bytes
from fasthpa.labels import LABEL_NAMES
from fasthpa.model import add_location_for
from fasthpa.runtime import intra_op_threads
from fasthpa.thresholds import (
    ThresholdResult,
    load_thresholds,
    per_label_metrics,
    write_thresholds_json,
)
from fasthpa.thresholds.rules import fit_configured
from fasthpa.train.build import Run, part_loader
from fasthpa.train.restore import TrainState


class Evaluator:
    """See the module docstring."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def due(self, epoch: int, is_last: bool) -> bool:
        return (epoch + 1) % self.run.cfg.run.eval_every == 0 or is_last

    def evaluate_dev(self, state: TrainState) -> tuple[dict[str, Any], bool]:
        """Dev metrics for the history row (rank 0; empty elsewhere) and whether they improved
        on ``state.best_f1``, which is updated on every rank."""
        run = self.run
        got = predict_probs(
            run.model, run.dev_loader, run.info, len(run.data.dev_idx), run.autocast
        )
        metrics, improved = {}, False
        if run.info.is_main:
            rows, probs = got
            labels = run.data.targets[rows]
            names = [LABEL_NAMES[i] for i in run.cfg.label_indices]
            rates = run.data.targets[run.data.part_idx].mean(axis=0)  # real, not enriched
            r = run.cfg.run
            with intra_op_threads(1):  # many tiny fits: see fasthpa.runtime
                fit, _ = fit_configured(
                    probs, labels, r.threshold_rule, rates, r.seed, r.lpr_tolerance, names
                )
            metrics = _dev_row(fit, per_label_metrics(probs, labels, fit.thresholds))
            improved = fit.macro_f1_tuned > state.best_f1
            if improved:
                state.best_f1 = fit.macro_f1_tuned
                self._write_dev_outputs([run.data.ids[r] for r in rows], probs, labels, fit)
        improved = bool(broadcast_object(improved, run.info))
        state.best_f1 = float(broadcast_object(state.best_f1, run.info))
        return metrics, improved

    def _write_dev_outputs(self, ids, probs: np.ndarray, labels: np.ndarray, fit) -> None:
        buf = io.BytesIO()
        np.savez(buf, ids=np.asarray(ids), probs=probs, labels=labels.astype(np.uint8))
        atomic_write_bytes(self.run.run_dir / "dev_probs.npz", buf.getvalue())
        write_thresholds_json(self.run.run_dir / "thresholds.json", fit)

    def test_metrics(self) -> dict[str, Any]:
        """Macro F1 on the split's test part, at 0.5 and with the thresholds fitted on dev,
        using best.pt (rank 0 only; {} when there is no test part or no best.pt)."""
        run = self.run
        best = run.run_dir / "best.pt"
        if not len(run.data.test_idx) or not best.exists():
            return {}
        state = load_checkpoint(best)["model"]
        add_location_for(run.model, state).load_state_dict(state)
        single = DistInfo(rank=0, world_size=1, local_rank=0, device=run.device)
        rows_ = run.data.test_idx
        loader = part_loader(run.cfg, run.data, rows_, False, run.augment, run.amp, single)
        rows, probs = predict_probs(run.model, loader, single, len(run.data.test_idx), run.autocast)
        labels = run.data.targets[rows]
        thresholds = load_thresholds(run.run_dir / "thresholds.json", len(run.cfg.label_indices))
        return {
            "test_samples": int(len(rows)),
            "test_macro_f1_at_0.5": per_label_metrics(probs, labels, 0.5)["macro_f1"],
            "test_macro_f1_tuned": per_label_metrics(probs, labels, thresholds)["macro_f1"],
        }


def _dev_row(fit: ThresholdResult, tuned: dict[str, Any]) -> dict[str, Any]:
    return {
        "dev_macro_f1_at_0.5": fit.macro_f1_at_05,
        "dev_macro_f1_tuned": fit.macro_f1_tuned,
        "dev_per_label": {
            k: np.asarray(tuned[k]).round(6).tolist()
            for k in ("precision", "recall", "f1", "support")
        },
    }
