"""TensorBoard event files for a run (``--tensorboard [DIR]``, default ``RUN/tb``), rank 0 only.

    tensorboard --logdir runs/r18/tb

Every row the run logs to history.jsonl (on log steps and after each epoch; the rows are made on
the host from figures already synced there, so this adds no host sync) also goes to TensorBoard:

- step rows: ``train/loss``, ``train/lr``, ``speed/images_per_sec``, ``speed/data_wait_share``,
  ``speed/step_time_ms``, on CUDA ``gpu/max_allocated_gib`` and NVML's ``gpu/util``,
  ``gpu/mem_gib``, ``gpu/power_w``, and with ``--noise-scale`` ``noise/b_simple``;
- epoch rows: ``dev/macro_f1_at_0.5``, ``dev/macro_f1_tuned``, ``train/epoch_loss`` and the
  per-label dev F1 (``dev_f1/07_Golgi apparatus``);
- at the end, the run's config as hyper-parameters with its final metrics.

The x axis is the optimiser step. A resumed run purges what was logged after its checkpoint,
so the curves continue without repeated steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fasthpa.errors import UserError
from fasthpa.labels import LABEL_NAMES

STEP_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "images_per_sec": "speed/images_per_sec",
    "data_wait_share": "speed/data_wait_share",
    "step_time_ms": "speed/step_time_ms",
    "max_allocated_gib": "gpu/max_allocated_gib",
    "gpu_util": "gpu/util",
    "gpu_mem_gib": "gpu/mem_gib",
    "gpu_power_w": "gpu/power_w",
    "b_simple": "noise/b_simple",
}
EPOCH_TAGS = {
    "dev_macro_f1_at_0.5": "dev/macro_f1_at_0.5",
    "dev_macro_f1_tuned": "dev/macro_f1_tuned",
    "train_loss": "train/epoch_loss",
}
INSTALL_HINT = "pip install 'fasthpa[tensorboard]' (or: pip install tensorboard)"


def summary_writer_class():
    """torch's SummaryWriter; a UserError saying how to install it when tensorboard is absent."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError:
        raise UserError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}.") from None
    return SummaryWriter


class TensorBoardLog:
    """The history rows as TensorBoard scalars (see the module docstring)."""

    def __init__(self, log_dir: Path, purge_after: int | None = None) -> None:
        writer_class = summary_writer_class()
        purge = None if purge_after is None else purge_after + 1
        self.log_dir = Path(log_dir)
        self.writer = writer_class(log_dir=str(self.log_dir), purge_step=purge)

    def add_row(self, row: dict[str, Any]) -> None:
        step = int(row.get("step", 0))
        tags = STEP_TAGS if row.get("kind") == "step" else EPOCH_TAGS
        for key, tag in tags.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, step)
        per_label = (row.get("dev_per_label") or {}).get("f1")
        for i, f1 in enumerate(per_label or []):
            self.writer.add_scalar(f"dev_f1/{i:02d}_{LABEL_NAMES[i]}", f1, step)
        self.writer.flush()

    def close(self, config: dict[str, dict[str, Any]], final: dict[str, Any]) -> None:
        """The config as hyper-parameters beside the final metrics, then close the files."""
        if final:
            hparams = {
                f"{section}.{name}": value
                if isinstance(value, (int, float, str, bool))
                else str(value)
                for section, values in config.items()
                for name, value in values.items()
            }
            metrics = {f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))}
            self.writer.add_hparams(hparams, metrics, run_name="hparams")
        self.writer.close()
