"""Multi-label loss, forward + backward: the fused Triton kernel vs eager PyTorch vs torch.compile.

For each loss (weighted BCE with w = 1 - f_l; focal loss, gamma 2) and batch size B (B x 28
logits, fp32, as the trainer passes them), times ``loss(x, y)`` plus ``autograd.grad`` w.r.t.
the logits:

  eager     PyTorch as one would write it: ``F.binary_cross_entropy_with_logits(weight=w)``,
            ``torchvision.ops.sigmoid_focal_loss`` (mean)
  compile   the same function under ``torch.compile(fullgraph=True)``, compiled per shape
            (``--quick``: once per loss with a dynamic batch size, to keep compile time short)
  twin      ``fasthpa.kernels`` with ``backend="torch"``: the op's plain PyTorch kernel (what
            ``backend="auto"`` runs off CUDA)
  triton    ``fasthpa.kernels`` with ``backend="triton"`` on CUDA: the fused kernel. On a CPU
            it is "n/a": there it would run under the Triton interpreter, a correctness tool,
            and timing that would say nothing about the kernel.

Every implementation's loss is first checked against the float64 reference (max relative
error in the table). Then the loss's share of a whole training step: a ResNet18 (4 input
channels, 28 outputs) forward + loss + backward + Adam step, timed with the eager loss and
with fasthpa's, beside the loss's own forward + backward time at that batch, so a fast kernel
is not read as a faster trainer.

    python benchmarks/losses.py --quick --device cpu --threads 1   # about a minute

On a CPU that other processes share, use ``--threads 1``: with 2 threads every parallel region
waits for a core someone else holds (we saw 8 ms stalls on a 20 us loss).
    python benchmarks/losses.py --device cuda            # batch 8 .. 8192; step at 32 x 512 px

Timing: warm-up calls first (compilation included there), a synchronise before every clock
read (CUDA events on a GPU), the median and spread of ``--repeats`` timed groups.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from common import ROOT, ResultFiles, markdown_table, print_rows, time_fn

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LABELS = 28


def eager_losses(weight):
    """The baselines: PyTorch's own weighted BCE and torchvision's focal loss."""
    import torch.nn.functional as F
    from torchvision.ops import sigmoid_focal_loss

    return {
        "weighted BCE": lambda x, y: F.binary_cross_entropy_with_logits(x, y, weight=weight),
        "focal g=2": lambda x, y: sigmoid_focal_loss(x, y, alpha=-1, gamma=2.0, reduction="mean"),
    }


def fasthpa_losses(weight, backend: str):
    import fasthpa.kernels as K

    return {
        "weighted BCE": lambda x, y: K.bce_with_logits(x, y, weight=weight, backend=backend),
        "focal g=2": lambda x, y: K.focal_loss(x, y, gamma=2.0, backend=backend),
    }


def reference_losses(weight):
    from fasthpa.kernels.reference import bce_with_logits_reference, focal_loss_reference

    return {
        "weighted BCE": lambda x, y: bce_with_logits_reference(x, y, weight.double()),
        "focal g=2": lambda x, y: focal_loss_reference(x, y, gamma=2.0),
    }


def inputs(batch: int, device, seed: int = 0):
    """Logits and multi-hot targets with the HPA label frequencies (Kaggle train counts)."""
    import torch

    from fasthpa.labels import KAGGLE_TRAIN_COUNTS

    g = torch.Generator().manual_seed(seed + batch)
    freq = torch.tensor(KAGGLE_TRAIN_COUNTS, dtype=torch.float32) / 31072
    y = (torch.rand(batch, LABELS, generator=g) < freq).float()
    x = torch.randn(batch, LABELS, generator=g) * 3
    return x.to(device), y.to(device)


def fwd_bwd(loss_fn: Callable, x, y) -> Callable[[], None]:
    import torch

    leaf = x.detach().clone().requires_grad_()

    def run():
        torch.autograd.grad(loss_fn(leaf, y), leaf)

    return run


def max_rel_error(loss_fn, ref_fn, x, y) -> float:
    got = loss_fn(x, y).double()
    ref = ref_fn(x.double(), y.double())
    return float((got - ref).abs().max() / ref.abs().max())


def loss_rows(
    device, batches, repeats, compile_mode: str, on_row: Callable[[list], None] = lambda rows: None
) -> list[dict]:
    """compile_mode: "per-shape" (dynamic=False, recompiled per batch), "dynamic" or "off".
    ``on_row(rows)`` is called with the rows so far after each one (to write partial results)."""
    import torch
    from fasthpa.kernels import label_weights_from_frequency

    cuda = torch.device(device).type == "cuda"
    _, y_train = inputs(4096, device, seed=1)
    weight = label_weights_from_frequency(y_train)  # 1 - f_l from a "training split"
    impls = {"eager": eager_losses(weight), "twin": fasthpa_losses(weight, "torch")}
    if cuda:
        impls["triton"] = fasthpa_losses(weight, "triton")
    refs = reference_losses(weight)
    rows = []
    for name in refs:
        if compile_mode == "dynamic":
            torch._dynamo.reset()
            compiled = torch.compile(impls["eager"][name], fullgraph=True, dynamic=True)
        for batch in batches:
            x, y = inputs(batch, device)
            row = {"loss": name, "batch": batch}
            fns = {impl: losses[name] for impl, losses in impls.items()}
            if compile_mode == "per-shape":
                torch._dynamo.reset()  # a fresh compile per shape, as a fixed-batch trainer gets
                fns["compile"] = torch.compile(impls["eager"][name], fullgraph=True, dynamic=False)
            elif compile_mode == "dynamic":
                fns["compile"] = compiled
            # group very short calls so a timed group lasts well over the clock's resolution
            inner = 20 if cuda or batch <= 512 else 5
            for impl in ("eager", "compile", "twin", "triton"):
                if impl not in fns:
                    row[f"{impl} ms"] = row[f"{impl} min ms"] = "n/a"
                    continue
                fn = fns[impl]
                err = max_rel_error(fn, refs[name], x, y)
                t = time_fn(fwd_bwd(fn, x, y), device, warmup=3, repeats=repeats, inner=inner)
                row[f"{impl} ms"] = t["median_s"] * 1e3
                row[f"{impl} min ms"] = t["min_s"] * 1e3
                row[f"{impl} spread"] = t["spread"]
                row[f"{impl} err"] = err
            best = "triton" if cuda else "twin"
            # speed-up from the minima: the medians on a shared CPU carry other processes' noise
            row[f"{best} vs eager"] = row["eager min ms"] / row[f"{best} min ms"]
            row["max rel err"] = max(v for k, v in row.items() if k.endswith(" err"))
            rows.append(row)
            on_row(rows)
    return rows


def step_rows(
    device, batch: int, size: int, repeats: int, on_row: Callable[[list], None] = lambda rows: None
) -> list[dict]:
    """A ResNet18 training step with each loss, and the loss's own share of it; ``on_row`` as
    in ``loss_rows``."""
    import torch
    import torchvision

    cuda = torch.device(device).type == "cuda"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=LABELS)
    model.conv1 = torch.nn.Conv2d(4, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 4, size, size, device=device).to(memory_format=torch.channels_last)
    x, y = inputs(batch, device)
    _, y_train = inputs(4096, device, seed=1)
    from fasthpa.kernels import label_weights_from_frequency

    weight = label_weights_from_frequency(y_train)
    candidates = {"eager": eager_losses(weight)}
    candidates["triton" if cuda else "twin"] = fasthpa_losses(weight, "auto")
    rows = []
    for name in candidates["eager"]:
        for impl, losses in candidates.items():
            loss_fn = losses[name]

            def step(loss_fn=loss_fn):
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
                    logits = model(images)
                loss = loss_fn(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            t_step = time_fn(step, device, warmup=2, repeats=max(5, repeats // 3))
            t_loss = time_fn(fwd_bwd(loss_fn, x, y), device, warmup=3, repeats=repeats, inner=20)
            rows.append(
                {
                    "loss": name,
                    "loss impl": impl,
                    "step": f"ResNet18 {batch} x 4 x {size}^2" + (" bf16" if cuda else " fp32"),
                    "step ms": t_step["median_s"] * 1e3,
                    "step min ms": t_step["min_s"] * 1e3,
                    "step spread": t_step["spread"],
                    "loss fwd+bwd ms": t_loss["median_s"] * 1e3,
                    "loss min ms": t_loss["min_s"] * 1e3,
                    "loss share of step": t_loss["median_s"] / t_step["median_s"],
                    "loss share (min)": t_loss["min_s"] / t_step["min_s"],
                }
            )
            on_row(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)"
    )
    parser.add_argument("--out-dir", default=None, help="results folder (benchmarks/results)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible.", file=sys.stderr)
        return 2
    cuda = device == "cuda"
    if args.quick:
        batches, repeats = [8, 128, 2048, 8192], 21
        step_batch, step_size = (32, 256) if cuda else (8, 64)
    else:
        batches, repeats = [8, 32, 128, 512, 2048, 8192], 51
        step_batch, step_size = (32, 512) if cuda else (8, 128)

    files = ResultFiles("losses", device, args.out_dir)
    env = files.env
    load_before = os.getloadavg()[0]  # other processes' load: timings on a shared CPU vary
    print(
        f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"threads {env['cpu_threads']} | load average {load_before:.1f} | "
        f"commit {env['git_commit']}"
    )
    compile_mode = "off" if args.no_compile else "dynamic" if args.quick else "per-shape"
    best = "triton" if cuda else "twin"
    rows: list[dict] = []
    steps: list[dict] = []
    extra = {"quick": args.quick, "repeats": repeats, "compile": compile_mode}

    def save(complete: bool, note: str = ""):
        # the JSON keeps every number; each step row is marked kind="step"
        md = _markdown(_display(rows, best), steps, note)
        payload = rows + [dict(r, kind="step") for r in steps]
        return files.write(payload, md, extra=extra | {"note": note}, complete=complete)

    def saving_into(into: list) -> Callable[[list], None]:
        def on_row(got: list) -> None:
            into[:] = got
            save(complete=False)

        return on_row

    loss_rows(device, batches, repeats, compile_mode, saving_into(rows))
    display = _display(rows, best)
    print_rows(
        "loss forward + backward, ms: median (min); max rel err: the worst implementation's "
        "loss vs the float64 reference",
        display,
        list(display[0]),
    )
    step_rows(device, step_batch, step_size, repeats, saving_into(steps))
    print_rows("the loss inside a training step", steps, STEP_COLUMNS)

    load_after = os.getloadavg()[0]
    note = (
        f"CPU load average (1 min) {load_before:.1f} before, {load_after:.1f} after, on "
        f"{os.cpu_count()} cores: other processes shared the machine, so medians carry their "
        "interference and the minimum is the closer estimate of the uncontended cost. "
        f"compile: torch.compile(fullgraph=True), {compile_mode} shapes. "
        "triton: the fused kernel (CUDA only; on a CPU the kernel runs only under the Triton "
        "interpreter, which is a correctness tool and is not timed). twin: fasthpa.kernels' "
        "plain PyTorch kernel, what backend='auto' runs off CUDA."
    )
    extra["load_average"] = [load_before, load_after]
    paths = save(complete=True, note=note)
    print("wrote", *map(str, paths))
    return 0


STEP_COLUMNS = ["loss", "loss impl", "step", "step ms", "step min ms", "loss fwd+bwd ms"]
STEP_COLUMNS += ["loss min ms", "loss share of step", "loss share (min)"]
IMPLS = ("eager", "compile", "twin", "triton")


def _display(rows: list[dict], best: str) -> list[dict]:
    """The printed table's rows: each time as "median (min)"; the JSON keeps the numbers."""
    display = []
    for r in rows:
        d = {"loss": r["loss"], "batch": r["batch"]}
        for impl in IMPLS:
            med, low = r[f"{impl} ms"], r[f"{impl} min ms"]
            d[f"{impl} ms"] = med if isinstance(med, str) else f"{med:.4g} ({low:.4g})"
        d[f"{best} vs eager (min)"] = f"{r[f'{best} vs eager']:.3g}x"
        d["max rel err"] = r["max rel err"]
        display.append(d)
    return display


def _markdown(display: list[dict], steps: list[dict], note: str) -> str:
    return (
        "## Loss forward + backward\n\n"
        + markdown_table(display, list(display[0]) if display else None)
        + f"\n\n{note}\n\n## The loss inside a training step\n\n"
        + markdown_table(steps, STEP_COLUMNS)
    )


if __name__ == "__main__":
    raise SystemExit(main())
