"""The LZ4 pack: exact round trip in both block layouts, resumable and --verify-able, the file
format DALI's inflate reads, and a damaged file named in one line by every reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import write_tiny_dataset

from fasthpa.cli import main
from fasthpa.data.check import check_pack
from fasthpa.data.contract import AugmentConfig
from fasthpa.data.loader import build_loader
from fasthpa.data.pack import (
    LZ4_LAYOUTS,
    encode_lz4,
    pack_dataset,
    read_lz4,
    read_lz4_file,
    read_packed,
    resize_sample,
)
from fasthpa.data.source import open_source, read_sample, stored_size
from fasthpa.data.stats import ChannelStats
from fasthpa.errors import UserError

lz4_block = pytest.importorskip("lz4.block")

IDENTITY = ChannelStats((0.0,) * 4, (1.0 / 255.0,) * 4)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lz4")
    ids, pixels = write_tiny_dataset(root / "ds", n=9, size=16, seed=3)
    return {"root": root / "ds", "ids": ids, "pixels": pixels, "tmp": root}


@pytest.mark.parametrize("layout", LZ4_LAYOUTS)
@pytest.mark.parametrize("size", [None, 10])
def test_pack_round_trip_resume_and_verify(data, tmp_path, layout, size):
    out = tmp_path / "p"
    r = pack_dataset(
        data["root"],
        out,
        fmt="lz4",
        size=size,
        workers=2,
        verify=True,
        progress=False,
        lz4_layout=layout,
    )
    assert (r.written, r.skipped, r.verified) == (9, 0, 9)
    for i, sample_id in enumerate(data["ids"]):
        ref = resize_sample(data["pixels"][i], size)
        assert np.array_equal(read_packed(out / f"{sample_id}.lz4"), ref)
        assert np.array_equal(read_lz4(out / f"{sample_id}.lz4", 3), ref[..., :3])
    manifest = json.loads((out / "pack.json").read_text())
    assert manifest["format"] == "lz4" and manifest["size"] == size
    assert manifest["lz4"]["layout"] == layout
    victim = out / f"{data['ids'][4]}.lz4"
    blob = bytearray(victim.read_bytes())
    blob[-5] ^= 0x10
    victim.write_bytes(bytes(blob))
    r2 = pack_dataset(
        data["root"],
        out,
        fmt="lz4",
        size=size,
        workers=1,
        verify=True,
        progress=False,
        lz4_layout=layout,
    )
    assert (r2.written, r2.skipped, r2.verified) == (1, 8, 9), "the damaged file is rewritten"
    other = [x for x in LZ4_LAYOUTS if x != layout][0]
    with pytest.raises(UserError, match=f"already holds a {layout} lz4 pack"):
        pack_dataset(data["root"], out, fmt="lz4", size=size, progress=False, lz4_layout=other)
    assert not list(out.glob(".*"))


def test_file_format_is_raw_lz4_blocks_as_dali_reads_them(data):
    """The header's block sizes cut the payload into raw LZ4 blocks (no size prefix), each
    inflating to one [H, W] stain (planar) or the HWC image (interleaved): what
    ``fn.decoders.inflate(shape=, chunk_sizes=)`` is given."""
    img = data["pixels"][2]
    for layout in LZ4_LAYOUTS:
        blob = encode_lz4(img, layout, level=0)
        path = data["tmp"] / f"x_{layout}.lz4"
        path.write_bytes(blob)
        raw, hd = read_lz4_file(path)
        assert (hd.layout, hd.channels, hd.height, hd.width) == (layout, 4, 16, 16)
        start, planes = hd.offset, []
        for size in hd.sizes:
            block = raw[start : start + size]
            out = lz4_block.decompress(block, uncompressed_size=int(np.prod(hd.block_shape)))
            planes.append(np.frombuffer(out, np.uint8).reshape(hd.block_shape))
            start += size
        assert start == len(raw)
        got = np.stack(planes, axis=-1) if layout == "planar" else planes[0]
        assert np.array_equal(got, img)


def _damage(path, how: str) -> None:
    blob = bytearray(path.read_bytes())
    if how == "flip":
        blob[len(blob) // 2] ^= 0x01
    elif how == "truncate":
        blob = blob[: len(blob) - 7]
    else:
        blob[:8] = b"NOTLZ4\x00\x00"
    path.write_bytes(bytes(blob))


@pytest.fixture
def damaged(data, tmp_path):
    out = tmp_path / "p"
    pack_dataset(data["root"], out, fmt="lz4", workers=1, progress=False)
    return out, out / f"{data['ids'][5]}.lz4"


@pytest.mark.parametrize(
    "how,reason",
    [
        ("flip", "checksum mismatch"),
        ("truncate", "truncated: "),
        ("magic", "not a fasthpa LZ4 file: bad magic"),
    ],
)
def test_damaged_file_named_in_one_line_by_every_reader(data, damaged, how, reason):
    out, victim = damaged
    _damage(victim, how)
    source = open_source(data["root"], packed=out)
    expected = f"{victim}: corrupt LZ4 sample ({reason}"
    with pytest.raises(UserError) as err:
        read_sample(source, 5)
    msg = str(err.value)
    assert msg.startswith(expected) and "\n" not in msg and "re-run `fasthpa pack`" in msg
    with pytest.raises(UserError, match="packed files damaged") as err:
        check_pack(data["root"], "train", out)
    assert str(err.value).startswith(expected) and "(1 of 9 packed files damaged)" in str(err.value)
    for backend in ("torch", "resident"):
        with pytest.raises(UserError) as err:
            loader = build_loader(
                source,
                np.arange(9),
                train=False,
                batch_size=4,
                image_size=None,
                stats=IDENTITY,
                device=torch.device("cpu"),
                dtype=torch.float32,
                workers=0,
                backend=backend,
            )
            list(loader)
        assert str(err.value) == msg, backend


@pytest.mark.dali
def test_damaged_file_named_by_dali_cpu(data, damaged):
    out, victim = damaged
    _damage(victim, "flip")
    source = open_source(data["root"], packed=out)
    loader = build_loader(
        source,
        np.arange(9),
        train=False,
        batch_size=4,
        image_size=None,
        stats=IDENTITY,
        device=torch.device("cpu"),
        dtype=torch.float32,
        workers=1,
        backend="dali",
    )
    with pytest.raises(UserError, match=f"{victim}: corrupt LZ4 sample \\(checksum mismatch"):
        list(loader)


def test_check_cli_names_the_damaged_file(data, damaged, capsys):
    out, victim = damaged
    assert main(["check", str(data["root"]), "--packed", str(out)]) == 0
    assert f"pack {out}: 9 lz4 files intact" in capsys.readouterr().out
    _damage(victim, "flip")
    with pytest.raises(SystemExit) as code:
        main(["check", str(data["root"]), "--packed", str(out)])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1 and f"error: {victim}: corrupt" in err


def test_pack_cli_and_source(data, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "pack",
        str(data["root"]),
        "--out",
        str(out),
        "--format",
        "lz4",
        "--size",
        "12",
        "--lz4-layout",
        "interleaved",
        "--lz4-level",
        "0",
        "--verify",
        "--workers",
        "1",
    ]
    assert main(argv) == 0
    assert "9 verified exactly" in capsys.readouterr().out
    source = open_source(data["root"], packed=out)
    assert (source.kind, source.size, stored_size(source, 3)) == ("lz4", 12, (12, 12))
    with pytest.raises(SystemExit):
        main(argv[:-2] + ["--lz4-level", "13"])
    assert "--lz4-level 13: must be 0 (fast) to 12" in capsys.readouterr().err


def test_twin_reads_the_pack_like_the_sources(data, tmp_path):
    out = tmp_path / "p"
    pack_dataset(data["root"], out, fmt="lz4", workers=1, progress=False, lz4_layout="planar")
    source = open_source(data["root"], packed=out)
    aug = AugmentConfig(dihedral=True, random_crop=11)
    loaders = [
        build_loader(
            src,
            np.arange(9),
            train=True,
            batch_size=2,
            image_size=None,
            stats=IDENTITY,
            device=torch.device("cpu"),
            dtype=torch.float32,
            workers=0,
            backend="torch",
            augment=aug,
            seed=2,
            channels="rgb",
        )
        for src in (source, open_source(data["root"]))
    ]
    for (x, y, i), (x2, y2, i2) in zip(*loaders, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)


@pytest.mark.gpu
@pytest.mark.dali
@pytest.mark.parametrize("layout", LZ4_LAYOUTS)
@pytest.mark.parametrize("channels", ["rgby", "rgb"])
def test_dali_gpu_inflate_equals_the_cpu_twin(data, tmp_path, layout, channels):
    """fn.decoders.inflate on the GPU decodes the pack to the twin's pixels, batch for batch."""
    out = tmp_path / "p"
    pack_dataset(data["root"], out, fmt="lz4", workers=1, progress=False, lz4_layout=layout)
    source = open_source(data["root"], packed=out)
    kw = dict(
        train=True,
        batch_size=3,
        image_size=None,
        stats=IDENTITY,
        dtype=torch.float32,
        workers=2,
        augment=AugmentConfig(dihedral=True, random_crop=13),
        seed=4,
        channels=channels,
    )
    gpu = build_loader(source, np.arange(9), device=torch.device("cuda"), backend="dali", **kw)
    assert gpu.backend == "dali-gpu"
    twin = build_loader(source, np.arange(9), device=torch.device("cpu"), backend="torch", **kw)
    for epoch in (0, 1):
        gpu.set_epoch(epoch)
        twin.set_epoch(epoch)
        for (x, y, i), (x0, y0, i0) in zip(gpu, twin, strict=True):
            assert torch.equal(i.cpu(), i0) and torch.equal(y.cpu(), y0)
            assert torch.equal(x.cpu(), x0)
