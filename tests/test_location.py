"""The classical location features (fasthpa.location) against a plain per-image NumPy/SciPy
reference of the same definitions, and their place in the model, the refit and predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from fasthpa.data.synth import render_sample
from fasthpa.location import (
    DIM,
    PEAK_LEVELS,
    REFERENCE_SIZE,
    SCALES,
    LocationFeatures,
    _blur,
)
from fasthpa.model import LOCATION_KEY, add_location_for, build_model


def _gauss(img: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(img, sigma, mode="mirror")


def _q(a: np.ndarray, q: float) -> float:
    return float(np.quantile(a[::2, ::2], q))


def reference(img: np.ndarray) -> np.ndarray:
    """The features of one float64 [4, H, W] image on a 0-1 scale, pixel by pixel as the
    module's docstring defines them."""
    red, green, blue, yellow = img
    f = min(img.shape[1:]) / REFERENCE_SIZE
    b, c = _gauss(blue, 1.5 * f), _gauss(red + yellow + green, 2.0 * f)
    nucleus = b > 0.35 * max(_q(b, 0.99), 1e-3)
    cell = (c > 0.25 * max(_q(c, 0.99), 1e-3)) | nucleus
    cyto = cell & ~nucleus
    near = (_gauss(nucleus.astype(float), 3.0 * f) > 0.1) & cyto
    regions = [nucleus, cyto, near, cyto & ~near]
    g = green / max(_q(green, 0.99), 1e-3)

    def mean_in(v, m):
        return v[m].sum() / max(m.sum(), 1)

    out = [cell.mean(), mean_in(nucleus.astype(float), cell)]
    mass = max((g * cell).sum(), 1e-3)
    out += [(g * m).sum() / mass for m in regions] + [mean_in(g, m) for m in regions]
    out += [_q(g * cell, q) for q in (0.5, 0.8, 0.95, 0.99)]
    for other in (red, blue, yellow):
        a = (g - mean_in(g, cell)) * cell
        o = (other - mean_in(other, cell)) * cell
        out.append((a * o).sum() / max(np.sqrt((a * a).sum() * (o * o).sum()), 1e-6))
    means, quants, counts = [], [], []
    for s in (s * f for s in SCALES):
        gs = _gauss(g, s)
        p = np.pad(gs, 1, mode="edge")
        xx = p[1:-1, 2:] + p[1:-1, :-2] - 2 * gs
        yy = p[2:, 1:-1] + p[:-2, 1:-1] - 2 * gs
        xy = (p[2:, 2:] + p[:-2, :-2] - p[2:, :-2] - p[:-2, 2:]) / 4
        eig = np.linalg.eigvalsh(np.stack([np.stack([xx, xy], -1), np.stack([xy, yy], -1)], -1))
        low, high = eig[..., 0], eig[..., 1]
        log = -(xx + yy) * s * s
        ridge = (np.maximum(-low, 0) - np.maximum(-high, 0)) * s * s
        blob = np.sqrt(np.maximum(xx * yy - xy * xy, 0) * (xx + yy < 0)) * s * s
        dark = np.maximum(-log, 0)
        for resp in (log, ridge, blob, dark):
            means += [mean_in(resp, m) for m in regions]
            quants += [_q(resp * cell, 0.9), _q(resp * cell, 0.99)]
        window = 2 * max(1, round(2 * f)) + 1
        peaks = log == ndimage.maximum_filter(log, window, mode="constant", cval=-np.inf)
        peaks &= log > 0
        for level in PEAK_LEVELS:
            counts += [
                (peaks & (log > level) & m).sum() / (max(cell.sum(), 1) / (400 * f * f))
                for m in regions
            ]
    return np.asarray(out + means + quants + counts)


def _images(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [(8,), (20, 0), (27,), (14, 2), (), (17,), (9, 10), (26, 23)]
    imgs = [render_sample(picks[k % len(picks)], size, rng) for k in range(n)]
    return np.stack(imgs).transpose(0, 3, 1, 2).astype(np.float64) / 255.0


@pytest.mark.parametrize("shape", [(40, 33), (7, 12)])
def test_the_blur_is_scipys_gaussian_with_mirrored_borders(shape):
    # (7, 12): the radius at the larger sigmas outruns the side, and mirrors more than once
    imgs = np.random.default_rng(0).random((3, *shape))
    got = _blur(torch.tensor(imgs, dtype=torch.float32)[:, None], SCALES).numpy()
    assert got.shape == (3, len(SCALES), *shape)
    for n, img in enumerate(imgs):
        for k, s in enumerate(SCALES):
            want = _gauss(img, s)
            np.testing.assert_allclose(got[n, k], want, atol=2e-6, err_msg=f"sigma {s}")


def test_the_upper_quantiles_are_torchs():
    from fasthpa.location import _upper_quantiles

    x = torch.randn(3, 5, 1000)
    x[0, 0, :600] = 0.0  # ties, as the zeros outside the cell make them
    for qs in [(0.9, 0.99), (0.5, 0.8, 0.95, 0.99, 1.0)]:
        want = torch.quantile(x, torch.tensor(qs), dim=-1)
        torch.testing.assert_close(_upper_quantiles(x, qs), want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("size", [64, 128, 200])
def test_the_features_match_the_per_image_reference(size):
    x = _images(8, size, seed=size)
    mean, std = (0.05, 0.04, 0.06, 0.05), (0.1, 0.08, 0.12, 0.1)
    m, s = np.asarray(mean).reshape(1, 4, 1, 1), np.asarray(std).reshape(1, 4, 1, 1)
    normalised = torch.tensor((x - m) / s, dtype=torch.float32)
    got = LocationFeatures(mean, std)(normalised).numpy()
    assert got.shape == (8, DIM) and np.isfinite(got).all()
    want = np.stack([reference(img) for img in x])
    assert want.shape == got.shape
    # a float32 blur against SciPy's float64 one: a mask pixel or a puncta count can flip
    # at its threshold, so each feature is compared at its own scale, and nearly all must match
    scale = np.abs(want).max(0) + 1e-3
    close = np.abs(got - want) <= 0.02 * scale
    assert close.mean() > 0.99, np.argwhere(~close)[:10]
    assert (np.abs(got - want) <= 0.1 * scale).all()


def test_a_large_batch_runs_in_chunks_with_the_same_features(monkeypatch):
    import fasthpa.location as loc

    x = torch.tensor(_images(5, 64, seed=2), dtype=torch.float32)
    mod = LocationFeatures((0.0,) * 4, (1.0,) * 4)
    whole = mod(x)
    monkeypatch.setitem(loc.CHUNK_PIXELS, "cpu", 2 * 64 * 64)  # chunks of 2, 2 and 1 images
    torch.testing.assert_close(mod(x), whole, rtol=1e-5, atol=1e-5)


def test_the_features_ignore_autocast_and_take_three_channels():
    x = torch.tensor(_images(2, 64, seed=1), dtype=torch.float32)
    mod = LocationFeatures((0.0,) * 4, (1.0,) * 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = mod(x)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, mod(x))
    rgb = LocationFeatures((0.0,) * 3, (1.0,) * 3)(x[:, :3])
    assert rgb.shape == (2, DIM) and torch.isfinite(rgb).all()


@pytest.mark.gpu
def test_on_cuda_with_tf32_on_the_features_are_the_cpus():
    """The trainer turns TF32 on (runtime.enable_tf32); the features turn it off for their own
    matrix products, and back on after."""
    from fasthpa.runtime import enable_tf32, ieee_fp32_matmuls

    enable_tf32()
    before = torch.backends.cuda.matmul.fp32_precision
    x = torch.tensor(_images(8, 128, seed=3), dtype=torch.float32)
    cuda = torch.device("cuda")
    with ieee_fp32_matmuls(cuda):
        blur = _blur(x[:, 1:2].to(cuda), SCALES).cpu()
    torch.testing.assert_close(blur, _blur(x[:, 1:2], SCALES), rtol=0, atol=1e-5)
    mod = LocationFeatures((0.0,) * 4, (1.0,) * 4)
    got, want = mod.to(cuda)(x.to(cuda)).cpu().numpy(), mod.cpu()(x).numpy()
    assert torch.backends.cuda.matmul.fp32_precision == before
    scale = np.abs(want).max(0) + 1e-3
    assert (np.abs(got - want) <= 1e-3 * scale).mean() > 0.999


def test_add_location_keeps_the_outputs_and_the_state_round_trips():
    torch.manual_seed(0)
    model, _ = build_model("resnet18", pretrained="none")
    model.eval()
    x = torch.randn(2, 4, 48, 48)
    before = model(x)
    model.add_location((0.1,) * 4, (0.2,) * 4)
    assert model.fc.in_features == 512 + DIM
    assert model.features(x).shape == (2, 512 + DIM)
    torch.testing.assert_close(model(x), before)  # the new inputs' weights start at zero
    state = model.state_dict()
    assert LOCATION_KEY in state
    fresh, _ = build_model("resnet18", pretrained="none")
    add_location_for(fresh, state).load_state_dict(state)
    torch.testing.assert_close(fresh.eval()(x), before)


@pytest.mark.slow
def test_the_default_refit_reads_the_location_features_and_predict_reproduces_it(tmp_path):
    from fasthpa.checkpoint import load_checkpoint
    from fasthpa.data.synth import generate
    from fasthpa.predict import predict
    from fasthpa.train.cli import main as train_main

    root, run = tmp_path / "data", tmp_path / "run"
    generate(root, n=64, size=32, test_n=0, seed=3, workers=1)
    flags = (
        "--image-size 32 --batch-size 8 --workers 0 --loader torch --no-progress --pretrained none "
        "--epochs 1 --split 0.7,0.3"
    )
    assert train_main(["--data", str(root), "--out", str(run), *flags.split()]) == 0
    record = json.loads((run / "refit.json").read_text())
    assert record["location_features"] is True and record["features"] == 512 + DIM
    assert set(record["seconds"]) == {"features", "fits", "thresholds"}
    best = load_checkpoint(run / "best.pt")
    assert best["model"]["fc.weight"].shape == (28, 512 + DIM)
    assert best["fc_before_refit"]["fc.weight"].shape == (28, 512)
    assert best["model"]["fc.weight"][:, 512:].abs().sum() > 0  # the refit uses them
    dev = predict(
        run, root, split="train", part="dev", out=tmp_path / "dev.csv", loader="torch", workers=0
    )
    with np.load(run / "dev_probs.npz") as z:
        np.testing.assert_allclose(dev.probs, z["probs"], rtol=0, atol=1e-5)
    # --init-from a refitted best.pt trains the network alone, from the classifier it trained
    rare = tmp_path / "rare"
    init = ["--init-from", str(run / "best.pt"), "--labels", "0"]
    more = ["--no-refit-heads", "--max-steps", "2"]
    assert train_main(["--data", str(root), "--out", str(rare), *flags.split(), *init, *more]) == 0
    assert LOCATION_KEY not in load_checkpoint(rare / "last.pt")["model"]


@pytest.mark.parametrize("r", [1, 2, 3, 4, 7, 8, 11])
def test_the_max_filter_is_the_square_window(r):
    from fasthpa.location import _max_filter

    x = torch.randn(2, 3, 21, 18)
    want = torch.nn.functional.max_pool2d(x, 2 * r + 1, 1, r)
    assert torch.equal(_max_filter(x, r), want)


def test_a_stack_computes_shared_location_features_once():
    """StackedNet: folds normalised alike share one pass of the location features (a fixed
    function of the pixels); a fold with other statistics gets its own; the features are the
    plain concatenation of each net's, bit for bit."""
    from fasthpa.model import StackedNet

    def net(mean):
        m = build_model("resnet18", num_classes=28, in_channels=4, pretrained="none")[0].eval()
        m.add_location(mean, (0.2,) * 4)
        return m

    nets = [net((0.1,) * 4), net((0.1,) * 4), net((0.3,) * 4)]
    width = sum(n.fc.in_features for n in nets)
    stack = StackedNet(nets, torch.zeros(28, width), torch.zeros(28)).eval()
    assert stack.location_from == [0, 0, 2]
    calls = []
    for n in nets:
        n.location.register_forward_hook(lambda mod, args, out: calls.append(mod))
    x = torch.tensor(_images(2, 32, seed=5), dtype=torch.float32)
    with torch.no_grad():
        got = stack.features(x)
        assert calls == [nets[0].location, nets[2].location]
        want = torch.cat([n.features(x) for n in nets], 1)
    assert torch.equal(got, want)
