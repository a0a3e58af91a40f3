"""``MLTPOptimizer`` and ``DistributedDataParallel``: the step's forward passes, and a model wrapped in DDP
(or in FSDP's ``FullyShardedDataParallel``) that the optimizer was not given.

MLTP differentiates with ``torch.autograd.grad``, which does not fire DDP's reducer, so both forward
passes run under ``no_sync()``.  A forward pass under ``no_sync()`` tells DDP that the next forward pass
need not broadcast the buffers (``require_forward_param_sync``), which left BatchNorm's running
statistics to drift apart between processes.  :func:`unsynced` sets that flag again after the step, as
a plain DDP forward/backward does, so the next forward pass (the next step's, or an evaluation's)
starts from process 0's buffers whenever the model was built with ``broadcast_buffers=True``.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from ._sharded import fsdp_modules
from .selection import unwrap_model


@contextmanager
def unsynced(ddp: Optional[nn.parallel.DistributedDataParallel]) -> Iterator[None]:
    """``ddp.no_sync()`` for the step's forward passes; afterwards the next forward pass broadcasts the
    buffers as it does after a plain DDP step (when ``broadcast_buffers`` is set).  No-op for ``None``."""
    if ddp is None:
        yield
        return
    try:
        with ddp.no_sync():
            yield
    finally:
        ddp.require_forward_param_sync = True


def check_wrapper(model: nn.Module, base: torch.optim.Optimizer, process_group: Optional[Any]) -> None:
    """Refuse parameters that a ``DistributedDataParallel`` the optimizer was not given holds: their
    gradients would never be averaged and the processes would drift apart.  Refuse FSDP's
    ``FullyShardedDataParallel`` wrapper, which MLTP does not support (``fully_shard`` is)."""
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in unwrap_model(model).modules()):
        raise ValueError(_FSDP1_MESSAGE)
    if (
        isinstance(model, nn.parallel.DistributedDataParallel)
        or process_group is not None
        or not (dist.is_available() and dist.is_initialized())
        or dist.get_world_size() < 2
        or fsdp_modules(model)
    ):
        return
    held = {id(p) for group in base.param_groups for p in group["params"]}
    wrappers = (nn.parallel.DistributedDataParallel,) + ((fsdp1,) if fsdp1 is not None else ())
    gc.collect()  # a wrapper that is gone but not yet collected holds nothing
    for wrapper in (o for o in gc.get_objects() if isinstance(o, wrappers)):
        if not any(id(p) in held for p in wrapper.parameters()):
            continue
        if isinstance(wrapper, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "the model's parameters belong to a DistributedDataParallel module, and MLTPOptimizer was "
                "given the module inside it: no gradient would be averaged and the processes would drift "
                "apart. Give MLTPOptimizer the DDP-wrapped model (MLTPOptimizer(base, ddp_model, ...)) "
                "and call ddp_model in the closures"
            )
        raise ValueError(_FSDP1_MESSAGE)


_FSDP1_MESSAGE = (
    "FullyShardedDataParallel (FSDP1) is not supported: shard the model with FSDP2 "
    "(torch.distributed.fsdp.fully_shard) and use mode='fo'; see docs/distributed.md"
)


def _fsdp1_class() -> Optional[type]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel
