"""Process-group setup from torchrun's environment, and the few collectives the trainer needs.

A single process needs no torchrun; under torchrun (one node or many, through its standard
rendezvous flags) RANK/WORLD_SIZE/LOCAL_RANK come from the environment. NCCL on CUDA, gloo on CPU.
Under torchrun the process group is initialised even for a world of one, so such a run goes
through DistributedDataParallel exactly as a multi-GPU one does.

Nodes need not share a disk: :func:`decide_on_main` runs a decision (resume or not, which
checkpoint, the split) on rank 0 and hands every rank its result, or its error; and
:func:`check_every_rank` runs a check on every rank (is the dataset here?) and stops all of them
with the failing rank's one line, naming its host, instead of leaving the others to hang.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

DEVICE_CHOICES = ("auto", "cuda", "cpu")
"""``--device`` choices: cuda when available (auto), or forced."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ddp: bool = False
    """a process group is initialised (torchrun launched us): wrap the model in DDP"""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Initialise the process group if torchrun launched us; choose this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if use_cuda and not torch.cuda.is_available():
        from fasthpa.errors import UserError

        raise UserError("--device cuda: no CUDA device is available here.")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    launched = "WORLD_SIZE" in os.environ
    if launched and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            **({"device_id": device} if use_cuda else {}),
        )
    ddp = launched and dist.is_initialized()
    return DistInfo(rank, world_size, local_rank, device, ddp=ddp)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0 (rank order)."""
    if not info.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def average_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DDP broadcasts rank 0's buffers at each forward, so after the last step each rank holds
    statistics updated by its own last batch; averaging before evaluation and checkpointing
    gives every rank the same model and uses every rank's data.
    """
    if not info.enabled:
        return
    with torch.no_grad():
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(info.world_size)


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


T = TypeVar("T")


def decide_on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank; a UserError it raises is
    raised on every rank (with rank 0's message), so no rank waits for a decision that failed."""
    from fasthpa.errors import UserError

    if not info.enabled:
        return fn()
    box: list[Any] = [None, None]
    if info.is_main:
        try:
            box[0] = fn()
        except UserError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise UserError(box[1])
    return box[0]


def check_every_rank(fn: Callable[[], T], info: DistInfo) -> T:
    """Run ``fn`` on every rank; if it raises a UserError on any rank, raise one on every rank,
    naming the first failing rank and its host (a rank without the dataset stops the job at
    once, instead of the others hanging in the next collective until the timeout)."""
    from fasthpa.errors import UserError

    result, error = None, None
    try:
        result = fn()
    except UserError as e:
        error = str(e)
    if not info.enabled:
        if error is not None:
            raise UserError(error)
        return result
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, (error, socket.gethostname()))
    for rank, (message, host) in enumerate(gathered):
        if message is not None:
            raise UserError(f"rank {rank} (host {host}): {message}")
    return result
