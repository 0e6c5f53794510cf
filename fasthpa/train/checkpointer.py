"""Writing the run's checkpoints: ``last.pt`` (rotated to ``last.prev.pt``) and ``best.pt``.

    checkpointer = Checkpointer(run)
    if checkpointer.due(state.step): checkpointer.save(state)       # mid-epoch, --checkpoint-every
    checkpointer.save(state, best=improved)                          # after each epoch

Only rank 0 writes; every rank waits for the write (a barrier), so no rank runs ahead of a
checkpoint it might need. Writes are atomic with an integrity digest (fasthpa.checkpoint).
When a run starts, temporary files a killed write left behind are removed.
"""

from __future__ import annotations

from fasthpa.checkpoint import save_checkpoint
from fasthpa.distributed import barrier
from fasthpa.train.build import Run
from fasthpa.train.restore import TrainState, checkpoint_payload

TEMPORARY_GLOB = ".*.tmp"
"""what fasthpa.io.atomic_write names its temporary files (``.{name}.XXXX.tmp``)"""


class Checkpointer:
    """See the module docstring."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.every = run.cfg.run.checkpoint_every

    def due(self, step: int) -> bool:
        """Whether ``--checkpoint-every`` asks for a checkpoint after ``step``."""
        return bool(self.every) and step % self.every == 0

    def save(self, state: TrainState, best: bool = False) -> None:
        """Write last.pt (and best.pt when ``best``) for ``state`` on rank 0."""
        run = self.run
        if run.info.is_main:
            payload = checkpoint_payload(run, state)
            save_checkpoint(run.run_dir / "last.pt", payload, rotate=True)
            if best:
                save_checkpoint(run.run_dir / "best.pt", payload)
        barrier(run.info)

    def remove_stale_temporaries(self) -> list[str]:
        """Delete the temporary files of writes a kill interrupted (rank 0; the run folder is
        locked, so no other writer is active). Returns their names."""
        if not self.run.info.is_main:
            return []
        stale = sorted(self.run.run_dir.glob(TEMPORARY_GLOB))
        for path in stale:
            path.unlink(missing_ok=True)
        return [p.name for p in stale]
