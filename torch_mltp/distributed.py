"""Gradient averaging over the processes of a data-parallel run (the core: imports only torch).

``MLTPOptimizer`` does its own collectives under ``DistributedDataParallel`` (autograd.grad does not
fire DDP's reducer): :class:`GradientAverager` averages a list of tensors over a process group in
a few large all-reduces, one per bucket of about ``bucket_bytes`` per device and dtype, like DDP's
gradient buckets.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket size."""


def process_group_of(model: nn.Module) -> Optional[dist.ProcessGroup]:
    """The process group of a ``DistributedDataParallel`` model, else ``None``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.process_group
    return None


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
                    else tensors[k].reshape(-1)
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


def broadcast_from_first_rank(tensors: Sequence[Tensor], process_group: Optional[dist.ProcessGroup]) -> None:
    """Overwrite ``tensors`` in every process with the values of the group's first process."""
    source = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=source, group=process_group)
