"""The step meter: owns the log-step state and makes the training loop's only host syncs.

    meter = StepMeter(run, history, progress)
    meter.start_epoch(state.step)
    meter.add_data_wait(seconds)                 # host time spent waiting for a batch
    meter.record(state.step, loss)               # after the step: into a device buffer, no sync
    if meter.due(state.step, force=last_step or ckpt_due):
        stop = meter.flush(state.epoch, state.step, stop_requested)   # the syncs

Each flush reduces the losses of every step since the last one over the ranks, checks them for
NaN/inf (stopping the run with the step number), agrees on a stop request across ranks, and
writes one history row: loss, lr, images/sec overall and per device, the data-wait share, step
time, and on CUDA peak allocated memory plus NVML utilisation, memory and power.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fasthpa.distributed import all_reduce_sum
from fasthpa.errors import UserError
from fasthpa.train.build import Run
from fasthpa.train.folder import CHECKPOINT_NAMES
from fasthpa.train.history import History
from fasthpa.train.progress import EpochProgress


class StepMeter:
    """See the module docstring."""

    def __init__(self, run: Run, history: History, progress: EpochProgress) -> None:
        self.run, self.history, self.progress = run, history, progress
        self.log_every = run.cfg.run.log_every
        self.losses = torch.zeros(self.log_every, device=run.device)
        self.device_stats = DeviceStats(run.device)
        self.wait_shares: list[float] = []
        self.hinted = False
        self.start_epoch(0)

    def start_epoch(self, step: int) -> None:
        self.t_log = time.perf_counter()
        self.data_wait = 0.0
        self.steps_since_log = 0
        self.last_logged = step
        self.epoch_loss = torch.zeros((), device=self.run.device)
        self.epoch_steps = 0

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def record(self, step: int, loss: torch.Tensor) -> None:
        """The loss (a device scalar) of optimiser step ``step`` (1-based); no host sync."""
        self.losses[(step - 1) % self.log_every] = loss
        self.epoch_loss += loss
        self.steps_since_log += 1
        self.epoch_steps += 1

    def due(self, step: int, force: bool = False) -> bool:
        return force or step % self.log_every == 0

    def flush(self, epoch: int, step: int, stop_requested: bool) -> bool:
        """Log the steps up to ``step`` since the last flush; return whether any rank asked
        to stop."""
        info = self.run.info
        slots = [(s - 1) % self.log_every for s in range(self.last_logged + 1, step + 1)]
        losses = self.losses[torch.tensor(slots, device=self.run.device)]
        self.last_logged = step
        all_reduce_sum(losses, info)
        losses = (losses / info.world_size).cpu()
        flags = all_reduce_sum(torch.tensor([float(stop_requested)], device=self.run.device), info)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            self.progress.close()
            raise UserError(self._non_finite(losses, int(bad[0]), epoch, step))
        row = self._row(epoch, step, float(losses.mean()))
        if self.run.noise is not None:  # on every rank: read() all-reduces under DDP
            row |= self.run.noise.read()
        self._hint_if_input_bound(row)
        self.history.log(**row)
        self.progress.update(row)
        self.t_log, self.data_wait, self.steps_since_log = time.perf_counter(), 0.0, 0
        return float(flags[0]) > 0

    def _hint_if_input_bound(self, row: dict[str, Any]) -> None:
        """Say once (rank 0) when the steps wait for data: the figure and the fix."""
        self.wait_shares.append(row["data_wait_share"])
        if self.hinted or not self.run.info.is_main:
            return
        hint = input_bound_hint(self.wait_shares, self.run.train_loader.backend)
        if hint is not None:
            print(hint, flush=True)
            self.hinted = True

    def _row(self, epoch: int, step: int, loss: float) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.t_log, 1e-9)
        ips = self.steps_since_log * self.run.plan.global_batch / elapsed
        return {
            "kind": "step",
            "epoch": epoch,
            "step": step,
            "loss": loss,
            "lr": self.run.optimizer.param_groups[0]["lr"],
            "images_per_sec": round(ips, 2),
            "images_per_sec_per_device": round(ips / self.run.info.world_size, 2),
            "data_wait_share": round(self.data_wait / elapsed, 4),
            "step_time_ms": round(1000 * elapsed / max(self.steps_since_log, 1), 2),
        } | self.device_stats.read()

    def _non_finite(self, losses: torch.Tensor, index: int, epoch: int, step: int) -> str:
        bad_step = step - len(losses) + index + 1  # 1-based step number
        run_dir = self.run.run_dir
        kept = any((run_dir / n).exists() for n in CHECKPOINT_NAMES)
        where = (
            f"The last good checkpoint is kept in {run_dir}."
            if kept
            else "No checkpoint had been written yet."
        )
        return (
            f"non-finite loss ({float(losses[index])}) at step {bad_step} (epoch {epoch}); "
            f"stopped. {where}"
        )

    def epoch_mean_loss(self) -> float:
        """Mean training loss of the epoch over all ranks (a sync: call it after the epoch)."""
        total = all_reduce_sum(self.epoch_loss.clone(), self.run.info) / self.run.info.world_size
        return float(total / max(1, self.epoch_steps))


INPUT_BOUND_SHARE = 0.25
"""the share of step time spent waiting for data above which the trainer says it is input-bound"""


def input_bound_hint(wait_shares: list[float], backend: str) -> str | None:
    """The one-line note when the log steps so far (the first, which includes start-up, left
    out) spent more than INPUT_BOUND_SHARE of their time waiting for batches; else None."""
    measured = wait_shares[1:]
    if len(measured) < 2 or backend.startswith("resident"):
        return None
    share = sum(measured) / len(measured)
    if share <= INPUT_BOUND_SHARE:
        return None
    return (
        f"note: the steps spent {100 * share:.0f}% of their time waiting for data (loader "
        f"{backend}): the input pipeline, not the model, sets the pace. Hold the decoded data in "
        f"memory (--loader resident, when it fits), read a decoded pack (fasthpa pack --format "
        f"npy or lz4, then --packed DIR), or give the loader more --workers."
    )


class DeviceStats:
    """Peak allocated memory, and GPU utilisation, memory and power via NVML, read on log steps.

    The NVML handle is found by the device's UUID (or PCI bus id), not by its index: under
    CUDA_VISIBLE_DEVICES, CUDA's device 0 need not be NVML's device 0.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.handle: Any = None
        if device.type == "cuda":
            self.handle = _nvml_handle(device)

    def read(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        stats = {"max_allocated_gib": round(gib, 2)}
        if self.handle is None:
            return stats
        try:
            import pynvml

            mem = pynvml.nvmlDeviceGetMemoryInfo(self.handle)
            return stats | {
                "gpu_util": float(pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu),
                "gpu_mem_gib": round(mem.used / 2**30, 2),
                "gpu_power_w": round(pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0, 1),
            }
        except Exception:  # NVML went away (driver reset, container): allocator figures only
            return stats


def _nvml_handle(device: torch.device) -> Any:
    """NVML's handle for a CUDA device, by UUID, else by PCI bus id; None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(device)
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            text = str(uuid)
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(
                    text if text.startswith("GPU-") else f"GPU-{text}"
                )
            except pynvml.NVMLError:
                pass
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    except Exception:  # no NVML (a container without the driver library), or no such device
        return None
