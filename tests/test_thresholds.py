"""fasthpa.thresholds against plain references: scikit-learn F1 at every distinct score, a loop
over the 0.01 grid with exact fractions, a per-label sort for the prevalence rule; plus the
thresholds.json format and the `fasthpa thresholds` command's inputs and errors."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_recall_fscore_support

from fasthpa.cli import main
from fasthpa.errors import UserError
from fasthpa.labels import KAGGLE_TRAIN_COUNTS, KAGGLE_TRAIN_SAMPLES, LABEL_NAMES, NUM_LABELS
from fasthpa.thresholds import (
    apply_thresholds,
    fit_thresholds,
    load_thresholds,
    per_label_metrics,
    write_thresholds_json,
)

F1_TOL = 1e-12


def make_case(seed: int, n: int, step: float | None, dtype=np.float32):
    """Random [n, 28] scores and labels: common and rare labels, one label without positives,
    one with every sample positive; scores rounded to ``step`` give heavy ties."""
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.02, 0.5, NUM_LABELS)
    y = rng.random((n, NUM_LABELS)) < rates
    y[:, 3] = False  # no positives
    y[:, 5] = True  # all positive
    for col, count in ((8, 1), (9, 2), (10, 3)):  # rare labels
        y[:, col] = False
        y[rng.choice(n, min(count, n), replace=False), col] = True
    signal = rng.uniform(0.0, 0.6, NUM_LABELS)
    p = np.clip(y * signal + rng.random((n, NUM_LABELS)) * (1 - signal), 0.0, 1.0)
    if step is not None:
        p = np.round(p / step) * step
    p = np.clip(p, 0.0, 1.0).astype(dtype)
    p[:, 12] = p[0, 12]  # all-equal scores
    p[: n // 4, 13] = 0.0  # exact ends of the range
    p[n // 4 : n // 2, 13] = 1.0
    return p, y.astype(np.uint8)


def best_f1_brute_force(p_col: np.ndarray, y_col: np.ndarray) -> tuple[float, float]:
    """scikit-learn F1 at every distinct score; (best F1, highest score reaching it exactly)."""
    scores = np.unique(p_col)
    f1s = [f1_score(y_col, p_col >= t, zero_division=0) for t in scores]
    # exact fractions decide ties between cuts (scikit-learn's floats may differ in the last bit)
    exact = [
        Fraction(int(2 * (y_col & (p_col >= t)).sum()), int((p_col >= t).sum() + y_col.sum()))
        for t in scores
    ]
    best = max(exact)
    best_score = max(t for t, f in zip(scores, exact) if f == best)
    return max(f1s), float(best_score)


def predictions(p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    # float64 comparison: the thresholds are Python floats
    return p.astype(np.float64) >= np.asarray(thresholds, dtype=np.float64)


# -------------------------------------------------------------------------------- exact search


@pytest.mark.parametrize(
    "seed,n,step,dtype",
    [
        (0, 240, 0.05, np.float32),  # heavy ties
        (1, 97, 0.1, np.float64),  # heavier ties, float64 path, odd N
        (2, 61, None, np.float32),  # no rounding: nearly all scores distinct
        (3, 53, None, np.float64),
        (4, 1, None, np.float32),  # N = 1
    ],
)
def test_exact_matches_sklearn_brute_force(seed, n, step, dtype):
    p, y = make_case(seed, n, step, dtype)
    result = fit_thresholds(p, y, method="exact")
    achieved = predictions(p, result.thresholds)
    for label in range(NUM_LABELS):
        if y[:, label].sum() == 0:
            assert result.thresholds[label] == 0.5
            assert "no positives" in result.notes[label]
            assert result.f1_tuned[label] == 0.0
            continue
        best, best_score = best_f1_brute_force(p[:, label], y[:, label])
        assert abs(result.f1_tuned[label] - best) <= F1_TOL, label
        # the threshold reaches the optimum, judged by scikit-learn on its own predictions
        got = f1_score(y[:, label], achieved[:, label], zero_division=0)
        assert abs(got - best) <= F1_TOL, label
        # ...and it is the highest optimal cut: same predictions as `score >= best_score`
        np.testing.assert_array_equal(achieved[:, label], p[:, label] >= best_score)
        # thresholds are values of the scores' dtype, so float32 comparisons agree as well
        assert float(dtype(result.thresholds[label])) == result.thresholds[label]
        np.testing.assert_array_equal(
            p[:, label] >= dtype(result.thresholds[label]), achieved[:, label]
        )
    assert result.positives.tolist() == y.sum(0).tolist()
    assert result.macro_f1_tuned == pytest.approx(result.f1_tuned.mean(), abs=1e-15)
    assert result.macro_f1_tuned >= result.macro_f1_at_05
    ref_05 = f1_score(y, p >= 0.5, average=None, zero_division=0)
    np.testing.assert_allclose(result.f1_at_05, ref_05, rtol=0, atol=F1_TOL)


def test_exact_threshold_is_midpoint_to_next_lower_score():
    p = np.array([[0.9], [0.6], [0.2], [0.6]], dtype=np.float32)
    y = np.array([[1], [1], [0], [0]])
    result = fit_thresholds(p, y, label_names=["x"])
    # cuts: {0.9}: F1 2/3; {0.9, 0.6, 0.6}: 4/5; all: 4/6 -> cut at 0.6, midpoint with 0.2
    assert result.thresholds[0] == float(np.float32((np.float32(0.6) + np.float32(0.2)) / 2))
    assert result.f1_tuned[0] == pytest.approx(0.8, abs=1e-15)


def test_exact_midpoint_between_adjacent_floats_falls_back_to_the_cut_score():
    # no float32 strictly between the two, and their midpoint rounds (to even) onto lo
    lo = np.float32(0.5)
    hi = np.nextafter(lo, np.float32(1))
    assert np.float32((np.float64(hi) + np.float64(lo)) / 2) == lo
    p = np.array([[hi], [lo]], dtype=np.float32)
    result = fit_thresholds(p, np.array([[1], [0]]), label_names=["x"])
    assert result.thresholds[0] == float(hi)
    assert result.f1_tuned[0] == 1.0


@pytest.mark.parametrize("positive", [True, False])
def test_exact_single_sample(positive):
    p = np.full((1, NUM_LABELS), 0.3, dtype=np.float32)
    y = np.full((1, NUM_LABELS), int(positive))
    result = fit_thresholds(p, y)
    if positive:  # the only cut predicts the sample: F1 = 1 at threshold = its score
        np.testing.assert_array_equal(result.thresholds, np.float32(0.3))
        np.testing.assert_array_equal(result.f1_tuned, 1.0)
        assert result.notes == {}
    else:
        np.testing.assert_array_equal(result.thresholds, 0.5)
        assert sorted(result.notes) == list(range(NUM_LABELS))
    np.testing.assert_array_equal(result.f1_at_05, 0.0)


def test_exact_all_equal_scores_predicts_everything():
    rng = np.random.default_rng(7)
    y = (rng.random((50, NUM_LABELS)) < 0.3).astype(np.uint8)
    y[0] = 1
    p = np.full((50, NUM_LABELS), 0.25, dtype=np.float32)
    result = fit_thresholds(p, y)
    np.testing.assert_array_equal(result.thresholds, np.float32(0.25))
    pos = y.sum(0)
    np.testing.assert_allclose(result.f1_tuned, 2 * pos / (50 + pos), rtol=0, atol=F1_TOL)


def test_exact_same_on_numpy_torch_float16_and_negative_zero():
    p, y = make_case(11, 80, 0.05, np.float32)
    a = fit_thresholds(p, y)
    b = fit_thresholds(torch.from_numpy(p), torch.from_numpy(y.astype(bool)))
    np.testing.assert_array_equal(a.thresholds, b.thresholds)
    np.testing.assert_array_equal(a.f1_tuned, b.f1_tuned)
    # float16 scores are widened to float32: same answer as widening them first
    p16 = p.astype(np.float16)
    c = fit_thresholds(p16, y)
    d = fit_thresholds(p16.astype(np.float32), y)
    np.testing.assert_array_equal(c.thresholds, d.thresholds)
    # -0.0 is a score of 0 like +0.0
    pz = p.copy()
    pz[pz == 0] = -0.0
    e = fit_thresholds(pz, y)
    np.testing.assert_array_equal(a.thresholds, e.thresholds)


def test_bad_inputs_raise():
    p, y = make_case(0, 20, 0.1)
    bad = p.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_thresholds(bad, y)
    bad[3, 4] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_thresholds(bad, y)
    with pytest.raises(ValueError, match="shape"):
        fit_thresholds(p, y[:-1])
    with pytest.raises(ValueError, match="0/1"):
        fit_thresholds(p, y * 2)
    with pytest.raises(ValueError, match="method"):
        fit_thresholds(p, y, method="best")


# ------------------------------------------------------------------------------ grid, prevalence


def grid_reference(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Loop over labels and t = j/100; exact fractions; ties to the t closest to 0.5, then lower."""
    p64 = p.astype(np.float64)
    out = []
    for label in range(p.shape[1]):
        pos = int(y[:, label].sum())
        scored = []
        for j in range(101):
            pred = p64[:, label] >= j / 100
            denom = int(pred.sum()) + pos
            f1 = Fraction(2 * int((pred & (y[:, label] == 1)).sum()), denom) if denom else 0
            scored.append((f1, j))
        best = max(f for f, _ in scored)
        j = min((abs(j - 50), j) for f, j in scored if f == best)[1]
        out.append(j / 100)
    return np.array(out)


@pytest.mark.parametrize("seed,dtype", [(0, np.float32), (1, np.float64)])
def test_grid_matches_loop_reference(seed, dtype):
    # scores on the grid points themselves test the `>=` boundary
    p, y = make_case(seed, 150, 0.01, dtype)
    result = fit_thresholds(p, y, method="grid")
    ref = grid_reference(p, y)
    has_pos = y.sum(0) > 0
    np.testing.assert_array_equal(result.thresholds[has_pos], ref[has_pos])
    np.testing.assert_array_equal(result.thresholds[~has_pos], 0.5)
    ref_f1 = f1_score(y, predictions(p, ref), average=None, zero_division=0)
    np.testing.assert_allclose(result.f1_tuned[has_pos], ref_f1[has_pos], rtol=0, atol=F1_TOL)
    # the exact search is never worse than the grid
    exact = fit_thresholds(p, y, method="exact")
    assert np.all(exact.f1_tuned >= result.f1_tuned - F1_TOL)


def prevalence_reference(p: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Predictions of the rule: the k = floor(rate * N + 0.5) highest scores (and ties)."""
    n = p.shape[0]
    out = np.zeros(p.shape, dtype=bool)
    for label in range(p.shape[1]):
        k = int(math.floor(rates[label] * n + 0.5))
        if k > 0:
            kth = np.sort(p[:, label])[::-1][k - 1]
            out[:, label] = p[:, label] >= kth
    return out


@pytest.mark.parametrize("source", ["fit", "kaggle", "array"])
def test_prevalence_matches_sort_reference(source):
    p, y = make_case(5, 130, 0.02)
    if source == "fit":
        rates = y.mean(0)
        arg = "fit"
    elif source == "kaggle":
        rates = np.array(KAGGLE_TRAIN_COUNTS) / KAGGLE_TRAIN_SAMPLES
        arg = "kaggle"
    else:
        rates = np.random.default_rng(3).uniform(0, 1, NUM_LABELS)
        rates[:3] = (0.0, 1.0, 0.5 / 130)  # k = 0, k = N, a rounding edge
        arg = rates
    result = fit_thresholds(p, y, method="prevalence", prevalence=arg)
    np.testing.assert_array_equal(predictions(p, result.thresholds), prevalence_reference(p, rates))
    ref_f1 = f1_score(y, prevalence_reference(p, rates), average=None, zero_division=0)
    np.testing.assert_allclose(result.f1_tuned, ref_f1, rtol=0, atol=F1_TOL)


def test_rare_label_rules():
    p, y = make_case(9, 200, 0.05)
    pos = y.sum(0)
    exact = fit_thresholds(p, y)
    shrunk = fit_thresholds(p, y, rare_below=3, rare_rule="shrink", shrink=0.25)
    prev = fit_thresholds(p, y, method="prevalence")
    ruled = fit_thresholds(p, y, rare_below=3, rare_rule="prevalence")
    rare = (pos > 0) & (pos < 3)
    assert rare.sum() == 2  # labels 8 and 9 of make_case
    np.testing.assert_allclose(
        shrunk.thresholds[rare], 0.75 * exact.thresholds[rare] + 0.25 * 0.5, rtol=0, atol=1e-15
    )
    np.testing.assert_array_equal(shrunk.thresholds[~rare], exact.thresholds[~rare])
    np.testing.assert_array_equal(ruled.thresholds[rare], prev.thresholds[rare])
    np.testing.assert_array_equal(ruled.thresholds[~rare], exact.thresholds[~rare])
    assert set(shrunk.notes) == set(ruled.notes) == set(np.flatnonzero(rare | (pos == 0)))
    # f1_tuned is always the F1 at the returned thresholds
    for r in (shrunk, ruled):
        ref = f1_score(y, predictions(p, r.thresholds), average=None, zero_division=0)
        np.testing.assert_allclose(r.f1_tuned, ref, rtol=0, atol=F1_TOL)


# ------------------------------------------------------------------------------ metrics and json


@pytest.mark.parametrize("as_torch", [False, True])
def test_per_label_metrics_match_sklearn(as_torch):
    p, y = make_case(4, 120, 0.05)
    thr = np.random.default_rng(4).uniform(0, 1, NUM_LABELS)
    thr[6] = 1.5  # nothing predicted
    args = (torch.from_numpy(p), torch.from_numpy(y)) if as_torch else (p, y)
    m = per_label_metrics(*args, thr)
    pred = predictions(p, thr)
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, zero_division=0)
    for key, ref in (("precision", prec), ("recall", rec), ("f1", f1)):
        np.testing.assert_allclose(m[key], ref, rtol=0, atol=F1_TOL, err_msg=key)
    np.testing.assert_array_equal(m["support"], sup)
    np.testing.assert_array_equal(m["predicted"], pred.sum(0))
    assert m["macro_f1"] == pytest.approx(
        f1_score(y, pred, average="macro", zero_division=0), abs=F1_TOL
    )
    scalar = per_label_metrics(p, y, 0.5)
    np.testing.assert_array_equal(scalar["predicted"], (p >= 0.5).sum(0))
    np.testing.assert_array_equal(apply_thresholds(args[0], thr), pred)


def test_apply_thresholds_compares_float32_scores_in_float64():
    # float32(0.7) = 0.69999998...: below the threshold 0.7, although equal to it in float32
    p = np.array([[np.float32(0.7)], [np.float32(0.75)]], dtype=np.float32)
    assert np.float32(0.7) >= np.float32(0.7) and float(np.float32(0.7)) < 0.7
    np.testing.assert_array_equal(apply_thresholds(p, [0.7])[:, 0], [False, True])
    np.testing.assert_array_equal(apply_thresholds(torch.from_numpy(p), 0.7)[:, 0], [False, True])
    # the fit agrees: the grid threshold 0.70 leaves out the float32(0.7) score, so it already
    # reaches F1 = 1 (rounded to float32 it would not, and 0.71 would win)
    result = fit_thresholds(p, np.array([[0], [1]]), "grid", label_names=["x"])
    assert result.thresholds[0] == 0.7 and result.f1_tuned[0] == 1.0


def test_thresholds_json_round_trip(tmp_path):
    p, y = make_case(2, 90, 0.05)
    result = fit_thresholds(p, y, rare_below=3)
    path = write_thresholds_json(tmp_path / "run" / "thresholds.json", result, {"epoch": 4})
    payload = json.loads(path.read_text())
    for key in ("thresholds", "f1_at_0.5", "f1_tuned", "positives", "label_names"):
        assert len(payload[key]) == NUM_LABELS, key
    assert payload["method"] == "exact" and payload["epoch"] == 4
    assert payload["label_names"] == list(LABEL_NAMES)
    assert payload["macro_f1_tuned"] == result.macro_f1_tuned
    assert payload["macro_f1_at_0.5"] == result.macro_f1_at_05
    assert payload["positives"] == y.sum(0).tolist()
    assert set(payload["notes"]) == {str(i) for i in result.notes}
    np.testing.assert_array_equal(load_thresholds(path), result.thresholds)
    assert not list(path.parent.glob(".*tmp"))  # atomic write left no temporary file
    (tmp_path / "bad.json").write_text('{"thresholds": [0.5, 0.5]}')
    with pytest.raises(UserError, match="28 numbers"):
        load_thresholds(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------- the command


def run_cli(*argv: str) -> int:
    return main(["thresholds", *map(str, argv)])


def write_train_csv(path, ids, y):
    lines = ["Id,Target"] + [
        f"{i},{' '.join(str(j) for j in np.flatnonzero(row))}" for i, row in zip(ids, y)
    ]
    path.write_text("\n".join(lines) + "\n")


def test_cli_npz_csv_and_npy_inputs_agree(tmp_path, capsys):
    p, y = make_case(6, 70, 0.05)
    ids = np.array([f"id{i:03d}" for i in range(len(p))])
    np.savez(tmp_path / "dev_probs.npz", ids=ids, probs=p, labels=y)
    assert run_cli("--probs", tmp_path / "dev_probs.npz", "--out", tmp_path / "a.json") == 0
    out = capsys.readouterr().out
    assert "macro F1" in out and "Rods & rings" in out
    expected = fit_thresholds(p, y)
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["thresholds"] == expected.thresholds.tolist()
    assert a["macro_f1_tuned"] == expected.macro_f1_tuned

    # CSV probs (columns shuffled by name) + a train.csv listing more samples, in another order
    order = np.random.default_rng(0).permutation(len(p))
    cols = np.random.default_rng(1).permutation(NUM_LABELS)
    header = "Id," + ",".join(str(c) for c in cols)
    rows = [f"{ids[i]}," + ",".join(repr(float(p[i, c])) for c in cols) for i in range(len(p))]
    (tmp_path / "probs.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    extra_ids = [f"extra{i}" for i in range(5)]
    write_train_csv(
        tmp_path / "train.csv",
        list(ids[order]) + extra_ids,
        np.concatenate([y[order], np.ones((5, NUM_LABELS), np.uint8)]),
    )
    assert (
        run_cli(
            "--probs",
            tmp_path / "probs.csv",
            "--labels",
            tmp_path / "train.csv",
            "--method",
            "grid",
            "--out",
            tmp_path / "b.json",
        )
        == 0
    )
    b = json.loads((tmp_path / "b.json").read_text())
    # the CSV holds the float32 values printed exactly, read back as float64
    assert b["thresholds"] == fit_thresholds(p.astype(np.float64), y, "grid").thresholds.tolist()

    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "y.npy", y)
    assert (
        run_cli(
            "--probs",
            tmp_path / "p.npy",
            "--labels",
            tmp_path / "y.npy",
            "--rare-below",
            "3",
            "--rare-rule",
            "prevalence",
            "--prevalence",
            "kaggle",
            "--out",
            tmp_path / "c.json",
        )
        == 0
    )
    c = json.loads((tmp_path / "c.json").read_text())
    ref = fit_thresholds(p, y, rare_below=3, rare_rule="prevalence", prevalence="kaggle")
    assert c["thresholds"] == ref.thresholds.tolist()
    assert c["options"]["prevalence"] == "kaggle"

    # prevalence rates from a train.csv-style file (its 75 rows: ours plus the 5 extra)
    assert (
        run_cli(
            "--probs",
            tmp_path / "dev_probs.npz",
            "--method",
            "prevalence",
            "--prevalence",
            tmp_path / "train.csv",
            "--out",
            tmp_path / "d.json",
        )
        == 0
    )
    rates = np.concatenate([y, np.ones((5, NUM_LABELS), np.uint8)]).mean(0)
    d = json.loads((tmp_path / "d.json").read_text())
    assert (
        d["thresholds"] == fit_thresholds(p, y, "prevalence", prevalence=rates).thresholds.tolist()
    )


def expect_user_error(capsys, *argv, match: str) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert match in err, err
    return err


def test_cli_errors_name_the_file_and_row(tmp_path, capsys):
    p, y = make_case(8, 30, 0.05)
    out = tmp_path / "t.json"
    np.save(tmp_path / "y.npy", y)

    nan = p.copy()
    nan[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    expect_user_error(
        capsys,
        "--probs",
        tmp_path / "nan.npy",
        "--labels",
        tmp_path / "y.npy",
        "--out",
        out,
        match="row 7 label 2",
    )
    big = p.copy()
    big[4, 0] = 1.25
    np.save(tmp_path / "big.npy", big)
    expect_user_error(
        capsys,
        "--probs",
        tmp_path / "big.npy",
        "--labels",
        tmp_path / "y.npy",
        "--out",
        out,
        match="not a probability in [0, 1]",
    )
    np.save(tmp_path / "p27.npy", p[:, :27])
    expect_user_error(
        capsys,
        "--probs",
        tmp_path / "p27.npy",
        "--labels",
        tmp_path / "y.npy",
        "--out",
        out,
        match="[N, 28]",
    )
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "y_short.npy", y[:-1])
    expect_user_error(
        capsys,
        "--probs",
        tmp_path / "p.npy",
        "--labels",
        tmp_path / "y_short.npy",
        "--out",
        out,
        match="has 29 rows but",
    )

    ids = np.array([f"s{i}" for i in range(len(p))])
    np.savez(tmp_path / "dev.npz", ids=ids, probs=p)
    write_train_csv(tmp_path / "missing.csv", ids[1:], y[1:])
    expect_user_error(
        capsys,
        "--probs",
        tmp_path / "dev.npz",
        "--labels",
        tmp_path / "missing.csv",
        "--out",
        out,
        match="lacks 1 Id(s)",
    )
    (tmp_path / "badrow.csv").write_text("Id,Target\ns0,1 2\ns1,3 x\n")
    expect_user_error(
        capsys,
        "--probs",
        tmp_path / "dev.npz",
        "--labels",
        tmp_path / "badrow.csv",
        "--out",
        out,
        match="line 3",
    )
    (tmp_path / "badlabel.csv").write_text("Id,Target\ns0,28\n")
    expect_user_error(
        capsys,
        "--probs",
        tmp_path / "dev.npz",
        "--labels",
        tmp_path / "badlabel.csv",
        "--out",
        out,
        match="outside 0-27",
    )
    expect_user_error(
        capsys, "--probs", tmp_path / "dev.npz", "--out", out, match="--labels is needed"
    )
    expect_user_error(
        capsys,
        "--probs",
        tmp_path / "p.npy",
        "--labels",
        tmp_path / "missing.csv",
        "--out",
        out,
        match="has no Ids",
    )
    (tmp_path / "probs.csv").write_text(
        "Id," + ",".join(map(str, range(28))) + "\n" + "s0," + ",".join(["0.5"] * 27) + ",abc\n"
    )
    expect_user_error(
        capsys,
        "--probs",
        tmp_path / "probs.csv",
        "--labels",
        tmp_path / "missing.csv",
        "--out",
        out,
        match="line 2 (Id s0) column '27'",
    )
    expect_user_error(
        capsys,
        "--probs",
        tmp_path / "dev.npz",
        "--labels",
        tmp_path / "y.npy",
        "--method",
        "prevalence",
        "--prevalence",
        "train",
        "--out",
        out,
        match="--prevalence must be",
    )
    assert not out.exists()


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["exact", "grid", "prevalence"])
def test_cuda_matches_cpu(method):
    p, y = make_case(10, 3001, 0.001)
    cpu = fit_thresholds(p, y, method)
    gpu = fit_thresholds(torch.from_numpy(p).cuda(), torch.from_numpy(y).cuda(), method)
    np.testing.assert_array_equal(cpu.thresholds, gpu.thresholds)
    np.testing.assert_array_equal(cpu.f1_tuned, gpu.f1_tuned)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_sort_path_matches_numpy_sort_path(monkeypatch, dtype):
    """The GPU's sort (torch.sort) run on the CPU gives the same thresholds as the CPU's."""
    import fasthpa.thresholds.search as thresholds

    p, y = make_case(12, 150, 0.02, dtype)
    pt, yt = thresholds._as_tensors(p, y)
    by_numpy = thresholds._sort_scores(pt, yt, backend="numpy")
    by_torch = thresholds._sort_scores(pt, yt, backend="torch")
    assert torch.equal(by_numpy.keys, by_torch.keys)
    # within a tie group the label order may differ; the counts at each group's end may not
    group_end = torch.ones_like(by_numpy.keys, dtype=torch.bool)
    group_end[:, :-1] = by_numpy.keys[:, :-1] != by_numpy.keys[:, 1:]
    assert torch.equal(by_numpy.tp[group_end], by_torch.tp[group_end])

    expected = {m: fit_thresholds(p, y, m) for m in ("exact", "grid", "prevalence")}
    original = thresholds._sort_scores
    monkeypatch.setattr(
        thresholds, "_sort_scores", lambda p, y, backend=None: original(p, y, backend="torch")
    )
    for method, ref in expected.items():
        got = fit_thresholds(p, y, method)
        np.testing.assert_array_equal(got.thresholds, ref.thresholds)
        np.testing.assert_array_equal(got.f1_tuned, ref.f1_tuned)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counts_at_any_threshold_match_direct_counts(dtype):
    """The binary search in the sorted scores counts exactly what `p >= t` (float64) counts."""
    import fasthpa.thresholds.search as thresholds

    p, y = make_case(13, 200, 0.01, dtype)
    pt, yt = thresholds._as_tensors(p, y)
    s = thresholds._sort_scores(pt, yt)
    rng = np.random.default_rng(13)
    picks = p[rng.integers(0, len(p), 6), rng.integers(0, NUM_LABELS, 6)].astype(np.float64)
    candidates = [-0.5, -0.0, 0.0, 0.07, 0.5, 1.0, 1.5, *np.arange(101) / 100, *picks]
    candidates += [float(np.nextafter(dtype(v), dtype(2))) for v in picks]
    candidates += [float(np.nextafter(dtype(v), dtype(-1))) for v in picks]
    t = np.array(candidates, dtype=np.float64)
    predicted, tp = s.counts_at(torch.from_numpy(np.tile(t, (NUM_LABELS, 1))))
    pred = p.astype(np.float64)[:, :, None] >= t[None, None, :]  # [N, L, M]
    np.testing.assert_array_equal(predicted.numpy(), pred.sum(0))
    np.testing.assert_array_equal(tp.numpy(), (pred & (y[:, :, None] == 1)).sum(0))
