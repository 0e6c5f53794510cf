"""The network: a torchvision backbone with an RGBY stem and a multi-label classifier head.

    model, info = build_model("resnet18", pretrained="imagenet", yellow_init="xavier")
    atomic_write_json(run_dir / "model.json", info)   # which weights were used, checksums
    logits = model(x)   # x: N x in_channels x H x W, channels in fasthpa.labels.CHANNELS order

Input channels are (red, green, blue, yellow) for ``in_channels=4`` and (red, green, blue) for 3,
normalised with the training split's per-channel statistics (never ImageNet's mean/std: the
fluorescence images are mostly black). Any input size works (adaptive pooling before the head).
The output is N x num_classes logits; apply a sigmoid for per-label probabilities.

Pretrained weights (``pretrained="imagenet"`` or a file path) are a plain torchvision state_dict,
read with ``torch.load(weights_only=True)`` and checked key by key against the architecture; every
layer arrives unchanged except the classifier (replaced) and, for 4 channels, the first
convolution, whose RGB filters are copied exactly and whose yellow filter starts as
``yellow_init`` says. Under DDP (an initialised process group) ``build_model`` is collective:
rank 0 resolves (and downloads) the file and every rank loads that same file.

The model has no data-dependent Python control flow: it runs under ``channels_last`` and
``torch.compile(fullgraph=True)``. Save ``model.state_dict()`` of this module (not of a compiled
or DDP wrapper) so that the keys stay plain.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fasthpa.errors import UserError
from fasthpa.labels import CHANNELS, NUM_LABELS
from fasthpa.location import DIM as LOCATION_DIM
from fasthpa.location import LocationFeatures
from fasthpa.weights import (
    ARCHS,
    check_arch,
    default_pretrained,
    hash_in_name,
    imagenet_checkpoint,
    pretrained_kind,
    resolve_pretrained,
    resolve_pretrained_distributed,
    sha256_file,
)

__all__ = [
    "ARCHS",
    "HEAD_PRIOR",
    "HEADS",
    "YELLOW_INITS",
    "add_location_for",
    "AdaptiveConcatPool2d",
    "HPANet",
    "LOCATION_KEY",
    "Pretrained",
    "build_model",
    "default_pretrained",
    "load_pretrained",
    "load_torchvision_state_dict",
    "resolve_pretrained",
    "resolve_pretrained_distributed",
    "set_frozen_bn_eval",
]

YELLOW_INITS: tuple[str, ...] = ("xavier", "mean", "red")
HEADS: tuple[str, ...] = ("avgpool", "maxavg")

# The classifier's bias starts at the log-odds of this prior, so every label starts near
# p = 0.05 (the mean label prevalence in train.csv is 50,782 / (31,072 * 28) = 0.058) instead of
# p = 0.5. With 28 mostly rare labels a 0.5 start makes the first steps spend their (large)
# gradient on learning the biases, and that gradient flows into the pretrained backbone; this is
# also the focal-loss paper's prior initialisation. The weights keep nn.Linear's default init.
HEAD_PRIOR = 0.05

LOCATION_KEY = "location.mean"
"""in a model state: the model reads the location features (HPANet.add_location)"""


def add_location_for(model: HPANet, state: dict[str, Any]) -> HPANet:
    """``model`` made to fit ``state``: with the location features when the state has them
    (their normalisation arrives with the state's buffers)."""
    if LOCATION_KEY in state and model.location is None:
        channels = state[LOCATION_KEY].numel()
        model.add_location((0.0,) * channels, (1.0,) * channels)
    return model


@dataclass(frozen=True)
class _ArchSpec:
    stem: str  # dotted name of the first convolution in the torchvision model
    head: str  # name of the torchvision classifier, dropped and replaced
    num_features: int  # channels of the last feature map
    body: tuple[str, ...]  # torchvision children that make the feature extractor, in order
    # torchvision's init rule for the stem, re-applied to a widened stem when there are no weights
    init_stem: Callable[[torch.Tensor], Any]


def _resnet_stem_init(w: torch.Tensor) -> Any:
    return nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")


_RESNET_BODY = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_ARCH_SPECS: dict[str, _ArchSpec] = {
    "resnet18": _ArchSpec("conv1", "fc", 512, _RESNET_BODY, _resnet_stem_init),
    "resnet34": _ArchSpec("conv1", "fc", 512, _RESNET_BODY, _resnet_stem_init),
    "resnet50": _ArchSpec("conv1", "fc", 2048, _RESNET_BODY, _resnet_stem_init),
    "densenet121": _ArchSpec(
        "features.conv0", "classifier", 1024, ("features",), nn.init.kaiming_normal_
    ),
}
assert tuple(_ARCH_SPECS) == ARCHS


class AdaptiveConcatPool2d(nn.Module):
    """Adaptive average and max pooling to 1x1, concatenated: N x C x H x W -> N x 2C x 1 x 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [nn.functional.adaptive_avg_pool2d(x, 1), nn.functional.adaptive_max_pool2d(x, 1)],
            dim=1,
        )


class HPANet(nn.Module):
    """``body`` (feature map) -> ``pool`` -> flatten -> ``dropout`` -> ``fc`` (logits).

    ``body`` holds the torchvision modules under their torchvision names, so its state_dict keys
    are the torchvision keys (``body.layer1.0.conv1.weight``). With ``frozen_backbone`` the body's
    BatchNorm layers stay in eval mode through ``train()``, so frozen layers keep ImageNet's
    running statistics.
    """

    def __init__(
        self,
        body: nn.Module,
        num_features: int,
        num_classes: int,
        head: str = "avgpool",
        dropout: float = 0.0,
        frozen_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.body = body
        self.pool = AdaptiveConcatPool2d() if head == "maxavg" else nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features * (2 if head == "maxavg" else 1), num_classes)
        self.frozen_backbone = frozen_backbone
        self.location: LocationFeatures | None = None

    def features(self, x: torch.Tensor, location: torch.Tensor | None = None) -> torch.Tensor:
        """[N, fc.in_features]: the pooled features the classifier reads, and after
        :meth:`add_location` the classical location features of ``x`` after them (``location``:
        those features already computed, by a net with the same statistics; StackedNet)."""
        pooled = self.pool(self.body(x)).flatten(1)
        if self.location is None:
            return pooled
        return torch.cat([pooled.float(), self.location(x) if location is None else location], 1)

    def add_location(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Read fasthpa.location's features (of images normalised with ``mean``/``std``) beside
        the pooled ones: ``fc`` gains their DIM inputs with zero weights, so the outputs stay
        the same until the classifier is refitted (fasthpa.train.refit)."""
        device = self.fc.weight.device
        old = self.fc
        self.location = LocationFeatures(mean, std).to(device)
        self.fc = nn.Linear(old.in_features + LOCATION_DIM, old.out_features).to(device)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[:, : old.in_features].copy_(old.weight)
            self.fc.bias.copy_(old.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))

    def train(self, mode: bool = True) -> HPANet:
        super().train(mode)
        if mode and self.frozen_backbone:
            set_frozen_bn_eval(self)
        return self


class StackedNet(nn.Module):
    """Several HPANets read side by side, one Linear on their concatenated pooled features
    (a cross-validation's stack, fasthpa.cv.stack)."""

    def __init__(self, nets: list[HPANet], weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        width = sum(n.fc.in_features for n in nets)
        if weight.shape[1] != width:
            raise ValueError(f"the stack reads {weight.shape[1]} features, the nets give {width}")
        self.fc = nn.Linear(width, weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)
        self.fc.to(next(nets[0].parameters()).device)
        self.location_from = [_same_location(nets, k) for k in range(len(nets))]
        """for each net, the first net whose location features it shares (None: it reads none)"""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, sum of the nets' fc.in_features]: each net's pooled features, in order; the
        location features, a fixed function of the pixels, computed once for nets that
        normalise alike (a cv's folds: one set of channel statistics)."""
        out, shared = [], {}
        for net, k in zip(self.nets, self.location_from, strict=True):
            if k is not None and k not in shared:
                shared[k] = net.location(x)
            out.append(net.features(x, shared.get(k)))
        return torch.cat(out, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).to(self.fc.weight.dtype))


def _same_location(nets: list[HPANet], k: int) -> int | None:
    """The first of ``nets`` whose location features equal net k's (the same normalisation
    statistics), or None when net k reads none."""
    mine = nets[k].location
    if mine is None:
        return None
    stats = (mine.mean.cpu(), mine.std.cpu())
    for j, net in enumerate(nets[:k]):
        other = net.location
        if other is not None and all(map(torch.equal, (other.mean.cpu(), other.std.cpu()), stats)):
            return j
    return k


def set_frozen_bn_eval(model: nn.Module) -> int:
    """Put every BatchNorm layer whose parameters are all frozen into eval mode; return how many.

    Call after ``model.train()`` on any model (HPANet does it itself in ``train()``): a frozen
    layer should normalise with its pretrained running statistics rather than re-estimate them
    from small fluorescence batches. Works through DDP and torch.compile wrappers.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
                count += 1
    return count


@dataclass
class Pretrained:
    """Pretrained weights read once (on rank 0 in a DDP job) and handed to :func:`build_model`
    on every rank, so only one node needs the file: ``state`` is the torchvision state_dict
    without its classifier, ``info`` says which file it came from (for env.json)."""

    state: dict[str, torch.Tensor]
    info: dict[str, Any]


def load_pretrained(spec: str | None, arch: str, path: Path | None = None) -> Pretrained | None:
    """Resolve ``--pretrained`` (imagenet, none, a PATH; see fasthpa.weights) and read the file
    into a :class:`Pretrained`; None for ``none``. Not collective: call it on one rank.
    ``path``: the file already resolved for ``spec``."""
    check_arch(arch)
    path = resolve_pretrained(spec, arch) if path is None else Path(path)
    if path is None:
        return None
    kind = pretrained_kind(spec)
    tv_model = _torchvision_model(arch)
    info = {
        "pretrained": "imagenet" if kind == "imagenet" else str(path),
        "weights_file": str(path),
        "torchvision_weights": imagenet_checkpoint(arch).weights if kind == "imagenet" else None,
        "sha256": sha256_file(path),
        "torchvision_hash": hash_in_name(path.name),
        "sha256_matches_name": None,
    }
    if info["torchvision_hash"]:
        info["sha256_matches_name"] = info["sha256"].startswith(info["torchvision_hash"])
    return Pretrained(load_torchvision_state_dict(path, arch, tv_model), info)


def _torchvision_model(arch: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, arch)(weights=None)


def _check_build_args(arch, in_channels, yellow_init, head, dropout, num_classes) -> None:
    check_arch(arch)
    if in_channels not in (3, 4):
        raise UserError(f"--in-channels must be 3 (RGB) or 4 (RGBY), got {in_channels}.")
    if yellow_init not in YELLOW_INITS:
        raise UserError(
            f"--yellow-init must be one of {', '.join(YELLOW_INITS)}, got {yellow_init!r}."
        )
    if head not in HEADS:
        raise UserError(f"--head must be one of {', '.join(HEADS)}, got {head!r}.")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {dropout}.")
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}.")


def build_model(
    arch: str = "resnet18",
    num_classes: int = NUM_LABELS,
    in_channels: int = 4,
    pretrained: str | Pretrained | None = None,
    yellow_init: str = "xavier",
    head: str = "avgpool",
    freeze_backbone: bool = False,
    dropout: float = 0.0,
) -> tuple[nn.Module, dict]:
    """Build the classifier; return ``(model, info)`` with ``info`` ready for the run folder.

    arch: resnet18 | resnet34 | resnet50 | densenet121 (torchvision, built with weights=None).
    in_channels: 4 (RGBY) or 3 (RGB).
    pretrained: None/"none" (random init), "imagenet" (torchvision's cached checkpoint, downloaded
        if missing; see ``fasthpa weights``), the path of a torchvision state_dict file, or a
        :class:`Pretrained` read elsewhere (by rank 0, say).
    yellow_init: how the yellow input's stem filters start when pretrained RGB filters are
        transferred: "xavier" (xavier-uniform, as the reference report), "mean" (mean of the RGB
        filters) or "red" (a copy of the red filter). Without pretrained weights the whole
        4-channel stem gets the architecture's own random init and this is not used.
    head: "avgpool" (adaptive average pool) or "maxavg" (average and max pool concatenated).
    freeze_backbone: only the head (``fc``) trains; the body's BatchNorms stay in eval mode.
    dropout: dropout probability before the final Linear.

    Random draws (head, xavier yellow filter, random init) use torch's global RNG: seed it first.
    With a string ``pretrained`` under an initialised process group this is collective (see
    resolve_pretrained_distributed). Raises UserError for bad arguments and for a checkpoint
    that is missing, unreadable or does not fit ``arch``.
    """
    _check_build_args(arch, in_channels, yellow_init, head, dropout, num_classes)
    if not isinstance(pretrained, Pretrained):
        path = resolve_pretrained_distributed(pretrained, arch)
        pretrained = None if path is None else load_pretrained(pretrained, arch, path)
    spec = _ARCH_SPECS[arch]
    tv_model = _torchvision_model(arch)
    info: dict[str, Any] = {
        "arch": arch,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "channels": list(CHANNELS[:in_channels]),
        **_weights_info(pretrained),
        "transferred": 0,
    }
    if pretrained is not None:
        result = tv_model.load_state_dict(pretrained.state, strict=False)
        # load_torchvision_state_dict already named any real mismatch; this guards that check
        assert not result.unexpected_keys, result.unexpected_keys
        assert all(
            _is_head_key(k, spec) or k.endswith("num_batches_tracked") for k in result.missing_keys
        )
        info["transferred"] = len(pretrained.state)
    if in_channels == 4:
        _replace_stem(tv_model, spec, yellow_init if pretrained is not None else None)
    info["yellow_init"] = yellow_init if (pretrained is not None and in_channels == 4) else None
    model = _assemble(tv_model, spec, arch, num_classes, head, dropout, freeze_backbone)
    info.update(
        head=head,
        head_bias_prior=HEAD_PRIOR,
        dropout=dropout,
        freeze_backbone=freeze_backbone,
        num_features=model.fc.in_features,
        params_total=sum(p.numel() for p in model.parameters()),
        params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    return model, info


def _weights_info(pretrained: Pretrained | None) -> dict[str, Any]:
    if pretrained is not None:
        return dict(pretrained.info)
    keys = ("weights_file", "torchvision_weights", "sha256", "torchvision_hash")
    return {"pretrained": "none", **dict.fromkeys(keys), "sha256_matches_name": None}


def _replace_stem(tv_model: nn.Module, spec: _ArchSpec, yellow_init: str | None) -> None:
    stem = tv_model.get_submodule(spec.stem)
    widened = _widen_stem(stem, yellow_init, spec.init_stem)
    parent_name, _, child_name = spec.stem.rpartition(".")
    setattr(tv_model.get_submodule(parent_name) if parent_name else tv_model, child_name, widened)


def _assemble(tv_model, spec, arch, num_classes, head, dropout, freeze_backbone) -> HPANet:
    body_modules = OrderedDict((name, getattr(tv_model, name)) for name in spec.body)
    if arch.startswith("densenet"):
        # torchvision's DenseNet.forward applies this ReLU after `features`, in the functional API
        body_modules["relu"] = nn.ReLU(inplace=True)
    model = HPANet(
        nn.Sequential(body_modules), spec.num_features, num_classes, head, dropout, freeze_backbone
    )
    with torch.no_grad():
        model.fc.bias.fill_(-math.log((1.0 - HEAD_PRIOR) / HEAD_PRIOR))
    if freeze_backbone:
        model.body.requires_grad_(False)
        set_frozen_bn_eval(model)
    return model


def load_torchvision_state_dict(
    path: str | Path, arch: str, reference: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Read a torchvision ``arch`` state_dict file, check it, and return it without the classifier.

    ``reference`` is a torchvision ``arch`` model to check keys and shapes against (built if
    None). DenseNet files in torchvision's legacy key format (``norm.1``) are renamed as
    torchvision does. ``num_batches_tracked`` may be absent (older checkpoints). Raises UserError
    naming the file and the first mismatching key.
    """
    check_arch(arch)
    spec = _ARCH_SPECS[arch]
    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean: not a state_dict file
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--pretrained: {path} is not a checkpoint torch.load(weights_only=True) can read "
            f"({first}); expected a torchvision {arch} state_dict saved with torch.save."
        ) from None
    if (
        not isinstance(loaded, dict)
        or not loaded
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        raise UserError(
            f"--pretrained: {path} holds a {type(loaded).__name__}, not a state_dict (a non-empty "
            f"mapping of names to tensors) of a torchvision {arch}."
        )
    state = _rename_legacy_densenet_keys(loaded) if arch.startswith("densenet") else dict(loaded)
    if reference is None:
        import torchvision

        reference = getattr(torchvision.models, arch)(weights=None)
    expected = {k: v for k, v in reference.state_dict().items() if not _is_head_key(k, spec)}

    def mismatch(what: str) -> UserError:
        return UserError(f"--pretrained: {path} does not fit --arch {arch}: {what}.")

    for key, tensor in state.items():
        if _is_head_key(key, spec):
            continue  # the classifier is replaced, whatever its size
        if key not in expected:
            raise mismatch(f"unexpected key {key!r}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise mismatch(
                f"key {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    for key in expected:
        if key not in state and not key.endswith("num_batches_tracked"):
            raise mismatch(f"key {key!r} is missing")
    return {k: v for k, v in state.items() if not _is_head_key(k, spec)}


def _is_head_key(key: str, spec: _ArchSpec) -> bool:
    return key.startswith(spec.head + ".")


def _rename_legacy_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # torchvision's published DenseNet files predate a rename ('norm.1' -> 'norm1'); this is the
    # rule torchvision.models.densenet._load_state_dict applies to them.
    import re

    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    renamed = {}
    for key, value in state.items():
        match = pattern.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def _widen_stem(
    conv: nn.Conv2d, yellow_init: str | None, init_stem: Callable[[torch.Tensor], Any]
) -> nn.Conv2d:
    """A copy of the 3-input ``conv`` with a 4th (yellow) input.

    With ``yellow_init`` (pretrained RGB filters): RGB filters copied exactly, the yellow filter
    set as named. With None (random weights): all four filters re-drawn by ``init_stem``.
    """
    assert conv.in_channels == 3 and conv.groups == 1, conv
    widened = nn.Conv2d(
        4,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        if yellow_init is None:
            init_stem(widened.weight)
            if conv.bias is not None:
                widened.bias.zero_()
            return widened
        rgb = conv.weight
        widened.weight[:, :3].copy_(rgb)
        if yellow_init == "xavier":
            # fans of a 1-input filter bank, as the reference's xavier init of the new channel
            widened.weight[:, 3:].copy_(nn.init.xavier_uniform_(torch.empty_like(rgb[:, :1])))
        elif yellow_init == "mean":
            widened.weight[:, 3:].copy_(rgb.mean(dim=1, keepdim=True))
        else:  # "red"
            widened.weight[:, 3:].copy_(rgb[:, :1])
        if conv.bias is not None:
            widened.bias.copy_(conv.bias)
    return widened
