"""What both MLTP paths share: the step's result, running a task's closure, differentiating its loss
with messages that name the cause of autograd's usual failures, and running task j at ``w'``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import constants

Closure = Callable[[], Tensor]
Average = Callable[[Sequence[Optional[Tensor]], Sequence[Tensor]], list[Optional[Tensor]]]
"""``average(tensors, like)``: the mean over processes of each ``tensors[k]`` (``None`` reads as
zeros shaped like ``like[k]``; it stays ``None`` when it is ``None`` in every process)."""


class MLTPGradients(NamedTuple):
    """Everything one MLTP step computes; every tensor is detached.

    ``param_grads[k]`` is ``dJ/dw_k`` (``None`` when ``w_k`` is used by neither loss) and
    ``alpha_grads[a]`` is ``dJ/dalpha_a`` (``None`` when no tensor scaled by ``alpha_a`` was
    selected; the whole list is ``None`` when the alphas' gradients were not asked for).
    With a ``loss_scale`` the gradients are scaled by it; ``objective``, ``loss_i`` and ``loss_j``
    never are.
    """

    objective: Tensor
    loss_i: Tensor
    loss_j: Tensor
    param_grads: list[Optional[Tensor]]
    alpha_grads: Optional[list[Optional[Tensor]]]


class MLTPStepResult(NamedTuple):
    """The objective ``J`` of the last backward pass (eq. 4), its two losses, and whether it was
    non-finite and will be skipped (always ``False`` with a ``GradScaler``, which decides itself)."""

    objective: Tensor
    loss_i: Tensor
    loss_j: Tensor
    skipped: bool


def evaluate_loss(closure: Closure, task: str) -> Tensor:
    """Run a task's closure and check that it returned a differentiable scalar."""
    loss = closure()
    if not isinstance(loss, Tensor):
        raise TypeError(f"closure_{task} must return a scalar loss tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"closure_{task} must return a scalar loss, got a tensor of shape {tuple(loss.shape)} "
            "(reduce it, e.g. with .mean())"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"closure_{task} returned a loss that does not require grad: it must run the model's "
            "forward pass with autograd enabled and must not call .detach()"
        )
    return loss if loss.dim() == 0 else loss.reshape(())


def differentiate(
    loss: Tensor, params: Sequence[Tensor], loss_scale: Optional[Tensor], task: str, create_graph: bool
) -> tuple[Optional[Tensor], ...]:
    """``d(s * L)/dw`` (``None`` for a tensor the loss does not use)."""
    scaled = loss if loss_scale is None else loss * loss_scale
    try:
        return torch.autograd.grad(scaled, params, create_graph=create_graph, allow_unused=True)
    except RuntimeError as err:
        raise_if_differentiated_twice(err, task)
        if create_graph:
            raise_if_not_twice_differentiable(err)
        raise


def raise_if_differentiated_twice(err: RuntimeError, task: str) -> None:
    """Re-raise autograd's failure to differentiate a loss that its closure already differentiated."""
    if "backward through the graph a second time" in str(err):
        raise RuntimeError(
            f"closure_{task} must return its loss without calling .backward() on it: MLTP "
            "differentiates the loss itself"
        ) from err


_DOUBLE_BACKWARD_FAILURES = ("derivative for", "double backward", "donated buffer", "not implemented")


def raise_if_not_twice_differentiable(err: RuntimeError) -> None:
    """Re-raise autograd's failure to differentiate the model twice with the ways out."""
    text = str(err)
    if not any(marker in text.lower() for marker in _DOUBLE_BACKWARD_FAILURES):
        return
    if "compile" in text or "aot_autograd" in text or "donated buffer" in text:
        remedy = "a torch.compile'd model cannot be differentiated twice: use mode='fo' with it"
    elif "scaled_dot_product" in text or "attention" in text:
        remedy = (
            "use mode='fo', or run scaled_dot_product_attention (nn.MultiheadAttention, "
            "nn.TransformerEncoderLayer, ...) on its math backend, which is twice differentiable: "
            "with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH): ..."
        )
    else:
        remedy = "use mode='fo' (first order), which differentiates once"
    raise RuntimeError(
        f"second-order MLTP differentiates the model twice, and autograd cannot: "
        f"{text.splitlines()[0]}. {remedy[0].upper()}{remedy[1:]}"
    ) from err


@contextmanager
def swapped_storage(
    params: Sequence[Tensor], values: list[Tensor], release_early: bool = False
) -> Iterator[None]:
    """Make each ``params[k]`` hold ``values[k]`` inside the block; restore the originals after.

    The swap exchanges storage (``.data``), so the restore is exact and copies nothing, and
    autograd's leaves (and a module's references to them) stay the same objects.

    With ``release_early`` each parameter of at least :data:`~torch_mltp.constants.EARLY_RELEASE_FROM`
    entries gets its own storage back as soon as autograd has computed its gradient inside the block
    (all of its uses are then differentiated), and ``values`` is emptied: a value that nothing else
    holds is freed during the backward pass, not after it.
    """
    originals = [p.data for p in params]
    handles = []
    try:
        for k, p in enumerate(params):  # no local name keeps a value alive
            p.data = values[k]
        if release_early:
            values.clear()
            handles = [
                p.register_hook(_restore_storage(p, o))
                for p, o in zip(params, originals)
                if p.numel() >= constants.EARLY_RELEASE_FROM
            ]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for p, original in zip(params, originals):
            p.data = original


def _restore_storage(param: Tensor, original: Tensor) -> Callable[[Tensor], None]:
    def restore(grad: Tensor) -> None:
        param.data = original

    return restore
