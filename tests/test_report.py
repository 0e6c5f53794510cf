"""fasthpa report: real PNGs and report.md from a tiny trained run; the numbers behind the plots
against scikit-learn and the run's own files; one clear error for a folder that is not a run."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fasthpa.cli import main as cli
from fasthpa.labels import NUM_LABELS
from fasthpa.report import (
    PLOTS,
    THRESHOLD_GRID,
    confusion_counts,
    load_run,
    precision_recall_at,
    summarise_run,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real 2-epoch run at 32 px on 40 synthetic samples (about 10 s on 2 cores)."""
    from fasthpa.data.synth import generate
    from fasthpa.train.cli import main as train

    root = tmp_path_factory.mktemp("data")
    generate(root, n=40, size=32, seed=0, workers=1)
    run = tmp_path_factory.mktemp("runs") / "tiny"
    rc = train(
        [
            "--data",
            str(root),
            "--out",
            str(run),
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--loader",
            "torch",
            "--no-progress",
            "--pretrained",
            "none",
            "--recipe",
            "reference",
            "--epochs",
            "2",
            "--split",
            "0.5,0.25,0.25",
            "--log-every",
            "1",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    return run


def _assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert img.width >= 400 and img.height >= 300, (path.name, img.size)
        rgb = img.convert("RGB")
    extrema = rgb.getextrema()
    assert any(lo < hi for lo, hi in extrema), f"{path.name} is a single colour"
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, f"{path.name} has almost no content"


def test_report_of_two_runs_writes_real_pngs_and_embeds_them(tiny_run, tmp_path, capsys):
    second = tmp_path / "tiny_copy"
    shutil.copytree(tiny_run, second)
    out = tmp_path / "report"
    assert cli(["report", str(tiny_run), str(second), "--out", str(out), "--labels", "0,25"]) == 0
    assert "wrote" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    for name in PLOTS.values():
        _assert_real_png(out / name)
        assert f"]({name})" in md, f"report.md does not embed {name}"
    # one summary row per run, with the best tuned dev F1 the run itself recorded
    final = json.loads((tiny_run / "final_metrics.json").read_text())
    rows = [line for line in md.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2
    assert all(f"{final['best_dev_macro_f1_tuned']:.4f}" in row for row in rows)
    assert "0 (Nucleoplasm), 25 (Cytosol)" in md


def test_one_run_defaults_to_a_report_folder_inside_it(tiny_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    assert cli(["report", str(run)]) == 0
    md = (run / "report" / "report.md").read_text()
    assert "## Confusion counts per label" in md
    _assert_real_png(run / "report" / PLOTS["confusion"])


def test_summary_matches_the_run_files(tiny_run):
    run = load_run(tiny_run)
    s = summarise_run(run)
    lines = [json.loads(x) for x in (tiny_run / "history.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["kind"] == "epoch"]
    steps = [x for x in lines if x["kind"] == "step"]
    best = max(epochs, key=lambda e: e["dev_macro_f1_tuned"])
    assert s["dev_macro_f1_tuned"] == best["dev_macro_f1_tuned"]
    assert s["dev_macro_f1_at_0.5"] == best["dev_macro_f1_at_0.5"]
    final = json.loads((tiny_run / "final_metrics.json").read_text())
    assert s["dev_macro_f1_tuned"] == pytest.approx(final["best_dev_macro_f1_tuned"])
    assert s["test_macro_f1_tuned"] == final["test_macro_f1_tuned"]
    assert s["images_per_sec"] == statistics.median(x["images_per_sec"] for x in steps[1:])
    assert s["epochs"] == 2 and s["image_size"] == 32 and s["pretrained"] == "none"
    # the training-split label frequency, recomputed from train.csv and split.csv by hand
    cfg = json.loads((tiny_run / "config.json").read_text())
    targets = {}
    for line in (Path(cfg["data"]["data"]) / "train.csv").read_text().splitlines()[1:]:
        sample_id, target = line.split(",")
        targets[sample_id] = [int(t) for t in target.split()]
    train_ids = [
        line.split(",")[0]
        for line in (tiny_run / "split.csv").read_text().splitlines()[1:]
        if line.split(",")[1] == "train"
    ]
    expected = np.zeros(NUM_LABELS)
    for sample_id in train_ids:
        expected[targets[sample_id]] += 1
    np.testing.assert_allclose(run.frequency, expected / len(train_ids))
    assert run.frequency_source.startswith("training split")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_counts_match_sklearn(seed):
    from sklearn.metrics import multilabel_confusion_matrix

    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    # probabilities on a coarse grid, so scores equal to a threshold test the >= rule
    probs = rng.integers(0, 11, size=(n, NUM_LABELS)) / 10
    labels = (rng.random((n, NUM_LABELS)) < 0.3).astype(np.uint8)
    thresholds = rng.integers(0, 11, size=NUM_LABELS) / 10
    got = confusion_counts(probs, labels, thresholds)
    ref = multilabel_confusion_matrix(labels, (probs >= thresholds).astype(int))  # [[tn fp][fn tp]]
    expected = np.stack([ref[:, 1, 1], ref[:, 0, 1], ref[:, 1, 0], ref[:, 0, 0]], axis=1)
    np.testing.assert_array_equal(got, expected)
    assert (got.sum(axis=1) == n).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_curve_matches_sklearn(seed):
    from sklearn.metrics import precision_score, recall_score

    rng = np.random.default_rng(seed)
    scores = rng.random(37)
    truth = (rng.random(37) < 0.4).astype(int)
    truth[0] = 1
    precision, recall = precision_recall_at(scores, truth)
    for k, t in enumerate(THRESHOLD_GRID):
        pred = (scores >= t).astype(int)
        assert recall[k] == pytest.approx(recall_score(truth, pred))
        if pred.sum() == 0:
            assert np.isnan(precision[k])  # undefined: left out of the plot, not drawn as 0
        else:
            assert precision[k] == pytest.approx(precision_score(truth, pred))
    _, no_positives = precision_recall_at(scores, np.zeros(37))
    assert np.isnan(no_positives).all()


def test_a_run_without_dev_outputs_still_gets_its_curves(tiny_run, tmp_path):
    run = tmp_path / "early"
    shutil.copytree(tiny_run, run)
    (run / "thresholds.json").unlink()
    (run / "dev_probs.npz").unlink()
    out = tmp_path / "rep"
    assert cli(["report", str(run), "--out", str(out)]) == 0
    _assert_real_png(out / PLOTS["curves"])
    _assert_real_png(out / PLOTS["throughput"])
    assert not (out / PLOTS["confusion"]).exists()
    assert "No run has a dev evaluation yet" in (out / "report.md").read_text()


def test_bad_input_is_one_clear_error(tiny_run, tmp_path, capsys):
    def error(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as e:
            cli(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1
        return err

    not_a_run = tmp_path / "photos"
    not_a_run.mkdir()
    assert str(not_a_run) in error(["report", str(not_a_run)])
    assert "not a folder" in error(["report", str(tmp_path / "missing")])
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(tiny_run / "config.json", empty / "config.json")
    (empty / "history.jsonl").write_text("")
    msg = error(["report", str(empty)])
    assert str(empty) in msg and "no history" in msg
    broken = tmp_path / "broken_run"
    shutil.copytree(tiny_run, broken)
    (broken / "history.jsonl").write_text('{"kind": "step"}\nnot json\n')
    assert "line 2" in error(["report", str(broken)])
    assert "--labels" in error(["report", str(tiny_run), "--labels", "0,28"])
    assert "--out" in error(["report", str(tiny_run), str(tiny_run)])
