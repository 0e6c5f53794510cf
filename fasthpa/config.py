"""The training configuration: one dataclass tree, each field documented and validated.

This is the one place where user values are checked (builders downstream only assert), and the
choice lists come from the modules that own them (the loader contract, the model, the loss, the
runtime glue). Command-line flags are generated from the fields (``--batch-size`` for
``batch_size``; booleans get ``--x/--no-x``), so ``fasthpa train --help`` documents every field::

    cfg = TrainConfig()                                   # every default
    cfg = TrainConfig.from_dict(json.load(open("runs/r18/config.json")))
    parser = argparse.ArgumentParser(); add_config_arguments(parser)
    args = parser.parse_args(["--data", "ROOT", "--lr", "3e-3"])
    cfg, explicit = config_from_args(args)                # explicit == {"data.data", "optim.lr"}

Defaults are the reference report's recipe (../shared/reference/hpa.md): ResNet18 with a
4-channel stem, adaptive average pooling, 512 px, Adam lr 1e-3 betas (0.9, 0.999) eps 1e-8,
weighted BCE, flips, batch size 8, a 90/5/5 multi-label stratified split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasthpa.data.contract import BACKENDS, CHANNEL_SETS
from fasthpa.distributed import DEVICE_CHOICES
from fasthpa.errors import UserError
from fasthpa.labels import NUM_LABELS
from fasthpa.loss import FOCAL_VARIANTS, LOSSES
from fasthpa.model import HEADS, YELLOW_INITS
from fasthpa.recipes import DEFAULT_RECIPE, RECIPES, merge, recipe_values
from fasthpa.runtime import AMP_CHOICES, COMPILE_MODES, LR_SCHEDULES
from fasthpa.thresholds.rules import RULE_CHOICES
from fasthpa.weights import ARCHS


def _f(default: Any, help: str, choices: tuple | None = None, const: Any = None) -> Any:
    """A dataclass field carrying its CLI help (and choices) as metadata; ``const``: the value
    of the flag given without one (``--tensorboard`` alone)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None}
    return field(default=default, metadata=meta | {"const": const})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_range(
    obj: Any,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """UserError naming the flag unless ``obj.name`` is None or a finite number in the range."""
    value = getattr(obj, name)
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if ok:
        return
    lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
    hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
    rule = " and ".join(s for s in (lo_s, hi_s) if s)
    kind = "an integer" if isinstance(value, int) and number else "a finite number"
    raise UserError(f"{_flag(name)} {value}: must be {kind} {rule}.")


def _check_choice(obj: Any, name: str) -> None:
    choices = obj.__dataclass_fields__[name].metadata["choices"]
    value = getattr(obj, name)
    if choices and value not in choices:
        raise UserError(f"{_flag(name)} {value!r}: must be one of {', '.join(choices)}.")


def _check_choices(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        _check_choice(obj, f.name)


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
    channels: str = _f("rgby", "input stains: all four, or RGB only", CHANNEL_SETS)
    loader: str = _f(
        "auto",
        "input pipeline: auto = the dataset decoded once and held in memory (resident) when it "
        "fits, else DALI if installed, else PyTorch; or one forced",
        BACKENDS,
    )
    workers: int = _f(4, "loader worker processes / DALI CPU threads per rank")
    labels: str | None = _f(
        None,
        "train on these labels only (comma-separated indices, e.g. 27 or 8,9,10): a model with "
        "one output per label, as `fasthpa rare` trains for rare labels; None: all 28",
    )
    positive_share: float = _f(
        0.0,
        "with --labels: subsample the training part to all its positives and enough random "
        "negatives that positives make this share (the reference's rare-label models: 0.2); 0: off",
    )
    balance: float = _f(
        0.0,
        "label-aware sampling: an image holding a label rarer than this training frequency is "
        "drawn (this / frequency) ** --balance-power times per epoch (the epoch keeps its "
        "length); 0: off",
    )
    balance_power: float = _f(
        0.5, "exponent of the label-aware repeat factor (0.5: its square root)"
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_range(self, "image_size", 16)
        _check_range(self, "random_crop", 8, self.image_size)
        _check_range(self, "workers", 0)
        _check_range(self, "balance", 0.0, 1.0)
        _check_range(self, "positive_share", 0.0, 1.0, hi_open=True)
        if self.labels is not None:
            parse_labels(self.labels)
        elif self.positive_share > 0:
            raise UserError("--positive-share needs --labels (the labels whose positives count).")
        _check_range(self, "balance_power", 0.0, 4.0)
        if self.fold is not None:
            parse_fold(self.fold)


@dataclass
class ModelConfig:
    arch: str = _f("resnet18", "network architecture (torchvision)", ARCHS)
    pretrained: str = _f(
        "auto",
        "imagenet (torchvision's cached checkpoint), none, a checkpoint PATH, or auto: imagenet "
        "when its file is cached, else none",
    )
    yellow_init: str = _f("xavier", "how the 4th (yellow) stem filter starts", YELLOW_INITS)
    head: str = _f("avgpool", "pooling before the classifier", HEADS)
    dropout: float = _f(0.0, "dropout before the classifier")
    freeze_backbone: bool = _f(False, "train only the classifier (the reference's frozen run)")
    sync_bn: bool = _f(False, "SyncBatchNorm across ranks (CUDA only)")
    init_from: str | None = _f(
        None,
        "start from a fasthpa checkpoint (a run's best.pt): its network, and its classifier's "
        "rows for --labels (how `fasthpa rare` fine-tunes rare-label models)",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_range(self, "dropout", 0.0, 1.0, hi_open=True)


@dataclass
class LossConfig:
    loss: str = _f(
        "wbce",
        "bce, weighted bce (w = 1 - label frequency of the training split), or focal",
        LOSSES,
    )
    focal_gamma: float = _f(2.0, "focal loss gamma")
    focal_alpha: float | None = _f(None, "focal loss alpha balancing (None: off)")
    focal_variant: str = _f(
        "standard",
        "standard (1-p_t)^gamma, or the p_t^gamma factor printed in the reference report",
        FOCAL_VARIANTS,
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_range(self, "focal_gamma", 0.0)
        _check_range(self, "focal_alpha", 0.0, 1.0)


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, "peak learning rate (Adam)")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.0, "weight decay (AdamW-style, decoupled, when > 0)")
    lr_schedule: str = _f("constant", "learning-rate schedule", LR_SCHEDULES)
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs (fractions allowed)")
    grad_accum: int = _f(
        1, "micro-batches per optimiser step (global batch = batch x accum x ranks)"
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_range(self, "lr", 0.0, 10.0, lo_open=True)
        _check_range(self, "beta1", 0.0, 1.0, hi_open=True)
        _check_range(self, "beta2", 0.0, 1.0, hi_open=True)
        _check_range(self, "eps", 0.0, 1.0, lo_open=True)
        _check_range(self, "weight_decay", 0.0, 10.0)
        _check_range(self, "warmup_epochs", 0.0, 1000.0)
        _check_range(self, "grad_accum", 1)


@dataclass
class SpeedConfig:
    amp: str = _f(
        "off",
        "mixed precision: bf16, fp16 (with a GradScaler), off, or auto (bf16 where the device "
        "has native bf16: CUDA, a CPU with AVX-512 BF16 or AMX; else off)",
        AMP_CHOICES,
    )
    channels_last: bool = _f(True, "channels_last memory format for the model and inputs")
    compile: bool | None = _f(None, "torch.compile the model (default: on for CUDA, off on CPU)")
    compile_mode: str = _f("default", "torch.compile mode", COMPILE_MODES)
    device: str = _f("auto", "cuda, cpu, or auto (cuda when available)", DEVICE_CHOICES)

    def __post_init__(self) -> None:
        _check_choices(self)


@dataclass
class RunConfig:
    out: str = _f("runs/hpa", "run folder: config, checkpoints, history, thresholds")
    recipe: str = _f(
        "reference",
        "the recipe whose defaults this run started from (fasthpa.recipes; the command line "
        f"uses {DEFAULT_RECIPE!r} unless told otherwise)",
        tuple(RECIPES),
    )
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
    tensorboard: str | None = _f(
        None,
        "write TensorBoard event files (rank 0, log steps only) to this folder; the flag alone: "
        "RUN/tb. Needs the tensorboard package (pip install 'fasthpa[tensorboard]')",
        const="RUN/tb",
    )
    threshold_rule: str = _f(
        "exact",
        "how per-label thresholds are fitted (dev part; cv: out of fold; --refit-heads: the "
        "refit's out-of-fold scores): exact F1 cuts, a rule, or auto (the rule that scores best "
        "on rows it was not fitted on)",
        RULE_CHOICES,
    )
    lpr_tolerance: float | None = _f(
        None,
        "with auto: only rules whose predicted labels per row are within this fraction of the "
        "truth's (e.g. 0.3)",
    )
    refit_heads: bool = _f(
        False,
        "after training, refit the classifier to convergence on the training part's features "
        "(a logistic regression per label) and fit thresholds on its out-of-fold scores",
    )
    refit_c: float = _f(0.3, "inverse L2 strength of the refit (scikit-learn's C)")
    location_features: bool = _f(
        False,
        "with --refit-heads, the refit also reads classical subcellular-location features of "
        "each image (where the green stain lies, its blobs, lines and rings at six scales; "
        "fasthpa.location) beside the network's",
    )
    noise_scale: bool = _f(
        False,
        "measure the gradient noise scale B_simple (McCandlish et al. 2018) on log steps; needs "
        "--grad-accum >= 2 on one device, or several ranks",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        for name in ("epochs", "batch_size", "log_every", "eval_every", "max_steps"):
            _check_range(self, name, 1)
        _check_range(self, "checkpoint_every", 0)
        _check_range(self, "lpr_tolerance", 0.0, 10.0)
        _check_range(self, "refit_c", 0.0, 1e6, lo_open=True)
        _check_range(self, "seed", 0)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def in_channels(self) -> int:
        """Input channels of the model (4 for rgby, 3 for rgb)."""
        return CHANNEL_SETS[self.data.channels]

    @property
    def label_indices(self) -> tuple[int, ...]:
        """The labels the model predicts, in output order (all 28 unless ``--labels``)."""
        if self.data.labels is None:
            return tuple(range(NUM_LABELS))
        return parse_labels(self.data.labels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build (and validate) a config from nested dicts; missing fields take their defaults,
        unknown ones are ignored (config.json of an older version still loads)."""
        sections = {}
        for name, sub_cls in _sections():
            known = {g.name for g in dataclasses.fields(sub_cls)}
            sections[name] = sub_cls(**{k: v for k, v in d.get(name, {}).items() if k in known})
        return cls(**sections)


def _sections() -> list[tuple[str, type]]:
    hints = typing.get_type_hints(TrainConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def parse_labels(text: str) -> tuple[int, ...]:
    """'8,9,10' -> (8, 9, 10): distinct label indices in 0-27, ascending."""
    try:
        labels = tuple(int(x) for x in str(text).replace(" ", "").split(",") if x)
    except ValueError:
        raise UserError(f"--labels {text!r}: expected label indices like 27 or 8,9,10.") from None
    if (
        not labels
        or len(set(labels)) != len(labels)
        or not all(0 <= x < NUM_LABELS for x in labels)
    ):
        raise UserError(f"--labels {text!r}: need distinct label indices in 0-{NUM_LABELS - 1}.")
    return tuple(sorted(labels))


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


def _converter(tp: Any, nullable: bool, flag: str):
    """Parse one flag value as ``tp`` (``none`` for None where allowed), naming the flag on error."""

    def parse(text: str):
        if nullable and text.lower() == "none":
            return None
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {tp.__name__}") from None

    parse.__name__ = tp.__name__
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and one flag per config field, grouped by section, with the
    field's help and default.

    Flags default to "not given" (argparse.SUPPRESS), so the parsed namespace holds exactly the
    flags on the command line: :func:`config_from_args` fills in the rest and reports which
    were explicit, without a second parser.
    """
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="a TOML file of settings (sections [data] [model] [loss] [optim] [speed] [run]) or "
        "a run's config.json; flags given override it",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as TOML and exit",
    )
    for name, sub_cls in _sections():
        group = parser.add_argument_group(name)
        hints = typing.get_type_hints(sub_cls)
        for f in dataclasses.fields(sub_cls):
            tp, nullable = _base_type(hints[f.name])
            help_text = f"{f.metadata['help']} (default: {f.default})"
            kw: dict[str, Any] = {"dest": f"{name}.{f.name}", "help": help_text}
            kw["default"] = argparse.SUPPRESS
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            else:
                kw.update(type=_converter(tp, nullable, _flag(f.name)), metavar=f.name.upper())
            if f.metadata.get("const") is not None:
                kw.update(nargs="?", const=f.metadata["const"])
            group.add_argument(_flag(f.name), **kw)


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """Build (and so validate) a TrainConfig from parsed flags over ``--config FILE`` over the
    recipe (fasthpa.recipes); also return the fields set explicitly (by the file or a flag) as
    ``{"section.field", ...}``."""
    from fasthpa.configfile import read_config_file

    flags: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            flags.setdefault(section, {})[name] = value
    path = getattr(args, "config", None)
    file = read_config_file(path, dict(_sections())) if path else {}
    if file:
        try:  # the file's own values, checked before flags can hide them: errors name it
            _with_recipe(file)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    given = merge(file, flags)
    explicit = {f"{s}.{n}" for s, fields in given.items() for n in fields}
    return _with_recipe(given), explicit


def _with_recipe(given: dict[str, dict[str, Any]]) -> TrainConfig:
    """The config of the values ``given`` over their recipe's (the default one if unnamed)."""
    recipe = given.get("run", {}).get("recipe", DEFAULT_RECIPE)
    if recipe not in RECIPES:
        raise UserError(f"--recipe {recipe!r}: must be one of {', '.join(RECIPES)}.")
    return TrainConfig.from_dict(merge(recipe_values(recipe), given, {"run": {"recipe": recipe}}))


def print_config(cfg: TrainConfig) -> None:
    """The resolved config as TOML on stdout (``--print-config``)."""
    from fasthpa.configfile import to_toml

    print(to_toml(cfg.to_dict()), end="")


def save_config(path: str | Path, cfg: TrainConfig) -> None:
    from fasthpa.io import atomic_write_json

    atomic_write_json(path, cfg.to_dict())


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the run's config ({e}).") from None
