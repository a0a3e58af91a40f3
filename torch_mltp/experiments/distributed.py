"""The experiments under ``torchrun``: one process per device, a process group, and the collectives
that the training loop needs beyond the optimizer's own (metric sums, checkpoint hand-over).

``torchrun --nproc_per_node=N -m torch_mltp.experiments train ...`` sets ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK``; :func:`start` joins the group (gloo on the CPU, nccl on CUDA) with a finite
timeout, so that a process whose peers died fails instead of waiting forever.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Processes:
    """Where this process stands in the run: ``rank`` of ``world_size``, on ``local_rank``'s device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes results, checkpoints and logs."""
        return self.rank == 0

    def device(self, name: str) -> str:
        """``name`` with this process's GPU: ``cuda`` becomes ``cuda:<local_rank>``."""
        if self.distributed and name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return name

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        """The sum (or ``op``, a ``ReduceOp``) over processes of ``tensor`` (returned in place)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
        return tensor

    def share(self, value: Any) -> Any:
        """The main process's ``value``, in every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> Optional[List[Any]]:
        """Every process's ``value``, in rank order, on the main process (``None`` elsewhere)."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, values, dst=0)
        return values


SINGLE_PROCESS = Processes()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Processes:
    """Join the process group torchrun describes (no-op for a single process)."""
    if not launched_by_torchrun():
        return SINGLE_PROCESS
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return current()


def current() -> Processes:
    """This process's place in an initialised group, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def stop(wait_for_the_others: bool = True) -> None:
    """Leave the process group once the objects that hold pending collective work (DDP's reducer)
    are gone and, normally, every process got here, so that no communication thread outlives it."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if wait_for_the_others:
            dist.barrier()
        dist.destroy_process_group()
