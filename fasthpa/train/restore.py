"""Restoring a run: the training state, what a checkpoint holds, and loading it once.

    state = restore(run)                       # TrainState(); or the checkpoint's, loaded into
                                               # run.model / run.optimizer / run.scaler
    payload = checkpoint_payload(run, state)   # the dict last.pt / best.pt hold

Rank 0 picks the newest intact checkpoint (``last.pt``, else ``last.prev.pt``) and reads it once;
every other rank receives it by broadcast, so no node needs its own copy of the run folder.
The checkpoint holds the unwrapped model's state_dict, the optimiser and grad scaler, where the
data stood (epoch, step, batches into the epoch), the best dev F1 so far, every random generator's
state, the config and the channel statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fasthpa.checkpoint import load_latest
from fasthpa.distributed import decide_on_main
from fasthpa.errors import UserError
from fasthpa.runtime import rng_state
from fasthpa.train.build import Run


@dataclass
class TrainState:
    """Where training stands; the loop advances it, checkpoints save it."""

    epoch: int = 0
    """the epoch in progress (or, between epochs, the next one)"""
    step: int = 0
    """optimiser steps taken so far"""
    batch_in_epoch: int = 0
    """loader batches of ``epoch`` already consumed (a resumed run skips them)"""
    best_f1: float = -1.0
    """best tuned dev macro F1 so far"""
    rng: dict[str, Any] | None = None
    """generator states to restore once the epoch's iterator exists (resume only)"""


def checkpoint_payload(run: Run, state: TrainState) -> dict[str, Any]:
    """What ``last.pt`` / ``best.pt`` hold for ``state`` (plain keys: ``torch.load`` works)."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "epoch": state.epoch,
        "step": state.step,
        "batch_in_epoch": state.batch_in_epoch,
        "best_f1": state.best_f1,
        "rng": rng_state(),
        "config": run.cfg.to_dict(),
        "arch": run.cfg.model.arch,
        "in_channels": run.cfg.in_channels,
        "labels": list(run.cfg.label_indices),
        "model_info": run.model_info,
        "stats": vars(run.data.stats),
    }


def restore(run: Run) -> TrainState:
    """The state to start from: a fresh one, or the run's newest intact checkpoint, loaded
    into the model, optimiser and scaler on every rank."""
    if not run.resuming:
        return TrainState()
    # read once, on rank 0; the state reaches the other ranks in the same broadcast
    state, path, warnings = decide_on_main(lambda: _read_latest(run.run_dir), run.info)
    for w in warnings:
        run.say(f"warning: {w}")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.say(
        f"resuming {run.run_dir} from {path.name}: epoch {state['epoch']}, step {state['step']}"
    )
    return TrainState(
        epoch=state["epoch"],
        step=state["step"],
        batch_in_epoch=state["batch_in_epoch"],
        best_f1=state["best_f1"],
        rng=state["rng"],
    )


def _read_latest(run_dir: Path) -> tuple[dict[str, Any], Path, list[str]]:
    found = load_latest(run_dir)
    if found is None:
        raise UserError(f"{run_dir}: no intact checkpoint to resume from.")
    return found
