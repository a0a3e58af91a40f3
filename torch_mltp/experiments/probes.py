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
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)


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
        gradients = []
        for closure in closures:
            grads = torch.autograd.grad(closure(), parameters, allow_unused=True)
            gradients.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1).double()
                        for p, g in zip(parameters, grads)
                    ]
                )
            )
    first, second = gradients
    return (first @ second) / (first.norm() * second.norm())
