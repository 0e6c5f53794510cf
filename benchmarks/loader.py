"""Input pipeline throughput: samples/s of each backend x layout, at each image size.

Backends: the PyTorch twin (``torch``), DALI (``dali-cpu`` / ``dali-gpu``, where installed) and
the resident store (``resident``: the split decoded once, then each batch a gather; measured on
the ``kaggle`` layout it decodes from, its one-time decode reported as ``setup_s``).
Layouts: ``kaggle`` (4 stain PNGs per sample), ``packed`` (one RGBA PNG, ``fasthpa pack``),
``npy`` (the decoded cache, ``fasthpa pack --format npy --size S``, written at the size it is
read at) and ``lz4`` (the same pixels LZ4-compressed, ``--format lz4 --size S``; where the lz4
package is installed). The on-disk bytes of each layout are recorded too. Each cell runs the real training loader (train mode: shuffle, default flips,
normalise, batches on the device in the training dtype) over a synthetic dataset it writes with
``fasthpa.data.synth`` (``--data random`` for noise PNGs, which compress badly and decode
slower than real stains; ``--data DIR`` for an existing Kaggle-layout folder). One epoch warms
up (worker start, pipeline build), then ``--repeats`` epochs are timed, each ending with a
device synchronise; the table gives the median and spread and, per size, each row's speed
relative to the PyTorch twin reading the 4-file layout, all measured in the same run.

Headroom: ``--model-arch resnet18`` also times the model-only training step
(``benchmarks/throughput.py``'s, inputs already on the device, the trainer's default settings for
the device) at each size and the same batch, or ``--model-result FILE`` takes it from a
throughput result JSON of the same device and size; each row then gets ``headroom`` = its
samples/s over the model's images/s (above 1: the loader outruns the model).

    python benchmarks/loader.py --quick                      # 64 samples, a few minutes on 2 cores
    python benchmarks/loader.py --device cuda --threads 16 --n 2048 --sizes 512,256
    python benchmarks/loader.py --data /data/hpa --n 4096    # real images
    python benchmarks/loader.py --sizes 512 --n 64 --threads 2 --model-arch resnet18

``measure(...)`` returns the rows for other scripts (``benchmarks/throughput.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import ROOT, ResultFiles, markdown_table, synchronize, time_fn

LAYOUTS = ("kaggle", "packed", "npy") + (("lz4",) if importlib.util.find_spec("lz4") else ())


def make_dataset(out: Path, data: str, n: int, size: int, workers: int) -> str:
    """Write (or reuse) the Kaggle-layout dataset the benchmark reads; returns its description."""
    if data not in ("synth", "random"):
        return f"existing dataset {data}"
    if (out / "train.csv").exists():
        return f"{data} PNGs (reused {out})"
    if data == "synth":
        from fasthpa.data.synth import generate

        generate(out, n=n, size=size, seed=0, workers=workers)
        return f"fasthpa.data.synth PNGs, {size} px"
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_tiny_dataset

    write_tiny_dataset(out, n=n, size=size, seed=0)
    return f"random-noise PNGs, {size} px (decode slower than real stains)"


def packs(root: Path, work: Path, sizes: list[int], stored: int, workers: int) -> dict:
    """The packed RGBA folder and one npy cache (and LZ4 pack) per size (written at that size)."""
    from fasthpa.data.pack import pack_dataset

    out = {"packed": work / "packed_png"}
    pack_dataset(root, out["packed"], fmt="png", workers=workers, progress=False)
    for s in sizes:
        for fmt in [f for f in LAYOUTS if f in ("npy", "lz4")]:
            out[(fmt, s)] = work / f"{fmt}_{s}"
            pack_dataset(
                root,
                out[(fmt, s)],
                fmt=fmt,
                size=None if s == stored else s,
                workers=workers,
                progress=False,
            )
    return out


def disk_bytes(root: Path, pack_dirs: dict, n: int) -> dict[str, int]:
    """On-disk bytes per sample of each layout (the 4 stain PNGs; each pack's files)."""

    def folder(path: Path, pattern: str) -> int:
        return sum(f.stat().st_size for f in path.glob(pattern))

    sizes = {"kaggle": folder(root / "train", "*.png") // n, "packed": 0}
    sizes["packed"] = folder(pack_dirs["packed"], "*.png") // n
    for key, path in pack_dirs.items():
        if isinstance(key, tuple):
            sizes[f"{key[0]}_{key[1]}"] = folder(path, f"*.{key[0]}") // n
    return sizes


def measure(
    root: Path,
    pack_dirs: dict,
    *,
    sizes: list[int],
    backends: list[str],
    device: str,
    threads: int,
    n: int,
    batch_size: int,
    repeats: int,
    on_row: Callable[[list[dict]], None] = lambda rows: None,
) -> list[dict]:
    """samples/s for each size x layout x backend; rows are dicts ready for ResultFiles.write.
    ``on_row(rows)`` is called with the rows so far after each cell (to write partial results);
    each row's ``vs_torch_4file`` is filled in as soon as its size's baseline is measured."""
    import torch

    from fasthpa.data.loader import build_loader
    from fasthpa.data.source import open_source
    from fasthpa.data.stats import ChannelStats

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    stats = ChannelStats((0.08, 0.05, 0.05, 0.08), (0.13, 0.10, 0.15, 0.13))
    rows = []
    for size in sizes:
        for layout in LAYOUTS:
            packed = {"kaggle": None, "packed": pack_dirs["packed"]}
            packed.update({f: pack_dirs.get((f, size)) for f in ("npy", "lz4")})
            source = open_source(root, "train", packed[layout])
            indices = np.arange(min(n, len(source.ids)))
            for backend in backends:
                if backend == "resident" and layout != "kaggle":
                    continue  # decoded once: the layout it decodes from is only setup time
                t_setup = time.perf_counter()
                loader = build_loader(
                    source,
                    indices,
                    train=True,
                    batch_size=batch_size,
                    image_size=size,
                    stats=stats,
                    device=dev,
                    dtype=dtype,
                    workers=threads,
                    backend=backend,
                )
                t_setup = time.perf_counter() - t_setup
                epoch = [0]

                def one_epoch(loader=loader, epoch=epoch) -> None:
                    epoch[0] += 1
                    loader.set_epoch(epoch[0])
                    for _batch in loader:
                        pass
                    synchronize(dev)  # the last batch's device work is part of the epoch

                t0 = time.perf_counter()
                timing = time_fn(one_epoch, device=device, warmup=1, repeats=repeats)
                samples = len(loader) * batch_size
                rows.append(
                    {
                        "size": size,
                        "layout": layout,
                        "backend": loader.backend,
                        "samples_per_s": samples / timing["median_s"],
                        "epoch_s": timing["median_s"],
                        "spread": timing["spread"],
                        "samples": samples,
                        "batch": batch_size,
                        "threads": threads,
                        "wall_s": time.perf_counter() - t0,
                        "setup_s": t_setup,
                        "placement": loader.placement.get("where"),
                    }
                )
                print(
                    f"  {size:4d} px {layout:7s} {loader.backend:9s} "
                    f"{rows[-1]['samples_per_s']:9.1f} samples/s",
                    flush=True,
                )
                del loader
                _ratios(rows)
                on_row(rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    """Each row's speed against the PyTorch twin on the 4-file layout at its size (this run)."""
    for size in {r["size"] for r in rows}:
        base = [
            r
            for r in rows
            if r["size"] == size and r["layout"] == "kaggle" and r["backend"] == "torch"
        ]
        for r in rows:
            if r["size"] == size and base:
                r["vs_torch_4file"] = r["samples_per_s"] / base[0]["samples_per_s"]


def model_images_per_s(args, device: str, sizes: list[int]) -> dict[int, dict]:
    """Model-only training images/s per size at ``args.batch_size``: measured here
    (``--model-arch``) or read from a throughput JSON (``--model-result``)."""
    import json

    if args.model_result is not None:
        result = json.loads(Path(args.model_result).read_text())
        rows = [r for r in result["rows"] if r.get("section") == "sweep" and not r.get("oom")]
        match = [r for r in rows if r["batch"] == args.batch_size]
        if not match:
            sys.exit(f"error: {args.model_result}: no sweep row at batch {args.batch_size}")
        figure = {
            "images_per_s": match[0]["images_per_s"],
            "arch": result.get("arch"),
            "from": str(args.model_result),
            "device": result["environment"]["device"],
        }
        return {result["image_size"]: figure}
    if args.model_arch is None:
        return {}
    import throughput as tp
    import torch

    dev = torch.device(device)
    cfg = tp.default_config(dev.type, compile_on=False)
    out = {}
    for size in sizes:
        opts = tp.Options(device=device, arch=args.model_arch, image_size=size, warmup=1, repeats=3)
        step = tp.TrainStep(cfg, args.model_arch, 4, dev)
        got = tp.measure_model_only(step, args.batch_size, opts, 4)
        out[size] = {
            "images_per_s": got["images_per_s"],
            "spread": got["spread"],
            "arch": args.model_arch,
            "step": cfg.name,
        }
        print(
            f"  {size:4d} px model-only {args.model_arch} ({cfg.name}): "
            f"{got['images_per_s']:.1f} images/s",
            flush=True,
        )
        del step
    return out


def add_headroom(rows: list[dict], model: dict[int, dict]) -> None:
    """headroom = loader samples/s over the model-only images/s at the same size and batch."""
    for r in rows:
        if r["size"] in model:
            r["headroom"] = r["samples_per_s"] / model[r["size"]]["images_per_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 samples, 3 timed epochs")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="decode workers/threads (0: all cores)")
    p.add_argument("--sizes", default="512,256", help="image sizes to load at, comma-separated")
    p.add_argument("--n", type=int, default=512, help="samples per epoch")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per cell")
    p.add_argument("--data", default="synth", help="synth, random, or a Kaggle-layout folder")
    p.add_argument("--stored-size", type=int, default=512, help="side of the generated PNGs")
    p.add_argument("--backends", default="torch,dali,resident", help="torch, dali, resident")
    p.add_argument("--model-arch", default=None, help="time this model's step too (headroom)")
    p.add_argument(
        "--model-result", type=Path, default=None, help="or read it from a throughput JSON"
    )
    p.add_argument("--workdir", type=Path, default=None, help="keep the generated data here")
    p.add_argument("--no-save", action="store_true", help="print only; write no result files")
    p.add_argument(
        "--out-dir", type=Path, default=None, help="results folder (default: benchmarks/results)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats = min(args.n, 64), min(args.repeats, 3)
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    from fasthpa.data.loader import dali_available

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or os.cpu_count() or 1
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = [b for b in args.backends.split(",") if b != "dali" or dali_available()]
    files = None if args.no_save else ResultFiles("loader", device, args.out_dir)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fasthpa_loader_bench_"))
    # the resident store's decoded arrays live (and are deleted) with the generated data
    os.environ["FASTHPA_RESIDENT_DIR"] = str(work / "resident")
    try:
        rows, report = _run(args, work, device, threads, sizes, backends, files)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    _print_table(rows, report, files, device, threads)
    if files is not None:
        print("wrote", *report.save(rows, complete=True))
    return 0


class _Report:
    """What the result files say beside the rows; ``save`` rewrites them (after every row)."""

    def __init__(self, args, files, described: str, threads: int, on_disk: dict) -> None:
        self.args, self.files, self.described, self.threads = args, files, described, threads
        self.on_disk, self.model = on_disk, {}
        self.load_before = os.getloadavg()[0]

    def save(self, rows: list[dict], complete: bool = False):
        if self.files is None:
            return ()
        load = (self.load_before, os.getloadavg()[0])
        extra = {"data": self.described, "load_average_before_after": load}
        extra["args"] = {k: str(v) for k, v in vars(self.args).items()}
        extra |= {"disk_bytes_per_sample": self.on_disk, "model_only": self.model}
        md = _markdown(rows, self, load)
        return self.files.write(rows, md, extra=extra, complete=complete)


def _run(args, work: Path, device: str, threads: int, sizes, backends, files):
    from fasthpa.data.source import open_source, stored_size

    root = Path(args.data) if args.data not in ("synth", "random") else work / "data"
    t0 = time.perf_counter()
    described = make_dataset(root, args.data, args.n, args.stored_size, threads)
    stored = stored_size(open_source(root))[0]
    pack_dirs = packs(root, work, sizes, stored, threads)
    print(f"data: {described}; packed in {time.perf_counter() - t0:.0f} s", flush=True)
    on_disk = disk_bytes(root, pack_dirs, len(open_source(root).ids))
    print("bytes per sample on disk:", on_disk, flush=True)
    report = _Report(args, files, described, threads, on_disk)
    rows = measure(
        root,
        pack_dirs,
        sizes=sizes,
        backends=backends,
        device=device,
        threads=threads,
        n=args.n,
        batch_size=args.batch_size,
        repeats=args.repeats,
        on_row=report.save,
    )
    report.model = model_images_per_s(args, device, sizes)
    add_headroom(rows, report.model)
    return rows, report


def _columns(model: dict) -> list[str]:
    return COLUMNS + (["headroom"] if model else [])


def _print_table(rows, report: _Report, files, device: str, threads: int) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    env = files.env if files is not None else {"device": device, "torch": torch.__version__}
    title = f"loader throughput: {env['device']}, {threads} threads, torch {env['torch']}, "
    title += f"DALI {env.get('dali')}, data: {report.described}"
    table = Table(title=title)
    columns = _columns(report.model)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(_cell(r.get(c, "")) for c in columns))
    Console().print(table)


COLUMNS = ["size", "layout", "backend", "samples_per_s", "spread", "vs_torch_4file"]


def _cell(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _markdown(rows: list[dict], report: _Report, load: tuple) -> str:
    args = report.args
    md = (
        f"data: {report.described}; {args.n} samples per epoch, batch {args.batch_size}, "
        f"{report.threads} threads, {args.repeats} timed epochs after one warm-up epoch; "
        "samples/s is the median. vs_torch_4file: relative to the PyTorch twin on the "
        "4-file layout at the same size, same run. 1-minute load average before/after: "
        f"{load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} cores (a shared machine reads "
        "low and noisy; compare ratios, not absolute figures).\n\n"
    )
    more = ["epoch_s", "setup_s", "placement", "samples", "batch", "threads"]
    md += markdown_table(rows, _columns(report.model) + more)
    md += "\n\nBytes per sample on disk: "
    md += ", ".join(f"{k} {v:,}" for k, v in report.on_disk.items())
    if report.model:
        md += "\n\nModel-only step (headroom denominator): " + "; ".join(
            f"{k} px {v['images_per_s']:.1f} images/s ({v['arch']})"
            for k, v in report.model.items()
        )
    return md


if __name__ == "__main__":
    sys.exit(main())
