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

:func:`single_tensor_mltp` computes them with plain per-tensor code that reads like Algorithm 1;
``torch_mltp._multi_tensor`` computes the same with a number of operations that does not grow with
the number of tensors.  :func:`mltp_gradients` picks one, as ``torch.optim``'s ``foreach`` flag does.

Two optional inputs serve mixed precision and data parallelism without changing the math:

* ``loss_scale`` (a tensor ``s``, as ``torch.amp.GradScaler`` uses): both losses are multiplied by
  ``s`` before they are differentiated; the lookahead moves by the unscaled ``g_i`` and every
  returned gradient is ``s`` times its true value, ready for ``GradScaler.unscale_``.
* ``average`` (a function that averages gradients over processes): the tasks are then the unions
  of every process's task i and task j, and ``g_i``, ``h_j`` and the Hessian term are averaged
  before they are used, so every process computes the gradients of the union.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ._autograd import (
    Average,
    Closure,
    MLTPGradients,
    differentiate,
    evaluate_loss,
    raise_if_not_twice_differentiable,
    swapped_storage,
)
from ._multi_tensor import Workspace, multi_tensor_mltp

__all__ = ["MLTPGradients", "fast_path_applies", "mltp_gradients", "single_tensor_mltp"]


def single_tensor_mltp(
    closure_i: Closure,
    closure_j: Closure,
    params: Sequence[Tensor],
    selected: Sequence[int],
    alphas: Sequence[Tensor],
    alpha_of: Sequence[int],
    eta: float,
    first_order: bool,
    *,
    alpha_grads: bool = True,
    loss_scale: Optional[Tensor] = None,
    average: Optional[Average] = None,
    guard_lookahead: bool = False,
) -> MLTPGradients:
    """One MLTP step, tensor by tensor (Algorithm 1, lines 3-6, and the gradients of line 7)."""
    params, s = list(params), 1.0 if loss_scale is None else loss_scale
    # line 3: L_i(w) and g_i = dL_i/dw; its graph is kept for the exact dw'/dw = I - alpha * H_i
    with torch.enable_grad():
        loss_i = evaluate_loss(closure_i, "i")
        g_graph = differentiate(loss_i, params, loss_scale, "i", create_graph=not first_order)
    loss_i, g_i = loss_i.detach(), [None if g is None else g.detach() for g in g_graph]
    if average is not None:  # task i is the union of every process's task i
        loss_i, *g_i = average([loss_i, *g_i], [loss_i, *params])
    # line 4: w'_S = w_S - alpha * g_i,S (g_i unscaled); guarded: w' = w unless g_i,S is finite
    g_selected, step_sizes = (
        [_or_zeros(g_i[k], params[k]) for k in selected],
        [alphas[a].detach() / s for a in alpha_of],
    )
    with torch.no_grad():
        w_prime = [params[k] - alpha * g for k, alpha, g in zip(selected, step_sizes, g_selected)]
        if guard_lookahead or loss_scale is not None:
            finite = torch.stack([torch.isfinite(g).all() for g in g_selected]).all()
            w_prime = [torch.where(finite, w, params[k]) for k, w in zip(selected, w_prime)]
    # line 5: L_j(w') and h_j = dL_j/dw at w'
    with torch.enable_grad(), swapped_storage([params[k] for k in selected], w_prime):
        loss_j = evaluate_loss(closure_j, "j")
        h_j = list(differentiate(loss_j, params, loss_scale, "j", create_graph=False))
    loss_j = loss_j.detach()
    if average is not None:
        loss_j, *h_j = average([loss_j, *h_j], [loss_j, *params])
    # line 6: J = L_i(w) + eta * L_j(w')
    objective = loss_i + eta * loss_j
    # dJ/dalpha = -eta * <h_j, g_i> over the entries each alpha scales
    alpha_result: Optional[list] = [None] * len(alphas) if alpha_grads else None
    for k, a, g in zip(selected, alpha_of, g_selected) if alpha_grads else ():
        product = _or_zeros(h_j[k], params[k]) * g * (-eta / s)
        product = product.sum() if alphas[a].dim() == 0 else product
        alpha_result[a] = product if alpha_result[a] is None else alpha_result[a] + product
    # dJ/dw = g_i + eta * h_j (first order, dw'/dw = I) ...
    param_grads = [_total(p, (g, 1.0), (h, eta)) for p, g, h in zip(params, g_i, h_j)]
    if not first_order:  # ... - eta * H_i[:, S] (alpha * h_j,S): one Hessian-vector product
        pairs = [
            (g_graph[k], -eta * alpha * h_j[k])
            for k, alpha in zip(selected, step_sizes)
            if g_graph[k] is not None and g_graph[k].requires_grad and h_j[k] is not None
        ]
        if pairs:
            outputs, vectors = zip(*pairs)
            hessian_term = _hessian_vector_products(outputs, params, vectors)
            param_grads = [
                _total(p, (d, 1.0), (t, 1.0)) for p, d, t in zip(params, param_grads, hessian_term)
            ]
        if average is not None:  # the Hessian term is each process's own: average the sum
            param_grads = average(param_grads, params)
    return MLTPGradients(objective, loss_i, loss_j, param_grads, alpha_result)


def _hessian_vector_products(
    grads: Sequence[Tensor], params: list[Tensor], vectors: Sequence[Tensor]
) -> tuple[Optional[Tensor], ...]:
    """``sum_k d<grads_k, vectors_k>/dw`` through the graph of ``grads``."""
    try:
        return torch.autograd.grad(grads, params, grad_outputs=vectors, allow_unused=True)
    except RuntimeError as err:
        raise_if_not_twice_differentiable(err)
        raise


def _or_zeros(grad: Optional[Tensor], param: Tensor) -> Tensor:
    return torch.zeros_like(param) if grad is None else grad


def _total(param: Tensor, *terms: tuple[Optional[Tensor], float]) -> Optional[Tensor]:
    """``sum(scale * term)`` over the present terms as a new tensor laid out like ``param``;
    ``None`` when no term is present."""
    present = [(t, scale) for t, scale in terms if t is not None]
    if not present:
        return None
    total = torch.zeros_like(param, memory_format=torch.preserve_format)
    for term, scale in present:
        total.add_(term.detach(), alpha=scale)
    return total


def fast_path_applies(params: Sequence[Tensor], alphas: Sequence[Tensor]) -> bool:
    """Whether the fused multi-tensor path can take these tensors: plain dense tensors (a tensor
    subclass such as ``DTensor`` takes the single-tensor path)."""
    return all(type(t) in (Tensor, nn.Parameter) and t.layout == torch.strided for t in (*params, *alphas))


def mltp_gradients(
    closure_i: Closure,
    closure_j: Closure,
    params: Sequence[Tensor],
    selected: Sequence[int],
    alphas: Sequence[Tensor],
    alpha_of: Sequence[int],
    eta: float,
    first_order: bool,
    *,
    alpha_grads: bool = True,
    loss_scale: Optional[Tensor] = None,
    average: Optional[Average] = None,
    guard_lookahead: bool = False,
    foreach: Optional[bool] = None,
    workspace: Optional[Workspace] = None,
) -> MLTPGradients:
    """Compute ``J`` (eq. 4) and its exact gradients with respect to ``w`` and ``alpha``.

    Args:
        closure_i, closure_j: forward passes on task i and task j returning scalar losses.
        params: the trainable tensors ``w`` (leaves the closures use).
        selected: indices into ``params`` of the lookahead set ``S``, in increasing order.
        alphas: the step-size tensors; ``alphas[alpha_of[n]]`` is the step size of
            ``params[selected[n]]`` and broadcasts against it (scalar or same shape).
        eta: weight of the task-j loss.
        first_order: take ``dw'/dw`` as the identity (MLTP_FO) instead of the exact Jacobian.
        alpha_grads: also return ``dJ/dalpha`` (skip it when alpha is a fixed hyperparameter).
        loss_scale: differentiate ``s * L`` instead of ``L`` (mixed precision); the returned
            gradients are scaled, the lookahead is not.
        average: averages gradients over processes whose tasks together form task i and task j.
        guard_lookahead: when ``g_i`` is not finite, run task j at ``w`` (``w' = w``, decided on the
            device) so that its forward pass, and BatchNorm's running statistics, never see
            non-finite weights; always on with ``loss_scale``.
        foreach: ``True`` for the fused multi-tensor path (plain dense tensors only), ``False`` for
            :func:`single_tensor_mltp`; ``None`` takes the fused path wherever :func:`fast_path_applies`.
        workspace: what the fused path may keep between calls with the same tensors.
    """
    if foreach is None:
        foreach = fast_path_applies(params, alphas)
    options = dict(
        alpha_grads=alpha_grads, loss_scale=loss_scale, average=average, guard_lookahead=guard_lookahead
    )
    args = (closure_i, closure_j, list(params), selected, alphas, alpha_of, eta, first_order)
    if foreach:
        return multi_tensor_mltp(*args, **options, workspace=workspace)
    return single_tensor_mltp(*args, **options)
