"""Tests for `fasthpa predict`: one tiny run trained once (32 px, 40 + 12 synthetic samples), then
the submission, TTA, the trainer's dev probabilities, the at-least-one rule, bad input and a
2-rank torchrun, each against a plain reference. About 40 s on 2 idle CPU cores."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fasthpa.errors import UserError
from fasthpa.labels import NUM_LABELS
from fasthpa.predict import (
    DIHEDRAL_VIEWS,
    FLIP_VIEWS,
    IDENTITY,
    TTA_VIEWS,
    assign_labels,
    predict,
    validate_submission,
)

# small and single-threaded loaders: several test files share 2 cores
FAST = {"loader": "torch", "workers": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset root, run folder) of a one-epoch resnet18 run on 32 px synthetic images."""
    from fasthpa.data.synth import generate
    from fasthpa.train.cli import main as train_main

    base = tmp_path_factory.mktemp("predict")
    root, run_dir = base / "data", base / "run"
    generate(root, 40, size=32, test_n=12, seed=3, workers=1)
    rc = train_main(
        [
            "--data",
            str(root),
            "--out",
            str(run_dir),
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
            "1",
            "--split",
            "0.6,0.4,0",
            "--log-every",
            "2",
        ]
    )
    assert rc == 0 and (run_dir / "best.pt").is_file() and (run_dir / "thresholds.json").is_file()
    return root, run_dir


@pytest.fixture(scope="module")
def flips_run(trained, tmp_path_factory):
    """The test split predicted once with flips TTA (shared: each predict call loads the model)."""
    root, run_dir = trained
    out = tmp_path_factory.mktemp("flips") / "submission.csv"
    return predict(run_dir, root, tta="flips", out=out, **FAST)


@pytest.fixture(scope="module")
def predictor(trained):
    """The run's model and a loader over the test split, in this process, for direct view tests."""
    from fasthpa.distributed import DistInfo
    from fasthpa.predict import build_predictor, load_run_inputs, select_rows

    root, run_dir = trained
    run = load_run_inputs(run_dir)
    rows = select_rows(root, "test", None, None, run_dir, channels=4)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return build_predictor(run, rows, info, batch_size=5, workers=0, backend="torch")


def read_ids(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [row[0] for row in list(csv.reader(f))[1:] if row]


def read_submission(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def plain_labels(p: np.ndarray, thr: np.ndarray, at_least_one: bool) -> str:
    """The Predicted cell for one row, by the rule written out longhand."""
    chosen = [lab for lab in range(len(p)) if float(p[lab]) >= float(thr[lab])]
    if not chosen and at_least_one:
        best = 0
        for lab in range(1, len(p)):
            if p[lab] > p[best]:
                best = lab
        chosen = [best]
    return " ".join(str(lab) for lab in chosen)


# ---------------------------------------------------------------------------- pure pieces


def test_views_are_the_dihedral_group():
    x = torch.randn(2, 3, 7, 7)  # odd side: centre pixels must land right too
    reference = [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]
    got = [view(x) for view in DIHEDRAL_VIEWS]
    assert len({view.name for view in DIHEDRAL_VIEWS}) == 8
    # every view is exactly one element of rot90 x flip, and all 8 elements are reached
    matches = [[i for i, r in enumerate(reference) if torch.equal(g, r)] for g in got]
    assert all(len(m) == 1 for m in matches), matches
    assert sorted(m[0] for m in matches) == list(range(8))
    named = {view.name: view(x) for view in DIHEDRAL_VIEWS}
    assert torch.equal(named["rot90"], torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(named["rot270"], torch.rot90(x, 3, dims=(-2, -1)))
    assert torch.equal(named["rot180"], torch.rot90(x, 2, dims=(-2, -1)))
    assert TTA_VIEWS["flips"] == FLIP_VIEWS and TTA_VIEWS["none"] == (IDENTITY,)
    flips = [view(x) for view in FLIP_VIEWS]
    for want in (x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)):
        assert sum(torch.equal(want, f) for f in flips) == 1


def test_assign_labels_matches_the_plain_rule():
    rng = np.random.default_rng()
    probs = rng.random((60, NUM_LABELS)).astype(np.float32)
    probs[:20] *= 0.1  # rows with nothing above threshold
    probs[5, [3, 9]] = 0.09  # a tie for the arg-max: the first label wins
    probs[5, 10:] = 0.0
    probs[5, :3] = 0.0
    probs[5, 4:9] = 0.0
    thr = rng.uniform(0.2, 0.9, NUM_LABELS)
    probs[30, 0] = 0.55  # above every scaled-down row, so rows :20 stay below all thresholds
    thr[0] = float(probs[30, 0])  # a score exactly at its threshold counts as positive
    for at_least_one in (True, False):
        got = assign_labels(probs, thr, at_least_one)
        for i in range(len(probs)):
            want = plain_labels(probs[i], thr, at_least_one)
            assert " ".join(str(j) for j in np.flatnonzero(got[i])) == want, (i, at_least_one)
    got = assign_labels(probs, thr, True)
    assert got[30, 0] and list(np.flatnonzero(got[5])) == [3]
    assert got.any(axis=1).all() and not assign_labels(probs, thr, False)[:20].any()


# ---------------------------------------------------------------------------- end to end


def test_submission_for_the_test_split(trained, flips_run):
    root, run_dir = trained
    out = flips_run.submission_path
    header, body = read_submission(out)
    assert header == ["Id", "Predicted"]
    expected_ids = read_ids(root / "sample_submission.csv")
    assert [row[0] for row in body] == expected_ids == flips_run.ids
    thr = np.asarray(json.loads((run_dir / "thresholds.json").read_text())["thresholds"])
    with np.load(out.with_name("submission_probs.npz")) as z:
        assert list(z["ids"]) == expected_ids
        probs = z["probs"]
        assert probs.dtype == np.float32 and probs.shape == (len(expected_ids), NUM_LABELS)
        assert np.array_equal(z["thresholds"], thr) and "labels" not in z.files
    for (_, cell), p in zip(body, probs):
        labels = [int(t) for t in cell.split()]
        assert labels and labels == sorted(set(labels)) and all(0 <= x < 28 for x in labels)
        assert cell == plain_labels(p, thr, True)
    assert np.array_equal(flips_run.probs, probs)


def test_ids_file_sets_the_rows_and_their_order(trained, flips_run, tmp_path):
    root, run_dir = trained
    ids = read_ids(root / "sample_submission.csv")[::-2]  # a subset, reversed
    ids_csv = tmp_path / "ids.csv"
    ids_csv.write_text("Id,Predicted\n" + "".join(f"{i},0\n" for i in ids))
    part = predict(
        run_dir,
        root,
        ids_csv=ids_csv,
        tta="flips",
        out=tmp_path / "some.csv",
        batch_size=3,
        **FAST,
    )
    _, body = read_submission(tmp_path / "some.csv")
    assert [row[0] for row in body] == ids == part.ids
    where = {sample_id: i for i, sample_id in enumerate(flips_run.ids)}
    full = flips_run.probs[[where[i] for i in ids]]
    np.testing.assert_allclose(part.probs, full, rtol=0, atol=1e-5)


def test_dev_part_reproduces_the_trainers_dev_probs(trained, tmp_path):
    root, run_dir = trained
    # batch 5 regroups the rows (and pads the last batch) unlike the trainer's batch of 8
    result = predict(
        run_dir,
        root,
        split="train",
        part="dev",
        checkpoint="best",
        out=tmp_path / "dev.csv",
        batch_size=5,
        **FAST,
    )
    with np.load(run_dir / "dev_probs.npz") as z:
        ids, probs, labels = list(z["ids"]), z["probs"], z["labels"]
    with open(run_dir / "split.csv", newline="") as f:
        split = dict(csv.reader(f))
    assert result.ids == ids == [i for i in read_ids(root / "train.csv") if split[i] == "dev"]
    np.testing.assert_allclose(result.probs, probs, rtol=0, atol=1e-5)
    assert np.array_equal(result.labels, labels)
    with np.load(tmp_path / "dev_probs.npz") as z:
        assert np.array_equal(z["labels"], labels) and list(z["ids"]) == ids


def test_identity_views_equal_no_tta_and_flips_average_the_single_views(predictor, flips_run):
    def probs(views):
        rows, p = predictor.probs(views)
        assert np.array_equal(rows, np.arange(predictor.n_rows))
        return p

    none = probs(TTA_VIEWS["none"])
    assert np.array_equal(probs((IDENTITY,)), none)
    assert np.array_equal(probs((IDENTITY, IDENTITY)), none)
    flips = probs(TTA_VIEWS["flips"])
    reference = np.mean(np.stack([probs((view,)) for view in FLIP_VIEWS]).astype(np.float64), 0)
    np.testing.assert_allclose(flips, reference, rtol=0, atol=1e-6)
    assert not np.allclose(
        flips, none, rtol=0, atol=1e-6
    )  # a random small net is not flip-invariant
    # the full predict path (batch 8 there, 5 here) gives the same flips average
    np.testing.assert_allclose(flips_run.probs, flips, rtol=0, atol=1e-5)


def test_cli_thresholds_override_and_the_at_least_one_switch(trained, tmp_path):
    from fasthpa.cli import main as cli_main

    root, run_dir = trained
    never = tmp_path / "never.json"
    never.write_text(json.dumps({"thresholds": [2.0] * NUM_LABELS}))  # no probability reaches 2
    common = [
        "predict",
        "--run",
        str(run_dir),
        "--data",
        str(root),
        "--thresholds",
        str(never),
        "--loader",
        "torch",
        "--workers",
        "0",
        "--no-progress",
    ]
    assert cli_main(common + ["--out", str(tmp_path / "on.csv")]) == 0
    assert cli_main(common + ["--no-at-least-one", "--out", str(tmp_path / "off.csv")]) == 0
    _, on = read_submission(tmp_path / "on.csv")
    _, off = read_submission(tmp_path / "off.csv")
    with np.load(tmp_path / "on_probs.npz") as z:
        argmax = z["probs"].argmax(axis=1)
    assert [cell for _, cell in on] == [str(a) for a in argmax]
    assert [cell for _, cell in off] == [""] * len(argmax)
    assert [i for i, _ in off] == read_ids(root / "sample_submission.csv")


# ---------------------------------------------------------------------------- bad input


def _copy_run(run_dir: Path, dest: Path, drop: str) -> Path:
    shutil.copytree(run_dir, dest)
    (dest / drop).unlink()
    return dest


@pytest.mark.parametrize(
    "case",
    [
        "no_checkpoint",
        "no_thresholds",
        "ids_without_images",
        "part_with_test_split",
        "other_runs_checkpoint",
    ],
)
def test_bad_input_is_one_sentence_naming_the_file(trained, tmp_path, case, capsys):
    from fasthpa.predict.cli import main

    root, run_dir = trained
    args = [
        "--run",
        str(run_dir),
        "--data",
        str(root),
        "--out",
        str(tmp_path / "s.csv"),
        "--loader",
        "torch",
        "--workers",
        "0",
        "--no-progress",
    ]
    if case == "no_checkpoint":
        args[1] = str(_copy_run(run_dir, tmp_path / "r", "best.pt"))
        names = "best.pt"
    elif case == "no_thresholds":
        args[1] = str(_copy_run(run_dir, tmp_path / "r", "thresholds.json"))
        names = "thresholds.json"
    elif case == "ids_without_images":
        ids_csv = tmp_path / "ids.csv"
        first = read_ids(root / "sample_submission.csv")[0]
        ids_csv.write_text(f"Id,Predicted\n{first},0\nnot-an-image-id,0\n")
        args += ["--ids", str(ids_csv)]
        names = "ids.csv: 1 Id(s) have no images"
    elif case == "part_with_test_split":
        args += ["--part", "dev"]
        names = "--part dev"
    else:
        cfg = json.loads((run_dir / "config.json").read_text())
        cfg["model"]["arch"] = "resnet34"
        other = _copy_run(run_dir, tmp_path / "r", "config.json")
        (other / "config.json").write_text(json.dumps(cfg))
        args[1] = str(other)
        names = "best.pt: the checkpoint's arch is 'resnet18'"
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and names in err and "\n" not in err, err
    assert not (tmp_path / "s.csv").exists()
    with pytest.raises(UserError):  # the Python API raises the same error
        predict(args[1], root, out=tmp_path / "s.csv", **FAST, **_api_extra(args))


def _api_extra(args: list[str]) -> dict:
    extra = {}
    if "--ids" in args:
        extra["ids_csv"] = args[args.index("--ids") + 1]
    if "--part" in args:
        extra["part"] = args[args.index("--part") + 1]
    return extra


def test_validate_submission_rejects_damaged_files(tmp_path):
    ids = ["a", "b", "c"]
    good = "Id,Predicted\na,0 5\nb,27\nc,3\n"
    path = tmp_path / "s.csv"
    path.write_text(good)
    validate_submission(path, ids, at_least_one=True)
    damaged = {
        "header": good.replace("Predicted", "Target"),
        "missing row": "Id,Predicted\na,0 5\nb,27\n",
        "order": "Id,Predicted\nb,27\na,0 5\nc,3\n",
        "label 28": good.replace("b,27", "b,28"),
        "unsorted": good.replace("0 5", "5 0"),
        "duplicate": good.replace("0 5", "5 5"),
        "not an int": good.replace("c,3", "c,x"),
        "empty": good.replace("c,3", "c,"),
    }
    for what, text in damaged.items():
        path.write_text(text)
        with pytest.raises(UserError, match="s.csv"):
            validate_submission(path, ids, at_least_one=True)
            pytest.fail(f"accepted a submission with a bad {what}")
    path.write_text(damaged["empty"])
    validate_submission(path, ids, at_least_one=False)  # empty is fine without --at-least-one


# ---------------------------------------------------------------------------- ranks


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_submission(trained, flips_run, tmp_path):
    root, run_dir = trained
    # --run-dir: torchrun's parser rejects --run as an ambiguous abbreviation of its --run-path;
    # batch 5 over 2 ranks leaves padding on both ranks
    flags = [
        "--run-dir",
        str(run_dir),
        "--data",
        str(root),
        "--loader",
        "torch",
        "--workers",
        "0",
        "--no-progress",
        "--batch-size",
        "5",
        "--tta",
        "flips",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fasthpa.predict",
        *flags,
        "--out",
        str(tmp_path / "ddp.csv"),
    ]
    p = subprocess.run(ddp, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "ddp.csv").read_text() == flips_run.submission_path.read_text()
    with np.load(tmp_path / "ddp_probs.npz") as z:
        assert list(z["ids"]) == flips_run.ids
        np.testing.assert_allclose(z["probs"], flips_run.probs, rtol=0, atol=1e-5)
