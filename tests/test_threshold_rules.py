"""fasthpa.thresholds.rules against plain references (scikit-learn F1 in loops, per-label sorts),
and choose_rule on constructed cases whose better rule is known from a large fresh sample."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from fasthpa.thresholds import fit_thresholds
from fasthpa.thresholds.rules import (
    Rule,
    choose_rule,
    cross_fit_predictions,
    decode,
    fit_rule,
    fold_assignment,
    global_threshold,
    macro_f1,
    parse_rule,
)


def make_case(rng: np.random.Generator, n: int, n_labels: int = 12, step: float | None = None):
    """Scores and labels: label frequencies 2-40 %, one label without positives, one with 2."""
    rates = rng.uniform(0.02, 0.4, n_labels)
    y = rng.random((n, n_labels)) < rates
    y[:, 0] = False
    y[:, 1] = False
    y[rng.choice(n, 2, replace=False), 1] = True
    signal = rng.uniform(0.1, 0.6, n_labels)
    p = np.clip(y * signal + rng.random((n, n_labels)) * (1 - signal), 0, 1)
    if step is not None:
        p = np.round(p / step) * step
    return p.astype(np.float32), y.astype(np.uint8)


def separable_case(rng: np.random.Generator, n: int, n_labels: int, rate: float, overlap: float):
    """Positives score in [0.5 - overlap, 1], negatives in [0, 0.5]: the same score law for
    every label, so one shared threshold is (near) optimal for all of them."""
    y = rng.random((n, n_labels)) < rate
    pos = rng.uniform(0.5 - overlap, 1.0, (n, n_labels))
    neg = rng.uniform(0.0, 0.5, (n, n_labels))
    return np.where(y, pos, neg).astype(np.float32), y.astype(np.uint8)


def test_parse_rule_accepts_the_documented_names_and_rejects_the_rest():
    assert parse_rule("exact") == Rule("exact")
    assert parse_rule("shrink:10") == Rule("shrink", 10.0)
    assert parse_rule("shrink-global:2.5") == Rule("shrink-global", 2.5)
    for bad in ("Exact", "shrink", "shrink:-1", "shrink:x", "global:3", "shrink:inf", ""):
        with pytest.raises(ValueError, match="threshold rule"):
            parse_rule(bad)


def test_exact_and_prevalence_rules_are_fit_thresholds():
    rng = np.random.default_rng()
    p, y = make_case(rng, 300)
    rates = rng.uniform(0, 0.3, y.shape[1])
    np.testing.assert_array_equal(fit_rule(p, y, "exact"), fit_thresholds(p, y).thresholds)
    got = fit_rule(p, y, "prevalence", rates=rates)
    # plain reference: the round(rate * N) highest scores of each column are predicted
    for col in range(y.shape[1]):
        k = int(np.floor(rates[col] * len(p) + 0.5))
        predicted = int((p[:, col] >= got[col]).sum())
        ties = (p[:, col] == np.sort(p[:, col])[::-1][max(k - 1, 0)]).sum() if k else 0
        assert k <= predicted <= k + max(ties - 1, 0), col


@pytest.mark.parametrize("step", [None, 0.05])
def test_global_threshold_matches_a_grid_loop_over_scikit_learn(step):
    rng = np.random.default_rng()
    p, y = make_case(rng, int(rng.integers(50, 400)), step=step)
    grid = np.arange(101) / 100
    macro = np.array([f1_score(y, p >= t, average="macro", zero_division=0) for t in grid])
    best = np.flatnonzero(np.isclose(macro, macro.max(), rtol=0, atol=1e-12))
    expected = grid[best[np.argmin(np.abs(best - 50) * 2 + (best > 50))]]
    assert global_threshold(p, y) == pytest.approx(expected, abs=0)
    np.testing.assert_array_equal(fit_rule(p, y, "global"), np.full(y.shape[1], expected))


@pytest.mark.parametrize("kind", ["shrink", "shrink-global"])
def test_shrinkage_moves_each_label_by_its_positive_count(kind):
    rng = np.random.default_rng()
    p, y = make_case(rng, 200)
    k = float(rng.uniform(1, 20))
    exact = fit_thresholds(p, y).thresholds
    if kind == "shrink":
        target = fit_thresholds(p, y, "prevalence").thresholds
    else:
        target = np.full(y.shape[1], global_threshold(p, y))
    got = fit_rule(p, y, f"{kind}:{k}")
    for col in range(y.shape[1]):
        n_pos = int(y[:, col].sum())
        w = n_pos / (n_pos + k)
        assert got[col] == pytest.approx(w * exact[col] + (1 - w) * target[col], abs=1e-15)
    assert got[0] == target[0]  # no positives: all weight on the target, whatever K
    no_shrink = fit_rule(p, y, f"{kind}:0")
    # K = 0: the exact cut wherever a label has positives (column 0 never has; a random draw
    # can leave another label without any), the target where it has none
    has = y.sum(axis=0) > 0
    np.testing.assert_array_equal(no_shrink[has], exact[has])
    np.testing.assert_array_equal(no_shrink[~has], target[~has])
    assert not has[0]


def test_decode_matches_a_row_loop():
    rng = np.random.default_rng()
    p, _ = make_case(rng, 100)
    thr = rng.uniform(0.3, 0.95, p.shape[1])
    for at_least_one in (False, True):
        for cap in (0, 1, 2):
            got = decode(p, thr, at_least_one, cap)
            for i in range(len(p)):
                row = p[i] >= thr
                if at_least_one and not row.any():
                    row[np.argmax(p[i])] = True
                if cap and row.sum() > cap:
                    keep = np.argsort(-np.where(row, p[i], -np.inf), kind="stable")[:cap]
                    row = np.isin(np.arange(len(row)), keep)
                np.testing.assert_array_equal(got[i], row, err_msg=f"row {i}")


def test_fold_assignment_spreads_rare_positives_and_is_deterministic():
    rng = np.random.default_rng()
    _, y = make_case(rng, 301)
    for folds in (2, 3, 5):
        seed = int(rng.integers(1 << 30))
        a = fold_assignment(y, folds, seed)
        np.testing.assert_array_equal(a, fold_assignment(y, folds, seed))
        assert set(np.unique(a)) == set(range(folds))
        sizes = np.bincount(a, minlength=folds)
        assert sizes.max() - sizes.min() <= 1
        # the 2 positives of label 1 (the rarest) fall in different folds
        assert len(set(a[y[:, 1] == 1])) == 2
    assert not np.array_equal(fold_assignment(y, 2, 1), fold_assignment(y, 2, 2))


def test_cross_fit_predictions_use_only_the_other_folds():
    rng = np.random.default_rng()
    p, y = make_case(rng, 120)
    fold = fold_assignment(y, 3, 0)
    got = cross_fit_predictions(p, y, "shrink:5", fold)
    for f in range(3):
        held = fold == f
        thr = fit_rule(p[~held], y[~held], "shrink:5")
        np.testing.assert_array_equal(got[held], decode(p[held], thr))


def test_choose_rule_picks_exact_when_the_prevalence_rates_are_wrong():
    rng = np.random.default_rng()
    p, y = separable_case(rng, 400, 6, rate=0.2, overlap=0.0)
    wrong_rates = np.full(6, 0.6)  # three times the truth: prevalence predicts far too many
    fresh_p, fresh_y = separable_case(rng, 8000, 6, rate=0.2, overlap=0.0)
    rules = ("prevalence", "exact")
    fresh = {r: macro_f1(decode(fresh_p, fit_rule(p, y, r, wrong_rates)), fresh_y) for r in rules}
    assert fresh["exact"] > fresh["prevalence"] + 0.1  # the known answer, checked
    choice = choose_rule(p, y, rules, folds=2, repeats=2, seed=0, rates=wrong_rates)
    assert choice.rule == "exact"
    assert choice.scores["exact"][0] > choice.scores["prevalence"][0]
    np.testing.assert_array_equal(choice.thresholds, fit_rule(p, y, "exact"))


def test_choose_rule_picks_the_shared_threshold_when_positives_are_few():
    rng = np.random.default_rng()
    # 20 labels with the same score law, ~3 positives each in 60 rows: per-label cuts overfit
    p, y = separable_case(rng, 60, 20, rate=0.05, overlap=0.3)
    fresh_p, fresh_y = separable_case(rng, 20000, 20, rate=0.05, overlap=0.3)
    rules = ("exact", "global")
    fresh = {r: macro_f1(decode(fresh_p, fit_rule(p, y, r), False), fresh_y) for r in rules}
    assert fresh["global"] > fresh["exact"] + 0.03  # the known answer, checked
    choice = choose_rule(p, y, rules, folds=2, repeats=8, seed=3, at_least_one=False)
    assert choice.rule == "global"
    assert choice.expected_labels_per_row == pytest.approx(y.sum(1).mean())


def test_choose_rule_is_deterministic_and_reports_what_it_did():
    rng = np.random.default_rng()
    p, y = make_case(rng, 150)
    rules = ("exact", "prevalence", "shrink:10")
    a = choose_rule(p, y, rules, folds=2, repeats=3, seed=7)
    b = choose_rule(p, y, rules, folds=2, repeats=3, seed=7)
    assert a.to_json() == b.to_json()
    assert set(a.scores) == set(rules)
    assert a.cv_macro_f1 == max(m for m, _ in a.scores.values())
    assert 1.0 <= a.labels_per_row <= y.shape[1]
    assert a.options == {
        "folds": 2,
        "repeats": 3,
        "seed": 7,
        "at_least_one": True,
        "lpr_tolerance": None,
    }
    with pytest.raises(ValueError, match="folds >= 2"):
        choose_rule(p, y, rules, folds=1)
    with pytest.raises(ValueError, match="threshold rule"):
        choose_rule(p, y, ("exact", "bogus"))


def test_choose_rule_with_an_lpr_tolerance_skips_rules_that_predict_too_many_labels():
    rng = np.random.default_rng()
    # 6 labels at 30 % with scores that carry no signal: predicting every label everywhere is
    # F1-optimal (2 * 0.3 / 1.3 = 0.46 against ~0.3 for the top 30 %), at 6 labels per row
    # where the truth has 1.8
    y = (rng.random((400, 6)) < 0.3).astype(np.uint8)
    p = rng.random((400, 6)).astype(np.float32)
    rules = ("global", "prevalence")
    free = choose_rule(p, y, rules, folds=2, repeats=2, seed=1)
    assert free.rule == "global"
    assert free.labels_per_row > 2 * free.expected_labels_per_row
    bounded = choose_rule(p, y, rules, folds=2, repeats=2, seed=1, lpr_tolerance=0.3)
    assert bounded.rule == "prevalence"
    assert abs(bounded.labels_per_row / bounded.expected_labels_per_row - 1) <= 0.3
    assert bounded.scores == free.scores  # the constraint changes the pick, not the scores
    # nothing eligible: the plain best is kept
    none = choose_rule(p, y, ("global",), folds=2, repeats=2, seed=1, lpr_tolerance=0.0)
    assert none.rule == "global"


def test_choose_rule_with_an_lpr_tolerance_and_no_positives_keeps_every_rule():
    # a rare-label model's dev part can hold no positive: no rate to be near, no division
    rng = np.random.default_rng(4)
    p, y = rng.random((60, 1)).astype(np.float32), np.zeros((60, 1), np.uint8)
    got = choose_rule(p, y, ("exact", "prevalence"), folds=2, repeats=2, lpr_tolerance=0.3)
    assert got.expected_labels_per_row == 0 and got.rule in ("exact", "prevalence")


def test_fit_configured_applies_at_least_one_to_all_labels_only():
    from fasthpa.thresholds.rules import fit_configured

    rng = np.random.default_rng(5)
    y = (rng.random((200, 1)) < 0.1).astype(np.uint8)
    p = np.clip(0.4 * y + 0.6 * rng.random((200, 1)), 0, 1).astype(np.float32)
    _, one = fit_configured(p, y, "auto", y.mean(0), lpr_tolerance=0.3)
    # one label: at-least-one would predict it on every row, whatever the rule
    assert one["options"]["at_least_one"] is False and one["labels_per_row"] < 0.5
    p28, y28 = make_case(rng, 200, 28)
    _, full = fit_configured(p28, y28, "auto", y28.mean(0))
    assert full["options"]["at_least_one"] is True
