"""The training configuration: one dataclass tree, each field documented and validated.

Command-line flags are generated from the fields (``--batch-size`` for ``batch_size``; booleans get
``--x/--no-x``), so ``fasthpa train --help`` documents every field. Defaults reproduce the reference
recipe (../shared/reference/hpa.md): ResNet18 with a 4-channel ImageNet-style stem, adaptive
average pooling, 512 px, Adam lr 1e-3 betas (0.9, 0.999) eps 1e-8, weighted BCE, flips, batch
size 8, a 90/5/5 multi-label stratified split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasthpa.errors import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "densenet121")


def _f(default: Any, help: str, choices: tuple | None = None, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help (and choices) as metadata."""
    meta = {"help": help, "choices": choices, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    data: str = _f(
        "", "dataset root in the Kaggle layout (train.csv + train/); required unless resuming"
    )
    packed: str | None = _f(
        None, "a folder from `fasthpa pack` (RGBA PNGs or the npy cache) to read pixels from"
    )
    split: str = _f(
        "0.9,0.05,0.05",
        "train,dev,test fractions for a multi-label stratified split, or a split CSV (Id,split)",
    )
    fold: str | None = _f(None, "K/N: train on N-1 stratified folds, use fold K (0-based) as dev")
    image_size: int = _f(512, "train and evaluate at this size (512 is the native HPA size)")
    random_crop: int | None = _f(
        None, "random crop of this size after resizing (eval: centre crop)"
    )
    hflip: bool = _f(True, "random horizontal flips")
    vflip: bool = _f(True, "random vertical flips")
    dihedral: bool = _f(False, "random 90-degree rotations too (the full dihedral group)")
    channels: str = _f("rgby", "input stains: all four, or RGB only", choices=("rgby", "rgb"))
    loader: str = _f(
        "auto",
        "input pipeline: DALI if installed else PyTorch (auto), or forced",
        choices=("auto", "dali", "torch", "cache"),
    )
    workers: int = _f(4, "loader worker processes / DALI CPU threads per rank")

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise UserError(f"--image-size {self.image_size}: must be at least 16.")
        if self.random_crop is not None and not 8 <= self.random_crop <= self.image_size:
            raise UserError(
                f"--random-crop {self.random_crop}: must be between 8 and --image-size {self.image_size}."
            )
        if self.workers < 0:
            raise UserError(f"--workers {self.workers}: must be >= 0.")
        if self.fold is not None:
            parse_fold(self.fold)


@dataclass
class ModelConfig:
    arch: str = _f("resnet18", "network architecture (torchvision)", choices=ARCHS)
    pretrained: str = _f(
        "auto",
        "imagenet (torchvision's cached checkpoint), none, a checkpoint PATH, or auto: imagenet "
        "when its file is cached, else none",
    )
    yellow_init: str = _f(
        "xavier", "how the 4th (yellow) stem filter starts", choices=("xavier", "mean", "red")
    )
    head: str = _f("avgpool", "pooling before the classifier", choices=("avgpool", "maxavg"))
    dropout: float = _f(0.0, "dropout before the classifier")
    freeze_backbone: bool = _f(False, "train only the classifier (the reference's frozen run)")
    sync_bn: bool = _f(False, "SyncBatchNorm across ranks (CUDA only)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout {self.dropout}: must be in [0, 1).")


@dataclass
class LossConfig:
    loss: str = _f(
        "wbce",
        "bce, weighted bce (w = 1 - label frequency of the training split), or focal",
        choices=("bce", "wbce", "focal"),
    )
    focal_gamma: float = _f(2.0, "focal loss gamma")
    focal_alpha: float | None = _f(None, "focal loss alpha balancing (None: off)")
    focal_variant: str = _f(
        "standard",
        "standard (1-p_t)^gamma, or the p_t^gamma factor printed in the reference report",
        choices=("standard", "reference_report"),
    )

    def __post_init__(self) -> None:
        if self.focal_gamma < 0:
            raise UserError(f"--focal-gamma {self.focal_gamma}: must be >= 0.")
        if self.focal_alpha is not None and not 0 <= self.focal_alpha <= 1:
            raise UserError(f"--focal-alpha {self.focal_alpha}: must be in [0, 1].")


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, "peak learning rate (Adam)")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.0, "weight decay (AdamW-style, decoupled, when > 0)")
    lr_schedule: str = _f(
        "constant", "learning-rate schedule", choices=("constant", "cosine", "onecycle")
    )
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs (fractions allowed)")
    grad_accum: int = _f(
        1, "micro-batches per optimiser step (global batch = batch x accum x ranks)"
    )

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise UserError(f"--lr {self.lr}: must be > 0.")
        if self.warmup_epochs < 0:
            raise UserError(f"--warmup-epochs {self.warmup_epochs}: must be >= 0.")
        if self.grad_accum < 1:
            raise UserError(f"--grad-accum {self.grad_accum}: must be >= 1.")


@dataclass
class SpeedConfig:
    amp: str = _f(
        "auto",
        "mixed precision: bf16, fp16 (with a GradScaler), off, or auto (bf16 on CUDA, off on CPU)",
        choices=("auto", "bf16", "fp16", "off"),
    )
    channels_last: bool = _f(True, "channels_last memory format for the model and inputs")
    compile: bool | None = _f(None, "torch.compile the model (default: on for CUDA, off on CPU)")
    compile_mode: str = _f(
        "default",
        "torch.compile mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    device: str = _f(
        "auto", "cuda, cpu, or auto (cuda when available)", choices=("auto", "cuda", "cpu")
    )


@dataclass
class RunConfig:
    out: str = _f("runs/hpa", "run folder: config, checkpoints, history, thresholds")
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(8, "batch size per device (the reference recipe used 8)")
    seed: int = _f(0, "seed for the split, initialisation, shuffling and augmentation")
    resume: str | None = _f(
        None, "resume this run folder (a folder that already holds last.pt resumes by itself)"
    )
    log_every: int = _f(50, "optimiser steps between log lines (the only host syncs in training)")
    checkpoint_every: int = _f(
        0, "also write last.pt every N optimiser steps (0: every epoch only)"
    )
    eval_every: int = _f(1, "evaluate on dev every N epochs (and always after the last)")
    max_steps: int | None = _f(None, "stop after this many optimiser steps in total (smoke runs)")
    progress: bool = _f(True, "rich progress bar on rank 0")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every", "eval_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1.")
        if self.checkpoint_every < 0:
            raise UserError(f"--checkpoint-every {self.checkpoint_every}: must be >= 0.")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        sections = {}
        for f in dataclasses.fields(cls):
            sub_cls = typing.get_type_hints(cls)[f.name]
            known = {g.name for g in dataclasses.fields(sub_cls)}
            sections[f.name] = sub_cls(**{k: v for k, v in d.get(f.name, {}).items() if k in known})
        return cls(**sections)


def parse_fold(text: str) -> tuple[int, int]:
    """'2/5' -> (2, 5)."""
    try:
        k, n = (int(x) for x in text.replace(" of ", "/").split("/"))
    except ValueError:
        raise UserError(f"--fold {text!r}: expected K/N, e.g. 0/5.") from None
    if n < 2 or not 0 <= k < n:
        raise UserError(f"--fold {text!r}: need N >= 2 and 0 <= K < N.")
    return k, n


# ------------------------------------------------------------------ flags from the dataclasses


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) for X | None annotations."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _none_or(conv):
    def parse(text: str):
        return None if text.lower() == "none" else conv(text)

    parse.__name__ = conv.__name__
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field, grouped by section, with the field's help and default."""
    for section in dataclasses.fields(TrainConfig):
        sub_cls = typing.get_type_hints(TrainConfig)[section.name]
        group = parser.add_argument_group(section.name)
        hints = typing.get_type_hints(sub_cls)
        for f in dataclasses.fields(sub_cls):
            flag = "--" + f.name.replace("_", "-")
            tp, nullable = _base_type(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw: dict[str, Any] = {"dest": f"{section.name}.{f.name}", "help": f.metadata["help"]}
            if tp is bool:
                kw.update(action=argparse.BooleanOptionalAction, default=default)
            else:
                conv = _none_or(tp) if nullable else tp
                kw.update(type=conv, default=default, metavar=f.name.upper())
                if f.metadata.get("choices"):
                    kw["choices"] = f.metadata["choices"]
                    kw.pop("metavar")
                if f.metadata.get("required"):
                    kw["required"] = True
            group.add_argument(flag, **kw)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build (and so validate) a TrainConfig from parsed flags."""
    values: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            values.setdefault(section, {})[name] = value
    return TrainConfig.from_dict(values)


def save_config(path: str | Path, cfg: TrainConfig) -> None:
    from fasthpa.io import atomic_write_json

    atomic_write_json(path, cfg.to_dict())


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the run's config ({e}).") from None
