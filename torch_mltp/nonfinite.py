"""Non-finite losses and gradients: the checks, and what the ``nonfinite`` policy carries from
``backward`` to ``step`` (a small per-optimizer state, as ``GradScaler`` keeps one per optimizer).

A step is *non-finite* when ``L_i``, ``L_j`` or any gradient it computed has an infinite or NaN entry.
``"raise"`` raises ``FloatingPointError`` in ``backward``; ``"skip"`` makes the next ``step`` a no-op.
Either way nothing is added to ``.grad``.  With a fused base optimizer (``fused=True``) and a base
state that already exists, ``"skip"`` is decided on the device: the base step reads a flag, as under
``GradScaler``, and no step waits for the device.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from . import constants
from ._autograd import MLTPGradients


class NonfiniteState:
    """What the non-finite policy knows between ``backward`` and ``step``.

    ``skip_pending``: the next step is skipped (decided on the host).  ``found_inf``: a device flag
    (1.0 when the accumulated gradients are not finite) for a fused base step.  ``skipped_steps``
    counts the skipped steps, part of it on the device until read.
    """

    def __init__(self) -> None:
        self.skip_pending = False
        self.found_inf: Optional[Tensor] = None
        self.skipped_on_host = 0
        self.skipped_on_device: Optional[Tensor] = None

    @property
    def skipped_steps(self) -> int:
        on_device = self.skipped_on_device
        return self.skipped_on_host + (0 if on_device is None else int(on_device.item()))

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.skipped_on_host = value
        self.skipped_on_device = None

    def judge(self, result: MLTPGradients, policy: str, on_device: bool) -> bool:
        """Record one backward pass's verdict; ``True`` when the host found it non-finite (its
        gradients must then not be accumulated).  Raises ``FloatingPointError`` under ``"raise"``."""
        if on_device:
            flag = (~all_finite(checked_tensors(result))).float()  # read by the fused base step
            self.found_inf = flag if self.found_inf is None else torch.maximum(self.found_inf, flag)
            return False
        bad = first_nonfinite(result)
        if bad is None:
            return False
        if policy == "raise":
            raise FloatingPointError(
                f"MLTP backward produced a non-finite {bad}; .grad, weights, alphas and optimizer "
                "state are unchanged (pass nonfinite='skip' to skip such steps instead)"
            )
        self.skip_pending = True
        return True

    def take_skip(self) -> bool:
        """Whether the coming step is skipped on the host (and count it)."""
        if not self.skip_pending:
            return False
        self.skip_pending = False
        self.skipped_on_host += 1
        return True

    @contextmanager
    def device_skip(self, base: Any) -> Iterator[None]:
        """Hand the device flag of the accumulated gradients to a fused base step."""
        flag = self.found_inf
        if flag is None:
            yield
            return
        base.found_inf = flag
        try:
            yield
        finally:
            del base.found_inf
            self.found_inf = None
            self.skipped_on_device = flag if self.skipped_on_device is None else self.skipped_on_device + flag

    def reset(self) -> None:
        """``zero_grad``: the gradients that a pending skip concerned are gone."""
        self.skip_pending = False
        self.found_inf = None


def checked_tensors(result: MLTPGradients) -> list[Tensor]:
    """``L_i``, ``L_j`` and the gradients of a step (the present ones)."""
    grads = [g for g in (*result.param_grads, *(result.alpha_grads or ())) if g is not None]
    return [result.loss_i, result.loss_j, *grads]


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """A device bool: every entry of ``tensors`` is finite (no host synchronisation)."""
    return _bounds(tensors).isfinite().all()


def finite_on_host(tensors: Sequence[Tensor]) -> bool:
    """Every entry of ``tensors`` is finite, read with one synchronisation.

    On the CPU a sum decides the common case in one reduction: a NaN or an infinity propagates to it,
    so a finite sum means finite entries.  A sum that is not finite (a non-finite entry, or finite
    entries whose sum overflows), and an accelerator's tensors, are read exactly through
    :func:`_bounds`."""
    if not tensors:
        return True
    if all(t.is_cpu for t in tensors) and math.isfinite(_sum(tensors)):
        return True
    return bool(_bounds(tensors).isfinite().all().item())


def _sum(tensors: Sequence[Tensor]) -> float:
    """The sum of every entry, read once: the small tensors concatenated, each large one (see
    :data:`~torch_mltp.constants.LARGE_TENSOR`) on its own, never copied; half precision is summed in
    float32."""
    small, sums = [], []
    for t in tensors:
        if t.numel() < constants.LARGE_TENSOR:
            small.append(t.reshape(-1))
        else:
            sums.append(t.sum(dtype=_ACCUMULATE.get(t.dtype)))
    if small:
        block = torch.cat(small)
        sums.append(block.sum(dtype=_ACCUMULATE.get(block.dtype)))
    return (sums[0] if len(sums) == 1 else torch.stack(sums).sum()).item()


_ACCUMULATE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _bounds(tensors: Sequence[Tensor]) -> Tensor:
    """A short 1-D tensor whose entries are all finite exactly when every entry of ``tensors`` is.

    On an accelerator, one fused reduction: the largest magnitude per tensor (it cannot overflow, as a
    norm can).  On the CPU that reduction is neither fused nor vectorised (ten times slower than a sum
    at 2**25 entries), so there the minimum and maximum are taken instead (both are finite exactly when
    every entry is; a NaN propagates to both): one pair over the concatenated small tensors, one pair
    per large tensor (see :data:`~torch_mltp.constants.LARGE_TENSOR`), which is never copied."""
    if not tensors:
        return torch.zeros(0)
    if not all(t.is_cpu for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, ord=math.inf))
    large = [t for t in tensors if t.numel() >= constants.LARGE_TENSOR]
    small = [t.reshape(-1) for t in tensors if 0 < t.numel() < constants.LARGE_TENSOR]
    extremes = [e for t in large for e in torch.aminmax(t)]
    if small:
        extremes.extend(torch.aminmax(torch.cat(small)))
    return torch.stack(extremes) if extremes else torch.zeros(0)


def first_nonfinite(result: MLTPGradients) -> Optional[str]:
    """Name the first non-finite quantity of a step (``"L_i"``, ``"L_j"``, a gradient), else ``None``.

    One fused reduction decides the common, all-finite case; only a failure pays for a search.
    """
    if finite_on_host(checked_tensors(result)):
        return None
    if not torch.isfinite(result.loss_i):
        return "L_i"
    if not torch.isfinite(result.loss_j):
        return "L_j"
    for k, g in enumerate(result.param_grads):
        if g is not None and not torch.isfinite(g).all():
            return f"dJ/dw[{k}]"
    for a, g in enumerate(result.alpha_grads or ()):
        if g is not None and not torch.isfinite(g).all():
            return f"dJ/dalpha[{a}]"
    return None
