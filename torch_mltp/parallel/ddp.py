"""MLTP under ``DistributedDataParallel`` (or over a process group): the :class:`DDPBackend`.

MLTP differentiates with ``torch.autograd.grad``, which does not fire DDP's reducer, so both forward passes
run under ``no_sync()`` and the backend averages over the processes itself (:class:`GradientAverager`):

* ``tasks="local"``: each process's two tasks are its own; ``J`` and its gradients are the mean of the
  processes' (one averaging after the step);
* ``tasks="global"``: task i is the union of every process's first task, task j of every second task; ``g_i``
  and ``h_j`` are averaged as they are formed (see :mod:`torch_mltp.functional`).

A forward pass under ``no_sync()`` tells DDP that the next forward pass need not broadcast the buffers
(``require_forward_param_sync``), which left BatchNorm's running statistics to drift apart between
processes.  :func:`unsynced` sets that flag again after the step, as a plain DDP forward/backward does, so
the next forward pass (the next step's, or an evaluation's) starts from process 0's buffers whenever the
model was built with ``broadcast_buffers=True``.

:func:`check_wrapper` refuses, at construction, a model whose parameters a ``DistributedDataParallel`` the
optimizer was not given holds, and FSDP1's ``FullyShardedDataParallel``.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..functional import MLTPGradients
from ..selection import unwrap_model
from .backend import Backend, Outcome, Step
from .local import AlphaStore, LocalBackend


class DDPBackend(LocalBackend):
    """Every process computes the same step: the mean over the processes (``tasks="local"``) or the step of
    the tasks' unions (``"global"``).  ``ddp`` is the ``DistributedDataParallel`` model, if any."""

    def __init__(self, ddp: Optional[nn.parallel.DistributedDataParallel], process_group: Any, tasks: str):
        self.ddp, self.tasks = ddp, tasks
        self.average = GradientAverager(process_group)
        self.average_tasks = self.average if tasks == "global" else None

    def make_alphas(self, *args: Any) -> AlphaStore:
        """The alphas drawn by the group's first process, the same in every process."""
        store = AlphaStore(*args)
        if self.average.world_size > 1:
            store.broadcast_from_first_rank(self.average.process_group)
        return store

    def gradients(self, step: Step) -> Outcome:
        with unsynced(self.ddp):
            result = super().gradients(step).result
        if self.tasks == "local":
            result = self._mean_over_processes(result, step)
        return Outcome(result)

    def _mean_over_processes(self, result: MLTPGradients, step: Step) -> MLTPGradients:
        """``tasks="local"``: the mean over processes of ``J`` and of its gradients, in one pass."""
        params, with_alphas = step.layout.params, result.alpha_grads is not None
        tensors = [result.loss_i, result.loss_j, *result.param_grads, *(result.alpha_grads or ())]
        like = [result.loss_i, result.loss_j, *params, *(step.alphas if with_alphas else ())]
        averaged = self.average(tensors, like)
        loss_i, loss_j, grads = cast(Tensor, averaged[0]), cast(Tensor, averaged[1]), averaged[2:]
        alpha_grads = grads[len(params) :] if with_alphas else None
        return MLTPGradients(loss_i + step.eta * loss_j, loss_i, loss_j, grads[: len(params)], alpha_grads)


class DeferredDDPBackend(Backend):
    """``tasks`` over processes for a model that an engine wraps in ``DistributedDataParallel`` itself,
    after the optimizer is built (the ``Trainer``) or before it and out of the optimizer's sight
    (Lightning's ``configure_optimizers``): the first ``backward`` finds the wrapper that holds the
    parameters and every step is :class:`DDPBackend`'s with it.  In one process without a wrapper the step
    is :class:`LocalBackend`'s."""

    def __init__(self, tasks: str):
        self.tasks = tasks
        self._engine: Optional[Backend] = None

    def make_alphas(self, *args: Any) -> AlphaStore:
        """The alphas drawn by the default group's first process, the same in every process."""
        store = AlphaStore(*args)
        if dist.get_world_size() > 1:
            store.broadcast_from_first_rank(None)
        return store

    def gradients(self, step: Step) -> Outcome:
        if self._engine is None:
            self._engine = self._find_engine(step.layout.params)
        return self._engine.gradients(step)

    def _find_engine(self, params: list[Tensor]) -> Backend:
        ddp = next(iter(_wrappers_holding(params, (nn.parallel.DistributedDataParallel,))), None)
        if ddp is not None:
            return DDPBackend(ddp_of(ddp), ddp.process_group, self.tasks)
        if dist.get_world_size() == 1:
            return LocalBackend()
        raise ValueError(
            f"tasks={self.tasks!r} over {dist.get_world_size()} processes: by the first backward() the model "
            "must be wrapped in DistributedDataParallel (as the Trainer, accelerate and Lightning do), and "
            "the closures must call the wrapped model"
        )


def _wrappers_holding(params: Sequence[Tensor], kinds: tuple) -> Iterator[nn.Module]:
    """The live modules of ``kinds`` (``DistributedDataParallel``, ...) that hold one of ``params``."""
    held = {id(p) for p in params}
    gc.collect()  # a wrapper that is gone but not yet collected holds nothing
    for wrapper in (o for o in gc.get_objects() if issubclass(type(o), kinds)):  # no attribute lookups
        if any(id(p) in held for p in wrapper.parameters()):
            yield wrapper


def ddp_of(model: nn.Module) -> Optional[nn.parallel.DistributedDataParallel]:
    """``model`` if it is a ``DistributedDataParallel`` module, or the one inside ``torch.compile``'s wrapper
    (``torch.compile(DDP(model))``); else ``None``.  Refuses ``static_graph=True``, which MLTP cannot run."""
    while not isinstance(model, nn.parallel.DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    if getattr(model, "static_graph", False):
        raise ValueError(
            "DistributedDataParallel(static_graph=True) is not supported: MLTP differentiates with "
            "torch.autograd.grad under no_sync(), which a static graph's reducer does not allow. Build the "
            "DistributedDataParallel model without static_graph"
        )
    return model


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
        ddp_of(model) is not None
        or process_group is not None
        or not (dist.is_available() and dist.is_initialized())
        or dist.get_world_size() < 2
    ):
        return
    held = [p for group in base.param_groups for p in group["params"]]
    wrappers = (nn.parallel.DistributedDataParallel,) + ((fsdp1,) if fsdp1 is not None else ())
    for wrapper in _wrappers_holding(held, wrappers):
        if isinstance(wrapper, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "the model's parameters belong to a DistributedDataParallel module, and MLTPOptimizer was "
                "given the module inside it: no gradient would be averaged and the processes would drift "
                "apart. Give MLTPOptimizer the DDP-wrapped model (MLTPOptimizer(base, ddp_model, ...)) "
                "and call ddp_model in the closures, or pass tasks='local' or tasks='global' to average "
                "over that wrapper's processes (as under Lightning's DDP strategy)"
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


DEFAULT_BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket size."""


class GradientAverager:
    """``average(tensors, like)``: the mean of each tensor over the processes of a group.

    A ``None`` entry counts as zeros shaped like ``like[k]``; the result is ``None`` only where
    the entry is ``None`` in every process (a parameter no process used keeps no gradient, as
    with ``DistributedDataParallel(find_unused_parameters=True)``).  Every process must pass
    ``like`` tensors of the same shapes, dtypes and devices, in the same order.  The results are
    fresh tensors (views of the reduced buckets) that the caller may modify in place.
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup], bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.process_group = process_group
        self.bucket_bytes = bucket_bytes
        self.world_size = dist.get_world_size(process_group)

    def __call__(self, tensors: Sequence[Optional[Tensor]], like: Sequence[Tensor]) -> list[Optional[Tensor]]:
        averaged: list[Optional[Tensor]] = [None] * len(tensors)
        for bucket in self._buckets(like):
            flat = torch.cat(
                [
                    torch.zeros(like[k].numel(), dtype=like[k].dtype, device=like[k].device)
                    if tensors[k] is None
                    else cast(Tensor, tensors[k]).reshape(-1)
                    for k in bucket
                ]
                + [
                    torch.tensor(
                        [float(tensors[k] is not None) for k in bucket], device=like[bucket[0]].device
                    ).to(like[bucket[0]].dtype)
                ]
            )
            dist.all_reduce(flat, group=self.process_group)
            flat.div_(self.world_size)
            present = flat[-len(bucket) :].tolist()
            offset = 0
            for k, used in zip(bucket, present):
                size = like[k].numel()
                if used > 0:
                    averaged[k] = flat[offset : offset + size].view(like[k].shape)
                offset += size
        return averaged

    def _buckets(self, like: Sequence[Tensor]) -> list[list[int]]:
        """Indices grouped by device and dtype, cut into buckets of about ``bucket_bytes``."""
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for k, t in enumerate(like):
            by_kind[(t.device, t.dtype)].append(k)
        buckets = []
        for indices in by_kind.values():
            current: list[int] = []
            size = 0
            for k in indices:
                current.append(k)
                size += like[k].numel() * like[k].element_size()
                if size >= self.bucket_bytes:
                    buckets.append(current)
                    current, size = [], 0
            if current:
                buckets.append(current)
        return buckets
