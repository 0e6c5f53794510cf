"""Rare-label models (`fasthpa rare`): one binary model per rare label on an enriched subsample,
started from the run's network and its classifier row; predict takes those labels'
probabilities and thresholds from them, and only those."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fasthpa.checkpoint import load_checkpoint
from fasthpa.cli import main as cli_main
from fasthpa.config import load_config
from fasthpa.data.dataset import read_targets_csv
from fasthpa.errors import UserError
from fasthpa.predict import predict
from fasthpa.rare import rare_labels, train_rare_models
from fasthpa.rare.models import batch_for, rare_config, subsample_rows, training_targets
from fasthpa.train.build import _init_state
from fasthpa.train.cli import main as train_main

pytestmark = pytest.mark.slow
FAST = {"loader": "torch", "workers": 0}


def _main_run(base: Path, seed: int, extra: str) -> Path:
    """A tiny main run (60 synthetic samples at 32 px, 1 epoch) in ``base``; ``extra`` flags."""
    from fasthpa.data.synth import generate

    root, run = base / "data", base / "run"
    generate(root, n=60, size=32, test_n=8, seed=seed, workers=1)
    flags = (
        "--image-size 32 --batch-size 8 --workers 0 --loader torch --no-progress --pretrained none "
        f"--epochs 1 --log-every 4 --split 0.6,0.2,0.2 {extra}"
    )
    assert train_main(["--data", str(root), "--out", str(run), *flags.split()]) == 0
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = _main_run(tmp_path_factory.mktemp("rare"), 6, "--recipe reference")
    summary = train_rare_models(run, labels=[8, 27], epochs=1, overrides={"data": FAST})
    assert summary["status"] == "finished"
    return run


def test_each_rare_model_is_a_run_of_one_label_on_an_enriched_subsample(run):
    main = load_config(run / "config.json")
    ids, targets = read_targets_csv(Path(main.data.data) / "train.csv")
    for label in (8, 27):
        out = run / "rare" / f"label{label:02d}"
        cfg = load_config(out / "config.json")
        assert cfg.data.labels == str(label) and cfg.data.positive_share == 0.2
        # thresholds at the label's real rate: the exact cut on the dev part, no refit
        assert cfg.run.threshold_rule == "exact" and not cfg.run.refit_heads
        rows = subsample_rows(training_targets(run, main), label, 0.2)
        assert cfg.run.batch_size == min(main.run.batch_size, batch_for(rows))
        assert cfg.model.init_from == str(run / "best.pt")
        assert (out / "split.csv").read_text() == (run / "split.csv").read_text()
        state = load_checkpoint(out / "best.pt")
        assert state["labels"] == [label] and state["model"]["fc.weight"].shape[0] == 1
        thr = json.loads((out / "thresholds.json").read_text())
        assert len(thr["thresholds"]) == 1 and thr["label_names"] == [thr["label_names"][0]]
    summary = json.loads((run / "rare" / "summary.json").read_text())
    assert [r["label"] for r in summary["labels"]] == [8, 27]
    assert set(summary["test_part"]) == {"with", "without"}
    from fasthpa.data.splits import read_split_csv

    part = read_split_csv(run / "split.csv", ids) == 0  # the training part
    freq = targets[part].mean(axis=0)
    for below in (0.05, 0.2):
        assert rare_labels(run, below) == [i for i in range(28) if 0 < freq[i] < below]


def test_a_rare_models_batch_leaves_two_batches_of_its_subsample():
    assert [batch_for(n) for n in (1, 2, 3, 4, 5, 16, 17, 25, 64, 600)] == [
        1,
        1,
        1,
        2,
        2,
        8,
        8,
        8,
        32,
        256,
    ]
    for n in range(1, 300):
        assert 2 * batch_for(n) <= max(2, n) and (batch_for(n) & (batch_for(n) - 1)) == 0


def test_the_model_starts_from_the_runs_network_and_classifier_row(run):
    main = load_config(run / "config.json")
    cfg = rare_config(main, run, 27, 0.2, 1, {}, 100)
    state = _init_state(cfg)
    best = load_checkpoint(run / "best.pt")["model"]
    assert torch.equal(state["fc.weight"], best["fc.weight"][[27]])
    assert torch.equal(state["fc.bias"], best["fc.bias"][[27]])
    assert torch.equal(state["body.conv1.weight"], best["body.conv1.weight"])


def test_predict_takes_only_the_rare_labels_from_their_models(run, tmp_path):
    data = load_config(run / "config.json").data.data
    with_rare = predict(run, data, out=tmp_path / "with.csv", **FAST)
    without = predict(run, data, out=tmp_path / "without.csv", rare=False, **FAST)
    others = [i for i in range(28) if i not in (8, 27)]
    assert np.array_equal(with_rare.probs[:, others], without.probs[:, others])
    assert not np.allclose(with_rare.probs[:, [8, 27]], without.probs[:, [8, 27]])
    for label in (8, 27):
        own = json.loads((run / "rare" / f"label{label:02d}" / "thresholds.json").read_text())
        assert with_rare.thresholds[label] == own["thresholds"][0]
    assert np.array_equal(with_rare.thresholds[others], without.thresholds[others])


def test_bad_requests_are_one_line(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["rare", "--run", str(tmp_path / "empty")], "config.json: not found"),
        (["rare", "--run", str(run), "--below", "0"], "--below 0.0: must be in (0, 1]"),
        (["rare", "--run", str(run), "--labels", "28"], "--labels '28'"),
        (["rare", "--run", str(run / "rare" / "label08")], "a model of some labels only"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err
    with pytest.raises(UserError, match="no label is rarer than --below"):
        train_rare_models(run, below=1e-9)


@pytest.fixture(scope="module")
def refit_run(tmp_path_factory) -> Path:
    """A main run of the default recipe (the refit with the location features) and the
    rare-label model of one label."""
    run = _main_run(tmp_path_factory.mktemp("rare_refit"), 7, "")
    assert load_config(run / "config.json").run.refit_heads
    label = int(np.argmax(training_targets(run, load_config(run / "config.json")).sum(0) > 0))
    summary = train_rare_models(run, labels=[label], epochs=1, overrides={"data": FAST})
    assert summary["status"] == "finished"
    return run


def test_after_a_refitting_run_the_rare_model_refits_on_the_whole_training_part(refit_run):
    main = load_config(refit_run / "config.json")
    (out,) = sorted((refit_run / "rare").glob("label*"))
    cfg = load_config(out / "config.json")
    assert cfg.run.refit_heads and cfg.run.location_features
    assert cfg.run.threshold_rule == main.run.threshold_rule
    label = int(cfg.data.labels)
    targets = training_targets(refit_run, main)
    refit = json.loads((out / "refit.json").read_text())
    # its network trained on the enriched subsample; its classifier on every training row
    assert subsample_rows(targets, label, 0.2) < len(targets) == refit["train_rows"]
    oof = np.load(out / "train_oof_probs.npz")
    assert oof["probs"].shape == (len(targets), 1)
    assert oof["labels"][:, 0].sum() == targets[:, label].sum()
    assert any(k.startswith("location.") for k in load_checkpoint(out / "best.pt")["model"])
    data = main.data.data
    got = predict(refit_run, data, out=out.parent / "with.csv", **FAST)
    assert np.isfinite(got.probs).all() and got.probs.shape[1] == 28


@pytest.mark.parametrize("with_f1", [0.4, 0.6])
def test_the_table_says_when_the_test_part_scored_lower_with_them(capsys, with_f1):
    from fasthpa.rare.models import _print

    row = {"label": 8, "name": "Peroxisomes", "dev_positives": 1}
    row |= {"dev_f1_main": 0.5, "dev_f1_rare_model": 0.0}
    test = {
        k: {"macro_f1": f, "per_label_f1": {8: f}} for k, f in [("without", 0.5), ("with", with_f1)]
    }
    _print({"status": "finished", "labels": [row], "test_part": test})
    out = capsys.readouterr().out
    assert f"0.5000 without the rare-label models, {with_f1:.4f} with them" in out
    assert ("scored lower with them" in out) is (with_f1 < 0.5)
