"""Train a multi-label HPA classifier: one CPU, one GPU, or many GPUs on many nodes.

Single process (CPU or one GPU)::

    python -m fasthpa.train --data ROOT --out runs/r18        # or: fasthpa train --data ROOT ...

One node, 8 GPUs::

    torchrun --nproc_per_node=8 -m fasthpa.train --data ROOT --out runs/r18 --batch-size 64

Two nodes (run on each, NODE_RANK 0 and 1; HOST = node 0's address)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=hpa1 -m fasthpa.train --data ROOT --out runs/r18

The run folder keeps config.json, env.json, split.csv, channel_stats.json, history.jsonl,
last.pt / best.pt, thresholds.json, dev_probs.npz and final_metrics.json. A folder that already
holds last.pt resumes by itself; SIGTERM/SIGINT save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fasthpa.checkpoint import load_checkpoint, load_latest, save_checkpoint
from fasthpa.config import (
    TrainConfig,
    add_config_arguments,
    config_from_args,
    load_config,
    parse_fold,
    save_config,
)
from fasthpa.distributed import (
    DistInfo,
    all_reduce_sum,
    average_buffers,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
)
from fasthpa.errors import UserError, module_main
from fasthpa.evaluate import predict_probs
from fasthpa.io import atomic_write_json, atomic_write_text
from fasthpa.labels import NUM_LABELS

# Fault injection for the tests (read once; never set in normal use).
_INJECT_NAN_AT_STEP = int(os.environ.get("FASTHPA_INJECT_NAN_AT_STEP", "-1"))
_SIGTERM_AT_STEP = int(os.environ.get("FASTHPA_SIGTERM_AT_STEP", "-1"))

# Fields a resumed run may change; everything else comes from the run's own config.json.
RESUME_OVERRIDES = {
    ("run", "epochs"),
    ("run", "max_steps"),
    ("run", "progress"),
    ("run", "log_every"),
    ("run", "checkpoint_every"),
    ("run", "eval_every"),
    ("data", "workers"),
    ("data", "loader"),
    ("data", "data"),
    ("data", "packed"),
}


# ---------------------------------------------------------------------------- setup helpers


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits at the next safe point."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Give the previous handlers back (train() may run inside a larger program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signal = signum

    @property
    def set(self) -> bool:
        return self.signal is not None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    import ast

    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA. PyTorch >= 2.9 has per-backend
    ``fp32_precision`` settings, and mixing them with the legacy ``allow_tf32`` flags can make
    inductor raise; use the new ones where they exist."""
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    except (AttributeError, RuntimeError):  # older PyTorch: the legacy flags
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    amp = cfg.speed.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total``: a pure function of the
    step, so resuming needs no scheduler state."""
    peak, kind = cfg.optim.lr, cfg.optim.lr_schedule
    if kind == "onecycle":
        warmup = warmup or max(1, int(0.3 * total))
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = peak * 1e-4 if kind == "onecycle" else 0.0
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class DataParts:
    source: Any
    ids: list[str]
    targets: np.ndarray
    train_idx: np.ndarray
    dev_idx: np.ndarray
    test_idx: np.ndarray
    stats: Any


@dataclass
class History:
    """history.jsonl on rank 0: one JSON line per log step and per epoch."""

    path: Path | None
    rows: list[dict] = field(default_factory=list)

    def log(self, **row: Any) -> None:
        if self.path is None:
            return
        row = {"time": round(time.time(), 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
        if self.path is None or not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def resolve_config(
    cfg: TrainConfig, args: argparse.Namespace | None, parser_defaults: dict
) -> tuple[TrainConfig, Path, bool]:
    """Decide the run folder and whether we resume; a resumed run keeps its saved config."""
    resume_dir = Path(cfg.run.resume) if cfg.run.resume else None
    out = resume_dir or Path(cfg.run.out)
    if resume_dir is not None and not (resume_dir / "config.json").is_file():
        raise UserError(f"--resume {resume_dir}: no config.json there; not a fasthpa run folder.")
    resuming = (out / "config.json").is_file() and any(
        (out / n).exists() for n in ("last.pt", "last.prev.pt", "last.pt.new")
    )
    if not resuming:
        if resume_dir is not None:
            raise UserError(f"--resume {resume_dir}: the folder holds no checkpoint (last.pt).")
        if not cfg.data.data:
            raise UserError("--data is required (the dataset root in the Kaggle layout).")
        return cfg, out, False
    saved = load_config(out / "config.json").to_dict()
    given = cfg.to_dict()
    ignored = []
    for section, fields in given.items():
        for name, value in fields.items():
            explicit = args is None or parser_defaults.get(f"{section}.{name}", object()) != value
            if not explicit or value in (None, "") or name in ("out", "resume"):
                continue
            if (section, name) in RESUME_OVERRIDES:
                saved[section][name] = value
            elif args is not None and value != saved[section][name]:
                ignored.append(f"--{name.replace('_', '-')}")
    if ignored and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"warning: resuming {out} with its saved config.json; ignoring changed "
            f"{', '.join(sorted(ignored))} (start a new --out to change them)."
        )
    saved["run"]["out"] = str(out)
    saved["run"]["resume"] = None
    return TrainConfig.from_dict(saved), out, True


def prepare_data(cfg: TrainConfig, run_dir: Path, info: DistInfo) -> DataParts:
    """The split (kept in the run folder), the pixel source and the channel statistics."""
    from fasthpa.data.source import open_source
    from fasthpa.data.splits import (
        fold_split,
        parse_fractions,
        read_split_csv,
        stratified_split,
        write_split_csv,
    )
    from fasthpa.data.stats import compute_channel_stats, load_stats, save_stats

    # Ids and targets come from train.csv (read once, by open_source), the pixels from the
    # Kaggle layout or a pack whose Ids it has checked
    source = open_source(cfg.data.data, "train", cfg.data.packed)
    ids, targets = source.ids, source.targets
    split_path = run_dir / "split.csv"
    if split_path.exists():
        assignment = read_split_csv(split_path, ids)
    elif cfg.data.fold:
        k, n = parse_fold(cfg.data.fold)
        assignment = fold_split(targets, k, n, cfg.run.seed)
    elif Path(cfg.data.split).suffix == ".csv" or Path(cfg.data.split).is_file():
        assignment = read_split_csv(cfg.data.split, ids)
    else:
        assignment = stratified_split(targets, parse_fractions(cfg.data.split), cfg.run.seed)
    if info.is_main and not split_path.exists():
        write_split_csv(split_path, ids, assignment)
    train_idx, dev_idx, test_idx = (np.flatnonzero(assignment == k) for k in range(3))
    if len(dev_idx) == 0:
        raise UserError(
            f"--split {cfg.data.split}: the dev part is empty; thresholds and F1 need one."
        )
    stats_path = run_dir / "channel_stats.json"
    stats = None
    if info.is_main:
        if stats_path.exists():
            stats = load_stats(stats_path)
        else:
            stats = compute_channel_stats(source, train_idx, seed=cfg.run.seed)
            save_stats(stats_path, stats)
    stats = broadcast_object(stats, info)
    return DataParts(source, ids, targets, train_idx, dev_idx, test_idx, stats)


def make_loss(cfg: TrainConfig, train_targets: np.ndarray, device: torch.device):
    """The loss as a function of (fp32 logits, targets); weights from the training split."""
    import fasthpa.kernels as K

    if cfg.loss.loss == "bce":
        return lambda logits, y: K.bce_with_logits(logits, y)
    weight = torch.as_tensor(
        K.label_weights_from_frequency(train_targets), dtype=torch.float32, device=device
    )
    if cfg.loss.loss == "wbce":
        return lambda logits, y: K.bce_with_logits(logits, y, weight=weight)
    gamma, alpha, variant = cfg.loss.focal_gamma, cfg.loss.focal_alpha, cfg.loss.focal_variant
    return lambda logits, y: K.focal_loss(logits, y, gamma=gamma, alpha=alpha, variant=variant)


def gpu_stats(device: torch.device) -> dict[str, float]:
    """Peak allocated memory, and GPU utilisation, memory and power via NVML (log steps only)."""
    if device.type != "cuda":
        return {}
    stats = {"max_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        return stats | {
            "gpu_util": float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
            "gpu_mem_gib": round(mem.used / 2**30, 2),
            "gpu_power_w": round(pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0, 1),
        }
    except Exception:  # no NVML (a container without the driver library): allocator figures only
        return stats


# ---------------------------------------------------------------------------- the step


def train_step(
    model,
    optimizer,
    scaler,
    loss_fn,
    micro_batches,
    autocast,
    ddp_no_sync,
    inject_nan: bool = False,
) -> torch.Tensor:
    """One optimiser step over ``micro_batches``; returns the mean loss as a device tensor
    (no host sync: the caller reads it only on log steps)."""
    accum = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        # only the last micro-batch all-reduces gradients under DDP
        sync_ctx = contextlib.nullcontext() if i == accum - 1 else ddp_no_sync()
        with sync_ctx:
            with autocast():
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            if inject_nan:  # fault injection for the tests
                loss = loss * float("nan")
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total = total + loss.detach() / accum
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# ---------------------------------------------------------------------------- evaluation


def dev_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Macro F1 at 0.5 and with per-label thresholds fitted on these probabilities."""
    from fasthpa.thresholds import fit_thresholds, per_label_metrics

    fit = fit_thresholds(probs, labels, method="exact")
    tuned = per_label_metrics(probs, labels, fit.thresholds)
    return {"fit": fit, "per_label": tuned}


# ---------------------------------------------------------------------------- the run


def train(
    cfg: TrainConfig, args: argparse.Namespace | None = None, parser_defaults: dict | None = None
) -> int:
    info = init_distributed(cfg.speed.device)
    stop = StopFlag()
    stop.install()
    try:
        return _train(cfg, info, stop, args, parser_defaults or {})
    finally:
        stop.restore()
        cleanup(info)


def _train(cfg: TrainConfig, info: DistInfo, stop: StopFlag, args, parser_defaults) -> int:
    from fasthpa.data.contract import AugmentConfig
    from fasthpa.data.loader import build_loader
    from fasthpa.envinfo import environment
    from fasthpa.model import build_model, default_pretrained, set_frozen_bn_eval

    cfg, run_dir, resuming = resolve_config(cfg, args, parser_defaults)
    device = info.device
    say = print if info.is_main else (lambda *a, **k: None)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(info)

    seed_everything(cfg.run.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        enable_tf32()

    data = prepare_data(cfg, run_dir, info)
    dtype_amp = amp_dtype(cfg, device)
    input_dtype = dtype_amp or torch.float32
    in_channels = 4 if cfg.data.channels == "rgby" else 3
    augment = AugmentConfig(
        hflip=cfg.data.hflip,
        vflip=cfg.data.vflip,
        dihedral=cfg.data.dihedral,
        random_crop=cfg.data.random_crop,
    )
    common = dict(
        batch_size=cfg.run.batch_size,
        image_size=cfg.data.image_size,
        channels=cfg.data.channels,
        stats=data.stats,
        device=device,
        dtype=input_dtype,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.run.seed,
        workers=cfg.data.workers,
        backend=cfg.data.loader,
    )
    train_loader = build_loader(data.source, data.train_idx, train=True, augment=augment, **common)
    # eval loaders take the augment config only for its centre crop (eval never flips)
    dev_loader = build_loader(data.source, data.dev_idx, train=False, augment=augment, **common)

    # ---- model: built and (if asked) pretrained-loaded on every rank from the same file
    pretrained = cfg.model.pretrained
    if pretrained == "auto":  # decided once, on rank 0: nodes may not share a cache
        pretrained = broadcast_object(
            default_pretrained(cfg.model.arch) if info.is_main else None, info
        )
    model, model_info = build_model(
        cfg.model.arch,
        num_classes=NUM_LABELS,
        in_channels=in_channels,
        pretrained=pretrained,
        yellow_init=cfg.model.yellow_init,
        head=cfg.model.head,
        freeze_backbone=cfg.model.freeze_backbone,
        dropout=cfg.model.dropout,
    )
    model.to(device)
    if cfg.speed.channels_last:
        model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_kw = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optim.weight_decay > 0:
        optimizer = torch.optim.AdamW(
            trainable, weight_decay=cfg.optim.weight_decay, **opt_kw, **fused
        )
    else:
        optimizer = torch.optim.Adam(trainable, **opt_kw, **fused)
    scaler = torch.amp.GradScaler(device.type) if dtype_amp is torch.float16 else None

    # ---- resume: the raw (unwrapped, uncompiled) model's state
    start_epoch, step, skip_batches, best_f1 = 0, 0, 0, -1.0
    resume_rng = None
    history = History(run_dir / "history.jsonl" if info.is_main else None)
    if resuming:
        found = load_latest(run_dir) if info.is_main else None
        found = broadcast_object(None if found is None else (str(found[1]), found[2]), info)
        if found is None:
            raise UserError(f"{run_dir}: no intact checkpoint to resume from.")
        ckpt_path, warnings = Path(found[0]), found[1]
        for w in warnings:
            say(f"warning: {w}")
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        resume_rng = state["rng"]
        start_epoch, step = state["epoch"], state["step"]
        skip_batches, best_f1 = state["batch_in_epoch"], state["best_f1"]
        history.truncate_after(step)
        say(f"resuming {run_dir} from {ckpt_path.name}: epoch {start_epoch}, step {step}")
    if cfg.model.freeze_backbone:
        set_frozen_bn_eval(model)

    raw_model = model
    if cfg.model.sync_bn and info.enabled and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if info.enabled:
        # DDP first, then compile: the order PyTorch documents for compiled DDP (DDPOptimizer
        # splits the graph at bucket boundaries so communication overlaps the backward)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_compile = cfg.speed.compile if cfg.speed.compile is not None else device.type == "cuda"
    if use_compile:
        model = torch.compile(
            model, mode=None if cfg.speed.compile_mode == "default" else cfg.speed.compile_mode
        )
    ddp_no_sync = (
        model.no_sync
        if isinstance(model, nn.parallel.DistributedDataParallel)
        else (getattr(getattr(model, "_orig_mod", None), "no_sync", None) or contextlib.nullcontext)
    )

    def autocast():
        if dtype_amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype_amp)

    loss_fn = make_loss(cfg, data.targets[data.train_idx], device)
    accum = cfg.optim.grad_accum
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise UserError(
            f"--batch-size {cfg.run.batch_size}: the training part has {len(data.train_idx)} samples, "
            f"too few for one step of {cfg.run.batch_size} x {accum} x {info.world_size} ranks."
        )
    total_steps = cfg.run.epochs * steps_per_epoch
    if cfg.run.max_steps is not None:
        total_steps = min(total_steps, cfg.run.max_steps)
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    global_batch = cfg.run.batch_size * accum * info.world_size

    if info.is_main:
        save_config(run_dir / "config.json", cfg)
        env = environment(device) | {
            "world_size": info.world_size,
            "loader": train_loader.backend,
            "amp": str(dtype_amp).replace("torch.", "") if dtype_amp else "off",
            "compile": use_compile,
            "channels_last": cfg.speed.channels_last,
            "pretrained": model_info,
            "global_batch": global_batch,
        }
        atomic_write_json(run_dir / "env.json", env)
        say(
            f"fasthpa: {cfg.model.arch} on {info.world_size} x {env['device']}, loader {train_loader.backend}, "
            f"amp {env['amp']}, compile {use_compile}, pretrained {model_info.get('pretrained')}, "
            f"{len(data.train_idx)} train / {len(data.dev_idx)} dev / {len(data.test_idx)} test, "
            f"{steps_per_epoch} steps/epoch, global batch {global_batch}"
        )

    def checkpoint_state(epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        return {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch,
            "step": step,
            "batch_in_epoch": batch_in_epoch,
            "best_f1": best_f1,
            "rng": rng_state(),
            "config": cfg.to_dict(),
            "arch": cfg.model.arch,
            "in_channels": in_channels,
            "model_info": model_info,
            "stats": vars(data.stats),
        }

    progress = _Progress(enabled=info.is_main and cfg.run.progress)
    log_every = cfg.run.log_every
    loss_buf = torch.zeros(log_every, device=device)
    epoch = start_epoch
    stopped = False
    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg.run.epochs):
        if step >= total_steps:
            break
        train_loader.set_epoch(epoch)
        it = iter(train_loader)
        batch_in_epoch = 0
        for _ in range(skip_batches):  # resume mid-epoch: replay the same data order
            next(it)
            batch_in_epoch += 1
        skip_batches = 0
        if resume_rng is not None:
            # restored only now: creating the iterator may draw from the global generator
            set_rng_state(resume_rng)
            resume_rng = None
        progress.start_epoch(epoch, steps_per_epoch, done=batch_in_epoch // accum)
        t_log, data_wait, steps_since_log, last_logged = time.perf_counter(), 0.0, 0, step
        epoch_loss_sum = torch.zeros((), device=device)
        epoch_steps = 0
        while batch_in_epoch // accum < steps_per_epoch and step < total_steps:
            t0 = time.perf_counter()
            micro = []
            for _ in range(accum):
                x, y, _ = next(it)
                micro.append((x, y))
            batch_in_epoch += accum
            data_wait += time.perf_counter() - t0
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total_steps, warmup, cfg)
            loss = train_step(
                model,
                optimizer,
                scaler,
                loss_fn,
                micro,
                autocast,
                ddp_no_sync,
                inject_nan=step + 1 == _INJECT_NAN_AT_STEP,
            )
            loss_buf[step % log_every] = loss
            epoch_loss_sum += loss
            step += 1
            epoch_steps += 1
            steps_since_log += 1
            progress.advance()
            if step == _SIGTERM_AT_STEP:
                os.kill(os.getpid(), signal.SIGTERM)
            last_step = batch_in_epoch // accum >= steps_per_epoch or step >= total_steps
            ckpt_due = bool(cfg.run.checkpoint_every) and step % cfg.run.checkpoint_every == 0
            if step % log_every == 0 or last_step or ckpt_due or (stop.set and not info.enabled):
                # the only host syncs of the training loop; a checkpoint is written only after
                # this check has seen every loss since the last log step
                slots = [(s - 1) % log_every for s in range(last_logged + 1, step + 1)]
                losses = loss_buf[torch.tensor(slots, device=device)]
                last_logged = step
                all_reduce_sum(losses, info)
                losses = (losses / info.world_size).cpu()
                flags = all_reduce_sum(torch.tensor([float(stop.set)], device=device), info)
                bad = (~torch.isfinite(losses)).nonzero()
                if len(bad):
                    bad_step = step - len(losses) + int(bad[0]) + 1  # 1-based step number
                    progress.close()
                    raise UserError(
                        f"non-finite loss ({float(losses[int(bad[0])])}) at step {bad_step} "
                        f"(epoch {epoch}); stopped. The last good checkpoint is kept in {run_dir}."
                    )
                now = time.perf_counter()
                elapsed = now - t_log
                ips = steps_since_log * global_batch / max(elapsed, 1e-9)
                row = {
                    "kind": "step",
                    "epoch": epoch,
                    "step": step,
                    "loss": float(losses.mean()),
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_sec": round(ips, 2),
                    "images_per_sec_per_device": round(ips / info.world_size, 2),
                    "data_wait_share": round(data_wait / max(elapsed, 1e-9), 4),
                    "step_time_ms": round(1000 * elapsed / max(steps_since_log, 1), 2),
                } | gpu_stats(device)
                history.log(**row)
                progress.update(row)
                t_log, data_wait, steps_since_log = now, 0.0, 0
                if float(flags[0]) > 0:
                    stopped = True
            if ckpt_due and not last_step:
                _save_last(run_dir, checkpoint_state(epoch, batch_in_epoch), info)
            if stopped:
                break
        progress.close()
        if stopped:
            _save_last(run_dir, checkpoint_state(epoch, batch_in_epoch), info)
            signame = signal.Signals(stop.signal).name if stop.signal else "a signal"
            say(
                f"stopped by {signame} at epoch {epoch}, step {step}; checkpoint saved to "
                f"{run_dir / 'last.pt'}. Run the same command (or --resume {run_dir}) to continue."
            )
            return 0
        average_buffers(raw_model, info)  # one BatchNorm state on every rank before eval/save
        epoch_done = batch_in_epoch // accum >= steps_per_epoch
        # ---- evaluation on dev, every rank, each row exactly once
        row: dict[str, Any] = {
            "kind": "epoch",
            "epoch": epoch,
            "step": step,
            "train_loss": float(
                all_reduce_sum(epoch_loss_sum.clone(), info) / info.world_size / max(1, epoch_steps)
            ),
            "elapsed_s": round(time.perf_counter() - t_run, 2),
        }
        is_last = epoch == cfg.run.epochs - 1 or step >= total_steps
        improved = False
        if (epoch + 1) % cfg.run.eval_every == 0 or is_last:
            got = predict_probs(raw_model, dev_loader, info, len(data.dev_idx), autocast)
            if info.is_main:
                rows, probs = got
                labels = data.targets[rows]
                m = dev_metrics(probs, labels)
                fit = m["fit"]
                row |= {
                    "dev_macro_f1_at_0.5": fit.macro_f1_at_05,
                    "dev_macro_f1_tuned": fit.macro_f1_tuned,
                    "dev_per_label": {
                        k: np.asarray(m["per_label"][k]).round(6).tolist()
                        for k in ("precision", "recall", "f1", "support")
                    },
                }
                improved = fit.macro_f1_tuned > best_f1
                if improved:
                    best_f1 = fit.macro_f1_tuned
                    _write_dev_outputs(run_dir, [data.ids[r] for r in rows], probs, labels, fit)
            improved = bool(broadcast_object(improved, info))
            best_f1 = float(broadcast_object(best_f1, info))
        ckpt_epoch, ckpt_batch = (epoch + 1, 0) if epoch_done else (epoch, batch_in_epoch)
        state = checkpoint_state(ckpt_epoch, ckpt_batch)
        _save_last(run_dir, state, info)
        if improved and info.is_main:
            save_checkpoint(run_dir / "best.pt", state)
        history.log(**row)
        if info.is_main:
            _print_epoch(row, best_f1)
        if stop.set:
            say(
                f"stopped by a signal after epoch {epoch}; checkpoint saved to {run_dir / 'last.pt'}."
            )
            return 0

    # ---- the held-out test part, with the best checkpoint and its dev-fitted thresholds
    if info.is_main:
        final = {"best_dev_macro_f1_tuned": best_f1, "steps": step, "epochs": epoch + 1}
        if len(data.test_idx) and (run_dir / "best.pt").exists():
            best = load_checkpoint(run_dir / "best.pt")
            raw_model.load_state_dict(best["model"])
            final |= _test_metrics(raw_model, data, common, run_dir, autocast, augment)
        atomic_write_json(run_dir / "final_metrics.json", final)
        say(
            f"done: best dev macro F1 (tuned) {best_f1:.4f}"
            + (
                f"; test part macro F1 {final['test_macro_f1_at_0.5']:.4f} at 0.5, "
                f"{final['test_macro_f1_tuned']:.4f} with dev thresholds"
                if "test_macro_f1_tuned" in final
                else ""
            )
        )
    return 0


def _save_last(run_dir: Path, state: dict, info: DistInfo) -> None:
    if info.is_main:
        save_checkpoint(run_dir / "last.pt", state, rotate=True)
    barrier(info)


def _write_dev_outputs(
    run_dir: Path, ids: list[str], probs: np.ndarray, labels: np.ndarray, fit
) -> None:
    import io

    from fasthpa.io import atomic_write_bytes
    from fasthpa.thresholds import write_thresholds_json

    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray(ids), probs=probs, labels=labels.astype(np.uint8))
    atomic_write_bytes(run_dir / "dev_probs.npz", buf.getvalue())
    write_thresholds_json(run_dir / "thresholds.json", fit)


def _test_metrics(model, data: DataParts, common: dict, run_dir: Path, autocast, augment) -> dict:
    """Macro F1 on the split's test part, at 0.5 and with the thresholds fitted on dev."""
    from fasthpa.data.loader import build_loader
    from fasthpa.thresholds import load_thresholds, per_label_metrics

    single = DistInfo(rank=0, world_size=1, local_rank=0, device=common["device"])
    loader = build_loader(
        data.source, data.test_idx, train=False, augment=augment,
        **(common | {"rank": 0, "world_size": 1}),
    )  # fmt: skip
    rows, probs = predict_probs(model, loader, single, len(data.test_idx), autocast)
    labels = data.targets[rows]
    at05 = per_label_metrics(probs, labels, 0.5)
    tuned = per_label_metrics(probs, labels, load_thresholds(run_dir / "thresholds.json"))
    return {
        "test_samples": int(len(rows)),
        "test_macro_f1_at_0.5": at05["macro_f1"],
        "test_macro_f1_tuned": tuned["macro_f1"],
    }


class _Progress:
    """A rich progress bar per epoch on rank 0 (host-side only: it never reads a device value
    outside log steps)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def start_epoch(self, epoch: int, total: int, done: int = 0) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn(f"epoch {epoch}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def update(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task,
                info=f"loss {row['loss']:.4f} | {row['images_per_sec']:.1f} img/s "
                f"({row['images_per_sec_per_device']:.1f}/dev) | data {100 * row['data_wait_share']:.0f}%",
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _print_epoch(row: dict, best_f1: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"epoch {row['epoch']} (step {row['step']})", show_header=True)
    for c in ("train loss", "dev F1 @0.5", "dev F1 tuned", "best tuned", "elapsed s"):
        t.add_column(c, justify="right")
    f05 = row.get("dev_macro_f1_at_0.5")
    ft = row.get("dev_macro_f1_tuned")
    t.add_row(
        f"{row['train_loss']:.4f}",
        "-" if f05 is None else f"{f05:.4f}",
        "-" if ft is None else f"{ft:.4f}",
        f"{best_f1:.4f}",
        f"{row['elapsed_s']:.1f}",
    )
    Console().print(t)


# ---------------------------------------------------------------------------- entry points


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    return train(config_from_args(args), args, defaults)


def main(argv: list[str] | None = None) -> int:
    return module_main("python -m fasthpa.train", __doc__, configure_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
