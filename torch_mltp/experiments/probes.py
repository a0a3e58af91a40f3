"""Measurements taken during training that leave the training itself exactly as it would be without them.

:func:`gradient_cosine` measures what MLTP's objective rewards (paper, eq. 5): the cosine similarity
between the gradients of the two tasks of a batch, both taken at the current weights.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from torch_mltp import task_closures


@contextlib.contextmanager
def preserved_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Put back ``model``'s buffers (BatchNorm running statistics and counters) and the torch RNG state
    (CPU, and ``device``'s when it is a CUDA device: dropout masks) as they were on entry."""
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    with torch.random.fork_rng([device] if device.type == "cuda" else [], device_type="cuda"):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)


def gradient_cosine(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """cos(dL_i/dw, dL_j/dw) on the batch ``(x, y)``: task i is its first half and task j its second
    half, split as :func:`torch_mltp.task_closures` splits them, and ``w`` is every trainable parameter
    of ``model`` as one flattened vector (a parameter a task does not reach contributes zeros).

    Both gradients are taken at the current weights by ``torch.autograd.grad``, so no ``.grad`` is
    written; the model's buffers and the RNG state are restored afterwards (:func:`preserved_state`), so
    training continues exactly as it would without the measurement. ``loss_fn(x, y)`` returns a task's
    scalar loss. Returns a 0-dimensional tensor on the parameters' device (NaN when a gradient is zero).
    """
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    closures = task_closures(loss_fn, x, y)
    with preserved_state(model, x.device):
        grads = [torch.autograd.grad(closure(), parameters, materialize_grads=True) for closure in closures]
    first, second = (torch.cat([g.reshape(-1).double() for g in task]) for task in grads)
    return (first @ second) / (first.norm() * second.norm())
