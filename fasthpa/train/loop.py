"""The training loop: epochs of optimiser steps, an evaluation and a checkpoint after each.

    stopped = fit(run, state, parts, stop)     # None when finished, else what to tell the user

``fit`` reads top to bottom and delegates: the step meter decides when to log (and makes the
only host syncs), the evaluator scores the dev part, the checkpointer writes ``last.pt`` /
``best.pt``. A signal (SIGTERM, SIGINT) is honoured at the next safe point -- every step on one
process, every log step under DDP so that all ranks agree -- with a checkpoint and a clean exit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fasthpa.distributed import average_buffers
from fasthpa.runtime import set_rng_state
from fasthpa.train.build import Run
from fasthpa.train.checkpointer import Checkpointer
from fasthpa.train.evaluator import Evaluator
from fasthpa.train.history import History
from fasthpa.train.meter import StepMeter
from fasthpa.train.progress import EpochProgress, print_epoch
from fasthpa.train.restore import TrainState
from fasthpa.train.step import LossHook, train_step


@dataclass
class LoopParts:
    """The loop's collaborators, built once by the trainer."""

    meter: StepMeter
    evaluator: Evaluator
    checkpointer: Checkpointer
    history: History
    progress: EpochProgress
    after_step: Callable[[int], None] | None = None
    """called with the step number after every optimiser step (tests: fault injection)"""
    loss_hook: LossHook | None = None
    """maps each micro-batch's loss before the backward (tests: fault injection)"""


def fit(run: Run, state: TrainState, parts: LoopParts, stop: Any) -> str | None:
    """Train from ``state`` to the end of the plan; None when it got there, else (stopped by a
    signal, with a checkpoint) the line to tell the user."""
    t_run = time.perf_counter()
    for epoch in range(state.epoch, run.cfg.run.epochs):
        if state.step >= run.plan.total_steps:
            break
        state.epoch = epoch
        if train_epoch(run, state, parts, stop):
            parts.checkpointer.save(state)
            return f"stopped by {stop.name} at epoch {epoch}, step {state.step}"
        average_buffers(run.model, run.info)  # one BatchNorm state on every rank before eval/save
        row = {"kind": "epoch", "epoch": epoch, "step": state.step}
        row["train_loss"] = parts.meter.epoch_mean_loss()
        row["elapsed_s"] = round(time.perf_counter() - t_run, 2)
        is_last = epoch == run.cfg.run.epochs - 1 or state.step >= run.plan.total_steps
        improved = False
        if parts.evaluator.due(epoch, is_last):
            metrics, improved = parts.evaluator.evaluate_dev(state)
            row |= metrics
        if epoch_finished(run, state):
            state.epoch, state.batch_in_epoch = epoch + 1, 0
        parts.checkpointer.save(state, best=improved)
        parts.history.log(**row)
        if run.info.is_main:
            print_epoch(row, state.best_f1)
        if stop.set:
            return f"stopped by {stop.name} after epoch {epoch}"
    return None


def train_epoch(run: Run, state: TrainState, parts: LoopParts, stop: Any) -> bool:
    """The optimiser steps of ``state.epoch`` from where it stands; True when stopped."""
    batches = epoch_batches(run, state)
    parts.meter.start_epoch(state.step)
    parts.progress.start_epoch(
        state.epoch, run.plan.steps_per_epoch, done=state.batch_in_epoch // run.plan.accum
    )
    try:
        while not epoch_finished(run, state) and state.step < run.plan.total_steps:
            if one_step(run, state, parts, batches, stop):
                return True
        return False
    finally:
        parts.progress.close()


def one_step(run: Run, state: TrainState, parts: LoopParts, batches: Iterator, stop: Any) -> bool:
    """Fetch the micro-batches, take one optimiser step, log or checkpoint when due; True when
    every rank agreed to stop."""
    t0 = time.perf_counter()
    micro = [next(batches)[:2] for _ in range(run.plan.accum)]
    state.batch_in_epoch += run.plan.accum
    parts.meter.add_data_wait(time.perf_counter() - t0)
    for group in run.optimizer.param_groups:
        group["lr"] = run.plan.lr(state.step)
    loss = train_step(
        run.net,
        run.optimizer,
        run.scaler,
        run.loss_fn,
        micro,
        run.autocast,
        parts.loss_hook,
        run.noise,
    )
    state.step += 1
    parts.meter.record(state.step, loss)
    parts.progress.advance()
    if parts.after_step is not None:
        parts.after_step(state.step)
    last = epoch_finished(run, state) or state.step >= run.plan.total_steps
    ckpt_due = parts.checkpointer.due(state.step)
    # one process checks a stop request every step; ranks agree on one at log steps only
    force = last or ckpt_due or (stop.set and not run.info.enabled)
    stopped = False
    if parts.meter.due(state.step, force):
        stopped = parts.meter.flush(state.epoch, state.step, stop.set)
    if ckpt_due and not last:
        parts.checkpointer.save(state)
    return stopped


def epoch_batches(run: Run, state: TrainState) -> Iterator:
    """The training batches of ``state.epoch``, past the ones a resumed run already took."""
    run.train_loader.set_epoch(state.epoch)
    batches = iter(run.train_loader)
    for _ in range(state.batch_in_epoch):  # resume mid-epoch: replay the same data order
        next(batches)
    if state.rng is not None:
        # restored only now: creating the iterator may draw from the global generator
        set_rng_state(state.rng)
        state.rng = None
    return batches


def epoch_finished(run: Run, state: TrainState) -> bool:
    return state.batch_in_epoch // run.plan.accum >= run.plan.steps_per_epoch
