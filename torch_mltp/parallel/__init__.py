"""How an MLTP step runs on each engine: one process, ``DistributedDataParallel``, FSDP2's ``fully_shard``.

:func:`backend_for` chooses the backend once, when ``MLTPOptimizer`` is built; the optimizer never asks which
engine it runs on after that.  :mod:`torch_mltp.parallel.backend` says what a backend does.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..selection import Mode
from .backend import Backend, Layout, Outcome, Step
from .ddp import DDPBackend, DeferredDDPBackend, check_wrapper, ddp_of
from .fsdp import fsdp_backend
from .local import AlphaStore, LocalBackend

__all__ = [
    "AlphaStore",
    "Backend",
    "DDPBackend",
    "DeferredDDPBackend",
    "Layout",
    "LocalBackend",
    "Outcome",
    "Step",
    "backend_for",
]


def backend_for(
    model: nn.Module,
    mode: Mode,
    tasks: Optional[str],
    process_group: Optional[Any],
    base: torch.optim.Optimizer,
) -> Backend:
    """The backend for ``model``: FSDP2's when it is sharded with ``fully_shard``; DDP's when it is a
    ``DistributedDataParallel`` model or a ``process_group`` is given, or with ``tasks`` given once a
    process group exists (an engine wraps the model, before or after the optimizer is built:
    :class:`DeferredDDPBackend`); else one process's.  Refuses, with the ways that work, what no backend
    can do."""
    sharded = fsdp_backend(model, mode, tasks, process_group)
    if sharded is not None:
        return sharded
    ddp = ddp_of(model)
    group = process_group if process_group is not None else getattr(ddp, "process_group", None)
    distributed = dist.is_available() and dist.is_initialized()
    if (
        group is None
        and tasks is not None
        and distributed
        and (tasks == "global" or dist.get_world_size() > 1)
    ):
        return DeferredDDPBackend(tasks)  # an engine wraps the model, before or after the optimizer is built
    check_wrapper(model, base, process_group)
    if group is None:
        if tasks == "global":
            raise ValueError(
                "tasks='global' spreads the tasks over processes: pass a DistributedDataParallel model or "
                "a process_group, or initialise the process group first for a model that an engine wraps "
                "in DistributedDataParallel after the optimizer is built"
            )
        return LocalBackend()
    return DDPBackend(ddp, group, tasks or "local")
