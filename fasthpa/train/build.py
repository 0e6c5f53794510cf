"""Building a run: config + data + model + optimiser -> one :class:`Run` object.

    run = build_run(start, info)      # start: fasthpa.train.folder.Start
    run.train_loader, run.dev_loader, run.model, run.optimizer, run.plan.total_steps
    run.wrap()                        # after restoring a checkpoint: SyncBN / DDP / compile

Every rank opens the dataset itself (a rank without it stops the job with one line naming the
rank and its host); what is decided once -- the split, the channel statistics, the pretrained
weights -- is decided on rank 0 and handed to the others, so nodes need not share a disk.
The order of the random draws (data, loaders, then the model's initialisation) is fixed: a
resumed run restores the generators afterwards and continues bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fasthpa.checkpoint import load_checkpoint
from fasthpa.config import TrainConfig, parse_fold
from fasthpa.data.contract import AugmentConfig, BatchLoader
from fasthpa.data.loader import build_loader
from fasthpa.data.preflight import preflight
from fasthpa.data.sharding import repeat_factors
from fasthpa.data.source import DataSource, open_source
from fasthpa.data.splits import (
    fold_split,
    parse_fractions,
    read_split_csv,
    stratified_split,
    write_split_csv,
)
from fasthpa.data.stats import ChannelStats, compute_channel_stats, load_stats, save_stats
from fasthpa.distributed import DistInfo, check_every_rank, decide_on_main
from fasthpa.errors import UserError
from fasthpa.labels import NUM_LABELS
from fasthpa.loss import LossFn, make_loss
from fasthpa.model import LOCATION_KEY, build_model, default_pretrained, load_pretrained
from fasthpa.noise_scale import NoiseScale, build_noise_scale
from fasthpa.runtime import (
    amp_dtype,
    autocast_factory,
    configure_backends,
    grad_scaler,
    lr_at,
    make_optimizer,
    seed_everything,
    to_device,
    wrap_model,
)
from fasthpa.train.folder import Start


@dataclass
class DataParts:
    """The dataset rows of each part of the split, and the training split's statistics."""

    source: DataSource
    train_idx: np.ndarray
    dev_idx: np.ndarray
    test_idx: np.ndarray
    stats: ChannelStats
    whole_train_idx: np.ndarray | None = None
    """the training part before enrichment, when ``train_idx`` is an enriched subsample of it
    (a rare-label model): the label's real rate, and the rows the refit fits on"""

    @property
    def part_idx(self) -> np.ndarray:
        """The whole training part (``train_idx`` unless it is an enriched subsample)."""
        return self.train_idx if self.whole_train_idx is None else self.whole_train_idx

    @property
    def ids(self) -> list[str]:
        return self.source.ids

    @property
    def targets(self) -> np.ndarray:
        return self.source.targets


@dataclass(frozen=True)
class StepPlan:
    """How many optimiser steps the run takes, and the learning rate of each."""

    accum: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    global_batch: int
    peak_lr: float
    schedule: str

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup, self.peak_lr, self.schedule)


@dataclass
class Run:
    """Everything a training run needs, built once (see the module docstring)."""

    cfg: TrainConfig
    info: DistInfo
    run_dir: Path
    resuming: bool
    data: DataParts
    augment: AugmentConfig
    train_loader: BatchLoader
    dev_loader: BatchLoader
    model: nn.Module
    """the unwrapped, uncompiled module: checkpoints save its state_dict"""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    loss_fn: LossFn
    amp: torch.dtype | None
    autocast: Callable[[], Any]
    plan: StepPlan
    model_info: dict[str, Any]
    net: nn.Module | None = None
    """what the step calls: ``model`` wrapped by :meth:`wrap` (DDP, compile), or ``model``"""
    noise: NoiseScale | None = None
    """the gradient-noise-scale meter (``--noise-scale``), built by :meth:`wrap`"""

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def compiled(self) -> bool:
        s = self.cfg.speed
        return s.compile if s.compile is not None else self.device.type == "cuda"

    def wrap(self) -> None:
        """SyncBN / DDP / compile around the model (after its state is restored)."""
        s = self.cfg.speed
        self.net = wrap_model(
            self.model,
            self.device,
            ddp=self.info.ddp,
            sync_bn=self.cfg.model.sync_bn,
            compile=self.compiled,
            compile_mode=s.compile_mode,
        )
        if self.cfg.run.noise_scale:
            ddp = isinstance(self.net, nn.parallel.DistributedDataParallel)
            self.noise = build_noise_scale(
                self.net if ddp and self.info.world_size > 1 else self.model,
                batch_size=self.cfg.run.batch_size,
                grad_accum=self.cfg.optim.grad_accum,
                world_size=self.info.world_size,
                scaler=self.scaler,
            )

    def say(self, *parts: Any) -> None:
        """Print on rank 0 only."""
        if self.info.is_main:
            print(*parts)


def build_run(start: Start, info: DistInfo) -> Run:
    """Data, loaders, model, optimiser and step plan for ``start`` on this rank."""
    cfg, device = start.cfg, info.device
    seed_everything(cfg.run.seed)
    configure_backends(device)
    data = prepare_data(cfg, start.run_dir, info)
    amp = amp_dtype(cfg.speed.amp, device)
    augment = AugmentConfig(
        hflip=cfg.data.hflip,
        vflip=cfg.data.vflip,
        dihedral=cfg.data.dihedral,
        random_crop=cfg.data.random_crop,
    )
    train_loader = part_loader(cfg, data, data.train_idx, True, augment, amp, info)
    # eval loaders take the augment config only for its centre crop (eval never flips)
    dev_loader = part_loader(cfg, data, data.dev_idx, False, augment, amp, info)
    model, model_info = _model(cfg, info)
    to_device(model, device, cfg.speed.channels_last)
    o = cfg.optim
    optimizer = make_optimizer(
        [p for p in model.parameters() if p.requires_grad],
        lr=o.lr,
        device=device,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    return Run(
        cfg=cfg,
        info=info,
        run_dir=start.run_dir,
        resuming=start.resuming,
        data=data,
        augment=augment,
        train_loader=train_loader,
        dev_loader=dev_loader,
        model=model,
        optimizer=optimizer,
        scaler=grad_scaler(device, amp),
        loss_fn=make_loss(cfg.loss, data.targets[data.train_idx], device),
        amp=amp,
        autocast=autocast_factory(device, amp),
        plan=_plan(cfg, len(train_loader), data, info),
        model_info=model_info,
    )


def prepare_data(cfg: TrainConfig, run_dir: Path, info: DistInfo) -> DataParts:
    """The pixel source (opened on every rank), the split (kept in the run folder) and the
    channel statistics of the training part (both decided on rank 0)."""
    source = check_every_rank(lambda: open_source(cfg.data.data, "train", cfg.data.packed), info)
    assignment = decide_on_main(lambda: _split(cfg, run_dir, source, info), info)
    train_idx, dev_idx, test_idx = (np.flatnonzero(assignment == k) for k in range(3))
    if len(dev_idx) == 0:
        raise UserError(
            f"--split {cfg.data.split}: the dev part is empty; thresholds and F1 need one."
        )
    stats = decide_on_main(lambda: _stats(cfg, run_dir, source, train_idx), info)
    # every file the run will read, checked before training (one local rank per node)
    rows = np.concatenate([train_idx, dev_idx, test_idx])
    check_every_rank(lambda: info.local_rank or preflight(source, rows, cfg.in_channels), info)
    whole = None
    if cfg.data.labels is not None:  # a model of some labels only (fasthpa rare)
        source = dataclasses.replace(source, targets=source.targets[:, list(cfg.label_indices)])
        whole = train_idx
        train_idx = _enriched(train_idx, source.targets, cfg.data.positive_share, cfg.run.seed)
    return DataParts(source, train_idx, dev_idx, test_idx, stats, whole)


def _enriched(rows: np.ndarray, targets: np.ndarray, share: float, seed: int) -> np.ndarray:
    """``rows`` cut to its positives (any of the targets' labels) and random negatives making
    the positives ``share`` of the whole (all of ``rows`` when ``share`` is 0)."""
    if share <= 0:
        return rows
    positive = targets[rows].any(axis=1)
    pos, neg = rows[positive], rows[~positive]
    if len(pos) == 0:
        raise UserError("--labels: the training part holds no positive of these labels.")
    rng = np.random.default_rng([seed, 0x9A7E])
    negatives = rng.choice(neg, size=enriched_negatives(len(pos), len(neg), share), replace=False)
    return np.sort(np.concatenate([pos, negatives]))


def enriched_negatives(positives: int, negatives: int, share: float) -> int:
    """How many of ``negatives`` an enriched subsample keeps beside its ``positives`` so that
    the positives make ``share`` of it (all of them when there are too few)."""
    return min(int(round(positives * (1 - share) / share)), negatives)


def _split(cfg: TrainConfig, run_dir: Path, source: DataSource, info: DistInfo) -> np.ndarray:
    split_path = run_dir / "split.csv"
    if split_path.exists():
        return read_split_csv(split_path, source.ids)
    if cfg.data.fold:
        k, n = parse_fold(cfg.data.fold)
        assignment = fold_split(source.targets, k, n, cfg.run.seed)
    elif Path(cfg.data.split).suffix == ".csv" or Path(cfg.data.split).is_file():
        assignment = read_split_csv(cfg.data.split, source.ids)
    else:
        assignment = stratified_split(source.targets, parse_fractions(cfg.data.split), cfg.run.seed)
    write_split_csv(split_path, source.ids, assignment)
    return assignment


def _stats(cfg: TrainConfig, run_dir: Path, source: DataSource, rows: np.ndarray) -> ChannelStats:
    path = run_dir / "channel_stats.json"
    if path.exists():
        return load_stats(path)
    stats = compute_channel_stats(source, rows, seed=cfg.run.seed)
    save_stats(path, stats)
    return stats


def part_loader(
    cfg: TrainConfig,
    data: DataParts,
    rows: np.ndarray,
    train: bool,
    augment: AugmentConfig,
    amp: torch.dtype | None,
    info: DistInfo,
) -> BatchLoader:
    """The loader over ``rows`` of the dataset for this rank, as the config asks (training
    rows drawn label-aware with ``--balance``)."""
    d = cfg.data
    repeat = None
    if train and d.balance > 0:
        repeat = repeat_factors(data.targets[rows], d.balance, d.balance_power)
    return build_loader(
        data.source,
        rows,
        train=train,
        augment=augment,
        batch_size=cfg.run.batch_size,
        image_size=cfg.data.image_size,
        channels=cfg.data.channels,
        stats=data.stats,
        device=info.device,
        dtype=amp or torch.float32,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.run.seed,
        workers=cfg.data.workers,
        backend=cfg.data.loader,
        repeat=repeat,
    )


def _model(cfg: TrainConfig, info: DistInfo) -> tuple[nn.Module, dict[str, Any]]:
    """The model on every rank from pretrained weights read on rank 0 (nodes need not share
    the torch cache); every rank makes the same random draws, so the ranks stay in step."""
    m, arch = cfg.model, cfg.model.arch

    def read() -> Any:
        spec = default_pretrained(arch) if m.pretrained == "auto" else m.pretrained
        return load_pretrained(spec, arch)

    pretrained = decide_on_main(read, info)
    model, model_info = build_model(
        arch,
        num_classes=len(cfg.label_indices),
        in_channels=cfg.in_channels,
        pretrained=pretrained,
        yellow_init=m.yellow_init,
        head=m.head,
        freeze_backbone=m.freeze_backbone,
        dropout=m.dropout,
    )
    if m.init_from:
        state = decide_on_main(lambda: _init_state(cfg), info)
        model.load_state_dict(state)
        model_info["init_from"] = m.init_from
    return model, model_info


def _init_state(cfg: TrainConfig) -> dict[str, Any]:
    """``--init-from``'s model state for this model: the same network, and the classifier's
    rows of ``--labels`` (a UserError naming the file when it does not fit)."""
    path = Path(cfg.model.init_from)
    ckpt = load_checkpoint(path)
    if ckpt.get("arch") != cfg.model.arch or ckpt.get("in_channels") != cfg.in_channels:
        raise UserError(
            f"--init-from {path}: a {ckpt.get('arch')} on {ckpt.get('in_channels')} channels, "
            f"not the {cfg.model.arch} on {cfg.in_channels} this run trains."
        )
    state = dict(ckpt["model"])
    if LOCATION_KEY in state:  # the network alone trains here: its classifier before the refit
        state = {k: v for k, v in state.items() if not k.startswith("location.")}
        state.update(ckpt["fc_before_refit"])
    rows = list(cfg.label_indices)
    weight = state.get("fc.weight")
    if weight is None or weight.shape[0] != NUM_LABELS:
        raise UserError(f"--init-from {path}: its classifier does not have {NUM_LABELS} outputs.")
    state["fc.weight"], state["fc.bias"] = weight[rows].clone(), state["fc.bias"][rows].clone()
    return state


def _plan(cfg: TrainConfig, batches: int, data: DataParts, info: DistInfo) -> StepPlan:
    accum = cfg.optim.grad_accum
    steps_per_epoch = batches // accum
    if steps_per_epoch == 0:
        raise UserError(
            f"--batch-size {cfg.run.batch_size}: the training part has {len(data.train_idx)} "
            f"samples, too few for one step of {cfg.run.batch_size} x {accum} x "
            f"{info.world_size} ranks."
        )
    total = cfg.run.epochs * steps_per_epoch
    if cfg.run.max_steps is not None:
        total = min(total, cfg.run.max_steps)
    return StepPlan(
        accum=accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup=int(round(cfg.optim.warmup_epochs * steps_per_epoch)),
        global_batch=cfg.run.batch_size * accum * info.world_size,
        peak_lr=cfg.optim.lr,
        schedule=cfg.optim.lr_schedule,
    )
