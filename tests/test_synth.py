"""Tests for the synthetic HPA generator (`fasthpa synth`): layout, determinism, labels, motifs.

Small on purpose (tiny images, a few hundred renders at most): the whole file runs in seconds.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from fasthpa.cli import main
from fasthpa.data import synth
from fasthpa.data.synth import (
    LABELS_PER_SAMPLE_COUNTS,
    _blur,
    generate,
    label_quotas,
    render_sample,
    sample_labels,
    sample_rng,
)
from fasthpa.errors import UserError
from fasthpa.labels import CHANNELS, KAGGLE_TRAIN_COUNTS, NUM_LABELS

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _label_counts(labels: list[tuple[int, ...]]) -> np.ndarray:
    counts = np.zeros(NUM_LABELS, dtype=np.int64)
    for labs in labels:
        counts[list(labs)] += 1
    return counts


def _read_rows(path: Path) -> tuple[str, list[tuple[str, str]]]:
    text = path.read_text()
    assert text.endswith("\n") and "\r" not in text and "\n\n" not in text
    header, *rows = text.splitlines()
    return header, [tuple(row.split(",")) for row in rows]


# ----------------------------------------------------------------------------------------------
# Layout and CSV format
# ----------------------------------------------------------------------------------------------


def test_layout_and_csvs_match_kaggle(tmp_path):
    out = tmp_path / "ds"
    summary = generate(out, n=7, size=32, test_n=3, seed=5)
    assert sorted(p.name for p in out.iterdir()) == [
        "sample_submission.csv",
        "test",
        "test_labels.csv",
        "train",
        "train.csv",
    ]

    header, train = _read_rows(out / "train.csv")
    assert header == "Id,Target"
    assert len(train) == 7 == summary.n_train
    header, truth = _read_rows(out / "test_labels.csv")
    assert header == "Id,Target"
    header, sub = _read_rows(out / "sample_submission.csv")
    assert header == "Id,Predicted"
    assert [row[1] for row in sub] == ["0"] * 3
    assert [row[0] for row in sub] == [row[0] for row in truth]

    train_ids = [row[0] for row in train]
    test_ids = [row[0] for row in truth]
    assert train_ids == sorted(train_ids) and test_ids == sorted(test_ids)
    assert len(set(train_ids) | set(test_ids)) == 10  # unique across both splits
    for sample_id, target in train + truth:
        assert UUID.match(sample_id), sample_id
        labels = [int(tok) for tok in target.split(" ")]  # single spaces, no padding
        assert " ".join(map(str, labels)) == target
        assert 1 <= len(labels) <= 3 and len(set(labels)) == len(labels)
        assert all(0 <= x < NUM_LABELS for x in labels)

    for split, ids in (("train", train_ids), ("test", test_ids)):
        expected = {f"{i}_{stain}.png" for i in ids for stain in CHANNELS}
        assert {p.name for p in (out / split).iterdir()} == expected  # no temporaries left
        for name in list(expected)[:4]:
            with Image.open(out / split / name) as im:
                assert im.format == "PNG" and im.mode == "L" and im.size == (32, 32)

    # what the usual Kaggle loaders do must work unchanged
    df = pd.read_csv(out / "train.csv", dtype=str)
    assert list(df.columns) == ["Id", "Target"] and len(df) == 7
    assert df["Target"].str.split().map(len).between(1, 3).all()
    assert summary.label_counts == tuple(
        _label_counts([tuple(map(int, t.split())) for _, t in train])
    )


def test_png_pixels_are_the_in_memory_render(tmp_path):
    generate(tmp_path, n=3, size=48, test_n=2, seed=9)
    for split, csv in (("train", "train.csv"), ("test", "test_labels.csv")):
        _, rows = _read_rows(tmp_path / csv)
        for index, (sample_id, target) in enumerate(rows):
            labels = [int(tok) for tok in target.split()]
            expected = render_sample(labels, 48, sample_rng(9, split, index))
            for c, stain in enumerate(CHANNELS):
                with Image.open(tmp_path / split / f"{sample_id}_{stain}.png") as im:
                    np.testing.assert_array_equal(np.asarray(im), expected[..., c])


def test_without_test_split_writes_only_train(tmp_path):
    generate(tmp_path, n=2, size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", "train.csv"]


def test_cli_writes_dataset_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(["synth", str(out), "--n", "3", "--size", "24", "--test-n", "1", "--workers", "1"])
        == 0
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("wrote 3 train + 1 test samples (24 px, seed 0")
    assert len(list((out / "train").iterdir())) == 12 and (out / "sample_submission.csv").exists()


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_for_any_worker_count(tmp_path):
    one = generate(tmp_path / "w1", n=9, size=32, test_n=3, seed=4, workers=1)
    two = generate(tmp_path / "w2", n=9, size=32, test_n=3, seed=4, workers=2)
    assert (one.workers, two.workers) == (1, 2)
    a, b = _tree_bytes(tmp_path / "w1"), _tree_bytes(tmp_path / "w2")
    assert len(a) == 4 * 12 + 3
    assert a == b
    generate(tmp_path / "other", n=9, size=32, test_n=3, seed=5)
    c = _tree_bytes(tmp_path / "other")
    assert c["train.csv"] != a["train.csv"]
    assert set(c).isdisjoint(set(a) - {"train.csv", "test_labels.csv", "sample_submission.csv"})


def test_render_sample_is_a_function_of_the_generator_state():
    a = render_sample([3, 25], 40, np.random.default_rng(1))
    b = render_sample([25, 3], 40, np.random.default_rng(1))  # label order does not matter
    c = render_sample([3, 25], 40, np.random.default_rng(2))
    assert a.dtype == np.uint8 and a.shape == (40, 40, 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------------------------
# Labels (the sampler alone, no images)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_frequencies_follow_kaggle_counts(seed):
    n = 2000
    counts = _label_counts(sample_labels(n, np.random.default_rng(seed)))
    rho = spearmanr(counts, KAGGLE_TRAIN_COUNTS).statistic
    assert rho > 0.95, rho
    # per-label share of samples against the real share (Kaggle: 31,072 samples)
    real = np.asarray(KAGGLE_TRAIN_COUNTS) / 31072
    ours = counts / n
    common = real > 0.01
    np.testing.assert_allclose(ours[common], real[common], rtol=0.1, atol=0.01)


@pytest.mark.parametrize("n", [1000, 1001, 1777, 4000])
def test_every_label_present_at_least_three_times(n):
    counts = _label_counts(sample_labels(n, np.random.default_rng(n)))
    assert counts.min() >= 3, counts


@pytest.mark.parametrize("n", [1, 2, 5, 10, 17, 30, 60])
def test_small_n_covers_as_many_labels_as_possible(n):
    labels = sample_labels(n, np.random.default_rng(n))
    assert len(labels) == n and all(1 <= len(labs) <= 3 for labs in labels)
    slots = sum(len(labs) for labs in labels)
    counts = _label_counts(labels)
    assert int((counts > 0).sum()) == min(NUM_LABELS, slots)
    if slots >= 3 * NUM_LABELS:
        assert counts.min() >= 3


def test_label_quotas_water_fill():
    for total in (28, 60, 84, 500, 3260, 50782):
        q = label_quotas(total, np.random.default_rng(0))
        assert q.sum() == total
        floor = min(3, total // NUM_LABELS)
        assert q.min() >= floor
        # labels above the floor are proportional to the real counts (to rounding)
        counts = np.asarray(KAGGLE_TRAIN_COUNTS, dtype=np.float64)
        free = q > floor
        if not free.any():  # every label at the floor
            continue
        scale = (total - q[~free].sum()) / counts[free].sum()
        assert np.all(np.abs(q[free] - scale * counts[free]) < 1.0)
    np.testing.assert_array_equal(label_quotas(50782, None), KAGGLE_TRAIN_COUNTS)


def test_labels_per_sample_follow_the_real_distribution():
    n = 3000
    labels = sample_labels(n, np.random.default_rng(7))
    assert all(len(set(labs)) == len(labs) for labs in labels)
    sizes = Counter(len(labs) for labs in labels)
    assert set(sizes) == {1, 2, 3}
    real = np.asarray(LABELS_PER_SAMPLE_COUNTS) / sum(LABELS_PER_SAMPLE_COUNTS)
    ours = np.asarray([sizes[1], sizes[2], sizes[3]]) / n
    np.testing.assert_allclose(ours, real, atol=0.005)
    assert abs(real[0] - 0.49) < 0.01 and abs(real[1] - 0.40) < 0.01  # 1 label 49%, 2 labels 40%


def _pairs(seed: int) -> Counter:
    labels = sample_labels(3000, np.random.default_rng(seed))
    return Counter(tuple(sorted(p)) for labs in labels for p in combinations(labs, 2))


def test_nucleoplasm_and_cytosol_is_the_commonest_pair(monkeypatch):
    with_affinity = _pairs(3)
    (top, top_n), (_, second_n) = with_affinity.most_common(2)
    assert top == (0, 25) and top_n > 1.5 * second_n
    # the pair affinity is what lifts it: dealing labels by frequency alone gives far fewer
    monkeypatch.setattr(synth, "_affinity", lambda: np.ones((NUM_LABELS, NUM_LABELS)))
    assert top_n > 1.3 * _pairs(3)[(0, 25)]


# ----------------------------------------------------------------------------------------------
# Images: stains and green motifs
# ----------------------------------------------------------------------------------------------


def _channels(image: np.ndarray) -> tuple[np.ndarray, ...]:
    x = image.astype(np.float32) / 255.0
    return tuple(x[..., c] for c in range(4))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_channel_means_are_in_the_real_range():
    labels = sample_labels(60, np.random.default_rng(0))
    images = np.stack(
        [render_sample(labs, 64, np.random.default_rng(i)) for i, labs in enumerate(labels)]
    )
    means = images.reshape(-1, 4).mean(0) / 255.0
    # Kaggle train set (R, G, B, Y): 0.081, 0.053, 0.055, 0.083; ours need only be near them
    real = np.asarray([0.0807, 0.0526, 0.0549, 0.0828])
    assert np.all(means > real / 2.5) and np.all(means < real * 2.5), means


def test_green_is_empty_without_labels_and_bright_with_them():
    empty = [_channels(render_sample([], 64, np.random.default_rng(i)))[1].mean() for i in range(4)]
    full = [
        _channels(render_sample([25], 64, np.random.default_rng(i)))[1].mean() for i in range(4)
    ]
    assert max(empty) * 2 < min(full)


def test_green_motifs_sit_in_their_compartments():
    def mean_corr(label: int, other: int, seeds=range(4)) -> float:
        vals = []
        for s in seeds:
            ch = _channels(render_sample([label], 96, np.random.default_rng([21, label, s])))
            vals.append(_corr(ch[1], ch[other]))
        return float(np.mean(vals))

    red, blue, yellow = 0, 2, 3
    assert mean_corr(0, blue) > 0.7  # nucleoplasm fills the nucleus
    assert mean_corr(25, blue) < 0.2 and mean_corr(21, blue) < 0.2  # cytosol, membrane: outside
    assert mean_corr(14, red) > 0.5  # microtubules: a green copy of the red fibres
    assert mean_corr(6, yellow) > 0.6  # ER: a green copy of the yellow mesh
    assert mean_corr(14, red) > mean_corr(0, red) + 0.3


def _probe_features(image: np.ndarray) -> np.ndarray:
    """Ten cheap, label-agnostic summaries of where and how the green stain sits."""
    r, g, b, y = _channels(image)
    nucleus = _blur(b, 1.0) > 0.5 * np.percentile(b, 99)
    cell = (_blur(r + y, 1.5) > 0.3 * np.percentile(r + y, 99)) | nucleus
    cyto = cell & ~nucleus

    def edge(mask):
        s = _blur(mask.astype(np.float32), 1.0)
        return (s > 0.15) & (s < 0.85)

    total = g.sum() + 1e-6
    g1, g3 = _blur(g, 1.0), _blur(g, 2.5)
    var = g.var() + 1e-9
    top = np.sort(g.ravel())[::-1][: g.size // 50]
    in_cell = g[cell].mean() + 1e-6
    return np.nan_to_num(
        [
            g[nucleus].sum() / total,
            g[cyto].sum() / total,
            _corr(g, r),
            _corr(g, y),
            _corr(g, b),
            top.sum() / total,
            (g - g1).var() / var,
            (g1 - g3).var() / var,
            g[edge(cell)].mean() / in_cell,
            g[edge(nucleus)].mean() / in_cell,
        ]
    )


def test_each_label_has_its_own_green_motif():
    """A linear probe on ten green-stain summaries tells the 28 single-label motifs apart."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    per_label, n_train = 9, 6
    x, y = [], []
    for label in range(NUM_LABELS):
        for j in range(per_label):
            x.append(
                _probe_features(render_sample([label], 64, np.random.default_rng([3, label, j])))
            )
            y.append(label)
    x, y = np.asarray(x), np.asarray(y)
    train = np.arange(len(y)) % per_label < n_train
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=10.0))
    probe.fit(x[train], y[train])
    accuracy = float((probe.predict(x[~train]) == y[~train]).mean())
    # chance is 1/28 = 0.036; the probe reaches about 0.7 here
    assert accuracy > 0.4, accuracy

    # the same probe on shuffled labels stays near chance: the signal is the motif, not the probe
    shuffled = np.random.default_rng(0).permutation(y[train])
    probe.fit(x[train], shuffled)
    assert float((probe.predict(x[~train]) == y[~train]).mean()) < 0.2


def test_render_sample_rejects_bad_arguments():
    with pytest.raises(ValueError, match="labels"):
        render_sample([28], 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="size"):
        render_sample([0], 8, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------
# Bad input and overwriting
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"n": 0}, "--n"),
        ({"n": 2, "size": 15}, "--size"),
        ({"n": 2, "test_n": -1}, "--test-n"),
        ({"n": 2, "seed": -3}, "--seed"),
        ({"n": 2, "workers": -1}, "--workers"),
    ],
)
def test_bad_arguments_raise_one_clear_sentence(tmp_path, kwargs, flag):
    with pytest.raises(UserError, match=re.escape(flag)) as e:
        generate(tmp_path / "x", **kwargs)
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")
    assert not (tmp_path / "x").exists()


def test_non_empty_output_needs_overwrite(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        generate(tmp_path, n=2, size=16)
    with pytest.raises(SystemExit) as e:
        main(["synth", str(tmp_path), "--n", "2", "--size", "16"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: output folder {tmp_path} is not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_the_old_dataset_and_keeps_other_files(tmp_path):
    generate(tmp_path, n=5, size=16, test_n=2, seed=1)
    (tmp_path / "notes.txt").write_text("keep me")
    generate(tmp_path, n=2, size=16, seed=2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "test", "train", "train.csv"]
    assert list((tmp_path / "test").iterdir()) == []  # old test images gone, CSVs too
    _, rows = _read_rows(tmp_path / "train.csv")
    assert {p.name for p in (tmp_path / "train").iterdir()} == {
        f"{i}_{s}.png" for i, _ in rows for s in CHANNELS
    }
