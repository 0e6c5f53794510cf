"""Decoded-cache layout: one .npy per sample (what `fasthpa pack --format npy` writes) against a
few large shards, read in a shuffled order as training reads them.

Both layouts hold the same uint8 HWC samples. Per-sample files are what DALI's numpy reader (and
GPUDirect Storage) consume; a shard is one big array read by slicing a memory map. The files are
written fresh and then read twice: the first pass ("cold") may still hit the page cache on a
machine with free memory, so the page cache is dropped when this process may do it (root) and the
run says whether it could.

    python benchmarks/cache_layout.py --quick          # 256 samples at 256 px
    python benchmarks/cache_layout.py --n 2048 --size 512
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import markdown_table, print_rows, write_results


def drop_page_cache() -> bool:
    """Ask the kernel to drop clean page-cache pages (needs root); True if it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def write_layouts(work: Path, n: int, size: int, shards: int, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    per_sample, sharded = work / "per_sample", work / "shards"
    per_sample.mkdir(parents=True)
    sharded.mkdir(parents=True)
    per_shard = -(-n // shards)
    for s in range(shards):
        count = min(per_shard, n - s * per_shard)
        block = rng.integers(0, 256, size=(count, size, size, 4), dtype=np.uint8)
        np.save(sharded / f"shard_{s:03d}.npy", block)
        for k in range(count):
            np.save(per_sample / f"{s * per_shard + k:06d}.npy", block[k])
    return per_sample, sharded


def read_per_sample(folder: Path, order: np.ndarray) -> int:
    total = 0
    for i in order:
        total += int(np.load(folder / f"{i:06d}.npy")[0, 0, 0])
    return total


def read_shards(folder: Path, order: np.ndarray, per_shard: int) -> int:
    maps = [np.load(p, mmap_mode="r") for p in sorted(folder.glob("shard_*.npy"))]
    total = 0
    for i in order:
        sample = np.array(maps[i // per_shard][i % per_shard])  # copy out, as a loader must
        total += int(sample[0, 0, 0])
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 samples at 256 px")
    p.add_argument("--n", type=int, default=1024, help="samples")
    p.add_argument("--size", type=int, default=512, help="image side")
    p.add_argument("--shards", type=int, default=4, help="shards for the sharded layout")
    p.add_argument("--repeats", type=int, default=3, help="warm passes per layout")
    p.add_argument(
        "--workdir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    p.add_argument("--out-dir", type=Path, default=None, help="results folder")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.size = min(args.n, 256), min(args.size, 256)
    work = Path(tempfile.mkdtemp(prefix="cache_layout_", dir=args.workdir))
    try:
        per_sample, sharded = write_layouts(work, args.n, args.size, args.shards, seed=0)
        per_shard = -(-args.n // args.shards)
        order = np.random.default_rng(1).permutation(args.n)
        readers = {
            "one .npy per sample": lambda: read_per_sample(per_sample, order),
            f"{args.shards} shards (mmap)": lambda: read_shards(sharded, order, per_shard),
        }
        mib = args.n * args.size * args.size * 4 / 2**20
        rows = []
        for name, read in readers.items():
            dropped = drop_page_cache()
            t0 = time.perf_counter()
            read()
            cold = time.perf_counter() - t0
            warm = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                read()
                warm.append(time.perf_counter() - t0)
            med = float(np.median(warm))
            rows.append(
                {
                    "layout": name,
                    "samples": args.n,
                    "size": args.size,
                    "cold_samples_per_s": args.n / cold,
                    "cold_page_cache_dropped": dropped,
                    "warm_samples_per_s": args.n / med,
                    "warm_MiB_per_s": mib / med,
                    "warm_spread": (max(warm) - min(warm)) / med,
                }
            )
        base = rows[0]["warm_samples_per_s"]
        for r in rows:
            r["warm_x_per_sample"] = r["warm_samples_per_s"] / base
        columns = list(rows[0].keys())
        print_rows(f"decoded cache layouts, {args.n} x {args.size} px x 4 (uint8)", rows, columns)
        md = (
            "Shuffled reads of the same uint8 HWC samples from one .npy per sample and from "
            "memory-mapped shards, one process; 'cold' is the first pass after writing (page cache "
            "dropped only where `cold_page_cache_dropped` is true), 'warm' the median of the "
            "repeats.\n\n" + markdown_table(rows, columns)
        )
        paths = write_results("cache_layout", "cpu", rows, md, out_dir=args.out_dir)
        print("wrote", *paths)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
