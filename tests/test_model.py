"""build_model: ImageNet transfer from torchvision's cache, the RGBY stem, heads, freezing, archs.

Every checkpoint is made here from a randomly initialised torchvision model (no network). The
references are torchvision itself (its own loader and modules) and plain float64 re-computations.
"""

from __future__ import annotations

import hashlib
import math
import urllib.error

import pytest
import torch
import torch.hub
import torchvision
from torch import nn

from fasthpa.errors import UserError
from fasthpa.model import (
    ARCHS,
    HEAD_PRIOR,
    build_model,
    load_torchvision_state_dict,
    set_frozen_bn_eval,
)

STEMS = {"resnet18": "conv1", "resnet34": "conv1", "resnet50": "conv1"}
STEMS["densenet121"] = "features.conv0"
HEAD_PREFIX = {
    "resnet18": "fc.",
    "resnet34": "fc.",
    "resnet50": "fc.",
    "densenet121": "classifier.",
}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A fresh, empty TORCH_HOME; any attempt to reach the network fails the test."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case anything called set_dir

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to use the network")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    return home


def torchvision_file_name(arch: str) -> str:
    """The cache file name torchvision itself expects for arch's default ImageNet weights."""
    return torchvision.models.get_model_weights(arch).DEFAULT.url.rsplit("/", 1)[-1]


def make_checkpoint(arch: str, path, seed: int = 0, keep_num_batches_tracked: bool = True):
    """Save a random torchvision `arch` state_dict at `path` (torchvision's format); return it.

    BatchNorm weights, biases and running statistics are randomised too, so a layer that was
    not transferred cannot match by keeping its default values.
    """
    torch.manual_seed(seed)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            value.fill_(1234)
        elif value.ndim == 1:
            value.copy_(torch.rand(value.shape, generator=g) + 0.5)
    if not keep_num_batches_tracked:  # torchvision's published files predate this buffer
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return {k: v.clone() for k, v in state.items()}


def cached_checkpoint(torch_home, arch: str = "resnet18", **kwargs):
    path = torch_home / "hub" / "checkpoints" / torchvision_file_name(arch)
    return path, make_checkpoint(arch, path, **kwargs)


def body_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's backbone tensors under torchvision's key names."""
    return {k[len("body.") :]: v for k, v in model.state_dict().items() if k.startswith("body.")}


def test_imagenet_from_cache_loads_every_layer_unchanged(torch_home):
    path, ckpt = cached_checkpoint(torch_home, "resnet18")
    # torchvision's own loader finds the very same file offline: our file name and folder are its
    tv_state = torchvision.models.ResNet18_Weights.DEFAULT.get_state_dict(progress=False)
    assert tv_state.keys() == ckpt.keys()

    torch.manual_seed(0)
    model, info = build_model("resnet18", pretrained="imagenet")
    got = body_state(model)
    transferred = {k: v for k, v in ckpt.items() if not k.startswith("fc.")}
    assert set(got) == set(transferred)
    for key, value in transferred.items():
        if key == "conv1.weight":
            assert got[key].shape == (64, 4, 7, 7)
            assert torch.equal(got[key][:, :3], value), "RGB stem filters must arrive exactly"
        else:
            assert torch.equal(got[key], value), key
    assert info["pretrained"] == "imagenet"
    assert info["weights_file"] == str(path)
    assert info["torchvision_weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert info["transferred"] == len(transferred)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["torchvision_hash"] == path.name.split("-")[1].split(".")[0]
    assert info["sha256_matches_name"] is False  # random weights under the real name
    assert info["yellow_init"] == "xavier"
    assert model(torch.randn(2, 4, 64, 64)).shape == (2, 28)


def test_old_style_checkpoint_without_num_batches_tracked_loads(torch_home):
    _, ckpt = cached_checkpoint(torch_home, "resnet18", keep_num_batches_tracked=False)
    model, info = build_model("resnet18", in_channels=3, pretrained="imagenet")
    got = body_state(model)
    assert info["transferred"] == len([k for k in ckpt if not k.startswith("fc.")])
    for key, value in ckpt.items():
        if not key.startswith("fc."):
            assert torch.equal(got[key], value), key


@pytest.mark.parametrize("yellow_init", ["xavier", "mean", "red"])
def test_yellow_init_modes(torch_home, yellow_init):
    _, ckpt = cached_checkpoint(torch_home, "resnet18")
    rgb = ckpt["conv1.weight"]
    torch.manual_seed(1)
    model, info = build_model("resnet18", pretrained="imagenet", yellow_init=yellow_init)
    stem = model.body.conv1.weight.detach()
    yellow = stem[:, 3:]
    assert torch.equal(stem[:, :3], rgb)
    assert info["yellow_init"] == yellow_init
    if yellow_init == "mean":
        reference = rgb.double().mean(dim=1, keepdim=True)
        torch.testing.assert_close(yellow.double(), reference, rtol=0, atol=1e-6)
    elif yellow_init == "red":
        assert torch.equal(yellow, rgb[:, :1])
    else:
        # xavier-uniform over a 1-input bank of 64 7x7 filters: U(-b, b), b = sqrt(6/(fan_in+fan_out))
        bound = math.sqrt(6.0 / (1 * 49 + 64 * 49))
        assert yellow.abs().max() <= bound
        assert abs(yellow.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
        for c in range(3):
            assert not torch.allclose(yellow, rgb[:, c : c + 1])
        torch.manual_seed(1)  # the global seed makes it reproducible (and equal across ranks)
        again, _ = build_model("resnet18", pretrained="imagenet", yellow_init=yellow_init)
        assert torch.equal(again.body.conv1.weight, model.body.conv1.weight)


def test_missing_imagenet_file_names_the_file_and_the_ways_out(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    expected = torch_home / "hub" / "checkpoints" / torchvision_file_name("resnet34")
    with pytest.raises(UserError) as err:
        build_model("resnet34", pretrained="imagenet")
    message = str(err.value)
    assert str(expected) in message
    assert "fasthpa weights fetch --arch resnet34" in message
    assert "--pretrained PATH" in message
    assert "\n" not in message and message.endswith(".")
    # the failed download left nothing behind, not even a .partial file
    assert not expected.parent.exists() or list(expected.parent.iterdir()) == []


def test_pretrained_path_loads_that_file(tmp_path, torch_home):
    path = tmp_path / "elsewhere" / "my-resnet18.pth"
    ckpt = make_checkpoint("resnet18", path, seed=3)
    model, info = build_model("resnet18", in_channels=3, pretrained=str(path))
    assert info["pretrained"] == str(path.resolve())
    assert info["weights_file"] == str(path.resolve())
    assert info["torchvision_weights"] is None
    got = body_state(model)
    for key, value in ckpt.items():
        if not key.startswith("fc."):
            assert torch.equal(got[key], value), key


def test_rgb_model_keeps_the_stem_exactly(torch_home):
    _, ckpt = cached_checkpoint(torch_home, "resnet18")
    model, info = build_model("resnet18", in_channels=3, pretrained="imagenet")
    assert model.body.conv1.weight.shape == (64, 3, 7, 7)
    assert torch.equal(model.body.conv1.weight, ckpt["conv1.weight"])
    assert info["channels"] == ["red", "green", "blue"] and info["yellow_init"] is None
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 28)


@pytest.mark.parametrize("spec", [None, "none", "None"])
def test_no_pretrained_weights(torch_home, spec):
    torch.manual_seed(0)
    model, info = build_model("resnet18", pretrained=spec)
    assert info["pretrained"] == "none" and info["weights_file"] is None
    assert info["transferred"] == 0 and info["yellow_init"] is None
    w = model.body.conv1.weight.detach()
    # torchvision's stem rule on all four inputs: kaiming normal, fan_out = 64 * 7 * 7
    assert w.shape == (64, 4, 7, 7)
    expected_std = math.sqrt(2.0 / (64 * 49))
    assert abs(w.std().item() - expected_std) < 0.1 * expected_std
    assert abs(w[:, 3].std().item() - expected_std) < 0.15 * expected_std


def _bad_pickle(path):
    path.write_bytes(b"this is not a checkpoint")


def _truncated(path):
    make_checkpoint("resnet18", path)
    path.write_bytes(path.read_bytes()[:5000])


def _not_a_state_dict(path):
    torch.save([torch.zeros(3)], path)


def _non_tensor_values(path):
    torch.save({"conv1.weight": 1.0}, path)


def _other_arch(path):
    make_checkpoint("resnet34", path)


def _wrong_shape(path):
    state = make_checkpoint("resnet18", path)
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(state, path)


def _missing_key(path):
    state = make_checkpoint("resnet18", path)
    del state["layer3.1.bn2.running_var"]
    torch.save(state, path)


@pytest.mark.parametrize(
    "write, words",
    [
        (_bad_pickle, ["torch.load(weights_only=True)"]),
        (_truncated, ["torch.load(weights_only=True)"]),
        (_not_a_state_dict, ["holds a list"]),
        (_non_tensor_values, ["not a state_dict"]),
        (_other_arch, ["unexpected key 'layer1.2.conv1.weight'"]),
        (_wrong_shape, ["'layer2.0.conv1.weight'", "(128, 64, 5, 5)", "(128, 64, 3, 3)"]),
        (_missing_key, ["'layer3.1.bn2.running_var' is missing"]),
    ],
)
def test_bad_checkpoint_file_is_a_user_error_naming_file_and_key(tmp_path, write, words):
    path = tmp_path / "bad.pth"
    write(path)
    with pytest.raises(UserError) as err:
        build_model("resnet18", pretrained=str(path))
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message
    assert "\n" not in message


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.pth is not a file"):
        build_model("resnet18", pretrained=str(tmp_path / "nope.pth"))


def test_densenet_legacy_keys_are_renamed_like_torchvision(tmp_path):
    path = tmp_path / "densenet121-legacy.pth"
    # torchvision's published DenseNet files spell 'norm1' as 'norm.1' (conv likewise) and
    # predate num_batches_tracked
    ckpt = make_checkpoint("densenet121", path, keep_num_batches_tracked=False)
    legacy = {}
    for key, value in ckpt.items():
        for part in ("norm1", "norm2", "conv1", "conv2"):
            key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        legacy[key] = value
    assert legacy.keys() != ckpt.keys()
    torch.save(legacy, path)
    state = load_torchvision_state_dict(path, "densenet121")
    assert state.keys() == {k for k in ckpt if not k.startswith("classifier.")}
    model, info = build_model("densenet121", in_channels=3, pretrained=str(path))
    got = body_state(model)
    for key, value in state.items():
        assert torch.equal(got[key], value), key
    assert info["transferred"] == len(state)


@pytest.mark.parametrize("head", ["avgpool", "maxavg"])
def test_head_matches_a_float64_reference(head):
    torch.manual_seed(0)
    model, info = build_model("resnet18", head=head, dropout=0.25)
    model = model.double().eval()
    x = torch.randn(2, 4, 64, 64, dtype=torch.float64)
    logits = model(x)
    assert logits.shape == (2, 28)
    features = model.body(x)
    pooled = features.mean(dim=(2, 3))
    if head == "maxavg":
        pooled = torch.cat([pooled, features.amax(dim=(2, 3))], dim=1)
    assert info["num_features"] == pooled.shape[1] == {"avgpool": 512, "maxavg": 1024}[head]
    reference = pooled @ model.fc.weight.T + model.fc.bias
    torch.testing.assert_close(logits, reference, rtol=1e-12, atol=1e-12)
    assert model.dropout.p == 0.25


def test_head_bias_starts_at_the_prior_log_odds():
    model, info = build_model("resnet18", num_classes=5)
    assert model.fc.out_features == 5
    probabilities = torch.sigmoid(model.fc.bias.double())
    torch.testing.assert_close(probabilities, torch.full((5,), HEAD_PRIOR, dtype=torch.float64))
    assert info["head_bias_prior"] == HEAD_PRIOR


def test_freeze_backbone_trains_only_the_head_and_keeps_bn_statistics(torch_home):
    cached_checkpoint(torch_home, "resnet18")
    model, info = build_model("resnet18", pretrained="imagenet", freeze_backbone=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert info["params_trainable"] == 512 * 28 + 28
    model.train()
    bns = [m for m in model.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and not any(bn.training for bn in bns)
    assert model.training and model.fc.training
    before = {k: v.clone() for k, v in body_state(model).items()}
    model(torch.randn(4, 4, 32, 32)).sum().backward()
    after = body_state(model)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed in a frozen backbone"
    assert all(p.grad is None for p in model.body.parameters())
    assert model.fc.weight.grad is not None


def test_set_frozen_bn_eval_touches_only_frozen_batchnorms():
    model, _ = build_model("resnet18")
    model.train()
    assert set_frozen_bn_eval(model) == 0
    model.body.layer4.requires_grad_(False)
    assert set_frozen_bn_eval(model) == 5  # layer4: 2 blocks x 2 BN + the downsample BN
    assert all(not m.training for m in model.body.layer4.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.body.bn1.training and model.body.layer3[0].bn1.training


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_and_runs_forward(torch_home, arch):
    size = 64 if arch in ("resnet18", "resnet34") else 32  # resnet50/densenet121 are slow on CPU
    cached_checkpoint(torch_home, arch)
    model, info = build_model(arch, pretrained="imagenet", head="maxavg")
    stem = model.body.get_submodule(STEMS[arch])
    assert stem.in_channels == 4
    assert info["transferred"] > 0
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 4, size, size))
    assert out.shape == (2, 28) and torch.isfinite(out).all()


def test_channels_last_forward_equals_contiguous_forward():
    torch.manual_seed(0)
    model, _ = build_model("resnet18", head="maxavg")
    model.eval()
    x = torch.randn(2, 4, 64, 64)
    reference = build_model("resnet18", head="maxavg")[0]
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = reference.double().eval()(x.double())
        contiguous = model(x)
        model = model.to(memory_format=torch.channels_last)
        assert model.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        channels_last = model(x.contiguous(memory_format=torch.channels_last))
    # float32 against the float64 reference: the layouts take different conv kernels
    torch.testing.assert_close(contiguous.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(channels_last.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiles_with_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    eager, _ = build_model("resnet18", head="maxavg")
    twin, _ = build_model("resnet18", head="maxavg")
    twin.load_state_dict(eager.state_dict())
    eager = eager.to(memory_format=torch.channels_last).train()
    twin = twin.to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 4, 32, 32).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(4, 28)
    # fullgraph=True fails on any graph break (data-dependent Python control flow); aot_eager
    # traces forward and backward like inductor does, without its slow CPU code generation
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    out_eager, out_compiled = eager(x), compiled(x)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
    (out_eager * upstream).sum().backward()
    (out_compiled * upstream).sum().backward()
    for name in ("body.conv1.weight", "body.layer4.1.bn2.weight", "fc.weight", "fc.bias"):
        grad_eager = eager.get_parameter(name).grad
        grad_compiled = twin.get_parameter(name).grad
        torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(twin.body.bn1.running_mean, eager.body.bn1.running_mean)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"arch": "vgg16"}, "--arch"),
        ({"in_channels": 5}, "--in-channels"),
        ({"yellow_init": "zeros"}, "--yellow-init"),
        ({"head": "attention"}, "--head"),
        ({"dropout": 1.0}, "--dropout"),
    ],
)
def test_bad_arguments_name_the_flag(kwargs, flag):
    with pytest.raises(UserError, match=flag):
        build_model(**kwargs)
