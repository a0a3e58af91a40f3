"""Counting the ATen operations of a training step that touch tensor data (``torch.profiler``).

Top-level ``aten::`` operations (not called from another ``aten::`` operation), without the
metadata-only ones (views, reshapes, ``detach``, empty allocations, the storage swap's type check).
Host synchronisations are the ``aten::_local_scalar_dense`` calls outside the base optimizer's own
step, whose ``.item()`` calls read its step counters (CPU tensors also on a GPU); on a GPU,
:func:`cuda_synchronisations` counts what CUDA's sync debug mode reports instead.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch

METADATA_ONLY = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::detach",
    "aten::detach_", "aten::expand", "aten::t", "aten::transpose", "aten::unsqueeze", "aten::squeeze",
    "aten::slice", "aten::select", "aten::alias", "aten::_unsafe_view", "aten::permute", "aten::flatten",
    "aten::unflatten", "aten::split", "aten::chunk", "aten::narrow", "aten::lift_fresh", "aten::empty",
    "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::set_", "aten::result_type",
    "aten::view_as", "aten::expand_as", "aten::unbind", "aten::split_with_sizes", "aten::numpy_T",
    "aten::_has_compatible_shallow_copy_type",
}  # fmt: skip
SYNC = "aten::_local_scalar_dense"


def data_ops(step, x, y) -> Counter:
    """The top-level data-touching ATen operations of one call of ``step`` (after two warm-up calls),
    with the host synchronisations under ``SYNC``."""
    for _ in range(2):
        step(x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step(x, y)
    counts: Counter = Counter()
    counts[SYNC] = sum(1 for event in profile.events() if event.name == SYNC and not _in_base_step(event))
    for event in profile.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None and event.name not in METADATA_ONLY | {SYNC}:
            counts[event.name] += 1
    return counts


def _in_base_step(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step#") and "MLTPOptimizer" not in parent.name:
            return True
        parent = parent.cpu_parent
    return False


def cuda_synchronisations(step, x, y) -> int:
    """The host synchronisations of one call of ``step`` on a GPU (after two warm-up calls)."""
    for _ in range(2):
        step(x, y)
    return synchronisations_of(lambda: step(x, y))


def synchronisations_of(run) -> int:
    """How many times ``run()`` makes the host wait for the GPU, as
    ``torch.cuda.set_sync_debug_mode("warn")`` reports it: every operation that waits for the device."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(is_synchronisation_warning(str(w.message)) for w in caught)


def is_synchronisation_warning(message: str) -> bool:
    """A warning of CUDA's sync debug mode about an operation, not its one-time notice that the mode
    is a prototype (whose text also speaks of synchronization)."""
    message = message.lower()
    return "synchroniz" in message and "prototype" not in message


def cuda_kernel_launches(step, x, y) -> int:
    """The CUDA kernels one call of ``step`` launches (after two warm-up calls): on a GPU the measure
    that the operation count stands for, also where a ``_foreach_*`` operation falls back to one
    kernel per tensor."""
    for _ in range(2):
        step(x, y)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        step(x, y)
        torch.cuda.synchronize()
    return sum(1 for event in profile.events() if "LaunchKernel" in event.name)
