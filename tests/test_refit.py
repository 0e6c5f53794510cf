"""The classifier refit (``--refit-heads``): the L-BFGS logistic regressions against
scikit-learn's, out-of-fold scores from fits that never saw the row, and the trainer's use of it
(best.pt's classifier replaced, thresholds from the out-of-fold scores, dev scores redone)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fasthpa.checkpoint import load_checkpoint
from fasthpa.thresholds.rules import fold_assignment
from fasthpa.train.refit import fit_linear_heads, oof_linear_heads


def problem(seed: int, n: int = 300, f: int = 12, labels: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)) * rng.uniform(0.5, 3, f) + rng.normal(size=f)
    w = rng.normal(size=(f, labels))
    y = (x @ w + rng.normal(size=(n, labels)) > 0.5).astype(np.uint8)
    y[:, -1] = 0
    y[rng.choice(n, 6, replace=False), -1] = 1  # a rare label
    return x.astype(np.float32), y


@pytest.mark.parametrize("seed", [0, 1])
def test_the_fit_is_scikit_learns_l2_logistic_regression(seed):
    from sklearn.linear_model import LogisticRegression

    x, y = problem(seed)
    c = 0.3
    heads = fit_linear_heads(x, y, l2=1.0 / (c * len(x)))
    # fasthpa standardises inside the fit (std with ddof 1) and penalises the standardised
    # weights: the same problem as scikit-learn's on the standardised features
    mu, sd = x.astype(np.float64).mean(0), x.astype(np.float64).std(0, ddof=1)
    z = (x - mu) / sd
    for label in range(y.shape[1]):
        ref = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(z, y[:, label])
        want = ref.predict_proba(z)[:, 1]
        got = heads.probs(torch.from_numpy(x))[:, label].numpy()
        np.testing.assert_allclose(got, want, atol=2e-4, err_msg=f"label {label}")


def test_out_of_fold_scores_come_from_fits_without_the_row():
    x, y = problem(3)
    l2 = 1e-3
    oof = oof_linear_heads(x, y, l2, folds=4, seed=7)
    fold = fold_assignment(y, 4, 7)
    held = fold == 2
    alone = fit_linear_heads(x[~held], y[~held], l2).probs(torch.from_numpy(x[held])).numpy()
    np.testing.assert_allclose(oof[held], alone, rtol=0, atol=1e-6)
    assert np.bincount(fold).min() >= len(x) // 4 - 1  # folds of equal size
    assert len(set(fold[y[:, -1] == 1])) == 4  # the rare label's positives spread over folds


@pytest.mark.slow
def test_the_trainer_refits_writes_its_record_and_rescores_dev(tmp_path):
    from fasthpa.data.synth import generate
    from fasthpa.predict import predict
    from fasthpa.train.cli import main as train_main

    root, run = tmp_path / "data", tmp_path / "run"
    generate(root, n=64, size=32, test_n=0, seed=8, workers=1)
    flags = (
        "--image-size 32 --batch-size 8 --workers 0 --loader torch --no-progress --pretrained none "
        "--epochs 1 --log-every 4 --split 0.7,0.3 --refit-heads --threshold-rule auto "
        "--no-location-features"
    )
    assert train_main(["--data", str(root), "--out", str(run), *flags.split()]) == 0
    best = load_checkpoint(run / "best.pt")
    assert "fc_before_refit" in best
    assert not torch.equal(best["model"]["fc.weight"], best["fc_before_refit"]["fc.weight"])
    record = json.loads((run / "refit.json").read_text())
    thr = json.loads((run / "thresholds.json").read_text())
    assert thr["method"].startswith("rule:") and thr["fitted_on"] == "refit oof"
    assert record["train_rows"] == thr["n_samples"] and record["folds"] == 5
    assert record["location_features"] is False and record["features"] == 512
    assert "location.mean" not in best["model"]
    with np.load(run / "train_oof_probs.npz") as z:
        assert z["probs"].shape == (record["train_rows"], 28)
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["refit"]["rule"] == record["rule"] and final["refit_s"] > 0
    # dev_probs.npz is the refitted model's: predict reproduces it from best.pt
    dev = predict(
        run, root, split="train", part="dev", out=tmp_path / "dev.csv", loader="torch", workers=0
    )
    with np.load(run / "dev_probs.npz") as z:
        np.testing.assert_allclose(dev.probs, z["probs"], rtol=0, atol=1e-5)


def test_the_fits_side_by_side_are_the_fits_one_after_another():
    from fasthpa.runtime import intra_op_threads
    from fasthpa.train.refit import fit_with_oof

    x, y = problem(5, n=240)
    l2 = 2e-3
    heads, oof = fit_with_oof(x, y, l2, folds=4, seed=2)
    with intra_op_threads(1):  # as each fit runs there: the same float32 sums in the same order
        alone = fit_linear_heads(x, y, l2)
        one_by_one = oof_linear_heads(x, y, l2, folds=4, seed=2)
    torch.testing.assert_close(heads.weight, alone.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(heads.bias, alone.bias, rtol=0, atol=1e-6)
    np.testing.assert_allclose(oof, one_by_one, rtol=0, atol=1e-6)
