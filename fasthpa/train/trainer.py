"""``train(cfg)``: one training run from a config, start to finish (or to a clean stop).

    from fasthpa.config import TrainConfig
    from fasthpa.train import train
    result = train(cfg)                   # TrainResult: status, run_dir, best dev F1, test F1
    result = train(cfg, hooks=TrainHooks(after_step=lambda step: ...))   # tests: fault injection

The stages, each in its own module of this package: decide how the run starts (folder), build
it (build), restore its state (restore), then ``fit`` (loop) and score the held-out test part
(evaluator). SIGTERM/SIGINT save a checkpoint and return a "stopped" result; bad input raises
fasthpa.errors.UserError (the command line turns it into one line and exit status 2).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasthpa.config import TrainConfig, save_config
from fasthpa.distributed import DistInfo, cleanup, decide_on_main, init_distributed
from fasthpa.envinfo import environment
from fasthpa.io import atomic_write_json
from fasthpa.train.build import Run, build_run
from fasthpa.train.checkpointer import Checkpointer
from fasthpa.train.evaluator import Evaluator
from fasthpa.train.folder import RunLock, Start, decide_start
from fasthpa.train.history import History
from fasthpa.train.loop import LoopParts, fit
from fasthpa.train.meter import StepMeter
from fasthpa.train.progress import EpochProgress
from fasthpa.train.refit import refit_heads
from fasthpa.train.restore import TrainState, restore
from fasthpa.train.step import LossHook
from fasthpa.train.tensorboard import TensorBoardLog, summary_writer_class


@dataclass
class TrainHooks:
    """Callbacks for tests (fault injection); never needed in normal use."""

    after_step: Callable[[int], None] | None = None
    """called with the step number after every optimiser step"""
    loss_hook: LossHook | None = None
    """maps each micro-batch's loss before its backward (e.g. to inject a NaN)"""


@dataclass
class TrainResult:
    """What a run ended with (on every rank; ``final`` is filled on rank 0)."""

    status: str
    """"finished", or "stopped" (by a signal, with a checkpoint to resume from)"""
    run_dir: Path
    steps: int
    best_dev_f1: float
    """best tuned dev macro F1 (-1 before any evaluation)"""
    message: str = ""
    final: dict[str, Any] = field(default_factory=dict)
    """final_metrics.json (rank 0, finished runs)"""


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits at the next safe point."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Give the previous handlers back (train() may run inside a larger program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signal = signum

    @property
    def set(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a signal"


def train(
    cfg: TrainConfig, *, explicit: set[str] | None = None, hooks: TrainHooks | None = None
) -> TrainResult:
    """Run (or resume) the training ``cfg`` describes; see the module docstring.

    ``explicit`` names the fields given on the command line (``{"run.epochs", ...}``); a
    resumed run takes those it may change from it and warns about the others. None: all.
    A process group this call did not create is left open.
    """
    import torch.distributed as dist

    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.speed.device)
    stop = StopFlag()
    stop.install()
    try:
        return _train(cfg, explicit, hooks or TrainHooks(), info, stop)
    finally:
        stop.restore()
        if owns_group:  # a caller's group (fasthpa cv runs several folds in one) stays open
            cleanup(info)


def _train(cfg, explicit, hooks: TrainHooks, info: DistInfo, stop: StopFlag) -> TrainResult:
    start = decide_start(cfg, explicit, info)
    lock = RunLock(start.run_dir)
    decide_on_main(lock.acquire, info)  # rank 0 holds it; a refusal stops every rank
    try:
        return _run(start, hooks, info, stop)
    finally:
        lock.release()


def _run(start: Start, hooks: TrainHooks, info: DistInfo, stop: StopFlag) -> TrainResult:
    run = build_run(start, info)
    state = restore(run)
    run.wrap()
    parts = _loop_parts(run, state, hooks)
    _record_start(run)
    final: dict[str, Any] = {}
    try:
        stopped = fit(run, state, parts, stop)
        if stopped is not None:
            message = (
                f"{stopped}; checkpoint saved to {run.run_dir / 'last.pt'}. Run the same command "
                f"(or --resume {run.run_dir}) to continue."
            )
            run.say(message)
            return TrainResult("stopped", run.run_dir, state.step, state.best_f1, message)
        final = _finish(run, state, parts.evaluator)
        return TrainResult("finished", run.run_dir, state.step, state.best_f1, final=final)
    finally:
        if parts.history.tensorboard is not None:
            parts.history.tensorboard.close(run.cfg.to_dict(), final)


def _loop_parts(run: Run, state: TrainState, hooks: TrainHooks) -> LoopParts:
    history = History(run.run_dir / "history.jsonl" if run.info.is_main else None)
    if run.resuming:
        history.truncate_after(state.step)
    if run.cfg.run.tensorboard is not None:
        decide_on_main(lambda: summary_writer_class() and None, run.info)  # installed?
        if run.info.is_main:
            where = run.cfg.run.tensorboard
            log_dir = run.run_dir / "tb" if where == "RUN/tb" else Path(where)
            history.tensorboard = TensorBoardLog(log_dir, state.step if run.resuming else None)
    progress = EpochProgress(enabled=run.info.is_main and run.cfg.run.progress)
    checkpointer = Checkpointer(run)
    checkpointer.remove_stale_temporaries()
    return LoopParts(
        meter=StepMeter(run, history, progress),
        evaluator=Evaluator(run),
        checkpointer=checkpointer,
        history=history,
        progress=progress,
        after_step=hooks.after_step,
        loss_hook=hooks.loss_hook,
    )


def _record_start(run: Run) -> None:
    """config.json, env.json and the header line (rank 0)."""
    if not run.info.is_main:
        return
    save_config(run.run_dir / "config.json", run.cfg)
    env = environment(run.device) | {
        "world_size": run.info.world_size,
        "ddp": run.info.ddp,
        "loader": run.train_loader.backend,
        "loader_choice": getattr(run.train_loader, "choice", None),
        "data_placement": {
            "train": getattr(run.train_loader, "placement", None),
            "dev": getattr(run.dev_loader, "placement", None),
        },
        "amp": str(run.amp).replace("torch.", "") if run.amp else "off",
        "compile": run.compiled,
        "channels_last": run.cfg.speed.channels_last,
        "pretrained": run.model_info,
        "global_batch": run.plan.global_batch,
        "noise_scale": run.noise.describe() if run.noise is not None else None,
    }
    atomic_write_json(run.run_dir / "env.json", env)
    d = run.data
    where = env["data_placement"]["train"] or {}
    held = f" in {where['where']}" if where.get("where") not in (None, "streamed") else ""
    if where.get("bytes"):
        held += f" ({where['bytes'] / 2**30:.2f} GiB)"
    run.say(
        f"fasthpa: {run.cfg.model.arch} on {run.info.world_size} x {env['device']}, loader "
        f"{env['loader']}{held}, amp {env['amp']}, compile {run.compiled}, pretrained "
        f"{run.model_info.get('pretrained')}, {len(d.train_idx)} train / {len(d.dev_idx)} dev / "
        f"{len(d.test_idx)} test, {run.plan.steps_per_epoch} steps/epoch, global batch "
        f"{run.plan.global_batch}"
    )


def _finish(run: Run, state: TrainState, evaluator: Evaluator) -> dict[str, Any]:
    """The held-out test part with the best checkpoint and its dev thresholds (rank 0)."""
    if not run.info.is_main:
        return {}
    epochs = state.epoch + (1 if state.batch_in_epoch else 0)  # started, counting a cut-short one
    final = {"best_dev_macro_f1_tuned": state.best_f1, "steps": state.step, "epochs": epochs}
    if run.cfg.run.refit_heads and (run.run_dir / "best.pt").exists():
        t0 = time.perf_counter()
        final["refit"] = refit_heads(run, run.cfg.run.seed)
        final["refit_s"] = round(time.perf_counter() - t0, 2)
        run.say(
            f"refit the classifier on the training part's features: thresholds by rule "
            f"{final['refit']['rule']} on its out-of-fold scores ({final['refit_s']} s)"
        )
    final |= evaluator.test_metrics()
    atomic_write_json(run.run_dir / "final_metrics.json", final)
    line = f"done: best dev macro F1 (tuned) {state.best_f1:.4f}"
    if "test_macro_f1_tuned" in final:
        line += (
            f"; test part macro F1 {final['test_macro_f1_at_0.5']:.4f} at 0.5, "
            f"{final['test_macro_f1_tuned']:.4f} with dev thresholds"
        )
    run.say(line)
    return final
