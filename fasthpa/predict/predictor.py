"""Models ready to predict, and one loader shared by the models that see the same input.

    predictors = build_predictors(runs, rows, info)       # one per distinct input (usually one)
    rows_, probs = predictors[0].probs(TTA_VIEWS["flips"])  # rank 0; None on the others

Members of an ensemble that were trained at the same image size and eval crop, on the same
channels, with the same channel statistics and precision share one loader: each batch is
decoded once and every model of the group predicts it (fasthpa cv gives its folds the same
statistics for this reason). Members that differ get a loader of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fasthpa.data.contract import AugmentConfig, BatchLoader
from fasthpa.data.loader import build_loader
from fasthpa.distributed import DistInfo
from fasthpa.errors import UserError
from fasthpa.evaluate import Head, predict_probs
from fasthpa.labels import NUM_LABELS
from fasthpa.model import StackedNet, add_location_for, build_model
from fasthpa.predict.inputs import Rows, RunInputs
from fasthpa.predict.tta import IDENTITY, View
from fasthpa.runtime import amp_dtype, autocast_factory, to_device


@dataclass
class Predictor:
    """One loader over the chosen rows and the models that predict its batches."""

    models: list[nn.Module]
    loader: BatchLoader
    info: DistInfo
    n_rows: int
    amp: torch.dtype | None
    channels_last: bool
    heads: list[Head] | None = None
    """which label columns each model predicts (None: all 28 each; see fasthpa.evaluate)"""

    @property
    def model(self) -> nn.Module:
        return self.models[0]

    @property
    def main_models(self) -> int:
        """How many of the models predict every label (the ensemble's weight of this group)."""
        return len(self.models) if self.heads is None else sum(h.tier == 0 for h in self.heads)

    def autocast(self):
        return autocast_factory(self.info.device, self.amp)()

    def probs(
        self, views: Sequence[View] = (IDENTITY,), progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, probs float32 [N, 28]) on rank 0, None elsewhere: the mean over the models
        and the views (fasthpa.evaluate)."""
        bar = _progress_bar(len(self.loader)) if progress and self.info.is_main else None
        try:
            return predict_probs(
                self.models,
                self.loader,
                self.info,
                self.n_rows,
                self.autocast,
                views=views,
                channels_last=self.channels_last,
                on_batch=(lambda: bar.advance(bar.task_ids[0])) if bar is not None else None,
                heads=self.heads,
            )
        finally:
            if bar is not None:
                bar.stop()


def with_stack(predictors: list[Predictor], stack: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Replace the main models (a cv folder's folds) by one StackedNet reading all of them
    (fasthpa.cv.stack); rare-label models stay as they are."""
    holding = [p for p in predictors if p.main_models]
    if len(holding) != 1:
        raise UserError(
            "--run: the cv folder's folds differ in image size, crop, channel statistics or "
            "precision, and its stack reads them side by side; pass --no-stack to average them."
        )
    p = holding[0]
    tiers = p.heads or [Head(tuple(range(NUM_LABELS)))] * len(p.models)
    main = [m for m, h in zip(p.models, tiers) if h.tier == 0]
    rest = [(m, h) for m, h in zip(p.models, tiers) if h.tier > 0]
    p.models = [StackedNet(main, *stack).eval()] + [m for m, _ in rest]
    main_head = next(h for h in tiers if h.tier == 0)
    p.heads = [main_head] + [h for _, h in rest] if rest else None


def input_key(run: RunInputs) -> tuple:
    """What a loader depends on: members with equal keys can share one."""
    c = run.config
    return (
        c.data.image_size,
        c.data.random_crop,
        c.data.channels,
        tuple(run.stats.mean),
        tuple(run.stats.std),
        c.speed.amp,
        c.speed.channels_last,
    )


def build_predictors(
    runs: Sequence[RunInputs],
    rows: Rows,
    info: DistInfo,
    batch_size: int | None = None,
    workers: int | None = None,
    backend: str = "auto",
) -> list[Predictor]:
    """The members grouped by :func:`input_key`, one Predictor (and loader) per group."""
    groups: dict[tuple, list[RunInputs]] = {}
    for run in runs:
        groups.setdefault(input_key(run), []).append(run)
    for group in groups.values():
        if all(head_of(r).tier > 0 for r in group):
            raise UserError(
                f"{group[0].run_dir}: a rare-label model whose input (image size, crop, channel "
                f"statistics, precision) matches no main model; train it with `fasthpa rare`."
            )
    return [
        build_predictor(group, rows, info, batch_size, workers, backend)
        for group in groups.values()
    ]


def build_predictor(
    runs: RunInputs | Sequence[RunInputs],
    rows: Rows,
    info: DistInfo,
    batch_size: int | None = None,
    workers: int | None = None,
    backend: str = "auto",
) -> Predictor:
    """The models of ``runs`` (eval, on ``info.device``) and an eval loader over ``rows`` for
    this rank; the runs must share an :func:`input_key`. ``batch_size`` and ``workers``
    default to the first run's config."""
    runs = [runs] if isinstance(runs, RunInputs) else list(runs)
    assert len({input_key(r) for r in runs}) == 1, "members of one predictor share the input"
    cfg, dev = runs[0].config, info.device
    amp = amp_dtype(cfg.speed.amp, dev)
    loader = build_loader(
        rows.source,
        np.arange(len(rows.ids)),
        train=False,
        batch_size=batch_size or cfg.run.batch_size,
        image_size=cfg.data.image_size,
        channels=cfg.data.channels,
        # eval takes the centred crop of the training crop size; no random draws in eval
        augment=AugmentConfig(random_crop=cfg.data.random_crop),
        stats=runs[0].stats,
        device=dev,
        dtype=amp or torch.float32,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.run.seed,
        workers=cfg.data.workers if workers is None else workers,
        backend=backend,
    )
    models = [_model(run, dev) for run in runs]
    heads = [head_of(run) for run in runs]
    if all(h == Head(tuple(range(NUM_LABELS))) for h in heads):
        heads = None  # the plain path: every model predicts every label
    return Predictor(models, loader, info, len(rows.ids), amp, cfg.speed.channels_last, heads)


def head_of(run: RunInputs) -> Head:
    """A run's label columns; a model of some labels only (a rare-label model) is tier 1: its
    probabilities replace the main models' for its labels."""
    labels = run.config.label_indices
    return Head(labels, tier=0 if len(labels) == NUM_LABELS else 1)


def _model(run: RunInputs, device: torch.device) -> nn.Module:
    cfg = run.config
    model, _ = build_model(
        cfg.model.arch,
        num_classes=len(cfg.label_indices),
        in_channels=cfg.in_channels,
        pretrained="none",
        head=cfg.model.head,
        dropout=cfg.model.dropout,
    )
    try:
        add_location_for(model, run.state["model"]).load_state_dict(run.state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:160]
        raise UserError(f"{run.checkpoint_path}: the model state does not fit ({first}).") from None
    return to_device(model, device, cfg.speed.channels_last).eval()


def _progress_bar(total: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), transient=True)
    bar.start()
    bar.add_task("predict", total=total)
    return bar
