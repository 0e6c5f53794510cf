"""The dataset layer: CSV readers, the exact-or-reject PNG rule, `fasthpa check`, splits, pack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_tiny_dataset
from PIL import Image

from fasthpa.cli import main
from fasthpa.data.check import check_dataset
from fasthpa.data.dataset import decode_png, load_sample, read_ids_csv, read_targets_csv
from fasthpa.data.pack import pack_dataset, read_packed, resize_sample
from fasthpa.data.splits import (
    fold_split,
    kfold_assignment,
    parse_fractions,
    read_split_csv,
    stratified_split,
    write_split_csv,
)
from fasthpa.errors import UserError
from fasthpa.labels import CHANNELS


def run_cli(*argv: str) -> tuple[int, str]:
    """Run the real console entry point in a subprocess; return (exit code, stderr)."""
    p = subprocess.run(
        [sys.executable, "-m", "fasthpa.cli", *argv], capture_output=True, text=True, timeout=120
    )
    return p.returncode, p.stderr


# ---------------------------------------------------------------- CSV


def test_read_targets_csv_crlf_extra_columns(tmp_path):
    p = tmp_path / "train.csv"
    p.write_bytes(b"Id,Target,Extra\r\na,16 0,x\r\nb,27,y\r\n\r\n")
    ids, t = read_targets_csv(p)
    assert ids == ["a", "b"]
    assert t.dtype == np.uint8 and t.shape == (2, 28)
    assert t[0].nonzero()[0].tolist() == [0, 16]
    assert t[1].nonzero()[0].tolist() == [27]


@pytest.mark.parametrize(
    "body, message",
    [
        ("Id,Target\na,28\n", "line 2: label 28 for Id a is outside 0-27"),
        ("Id,Target\na,-1\n", "line 2: label -1 for Id a is outside 0-27"),
        ("Id,Target\na,0\nb,\n", "line 3: empty Target for Id b"),
        ("Id,Target\na,0\na,1\n", "line 3: duplicate Id a (first seen on line 2)"),
        ("Id,Target\na,x y\n", "line 2: Target 'x y' for Id a is not a list of integers"),
        ("Id,Label\na,1\n", "line 1: the header 'Id,Label' lacks column(s) Target"),
        ("Id,Target\na\n", "line 2: 1 field(s) where the header has 2"),
        ("", "the file is empty"),
        ("Id,Target\n", "no data rows"),
        ("Id,Target\n../x,1\n", "contains a path separator"),
    ],
)
def test_read_targets_csv_errors_name_the_row(tmp_path, body, message):
    p = tmp_path / "train.csv"
    p.write_text(body)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        read_targets_csv(p)
    assert str(p) in str(e.value)


def test_read_ids_csv(tmp_path):
    p = tmp_path / "sample_submission.csv"
    p.write_text("Id,Predicted\r\nx,0\r\ny,0\r\n")
    assert read_ids_csv(p) == ["x", "y"]


# ---------------------------------------------------------------- PNG kinds


def _save(path: Path, arr: np.ndarray, mode: str | None = None, **kw) -> Path:
    Image.fromarray(arr, mode=mode).save(path, **kw) if mode else Image.fromarray(arr).save(
        path, **kw
    )
    return path


def test_decode_gray8_and_interlaced(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (9, 7), dtype=np.uint8)
    assert np.array_equal(decode_png(_save(tmp_path / "a.png", a)), a)
    # interlaced (Adam7): written with pypng-free trick: PIL cannot write interlaced PNGs, so build one
    import zlib

    raw = _interlaced_png_bytes(a, zlib)
    (tmp_path / "i.png").write_bytes(raw)
    assert np.array_equal(decode_png(tmp_path / "i.png"), a)


def _interlaced_png_bytes(a: np.ndarray, zlib) -> bytes:
    """A minimal Adam7-interlaced 8-bit grayscale PNG encoder (filter type 0 everywhere)."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    h, w = a.shape
    passes = [
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ]
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = a[y0::dy, x0::dx]
        if sub.size == 0:
            continue
        for row in sub:
            raw += b"\x00" + row.tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_decode_16bit_exact_or_rejected(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (5, 6), dtype=np.uint8)
    wide = a.astype(np.uint16) * 257
    assert np.array_equal(decode_png(_save(tmp_path / "w.png", wide)), a)
    wide[0, 0] = 1000
    with pytest.raises(UserError, match="16-bit PNG whose values are not 8-bit data"):
        decode_png(_save(tmp_path / "bad.png", wide))


def test_decode_gray_alpha(tmp_path):
    a = np.random.default_rng(2).integers(0, 256, (4, 4), dtype=np.uint8)
    la = np.stack([a, np.full_like(a, 255)], axis=-1)
    assert np.array_equal(decode_png(_save(tmp_path / "la.png", la, "LA")), a)
    la[1, 1, 1] = 10
    with pytest.raises(UserError, match="LA PNG with transparent pixels"):
        decode_png(_save(tmp_path / "la2.png", la, "LA"))


def test_decode_rgb_equal_channels_and_palette(tmp_path):
    a = np.random.default_rng(3).integers(0, 256, (6, 5), dtype=np.uint8)
    rgb = np.repeat(a[..., None], 3, axis=-1)
    assert np.array_equal(decode_png(_save(tmp_path / "rgb.png", rgb)), a)
    pal = Image.fromarray(a).convert("P")  # a gray palette: expands exactly
    pal.save(tmp_path / "p.png")
    assert np.array_equal(decode_png(tmp_path / "p.png"), a)
    rgb[0, 0, 1] ^= 1
    with pytest.raises(UserError, match="colour PNG with different R, G, B values"):
        decode_png(_save(tmp_path / "rgb2.png", rgb))
    colour_pal = Image.fromarray(np.arange(30, dtype=np.uint8).reshape(6, 5), mode="L").convert("P")
    colour_pal.putpalette([10, 20, 30] * 256)  # every index maps to a non-gray colour
    colour_pal.save(tmp_path / "p2.png")
    with pytest.raises(UserError, match="colour PNG"):
        decode_png(tmp_path / "p2.png")


def test_decode_corrupt_png(tmp_path):
    p = tmp_path / "c.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(UserError, match=r"c\.png: not a readable PNG"):
        decode_png(p)


def test_load_sample_channel_size_mismatch(tmp_path):
    write_tiny_dataset(tmp_path, n=2, size=8)
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "train" / "id0001_yellow.png")
    with pytest.raises(
        UserError, match=r"channels differ in size \(red=8x8, green=8x8, blue=8x8, yellow=8x9\)"
    ):
        load_sample(tmp_path / "train", "id0001")


# ---------------------------------------------------------------- check


def test_check_summary_and_cli(tmp_path):
    write_tiny_dataset(tmp_path, n=10, size=8)
    s = check_dataset(tmp_path, decode=-1)
    assert s.samples == 10 and s.decoded == 10 and s.sizes == {"8x8": 10}
    expected = np.zeros(28, int)
    for i in range(10):
        expected[list({i % 28, (i * 7) % 28})] += 1
    assert s.label_counts == expected.tolist()
    assert main(["check", str(tmp_path)]) == 0


def test_check_missing_files_message(tmp_path):
    write_tiny_dataset(tmp_path, n=6, size=8)
    for sample_id in ("id0002", "id0004"):
        (tmp_path / "train" / f"{sample_id}_green.png").unlink()
    (tmp_path / "train" / "id0004_blue.png").unlink()
    rc, err = run_cli("check", str(tmp_path))
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "3 channel file(s) missing for 2 sample(s)" in err
    assert "id0002_green.png" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda r: (r / "train.csv").write_text("Id,Target\nid0000,30\n"),
            "label 30 for Id id0000 is outside 0-27",
        ),
        (
            lambda r: (r / "train" / "id0001_red.png").write_bytes(b"not a png"),
            "id0001_red.png: not a readable PNG",
        ),
        (lambda r: (r / "train.csv").unlink(), "train.csv: file not found"),
    ],
)
def test_check_cli_bad_input_one_line(tmp_path, mutate, message):
    write_tiny_dataset(tmp_path, n=3, size=8)
    mutate(tmp_path)
    rc, err = run_cli("check", str(tmp_path), "--decode-all")
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_not_a_flag_is_rejected():
    rc, err = run_cli("check", "somewhere", "--no-such-flag")
    assert rc == 2 and "--no-such-flag" in err


# ---------------------------------------------------------------- splits


def _random_targets(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.geomspace(0.4, 0.01, 28)
    t = (rng.random((n, 28)) < p).astype(np.uint8)
    t[t.sum(1) == 0, 0] = 1
    return t


def test_stratified_split_fractions_determinism_and_rare_labels():
    t = _random_targets(2000, 0)
    a = stratified_split(t, (0.9, 0.05, 0.05), seed=3)
    b = stratified_split(t, (0.9, 0.05, 0.05), seed=3)
    c = stratified_split(t, (0.9, 0.05, 0.05), seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    counts = np.bincount(a, minlength=3)
    assert abs(counts[1] - 100) <= 10 and abs(counts[2] - 100) <= 10
    positives = t.sum(0)
    for part in (1, 2):  # every label with >= 40 positives appears in dev and in test
        have = t[a == part].sum(0)
        assert np.all(have[positives >= 40] > 0), (part, have, positives)
        # stratified: each part's label frequencies follow the whole set's
        freq = have / counts[part]
        assert np.allclose(freq, positives / len(t), atol=0.05)


def test_kfold_every_label_with_k_positives_in_each_fold():
    t = _random_targets(600, 1)
    k = 5
    folds = kfold_assignment(t, k, seed=0)
    assert set(folds.tolist()) == set(range(k))
    assert np.array_equal(folds, kfold_assignment(t, k, seed=0))
    positives = t.sum(0)
    for f in range(k):
        have = t[folds == f].sum(0)
        assert np.all(have[positives >= k] > 0)
    dev = fold_split(t, 2, k)
    assert np.array_equal(dev == 1, folds == 2)


def test_split_csv_roundtrip_and_errors(tmp_path):
    ids = [f"s{i}" for i in range(20)]
    a = stratified_split(_random_targets(20, 2), (0.8, 0.1, 0.1), seed=0)
    p = write_split_csv(tmp_path / "split.csv", ids, a)
    assert np.array_equal(read_split_csv(p, ids), a)
    with pytest.raises(UserError, match="1 dataset Id"):
        read_split_csv(p, ids + ["extra"])
    assert parse_fractions("0.8,0.2") == (0.8, 0.2, 0.0)
    with pytest.raises(UserError, match="--split '0.5,0.2'"):
        parse_fractions("0.5,0.2")


# ---------------------------------------------------------------- pack


@pytest.mark.parametrize("fmt,size", [("png", None), ("npy", None), ("npy", 8)])
def test_pack_exact_resumable_verified(tmp_path, fmt, size):
    ids, pixels = write_tiny_dataset(tmp_path / "ds", n=9, size=12)
    out = tmp_path / "packed"
    r = pack_dataset(
        tmp_path / "ds", out, fmt=fmt, size=size, workers=2, verify=True, progress=False
    )
    assert (r.written, r.skipped, r.verified) == (9, 0, 9)
    for i, sample_id in enumerate(ids):
        got = read_packed(out / f"{sample_id}.{fmt}")
        assert np.array_equal(got, resize_sample(pixels[i], size))
    manifest = json.loads((out / "pack.json").read_text())
    assert manifest["format"] == fmt and manifest["size"] == size and manifest["samples"] == 9
    assert (out / "ids.txt").read_text().split() == ids
    # damage one file: a resumed pack rewrites it and skips the rest
    victim = out / f"{ids[3]}.{fmt}"
    victim.write_bytes(victim.read_bytes()[:40])
    r2 = pack_dataset(
        tmp_path / "ds", out, fmt=fmt, size=size, workers=1, verify=True, progress=False
    )
    assert (r2.written, r2.skipped) == (1, 8)
    assert np.array_equal(read_packed(victim), resize_sample(pixels[3], size))
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_pack_verify_detects_a_difference(tmp_path):
    ids, _ = write_tiny_dataset(tmp_path / "ds", n=3, size=8)
    out = tmp_path / "p"
    pack_dataset(tmp_path / "ds", out, workers=1, progress=False)
    # change one source pixel after packing: the packed file is still "valid", verify must object
    src = tmp_path / "ds" / "train" / f"{ids[1]}_{CHANNELS[2]}.png"
    arr = np.asarray(Image.open(src)).copy()
    arr[0, 0] ^= 1
    Image.fromarray(arr).save(src)
    with pytest.raises(UserError, match=f"{ids[1]}.png: packed pixels differ"):
        pack_dataset(tmp_path / "ds", out, workers=1, verify=True, progress=False)


def test_pack_cli(tmp_path):
    write_tiny_dataset(tmp_path / "ds", n=4, size=8)
    assert (
        main(
            [
                "pack",
                str(tmp_path / "ds"),
                "--out",
                str(tmp_path / "o"),
                "--verify",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    rc, err = run_cli("pack", str(tmp_path / "ds"), "--out", str(tmp_path / "o2"), "--size", "4")
    assert rc == 2 and "--size applies to --format npy and lz4" in err
