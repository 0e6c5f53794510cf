"""`fasthpa cv` and fold ensembles on tiny synthetic data: out-of-fold probabilities cover every
train row once, thresholds fitted on them, the stack on all folds' features (predict's default
for a cv folder; --no-stack averages the folds), an interrupted cv resumes fold by fold, and bad
input is one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fasthpa.cv.cli import main as cv_main
from fasthpa.data.dataset import read_targets_csv
from fasthpa.distributed import DistInfo
from fasthpa.errors import UserError
from fasthpa.predict import predict
from fasthpa.train import TrainHooks

pytestmark = pytest.mark.slow

FAST = {"loader": "torch", "workers": 0}


def cv_args(root: Path, out: Path, *extra: str) -> list[str]:
    flags = (
        "--folds 2 --image-size 32 --batch-size 8 --workers 0 --loader torch --no-progress "
        "--pretrained none --epochs 1 --log-every 2 --recipe reference"
    )
    return ["--data", str(root), "--out", str(out), *flags.split(), *extra]


def run(argv: list[str], hooks: TrainHooks | None = None) -> int:
    try:
        return cv_main(argv, hooks)
    except SystemExit as e:
        return int(e.code)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from fasthpa.data.synth import generate

    root = tmp_path_factory.mktemp("cv") / "data"
    generate(root, n=48, size=32, test_n=8, seed=5, workers=1)
    return root


@pytest.fixture(scope="module")
def cv_dir(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cvrun") / "cv"
    assert cv_main(cv_args(data, out)) == 0
    return out


def test_oof_probabilities_cover_train_once_and_fit_the_thresholds(data, cv_dir):
    ids, targets = read_targets_csv(data / "train.csv")
    with np.load(cv_dir / "oof_probs.npz") as z:
        assert list(z["ids"]) == ids  # train.csv order, every row once
        assert np.array_equal(z["labels"], targets) and z["probs"].shape == (len(ids), 28)
        oof = z["probs"]
    # each row's probability is the one its fold's model gave it on its dev part
    for fold in ("fold0", "fold1"):
        with np.load(cv_dir / fold / "dev_probs.npz") as z:
            where = [ids.index(i) for i in z["ids"]]
            assert np.array_equal(oof[where], z["probs"])
    thr = json.loads((cv_dir / "thresholds.json").read_text())
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    assert thr["n_samples"] == len(ids) and summary["oof_samples"] == len(ids)
    assert summary["threshold_rule"] in ("exact", "prevalence") and len(summary["folds"]) == 2
    assert summary["labels_per_row_true"] == pytest.approx(targets.sum(1).mean())
    manifest = json.loads((cv_dir / "cv.json").read_text())
    assert manifest["folds"] == ["fold0", "fold1"] and manifest["k"] == 2
    # the folds share one set of channel statistics
    stats = {(cv_dir / f / "channel_stats.json").read_text() for f in ("fold0", "fold1")}
    assert stats == {(cv_dir / "channel_stats.json").read_text()}


def test_predict_on_the_cv_folder_without_the_stack_averages_the_folds(data, cv_dir, tmp_path):
    both = predict(cv_dir, data, out=tmp_path / "cv.csv", stack=False, **FAST)
    one = [predict(cv_dir / f, data, out=tmp_path / f"{f}.csv", **FAST) for f in ("fold0", "fold1")]
    mean = (one[0].probs.astype(np.float64) + one[1].probs) / 2
    np.testing.assert_allclose(both.probs, mean, rtol=0, atol=1e-6)
    oof_thr = json.loads((cv_dir / "thresholds.json").read_text())["thresholds"]
    assert np.array_equal(both.thresholds, np.asarray(oof_thr))
    # two run folders: averaged the same way, with the mean of their own thresholds
    pair = predict([cv_dir / "fold0", cv_dir / "fold1"], data, out=tmp_path / "p.csv", **FAST)
    np.testing.assert_allclose(pair.probs, both.probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pair.thresholds, (one[0].thresholds + one[1].thresholds) / 2)


def _plain_stack_features(cv_dir: Path, data: Path, split: str) -> tuple[list[str], torch.Tensor]:
    """Each fold network's pooled features, written out (body, pool, flatten), side by side."""
    from fasthpa.predict.inputs import load_run_inputs, select_rows
    from fasthpa.predict.predictor import _model, build_predictor

    folds = [cv_dir / "fold0", cv_dir / "fold1"]
    runs = [load_run_inputs(f, "best") for f in folds]
    rows = select_rows(data, split, None, None, folds[0], 4)
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    loader = build_predictor(runs, rows, cpu, workers=0, backend="torch").loader
    nets = [_model(r, cpu.device) for r in runs]
    out = torch.zeros((len(rows.ids), 512 * len(nets)))
    with torch.no_grad():
        for x, _, idx in loader:
            feats = [torch.flatten(n.pool(n.body(x)), 1) for n in nets]
            out[idx[idx >= 0]] = torch.cat(feats, 1)[idx >= 0]
    return rows.ids, out


def test_the_stack_is_one_fit_on_both_folds_features_and_predict_scores_with_it(
    data, cv_dir, tmp_path, capsys
):
    from fasthpa.checkpoint import load_checkpoint
    from fasthpa.train.refit import fit_linear_heads

    stack = load_checkpoint(cv_dir / "stack.pt")
    assert stack["folds"] == ["fold0", "fold1"] and stack["weight"].shape == (28, 1024)
    ids, feats = _plain_stack_features(cv_dir, data, "train")
    _, targets = read_targets_csv(data / "train.csv")
    assert ids == read_targets_csv(data / "train.csv")[0]
    ref = fit_linear_heads(feats, targets, 1.0 / (stack["c"] * len(ids)))
    fitted = torch.sigmoid(feats @ stack["weight"].T + stack["bias"])
    # the same fit on the same rows in the same order. The fits run in float32 and the features
    # written out here differ from the stack's in the last bits, so on this tiny, ill-conditioned
    # problem (weights on near-constant features) the two optima differ by up to ~2.5e-4 in
    # probability: compare what they score, at 5e-4
    np.testing.assert_allclose(fitted, ref.probs(feats), rtol=0, atol=5e-4)
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    assert 0 <= summary["stack_oof_macro_f1_tuned"] <= 1 and summary["stack_features"] == 1024
    # predict --run CVDIR: the stack's probabilities and its own thresholds
    got = predict(cv_dir, data, out=tmp_path / "stack.csv", **FAST)
    test_ids, test_feats = _plain_stack_features(cv_dir, data, "test")
    want = torch.sigmoid(test_feats @ stack["weight"].T + stack["bias"]).numpy()
    assert got.ids == test_ids
    np.testing.assert_allclose(got.probs, want, rtol=0, atol=1e-5)
    thr = json.loads((cv_dir / "stack_thresholds.json").read_text())["thresholds"]
    assert np.array_equal(got.thresholds, np.asarray(thr))
    averaged = predict(cv_dir, data, out=tmp_path / "mean.csv", stack=False, **FAST)
    assert not np.allclose(averaged.probs, got.probs, atol=1e-3)
    # the stack read best.pt's features: another checkpoint averages the folds, and says so
    last = predict(cv_dir, data, out=tmp_path / "last.csv", checkpoint="last", **FAST)
    assert "averaging the folds instead" in capsys.readouterr().err
    mean_thr = json.loads((cv_dir / "thresholds.json").read_text())["thresholds"]
    assert np.array_equal(last.thresholds, np.asarray(mean_thr))


def test_a_stack_of_other_folds_is_refused(data, cv_dir, tmp_path):
    from fasthpa.checkpoint import INTEGRITY_KEY, load_checkpoint, save_checkpoint

    other = tmp_path / "other"
    shutil.copytree(cv_dir, other, ignore=shutil.ignore_patterns("last*.pt"))
    state = load_checkpoint(other / "stack.pt")
    state.pop(INTEGRITY_KEY)
    save_checkpoint(other / "stack.pt", state | {"folds": ["fold0", "fold2"]})
    with pytest.raises(UserError, match=r"stack.pt: fitted on folds \['fold0', 'fold2'\]"):
        predict(other, data, out=tmp_path / "s.csv", **FAST)
    assert predict(other, data, out=tmp_path / "s.csv", stack=False, **FAST) is not None


def test_an_interrupted_cv_resumes_fold_by_fold(data, cv_dir, tmp_path, capsys):
    out = tmp_path / "cv"
    calls = []

    def after_step(step: int) -> None:
        calls.append(step)
        if calls.count(1) == 2:  # the second run's first step: step 1 of fold 1
            os.kill(os.getpid(), signal.SIGTERM)

    assert run(cv_args(data, out), TrainHooks(after_step=after_step)) == 0
    assert "stopped by SIGTERM at epoch 0, step 1" in capsys.readouterr().out
    assert (out / "fold0" / "final_metrics.json").is_file()
    assert (
        not (out / "fold1" / "final_metrics.json").exists()
        and (out / "fold1" / "last.pt").is_file()
    )
    assert not (out / "oof_probs.npz").exists()
    assert run(cv_args(data, out, "--no-stack")) == 0  # fold 1 resumes, then the OOF fit
    assert "resuming" in capsys.readouterr().out
    with np.load(out / "oof_probs.npz") as a, np.load(cv_dir / "oof_probs.npz") as b:
        assert np.array_equal(a["probs"], b["probs"])  # bit-identical to the uninterrupted cv
    thr = [json.loads((d / "thresholds.json").read_text())["thresholds"] for d in (out, cv_dir)]
    assert thr[0] == thr[1]
    assert not (out / "stack.pt").exists()  # --no-stack


@pytest.mark.parametrize("case", ["one_fold", "fold_flag", "other_k"])
def test_bad_requests_are_one_line(data, cv_dir, tmp_path, case, capsys):
    args = cv_args(data, tmp_path / "cv")
    if case == "one_fold":
        args[args.index("--folds") + 1], message = (
            "1",
            "--folds 1: cross-validation needs at least 2",
        )
    elif case == "fold_flag":
        args += ["--fold", "0/2"]
        message = "--fold: fasthpa cv chooses each fold's split"
    else:
        args[args.index("--out") + 1] = str(cv_dir)
        args[args.index("--folds") + 1] = "3"
        message = "was made with --folds 2, not 3"
    with pytest.raises(SystemExit) as exc:
        cv_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_folds_of_different_experiments_and_missing_folds_are_refused(data, cv_dir, tmp_path):
    from fasthpa.cv import collect_oof

    mixed = tmp_path / "mixed"
    shutil.copytree(cv_dir, mixed)
    cfg = json.loads((mixed / "fold1" / "config.json").read_text())
    cfg["data"]["image_size"] = 64
    (mixed / "fold1" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="fold1: trained with --image-size 64"):
        collect_oof(mixed)
    shutil.rmtree(mixed / "fold1")
    with pytest.raises(UserError, match="fold run fold1 is missing"):
        predict(mixed, data, out=tmp_path / "s.csv", **FAST)


def test_torchrun_two_ranks_run_the_folds_and_rank0_the_stack(data, tmp_path):
    """Under torchrun every fold trains on both ranks; the out-of-fold fit and the stack run on
    rank 0 after the others are done, and predict reads the folder like a single-process one."""
    out = tmp_path / "cv"
    args = cv_args(data, out)
    args[args.index("--batch-size") + 1] = "4"  # per rank: the global batch of the fixture's cv
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [*cmd, "-m", "fasthpa.cv", *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.count("stack of 2 folds") == 1  # rank 0 only
    ids, _ = read_targets_csv(data / "train.csv")
    with np.load(out / "oof_probs.npz") as z:
        assert list(z["ids"]) == ids
    env_fold = json.loads((out / "fold1" / "env.json").read_text())
    assert env_fold["world_size"] == 2
    got = predict(out, data, out=tmp_path / "s.csv", **FAST)
    thr = json.loads((out / "stack_thresholds.json").read_text())["thresholds"]
    assert np.array_equal(got.thresholds, np.asarray(thr)) and got.probs.shape == (8, 28)


def test_with_stack_replaces_the_folds_and_keeps_the_rare_label_models():
    from fasthpa.evaluate import Head
    from fasthpa.model import StackedNet, build_model
    from fasthpa.predict.predictor import Predictor, with_stack

    def net(classes: int):
        return build_model("resnet18", num_classes=classes, in_channels=4, pretrained="none")[0]

    folds, rare = [net(28), net(28)], net(1)
    everything, rare_head = Head(tuple(range(28))), Head((27,), tier=1)
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    p = Predictor([*folds, rare], None, cpu, 4, None, False, [everything, everything, rare_head])
    weight, bias = torch.randn(28, 1024), torch.randn(28)
    with_stack([p], (weight, bias))
    assert isinstance(p.models[0], StackedNet) and p.models[1] is rare
    assert p.heads == [everything, rare_head] and p.main_models == 1
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        plain = torch.cat([f.pool(f.body(x)).flatten(1) for f in folds], 1) @ weight.T + bias
        torch.testing.assert_close(p.models[0].eval()(x), plain, rtol=1e-4, atol=1e-4)
    # folds whose inputs differ sit in two predictors: the stack cannot read them side by side
    split = [Predictor([f], None, cpu, 4, None, False, None) for f in (net(28), net(28))]
    with pytest.raises(UserError, match="pass --no-stack to average them"):
        with_stack(split, (weight, bias))
