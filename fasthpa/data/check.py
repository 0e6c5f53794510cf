"""Validate a Kaggle-layout HPA dataset and print a summary.

Reads the split's CSV, checks that every channel PNG exists, decodes a sample of samples (or all
of them with --decode-all) and checks that their channels agree in size. With ``--packed DIR`` it
also checks every file of a ``fasthpa pack`` folder: its header and an intact body (PNG chunk
CRCs, the LZ4 file's CRC-32, the npy data length). Bad input ends with one line naming the file
or row and exit status 2.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fasthpa.data.dataset import HPASplit, load_sample, load_split, missing_files
from fasthpa.data.pack import MANIFEST, check_packed_file
from fasthpa.data.source import open_source
from fasthpa.errors import UserError
from fasthpa.labels import LABEL_NAMES


@dataclass
class CheckSummary:
    root: Path
    split: str
    samples: int
    label_counts: list[int] | None
    labels_per_sample: dict[int, int] | None
    decoded: int
    sizes: dict[str, int] = field(default_factory=dict)  # "512x512" -> samples
    dtype: str = "uint8"


def check_dataset(
    root: str | Path, split: str = "train", decode: int = 16, seed: int = 0
) -> CheckSummary:
    """Validate ``root``'s ``split``; decode ``decode`` random samples (all if ``decode < 0``)."""
    data: HPASplit = load_split(root, split)
    missing = missing_files(data)
    if missing:
        ids = sorted({p.name.rsplit("_", 1)[0] for p in missing})
        first = ", ".join(p.name for p in missing[:3])
        raise UserError(
            f"{data.image_dir}: {len(missing)} channel file(s) missing for {len(ids)} sample(s) "
            f"(first: {first})."
        )
    n = len(data)
    if decode < 0 or decode >= n:
        picks = np.arange(n)
    else:
        picks = np.sort(np.random.default_rng(seed).choice(n, size=decode, replace=False))
    sizes: Counter[str] = Counter()
    for i in picks:
        img = load_sample(data.image_dir, data.ids[int(i)])
        sizes[f"{img.shape[1]}x{img.shape[0]}"] += 1
    counts = per_sample = None
    if data.targets is not None:
        counts = data.targets.sum(axis=0).astype(int).tolist()
        per_sample = dict(sorted(Counter(data.targets.sum(axis=1).astype(int).tolist()).items()))
    return CheckSummary(
        root=Path(root),
        split=split,
        samples=n,
        label_counts=counts,
        labels_per_sample=per_sample,
        decoded=len(picks),
        sizes=dict(sizes),
    )


def check_pack(root: str | Path, split: str, packed: str | Path) -> str:
    """Check every file of the pack ``packed`` for ``root``'s ``split``; returns a summary line.

    A damaged file is a UserError naming the first one and how many there are.
    """
    source = open_source(root, split, packed)
    manifest = json.loads((Path(packed) / MANIFEST).read_text())
    layout = (manifest.get("lz4") or {}).get("layout")
    bad: list[UserError] = []
    for row in range(len(source)):
        try:
            check_packed_file(source.sample_paths(row)[0], manifest.get("size"), layout)
        except UserError as e:
            bad.append(e)
    if bad:
        first = str(bad[0]).rstrip(".")
        raise UserError(f"{first} ({len(bad)} of {len(source)} packed files damaged).")
    return f"pack {packed}: {len(source)} {manifest['format']} files intact"


def print_summary(s: CheckSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{s.root}[/] split [bold]{s.split}[/]: {s.samples} samples, 4 stains each, all files present"
    )
    sizes = ", ".join(f"{k} ({v})" for k, v in s.sizes.items())
    console.print(f"decoded {s.decoded} sample(s): {s.dtype}, sizes {sizes}")
    if s.label_counts is None:
        return
    table = Table(title="label counts")
    table.add_column("idx", justify="right")
    table.add_column("label")
    table.add_column("count", justify="right")
    table.add_column("% of samples", justify="right")
    for i, (name, c) in enumerate(zip(LABEL_NAMES, s.label_counts)):
        style = "red" if c == 0 else None
        table.add_row(str(i), name, str(c), f"{100 * c / s.samples:.2f}", style=style)
    console.print(table)
    per = ", ".join(f"{k} label(s): {v}" for k, v in s.labels_per_sample.items())
    console.print(f"labels per sample: {per}; total labels {sum(s.label_counts)}")
    absent = [LABEL_NAMES[i] for i, c in enumerate(s.label_counts) if c == 0]
    if absent:
        console.print(f"[yellow]labels with no sample: {', '.join(absent)}[/]")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", type=Path, help="dataset folder (Kaggle layout)")
    p.add_argument(
        "--split", choices=["train", "test"], default="train", help="which split to check"
    )
    p.add_argument("--decode", type=int, default=16, help="decode this many random samples")
    p.add_argument(
        "--decode-all", action="store_true", help="decode every sample (slow on the full set)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for choosing the decoded samples")
    p.add_argument(
        "--packed",
        type=Path,
        default=None,
        help="also check every file of this `fasthpa pack` folder (headers and checksums)",
    )


def run(args: argparse.Namespace) -> int:
    summary = check_dataset(
        args.root, args.split, -1 if args.decode_all else args.decode, args.seed
    )
    print_summary(summary)
    if args.packed is not None:
        print(check_pack(args.root, args.split, args.packed))
    return 0
