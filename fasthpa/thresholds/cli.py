"""``fasthpa thresholds``: fit per-label thresholds on saved probabilities, print the table.

fasthpa thresholds --probs runs/r1/dev_probs.npz --out runs/r1/thresholds_exact.json
fasthpa thresholds --probs dev.csv --labels train.csv --method grid --out thresholds.json
fasthpa thresholds --probs dev.npy --labels dev_labels.npy --rare-below 10 --out t.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fasthpa.errors import UserError
from fasthpa.labels import NUM_LABELS
from fasthpa.thresholds.files import write_thresholds_json
from fasthpa.thresholds.inputs import align_labels, read_labels, read_prevalence, read_probs
from fasthpa.thresholds.search import (
    DEFAULT_THRESHOLD,
    METHODS,
    RARE_RULES,
    ThresholdResult,
    fit_thresholds,
    from_numpy,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fasthpa thresholds``."""
    parser.add_argument(
        "--probs",
        required=True,
        type=Path,
        help="dev probabilities: a run's dev_probs.npz (ids, probs, labels), an [N, 28] .npy, "
        "or a CSV with an Id column and 28 probability columns",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="true labels: a train.csv-style Id,Target file (matched by Id) or an [N, 28] "
        "multi-hot .npy/.npz (matched by row); may be left out when --probs is a dev_probs.npz "
        "with labels",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="exact",
        help="exact F1 search, a 0.01 grid, or the prevalence rule",
    )
    parser.add_argument("--out", required=True, type=Path, help="thresholds.json to write")
    parser.add_argument(
        "--rare-below",
        type=int,
        default=0,
        metavar="K",
        help="labels with fewer than K positives (but some) get --rare-rule instead of the "
        "tuned threshold; 0 turns this off",
    )
    parser.add_argument(
        "--rare-rule",
        choices=RARE_RULES,
        default="shrink",
        help="for rare labels: shrink the tuned threshold toward 0.5, or use the prevalence rule",
    )
    parser.add_argument(
        "--shrink",
        type=float,
        default=0.5,
        help="fraction of the way a rare label's threshold moves toward 0.5",
    )
    parser.add_argument(
        "--prevalence",
        default="fit",
        metavar="fit|kaggle|TRAIN_CSV",
        help="label frequencies for the prevalence rule: those of the fitting labels, of the "
        "Kaggle train.csv, or of a train.csv-style file",
    )
    parser.add_argument(
        "--default",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="threshold kept for labels without positives (exact and grid)",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device for the search (cpu, cuda, cuda:1)"
    )


def run(args: argparse.Namespace) -> int:
    """``fasthpa thresholds``: read, fit, print the per-label table, write thresholds.json."""
    import torch

    if args.rare_below < 0:
        raise UserError(f"--rare-below must be >= 0, got {args.rare_below}.")
    if not 0.0 <= args.shrink <= 1.0:
        raise UserError(f"--shrink must lie in [0, 1], got {args.shrink}.")
    if not 0.0 <= args.default <= 1.0:
        raise UserError(f"--default must lie in [0, 1], got {args.default}.")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a torch device.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} asked for, but no CUDA GPU is available.")

    probs, npz_labels = read_probs(args.probs, NUM_LABELS)
    if args.labels is not None:
        labels = read_labels(args.labels, NUM_LABELS)
    elif npz_labels is not None:
        labels = npz_labels
        if labels.values.shape != probs.values.shape:
            raise UserError(
                f"--probs {args.probs} holds labels of shape {labels.values.shape} for probs of "
                f"shape {probs.values.shape}."
            )
        if not np.isin(labels.values, (0, 1)).all():
            raise UserError(f"--probs {args.probs} 'labels' must be multi-hot: every entry 0 or 1.")
    else:
        raise UserError(f"--labels is needed: --probs {args.probs} holds no labels.")
    y = align_labels(probs, labels)
    prevalence = read_prevalence(args.prevalence, NUM_LABELS)

    p_t = from_numpy(probs.values).to(device)
    y_t = from_numpy(y.astype(np.bool_)).to(device)
    result = fit_thresholds(
        p_t,
        y_t,
        args.method,
        rare_below=args.rare_below,
        rare_rule=args.rare_rule,
        shrink=args.shrink,
        prevalence=prevalence,
        default=args.default,
    )
    result.options["prevalence"] = args.prevalence
    write_thresholds_json(
        args.out,
        result,
        {"probs": str(args.probs), "labels": str(args.labels or args.probs)},
    )
    print_result(result)
    print(f"wrote {args.out}")
    return 0


def print_result(result: ThresholdResult) -> None:
    """A rich table: label, positives, threshold, F1 at 0.5, tuned F1, gain; then macro F1s and
    the per-label notes (marked * in the table)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a pipe or a log file: no reason to squeeze into 80 columns
        console = Console(width=120)
    table = Table(title=f"per-label thresholds ({result.method}, N = {result.n_samples})")
    table.add_column("#", justify="right")
    table.add_column("label", no_wrap=True, overflow="ellipsis", min_width=12)
    for name in ("positives", "threshold", "F1 @ 0.5", "F1 tuned", "gain"):
        table.add_column(name, justify="right", no_wrap=True)
    for i, name in enumerate(result.label_names):
        gain = result.gain[i]
        colour = "green" if gain > 0 else "red" if gain < 0 else "dim"
        table.add_row(
            str(i),
            name + (" *" if i in result.notes else ""),
            str(result.positives[i]),
            f"{result.thresholds[i]:.4f}",
            f"{result.f1_at_05[i]:.4f}",
            f"{result.f1_tuned[i]:.4f}",
            f"[{colour}]{gain:+.4f}[/]",
        )
    table.add_section()
    table.add_row(
        "",
        "macro F1",
        str(int(result.positives.sum())),
        "",
        f"{result.macro_f1_at_05:.4f}",
        f"{result.macro_f1_tuned:.4f}",
        f"{result.macro_f1_tuned - result.macro_f1_at_05:+.4f}",
    )
    console.print(table)
    for i, note in sorted(result.notes.items()):
        console.print(f"* {i} {result.label_names[i]}: {note}", highlight=False)
