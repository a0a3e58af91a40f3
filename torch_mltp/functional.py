"""The MLTP objective and its exact gradients, with no state (paper section III, eqs. 2-5).

For two tasks i and j, trainable parameters ``w``, a selected subset ``S`` of them and step sizes
``alpha``::

    g_i   = dL_i/dw (w)                                      eq. (2)
    w'_S  = w_S - alpha * g_i,S,   w'_k = w_k  for k not in S   eq. (3), Algorithm 1 line 4
    J     = L_i(w) + eta * L_j(w')                           eq. (4)

and, with ``h_j = dL_j/dw (w')`` and ``H_i`` the Hessian of ``L_i`` at ``w``::

    dJ/dw      = g_i + eta * h_j - eta * H_i[:, S] (alpha * h_j,S)     (exact, "second order")
    dJ/dw      = g_i + eta * h_j                                      (first order: dw'/dw := I)
    dJ/dalpha  = -eta * <h_j,S, g_i,S>   summed over what alpha is shared by (exact in both)

The Hessian term is one Hessian-vector product through the graph of ``g_i``, so ``L_i`` is
differentiated once (with ``create_graph``) and then once more; nothing is recomputed.
The lookahead runs the closure for task j with the parameters' storage swapped for ``w'`` and
restores the original storage in every path, so the weights are bit-for-bit unchanged afterwards.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

Closure = Callable[[], Tensor]


class MLTPGradients(NamedTuple):
    """Everything one MLTP step computes; every tensor is detached.

    ``param_grads[k]`` is ``dJ/dw_k`` (``None`` when ``w_k`` is used by neither loss) and
    ``alpha_grads[a]`` is ``dJ/dalpha_a`` (``None`` when the alphas' gradients were not asked for).
    """

    objective: Tensor
    loss_i: Tensor
    loss_j: Tensor
    param_grads: list[Optional[Tensor]]
    alpha_grads: Optional[list[Tensor]]


def evaluate_loss(closure: Closure, task: str) -> Tensor:
    """Run a closure and check that it returned a differentiable scalar."""
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
            "forward pass with autograd enabled and must not call .backward() or .detach()"
        )
    return loss if loss.dim() == 0 else loss.reshape(())


def lookahead(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    alphas: Sequence[Tensor],
    out: Optional[Sequence[Tensor]] = None,
) -> list[Tensor]:
    """The inner gradient step of eq. (3) / Algorithm 1 line 4: ``w' = w - alpha * g``.

    Each ``alphas[k]`` broadcasts against ``params[k]`` (a scalar per layer or tensor, or one
    value per element).  With ``out`` the result is written into those tensors (one pass, no
    allocation) and they are returned.
    """
    if not params:
        return []
    with torch.no_grad():
        if out is None:
            return torch._foreach_addcmul(list(params), list(grads), list(alphas), value=-1)
        for p, g, a, o in zip(params, grads, alphas, out):
            torch.addcmul(p, g, a, value=-1, out=o)
        return list(out)


@contextmanager
def swapped_storage(params: Sequence[Tensor], values: Sequence[Tensor]) -> Iterator[None]:
    """Make each ``params[k]`` hold ``values[k]`` inside the block; restore the originals after.

    The swap exchanges storage (``.data``), so the restore is exact and copies nothing, and
    autograd's leaves (and a module's references to them) stay the same objects.
    """
    originals = [p.data for p in params]
    try:
        for p, v in zip(params, values):
            p.data = v
        yield
    finally:
        for p, original in zip(params, originals):
            p.data = original


def mltp_gradients(
    closure_i: Closure,
    closure_j: Closure,
    params: Sequence[Tensor],
    shifted: Sequence[int],
    alphas: Sequence[Tensor],
    alpha_of: Sequence[int],
    eta: float,
    first_order: bool,
    alpha_grads: bool = True,
    lookahead_out: Optional[Sequence[Tensor]] = None,
) -> MLTPGradients:
    """Compute ``J`` (eq. 4) and its exact gradients with respect to ``w`` and ``alpha``.

    Args:
        closure_i, closure_j: forward passes on task i and task j returning scalar losses.
        params: the trainable tensors ``w`` (leaves the closures use).
        shifted: indices into ``params`` of the lookahead set ``S``.
        alphas: the step-size tensors; ``alphas[alpha_of[n]]`` is the step size of
            ``params[shifted[n]]`` and broadcasts against it (scalar or same shape).
        eta: weight of the task-j loss.
        first_order: take ``dw'/dw`` as the identity (MLTP_FO) instead of the exact Jacobian.
        alpha_grads: also return ``dJ/dalpha`` (skip it when alpha is a fixed hyperparameter).
        lookahead_out: tensors shaped like ``params[shifted[n]]`` to hold ``w'`` (kept by the caller
            across steps); by default ``w'`` is allocated for the step.
    """
    with torch.enable_grad():
        return _mltp_gradients(
            closure_i,
            closure_j,
            list(params),
            shifted,
            alphas,
            alpha_of,
            eta,
            first_order,
            alpha_grads,
            lookahead_out,
        )


def _mltp_gradients(
    closure_i: Closure,
    closure_j: Closure,
    params: list[Tensor],
    shifted: Sequence[int],
    alphas: Sequence[Tensor],
    alpha_of: Sequence[int],
    eta: float,
    first_order: bool,
    alpha_grads: bool,
    lookahead_out: Optional[Sequence[Tensor]],
) -> MLTPGradients:
    loss_i = evaluate_loss(closure_i, "i")
    grads_i = torch.autograd.grad(loss_i, params, create_graph=not first_order, allow_unused=True)
    shifted_params = [params[k] for k in shifted]
    step_alphas = [alphas[a] for a in alpha_of]
    # From here on only values are combined (no_grad); g_i's graph serves the Hessian term alone.
    with torch.no_grad():
        g_shift = [_value_or_zeros(grads_i[k], params[k]) for k in shifted]
    with swapped_storage(shifted_params, lookahead(shifted_params, g_shift, step_alphas, lookahead_out)):
        loss_j = evaluate_loss(closure_j, "j")
        grads_j = torch.autograd.grad(loss_j, params, allow_unused=True)

    with torch.no_grad():
        h_shift = [_value_or_zeros(grads_j[k], params[k]) for k in shifted]
        hessian_term: Sequence[Optional[Tensor]] = [None] * len(params)
        if not first_order and shifted:
            hessian_term = _hessian_vector_product(
                [grads_i[k] for k in shifted], params, torch._foreach_mul(h_shift, step_alphas)
            )
        alpha_result = _alpha_gradients(h_shift, g_shift, alphas, alpha_of, eta) if alpha_grads else None
        param_grads = _combine(grads_i, grads_j, hessian_term, eta)
        objective = loss_i + eta * loss_j
    return MLTPGradients(objective, loss_i.detach(), loss_j.detach(), param_grads, alpha_result)


def _hessian_vector_product(
    grads_with_graph: Sequence[Optional[Tensor]], params: Sequence[Tensor], vectors: Sequence[Tensor]
) -> Sequence[Optional[Tensor]]:
    """``H_i[:, S] v``: the derivative of ``<g_i,S, v>`` with respect to every parameter."""
    pairs = [(g, v) for g, v in zip(grads_with_graph, vectors) if g is not None and g.requires_grad]
    if not pairs:  # L_i is linear in the shifted parameters: the Hessian block is zero
        return [None] * len(params)
    outputs, grad_outputs = zip(*pairs)
    return torch.autograd.grad(outputs, params, grad_outputs=grad_outputs, allow_unused=True)


def _combine(
    grads_i: Sequence[Optional[Tensor]],
    grads_j: Sequence[Optional[Tensor]],
    hessian_term: Sequence[Optional[Tensor]],
    eta: float,
) -> list[Optional[Tensor]]:
    """``dJ/dw = g_i + eta * h_j - eta * hvp`` per tensor, absent terms read as zero.

    Runs under ``no_grad`` after every other use of ``g_i``, so it accumulates into ``g_i`` in place
    (one fused ``_foreach`` call per term for the usual case where every term is present).
    """
    combined = [g.detach() if g is not None and g.requires_grad else g for g in grads_i]
    for terms, scale in ((grads_j, eta), (hessian_term, -eta)):
        both = [k for k, (g, t) in enumerate(zip(combined, terms)) if g is not None and t is not None]
        if both:
            torch._foreach_add_([combined[k] for k in both], [terms[k] for k in both], alpha=scale)
        for k, term in enumerate(terms):
            if term is not None and combined[k] is None:
                combined[k] = term * scale
    return combined


def _alpha_gradients(
    h_shift: Sequence[Tensor],
    g_shift: Sequence[Tensor],
    alphas: Sequence[Tensor],
    alpha_of: Sequence[int],
    eta: float,
) -> list[Tensor]:
    """``dJ/dalpha = -eta * <h_j, g_i>`` over the entries each alpha scales (eq. 4 differentiated).

    A scalar alpha gets the inner product summed over its tensors; an element-wise alpha the
    element-wise product.
    """
    sums: list[Optional[Tensor]] = [None] * len(alphas)
    for h, g, a in zip(h_shift, g_shift, alpha_of):
        product = torch.vdot(h.reshape(-1), g.reshape(-1)) if alphas[a].dim() == 0 else h * g
        sums[a] = product if sums[a] is None else sums[a] + product
    grads = [torch.zeros_like(alpha) if s is None else s.to(alpha.dtype) for s, alpha in zip(sums, alphas)]
    torch._foreach_mul_(grads, -eta)
    return grads


def _value_or_zeros(grad: Optional[Tensor], param: Tensor) -> Tensor:
    return torch.zeros_like(param) if grad is None else grad


def first_nonfinite(result: MLTPGradients) -> Optional[str]:
    """Name the first non-finite quantity of a step (``"L_i"``, ``"L_j"``, a gradient), else ``None``.

    One fused reduction decides the common, all-finite case; only a failure pays for a search.
    """
    grads = [g for g in (*result.param_grads, *(result.alpha_grads or ())) if g is not None]
    norms = torch._foreach_norm([result.loss_i, result.loss_j, *grads])
    if math.isfinite(torch.stack(norms).float().sum().item()):
        return None
    if not torch.isfinite(result.loss_i):
        return "L_i"
    if not torch.isfinite(result.loss_j):
        return "L_j"
    for k, g in enumerate(result.param_grads):
        if g is not None and not torch.isfinite(g).all():
            return f"dJ/dw[{k}]"
    for a, g in enumerate(result.alpha_grads or ()):
        if not torch.isfinite(g).all():
            return f"dJ/dalpha[{a}]"
    return None  # the norms overflowed, but every entry is finite
