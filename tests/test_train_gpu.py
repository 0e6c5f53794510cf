"""The trainer on a CUDA GPU (skipped without one; scripts/gpu_check.sh runs these).

- the training step (bf16 autocast, channels_last, fused Adam, the fused Triton loss) makes no
  host synchronisation: CUDA's sync debug mode turns any sync into an error;
- a short run with AMP and torch.compile completes and records GPU figures;
- the same run launched by torchrun as a world of one goes through DistributedDataParallel over
  NCCL, and torch.compile through DDPOptimizer (which splits the graph at DDP's bucket
  boundaries): the multi-GPU code path, checked on one GPU.

The runs split with iterative-stratification: on a GPU machine without it, gpu_check.sh's carry
folder provides it (scripts/gpu_check.sh --prepare).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fasthpa.config import TrainConfig
from fasthpa.loss import make_loss
from fasthpa.train.cli import main as train_main
from fasthpa.train.step import train_step

pytestmark = pytest.mark.gpu


def test_train_step_makes_no_host_sync():
    from fasthpa.model import build_model

    device = torch.device("cuda")
    model, _ = build_model("resnet18", pretrained="none")
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    cfg = TrainConfig()
    cfg.loss.loss = "wbce"
    rng = np.random.default_rng(0)
    targets = (rng.random((64, 28)) < 0.1).astype(np.uint8)
    loss_fn = make_loss(cfg.loss, targets, device)
    x = torch.randn(8, 4, 64, 64, device=device).to(memory_format=torch.channels_last)
    x = x.to(torch.bfloat16)
    y = torch.from_numpy(targets[:8]).float().to(device)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    loss_buf = torch.zeros(4, device=device)
    step = train_step
    step(model, opt, None, loss_fn, [(x, y)], autocast)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3):
            loss_buf[i] = step(model, opt, None, loss_fn, [(x, y)], autocast)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss_buf[:3]).all()


def _short_run_args(tmp_path: Path) -> tuple[list[str], Path]:
    """A 4-step bf16 + compile run on 96 synthetic samples at 64 px (72 train / 24 dev)."""
    from fasthpa.data.synth import generate

    root = tmp_path / "data"
    generate(root, n=96, size=64, test_n=0, seed=0, workers=1)
    run = tmp_path / "run"
    flags = (
        "--image-size 64 --batch-size 16 --epochs 1 --max-steps 4 --workers 2 --no-progress "
        "--pretrained none --split 0.75,0.25,0 --log-every 2 --amp bf16 --compile"
    )
    return ["--data", str(root), "--out", str(run), *flags.split()], run


def test_short_amp_compiled_run_on_cuda(tmp_path: Path):
    argv, run = _short_run_args(tmp_path)
    assert train_main(argv) == 0
    env = json.loads((run / "env.json").read_text())
    assert env["compile"] is True and env["amp"] == "bfloat16" and env["cuda_devices"]
    steps = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    assert steps and all(r["max_allocated_gib"] > 0 for r in steps)


def test_torchrun_one_process_goes_through_ddp_and_ddp_optimizer(tmp_path: Path):
    """torchrun with one process: DDP over NCCL (the trainer wraps in DDP whenever torchrun
    launched it, so a world of one runs the multi-GPU path) and the compiled model through
    DDPOptimizer, whose graph split the ``ddp_graphs`` log artifact prints."""
    argv, run = _short_run_args(tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd = [*torchrun, "-m", "fasthpa.train", *argv]
    env = os.environ | {"TORCH_LOGS": "ddp_graphs", "OMP_NUM_THREADS": "4"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    env_json = json.loads((run / "env.json").read_text())
    assert env_json["ddp"] is True and env_json["world_size"] == 1, env_json
    assert env_json["compile"] is True and env_json["amp"] == "bfloat16"
    # DDPOptimizer split the compiled graph at bucket boundaries (ResNet18's 45 MB of fp32
    # gradients make several 25 MB buckets), so communication could overlap the backward
    assert "---split graph---" in p.stdout + p.stderr, p.stderr[-4000:]
    steps = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["kind"] == "step"]
    assert losses and all(np.isfinite(losses)), steps


def test_noise_scale_meter_on_cuda(tmp_path: Path):
    """A short eager bf16 run with --noise-scale (two micro-batches of 8 against their sum):
    B_simple's parts are logged, finite, on log steps."""
    argv, run = _short_run_args(tmp_path)
    argv = [a for a in argv if a != "--compile"] + ["--noise-scale", "--grad-accum", "2"]
    argv[argv.index("--batch-size") + 1] = "8"
    assert train_main(argv) == 0
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert steps and all(r["b_small"] == 8 and r["b_big"] == 16 for r in steps)
    assert all(np.isfinite(r["grad_sq_ema"]) and np.isfinite(r["trace_sigma_ema"]) for r in steps)
    env = json.loads((run / "env.json").read_text())
    assert env["noise_scale"]["source"] == "grad_accum_micro_batches"
