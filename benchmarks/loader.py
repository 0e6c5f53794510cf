"""Input pipeline throughput: samples/s of each backend x layout, at each image size.

Backends: the PyTorch twin (``torch``) and DALI (``dali-cpu`` / ``dali-gpu``, where installed).
Layouts: ``kaggle`` (4 stain PNGs per sample), ``packed`` (one RGBA PNG, ``fasthpa pack``) and
``npy`` (the decoded cache, ``fasthpa pack --format npy --size S``, written at the size it is
read at). Each cell runs the real training loader (train mode: shuffle, default flips,
normalise, batches on the device in the training dtype) over a synthetic dataset it writes with
``fasthpa.data.synth`` (``--data random`` for noise PNGs, which compress badly and decode
slower than real stains; ``--data DIR`` for an existing Kaggle-layout folder). One epoch warms
up (worker start, pipeline build), then ``--repeats`` epochs are timed, each ending with a
device synchronise; the table gives the median and spread and, per size, each row's speed
relative to the PyTorch twin reading the 4-file layout, all measured in the same run.

    python benchmarks/loader.py --quick                      # 64 samples, a few minutes on 2 cores
    python benchmarks/loader.py --device cuda --threads 16 --n 2048 --sizes 512,256
    python benchmarks/loader.py --data /data/hpa --n 4096    # real images

``measure(...)`` returns the rows for other scripts (``benchmarks/throughput.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import ROOT, ResultFiles, markdown_table, synchronize, time_fn

LAYOUTS = ("kaggle", "packed", "npy")


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
    """The packed RGBA folder and one npy cache per size (written at that size)."""
    from fasthpa.data.pack import pack_dataset

    out = {"packed": work / "packed_png"}
    pack_dataset(root, out["packed"], fmt="png", workers=workers, progress=False)
    for s in sizes:
        out[("npy", s)] = work / f"npy_{s}"
        pack_dataset(root, out[("npy", s)], fmt="npy", size=None if s == stored else s,
                     workers=workers, progress=False)  # fmt: skip
    return out


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
            packed = {
                "kaggle": None,
                "packed": pack_dirs["packed"],
                "npy": pack_dirs[("npy", size)],
            }
            source = open_source(root, "train", packed[layout])
            indices = np.arange(min(n, len(source.ids)))
            for backend in backends:
                loader = build_loader(
                    source, indices, train=True, batch_size=batch_size, image_size=size,
                    stats=stats, device=dev, dtype=dtype, workers=threads,
                    backend="dali" if backend == "dali" else "torch",
                )  # fmt: skip
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
                rows.append({
                    "size": size, "layout": layout, "backend": loader.backend,
                    "samples_per_s": samples / timing["median_s"],
                    "epoch_s": timing["median_s"], "spread": timing["spread"],
                    "samples": samples, "batch": batch_size, "threads": threads,
                    "wall_s": time.perf_counter() - t0,
                })  # fmt: skip
                print(f"  {size:4d} px {layout:7s} {loader.backend:9s} "
                      f"{rows[-1]['samples_per_s']:9.1f} samples/s", flush=True)  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--backends", default="torch,dali", help="torch and/or dali")
    p.add_argument("--workdir", type=Path, default=None, help="keep the generated data here")
    p.add_argument("--no-save", action="store_true", help="print only; write no result files")
    p.add_argument(
        "--out-dir", type=Path, default=None, help="results folder (default: benchmarks/results)"
    )
    args = p.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from fasthpa.data.loader import dali_available

    if args.quick:
        args.n, args.repeats = min(args.n, 64), min(args.repeats, 3)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or os.cpu_count() or 1
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = [b for b in args.backends.split(",") if b != "dali" or dali_available()]
    files = None if args.no_save else ResultFiles("loader", device, args.out_dir)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fasthpa_loader_bench_"))
    try:
        root = Path(args.data) if args.data not in ("synth", "random") else work / "data"
        t0 = time.perf_counter()
        described = make_dataset(root, args.data, args.n, args.stored_size, threads)
        from fasthpa.data.source import open_source, stored_size

        stored = stored_size(open_source(root))[0]
        pack_dirs = packs(root, work, sizes, stored, threads)
        print(f"data: {described}; packed in {time.perf_counter() - t0:.0f} s", flush=True)
        load_before = os.getloadavg()[0]

        def save(rows: list[dict], complete: bool = False):
            if files is None:
                return ()
            load = (load_before, os.getloadavg()[0])
            extra = {"data": described, "load_average_before_after": load}
            extra["args"] = {k: str(v) for k, v in vars(args).items()}
            md = _markdown(rows, described, args, threads, load)
            return files.write(rows, md, extra=extra, complete=complete)

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
            on_row=save,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    env = files.env if files is not None else {"device": device, "torch": torch.__version__}
    title = f"loader throughput: {env['device']}, {threads} threads, torch {env['torch']}, "
    title += f"DALI {env.get('dali')}, data: {described}"
    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(_cell(r.get(c, "")) for c in COLUMNS))
    Console().print(table)
    if files is not None:
        print("wrote", *save(rows, complete=True))
    return 0


COLUMNS = ["size", "layout", "backend", "samples_per_s", "spread", "vs_torch_4file"]


def _cell(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _markdown(rows: list[dict], described: str, args, threads: int, load: tuple) -> str:
    md = (
        f"data: {described}; {args.n} samples per epoch, batch {args.batch_size}, "
        f"{threads} threads, {args.repeats} timed epochs after one warm-up epoch; "
        "samples/s is the median. vs_torch_4file: relative to the PyTorch twin on the "
        "4-file layout at the same size, same run. 1-minute load average before/after: "
        f"{load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} cores (a shared machine reads "
        "low and noisy; compare ratios, not absolute figures).\n\n"
    )
    return md + markdown_table(rows, COLUMNS + ["epoch_s", "samples", "batch", "threads"])


if __name__ == "__main__":
    sys.exit(main())
