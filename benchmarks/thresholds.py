"""Per-label threshold search: fasthpa's vectorised exact search vs the usual per-label loops.

Times, for N samples x 28 labels of float32 scores with the Kaggle label frequencies:
- ``fasthpa exact``: ``fit_thresholds(method="exact")`` end to end (search + F1 at 0.5 and tuned)
- ``fasthpa exact (search)``: the sort/cumsum/argmax search alone
- ``fasthpa exact (search, torch.sort)``: the same on the CPU with torch.sort instead of numpy's
  argsort (the gain of that choice in isolation)
- ``fasthpa grid``: ``fit_thresholds(method="grid")`` (101 grid points looked up in the sort)
- ``sklearn loop``: per label, ``precision_recall_curve`` -> F1 -> argmax (exact, the usual way)
- ``python grid``: for t in 0.00..1.00, ``f1_score(..., average=None)`` (what public code did)
on the CPU and, where there is one, the GPU (data already on the device), all in one run, and
reports each fasthpa row's speed-up over both baselines at the same N. The exact search's best
F1 is checked against the scikit-learn loop's before anything is timed.

The baselines are capped: above ``--baseline-max-n`` rows (20,000 with --quick, else 100,000) they
are timed on that many rows and their time scaled by N / rows, which the tables say (the Python
grid alone takes minutes at N = 1e6). The result files are rewritten after every N, so a run
stopped at a time limit keeps what it measured.

    python benchmarks/thresholds.py --quick          # CPU, N up to 1e5, under a minute
    python benchmarks/thresholds.py                  # N = 1e3 .. 1e6, CPU and GPU if present
    python benchmarks/thresholds.py --sizes 1000 1000000 --devices cuda
    python benchmarks/thresholds.py --quick --threads 1   # on a shared, busy CPU (see below)

On a CPU that other processes keep busy, torch's intra-op threads wait for each other and a
2-thread run can be 10x slower than a 1-thread one at N <= 1e5; the baselines are
single-threaded, so --threads 1 is the like-for-like comparison there.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import numpy as np
from common import ResultFiles, markdown_table, time_fn
from sklearn.metrics import f1_score, precision_recall_curve  # imported here, not in a timing

from fasthpa.labels import KAGGLE_TRAIN_COUNTS, KAGGLE_TRAIN_SAMPLES, NUM_LABELS


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 scores [n, 28] and uint8 labels with the Kaggle label frequencies; positives score
    higher on average, as a half-trained model's would."""
    rng = np.random.default_rng(seed)
    rates = np.array(KAGGLE_TRAIN_COUNTS) / KAGGLE_TRAIN_SAMPLES
    y = rng.random((n, NUM_LABELS)) < rates
    logits = rng.normal(-2.0, 1.5, (n, NUM_LABELS)) + 2.5 * y
    p = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    return p, y.astype(np.uint8)


def sklearn_loop(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The usual exact way: one precision_recall_curve per label."""
    thresholds = np.full(p.shape[1], 0.5)
    best = np.zeros(p.shape[1])
    for label in range(p.shape[1]):
        if not y[:, label].any():
            continue
        precision, recall, cuts = precision_recall_curve(y[:, label], p[:, label])
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
        i = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
        thresholds[label], best[label] = cuts[i], f1[i]
    return thresholds, best


def python_grid(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """What most public kernels did: scikit-learn F1 of every label at each 0.01 step."""
    grid = np.arange(101) / 100
    scores = np.stack([f1_score(y, p >= t, average=None, zero_division=0) for t in grid])
    return grid[scores.argmax(0)]


def timed(fn, device: str, repeats: int, budget_s: float) -> dict[str, float]:
    """time_fn with the repeats cut to fit ``budget_s``: slow baselines run once or twice; the
    first, untimed call is the warm-up."""
    from common import synchronize

    t0 = time.perf_counter()
    fn()
    synchronize(device)
    once = time.perf_counter() - t0
    reps = max(1, min(repeats, int(budget_s / max(once, 1e-9))))
    warmup = 0 if once > 0.5 else 2
    return time_fn(fn, device=device, warmup=warmup, repeats=reps)


def exact_search(p, y, backend: str | None):
    """The exact search alone (sort, cumulative TP, argmax), without input checks or metrics."""
    from fasthpa.thresholds.search import _exact_search, _sort_scores

    return _exact_search(_sort_scores(p, y, backend))


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f}x"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, N up to 1e5, under a minute")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="values of N")
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="rough seconds allowed per timed row"
    )
    parser.add_argument(
        "--baseline-max-n",
        type=int,
        default=None,
        help="time the CPU baselines on at most this many rows and scale the time linearly to N "
        "(default 20000 with --quick, else 100000; 0: never subsample)",
    )
    parser.add_argument(
        "--max-baseline-s",
        type=float,
        default=None,
        help="skip a baseline whose run is predicted (from the previous N) to exceed this",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); numpy and scikit-learn baselines use one",
    )
    parser.add_argument("--out-dir", default=None, help="results folder (default: results/)")
    args = parser.parse_args(argv)
    q = args.quick
    args.sizes = args.sizes or ([1_000, 10_000, 100_000] + ([] if q else [1_000_000]))
    args.repeats = args.repeats or (5 if q else 10)
    args.budget_s = args.budget_s or (3.0 if q else 20.0)
    args.max_baseline_s = args.max_baseline_s or (30.0 if q else 900.0)
    if args.baseline_max_n is None:
        args.baseline_max_n = 20_000 if q else 100_000
    return args


Emit = Callable[[dict, str], None]
"""emit(row, line): record a row (and rewrite the result files), print its line"""


def baseline_rows(n, p, y, args, last: dict[str, tuple[int, float]], emit: Emit) -> None:
    """The CPU baselines at N = n: timed on the first ``args.baseline_max_n`` rows (the rows are
    independent draws) and scaled by n / rows, or skipped when the previous N predicts a run
    longer than ``args.max_baseline_s``. ``last`` carries each baseline's (rows, seconds)."""
    timed_n = min(n, args.baseline_max_n) if args.baseline_max_n > 0 else n
    ps, ys = p[:timed_n], y[:timed_n]
    for name, fn in (
        ("sklearn loop", functools.partial(sklearn_loop, ps, ys)),
        ("python grid", functools.partial(python_grid, ps, ys)),
    ):
        prev = last.get(name)
        predicted = prev[1] * timed_n / prev[0] if prev else 0.0
        if predicted > args.max_baseline_s:
            skipped = {"skipped": True, "predicted_s": predicted}
            row = {"n": n, "device": "cpu", "method": name, **skipped}
            emit(row, f"[yellow]skip {name} at N={n}: predicted {predicted:.0f} s[/]")
            continue
        stats = timed(fn, "cpu", args.repeats, args.budget_s)
        last[name] = (timed_n, stats["median_s"])
        scale = n / timed_n  # the grid is linear in n; the loop sorts (n log n): conservative
        for key in ("median_s", "min_s", "max_s"):
            stats[key] *= scale
        row = {"n": n, "device": "cpu", "method": name, **stats, "timed_n": timed_n}
        scaled = f" (timed on {timed_n:,} rows, x{scale:.3g})" if scale > 1 else ""
        emit(row, f"N={n:>9,} cpu  {name:<30} {stats['median_s'] * 1e3:10.2f} ms{scaled}")


def fasthpa_rows(n, p, y, dev: str, base: dict[str, float], args, emit: Emit) -> dict:
    """fasthpa's searches at N = n on ``dev``, after checking the exact search finds
    scikit-learn's optimum (returned)."""
    import torch

    from fasthpa.thresholds import fit_thresholds
    from fasthpa.thresholds.search import _as_tensors

    _, ref_best = sklearn_loop(p, y)
    pt = torch.from_numpy(p).to(dev)
    yt = torch.from_numpy(y.astype(bool)).to(dev)
    exact = fit_thresholds(pt, yt, "exact")
    # the exact search must find scikit-learn's optimum before its time means anything
    diff = float(np.max(np.abs(exact.f1_tuned - ref_best)))
    check = {"n": n, "device": dev, "max_abs_f1_diff_vs_sklearn": diff}
    if diff > 1e-9:
        raise SystemExit(f"exact search disagrees with scikit-learn at N={n} on {dev}")
    pv, yv = _as_tensors(pt, yt)
    candidates = [
        ("fasthpa exact", functools.partial(fit_thresholds, pt, yt, "exact")),
        ("fasthpa exact (search)", functools.partial(exact_search, pv, yv, None)),
        ("fasthpa grid", functools.partial(fit_thresholds, pt, yt, "grid")),
    ]
    if dev == "cpu":  # the numpy-argsort trick in isolation: the same search on torch.sort
        on_torch_sort = functools.partial(exact_search, pv, yv, "torch")
        candidates.insert(2, ("fasthpa exact (search, torch.sort)", on_torch_sort))
    for name, fn in candidates:
        stats = timed(fn, dev, args.repeats, args.budget_s)
        row = {"n": n, "device": dev, "method": name, **stats}
        for bname in ("sklearn loop", "python grid"):
            key = "x_vs_" + bname.replace(" ", "_")
            row[key] = base[bname] / stats["median_s"] if bname in base else None
        emit(row, f"N={n:>9,} {dev:<4} {name:<30} {stats['median_s'] * 1e3:10.2f} ms")
    return check


COLUMNS = ["N", "device", "method", "median ms", "spread", "repeats", "timed on N"]
COLUMNS += ["x vs sklearn loop", "x vs python grid"]


def table_rows(rows: list[dict]) -> list[dict]:
    """The printed/markdown cells of each row."""
    out = []
    for r in rows:
        cells = [f"{r['n']:,}", r["device"], r["method"]]
        if r.get("skipped"):
            cells += [f"skipped (~{r['predicted_s']:.0f} s)", "", "", "", "", ""]
        else:
            cells += [f"{r['median_s'] * 1e3:.3f}", f"{r['spread']:.0%}", str(r["repeats"])]
            timed_n = r.get("timed_n", r["n"])
            cells.append(f"{timed_n:,} (scaled)" if timed_n < r["n"] else "")
            cells += [_ratio(r.get("x_vs_sklearn_loop")), _ratio(r.get("x_vs_python_grid"))]
        out.append(dict(zip(COLUMNS, cells)))
    return out


def markdown(rows: list[dict], devs: str, args) -> str:
    cap = (
        f"A baseline at N above {args.baseline_max_n:,} is timed on the first "
        f"{args.baseline_max_n:,} rows (independent draws) and its time scaled by N / rows "
        "('timed on N' column). The grid's cost is linear in N; the scikit-learn loop sorts "
        "(N log N), so its scaled time slightly understates it and its speed-ups are "
        "conservative. "
        if args.baseline_max_n > 0
        else ""
    )
    return (
        "Baselines run on the CPU with numpy/scikit-learn; the ratios divide a baseline's median "
        f"time by the fasthpa row's at the same N (measured in this one run). {cap}\n\n"
        f"Devices: {devs}.\n\n" + markdown_table(table_rows(rows), COLUMNS)
    )


def main(argv: list[str] | None = None) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from fasthpa.envinfo import device_name

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if args.quick and args.devices is None:
        devices = ["cpu"]
    console = Console()
    if not console.is_terminal:  # a log file: room for the whole table
        console = Console(width=160)
    devs = ", ".join(f"{d}: {device_name(d)}" for d in devices)
    files = ResultFiles("thresholds", "cuda" if "cuda" in devices else "cpu", args.out_dir)
    rows: list[dict] = []
    checks: list[dict] = []

    def save(complete: bool):
        extra = {"quick": args.quick, "labels": NUM_LABELS, "devices": devices, "checks": checks}
        extra |= {"torch_threads": torch.get_num_threads(), "baseline_max_n": args.baseline_max_n}
        return files.write(rows, markdown(rows, devs, args), extra=extra, complete=complete)

    def emit(row: dict, line: str) -> None:
        rows.append(row)
        console.print(line)
        save(complete=False)

    last_baseline: dict[str, tuple[int, float]] = {}
    for n in args.sizes:
        p, y = make_data(n)
        baseline_rows(n, p, y, args, last_baseline, emit)
        base = {r["method"]: r["median_s"] for r in rows if r["n"] == n and not r.get("skipped")}
        for dev in devices:
            checks.append(fasthpa_rows(n, p, y, dev, base, args, emit))

    table = Table(title="per-label threshold search, 28 labels (median of repeats)")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("device", "method") else "right")
    for cells in table_rows(rows):
        table.add_row(*cells.values())
    console.print(table)
    console.print(f"devices: {devs}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    console.print(
        f"exact vs scikit-learn best F1, max |diff|: "
        f"{max(c['max_abs_f1_diff_vs_sklearn'] for c in checks):.2e}"
    )
    if args.baseline_max_n > 0 and max(args.sizes) > args.baseline_max_n:
        console.print(
            f"baselines above N={args.baseline_max_n:,}: timed on that many rows, time scaled "
            "by N / rows (see the 'timed on N' column)"
        )
    jp, mp = save(complete=True)
    console.print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
