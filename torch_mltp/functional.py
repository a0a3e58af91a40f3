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

Two paths compute them, as ``torch.optim.Adam``'s two do: :func:`single_tensor_mltp`, plain per-tensor code
that reads like Algorithm 1, and :func:`multi_tensor_mltp`, the same blocks under the same markers with fused
multi-tensor operations (``torch_mltp._foreach``) whose number does not grow with the number of tensors.
:func:`mltp_gradients` picks one, as ``torch.optim``'s ``foreach`` flag does.  Half precision is summed in
float32 on both.

Two optional inputs serve mixed precision and data parallelism without changing the math:

* ``loss_scale`` (a tensor ``s``, as ``torch.amp.GradScaler`` uses): both losses are multiplied by ``s``
  before they are differentiated; the lookahead moves by the unscaled ``g_i`` and every returned gradient
  is ``s`` times its true value, ready for ``GradScaler.unscale_``.
* ``average`` (a function that averages gradients over processes): the tasks are then the unions of every
  process's task i and task j, so ``g_i`` and ``h_j`` are averaged as they are formed (lines 3 and 5) and
  the Hessian term, each process's own, with the sum at the end.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, cast

import torch
from torch import Tensor, nn

from . import _foreach, constants
from ._foreach import Workspace, all_finite

__all__ = [
    "Average",
    "Closure",
    "MLTPGradients",
    "Workspace",
    "fast_path_applies",
    "mltp_gradients",
    "multi_tensor_mltp",
    "single_tensor_mltp",
]

Closure = Callable[[], Tensor]
Average = Callable[[Sequence[Optional[Tensor]], Sequence[Tensor]], list[Optional[Tensor]]]
"""``average(tensors, like)``: the mean over processes of each ``tensors[k]`` (``None`` reads as zeros shaped
like ``like[k]``; it stays ``None`` when it is ``None`` in every process)."""


class MLTPGradients(NamedTuple):
    """Everything one MLTP step computes; every tensor is detached.

    ``param_grads[k]`` is ``dJ/dw_k`` (``None`` when ``w_k`` is used by neither loss) and ``alpha_grads[a]``
    is ``dJ/dalpha_a`` (``None`` when no tensor scaled by ``alpha_a`` was selected; the whole list is
    ``None`` when the alphas' gradients were not asked for).  With a ``loss_scale`` the gradients are scaled
    by it; ``objective``, ``loss_i`` and ``loss_j`` never are.
    """

    objective: Tensor
    loss_i: Tensor
    loss_j: Tensor
    param_grads: list[Optional[Tensor]]
    alpha_grads: Optional[list[Optional[Tensor]]]


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
    params, s = list(params), loss_scale
    # line 3: L_i(w) and g_i = dL_i/dw; its graph is kept for the exact dw'/dw = I - alpha * H_i
    with torch.enable_grad():
        loss_i = evaluate_loss(closure_i, "i")
        g_graph = differentiate(loss_i, params, loss_scale, "i", create_graph=not first_order)
    loss_i, g_i = loss_i.detach(), [None if g is None else g.detach() for g in g_graph]
    if average is not None:  # task i is the union of every process's task i
        loss_i, g_i = _averaged(average, loss_i, g_i, params)
    # line 4: w'_S = w_S - alpha * g_i,S (g_i unscaled); guarded: w' = w unless g_i,S is finite
    g_selected = [_or_zeros(g_i[k], params[k]) for k in selected]
    step_sizes = (
        [alphas[a].detach() for a in alpha_of] if s is None else scaled_step_sizes(alphas, alpha_of, s)
    )
    with torch.no_grad():
        w_prime = [params[k] - alpha * g for k, alpha, g in zip(selected, step_sizes, g_selected)]
        if guard_lookahead or loss_scale is not None:
            finite = all_finite(g_selected)
            w_prime = [torch.where(finite, w, params[k]) for k, w in zip(selected, w_prime)]
    # line 5: L_j(w') and h_j = dL_j/dw at w'
    with torch.enable_grad(), swapped_storage([params[k] for k in selected], w_prime):
        loss_j = evaluate_loss(closure_j, "j")
        h_j = list(differentiate(loss_j, params, loss_scale, "j", create_graph=False))
    loss_j = loss_j.detach()
    if average is not None:  # task j is the union of every process's task j
        loss_j, h_j = _averaged(average, loss_j, h_j, params)
    # line 6: J = L_i(w) + eta * L_j(w')
    objective = loss_i + eta * loss_j
    # dJ/dalpha = -eta * <h_j,S, g_i,S> over the entries each alpha scales (half precision in float32)
    scale = -eta if s is None else -eta / s
    alpha_sums: list[Optional[Tensor]] = [None] * len(alphas)
    for k, a, g in zip(selected, alpha_of, g_selected) if alpha_grads else ():
        accumulate = _foreach._ACCUMULATE.get(g.dtype, g.dtype)
        product = _or_zeros(h_j[k], params[k]).to(accumulate) * g.to(accumulate)
        product = product.sum() if alphas[a].dim() == 0 else product
        previous = alpha_sums[a]
        alpha_sums[a] = product if previous is None else previous + product
    alpha_result: Optional[list[Optional[Tensor]]] = None
    if alpha_grads:
        alpha_result = [
            None if p is None else (p * scale).to(alphas[a].dtype) for a, p in enumerate(alpha_sums)
        ]
    # dJ/dw = g_i + eta * h_j (first order: dw'/dw = I) ...
    param_grads = [_total(p, (g, 1.0), (h, eta)) for p, g, h in zip(params, g_i, h_j)]
    if not first_order:  # ... - eta * H_i[:, S] (alpha * h_j,S): one Hessian-vector product
        pairs = [
            (g, -eta * alpha * h)
            for g, h, alpha in zip((g_graph[k] for k in selected), (h_j[k] for k in selected), step_sizes)
            if g is not None and g.requires_grad and h is not None
        ]
        if pairs:
            outputs, vectors = zip(*pairs)
            with _explaining_double_backward():
                hessian_term = torch.autograd.grad(outputs, params, grad_outputs=vectors, allow_unused=True)
            param_grads = [
                _total(p, (d, 1.0), (t, 1.0)) for p, d, t in zip(params, param_grads, hessian_term)
            ]
        if average is not None:  # the Hessian term is each process's own: average the sum
            param_grads = average(param_grads, params)
    return MLTPGradients(objective, loss_i, loss_j, param_grads, alpha_result)


def multi_tensor_mltp(
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
    workspace: Optional[Workspace] = None,
) -> MLTPGradients:
    """:func:`single_tensor_mltp` with fused multi-tensor operations, block by block.

    Memory: ``g_i + eta * h_j`` and the Hessian term accumulate in place into the gradients autograd
    returned; first-order steps write ``w'`` into storage kept in the ``workspace``; second-order steps
    hand each large weight its storage back as soon as its gradient at ``w'`` is complete.
    """
    params, s = list(params), loss_scale
    space = (workspace or Workspace()).prepare(params, selected, alphas, alpha_of)
    # line 3: L_i(w) and g_i = dL_i/dw; its graph is kept for the exact dw'/dw = I - alpha * H_i
    with torch.enable_grad():
        loss_i = evaluate_loss(closure_i, "i")
        g_graph = differentiate(loss_i, params, loss_scale, "i", create_graph=not first_order)
    g_values = list(g_graph) if first_order else [None if g is None else g.detach() for g in g_graph]
    loss_i, g_i = loss_i.detach(), _foreach.owned(g_values, params)
    if average is not None:  # task i is the union of every process's task i
        loss_i, g_i = _averaged(average, loss_i, g_i, params)
    # line 4: w'_S = w_S - alpha * g_i,S (g_i unscaled); guarded: w' = w unless g_i,S is finite
    g_selected = [_or_zeros(g_i[k], params[k]) for k in selected]
    step_sizes = [alphas[a] for a in alpha_of] if s is None else scaled_step_sizes(alphas, alpha_of, s)
    shifted = [params[k] for k in selected]
    with torch.no_grad():
        finite = all_finite(g_selected) if guard_lookahead or loss_scale is not None else None
        storage = space.lookahead_storage(shifted) if first_order else None
        w_prime = _foreach.lookahead(space.selected_groups, shifted, g_selected, step_sizes, storage, finite)
    # line 5: L_j(w') and h_j = dL_j/dw at w'; second order frees each w'_k once task j is done with it
    with torch.enable_grad(), swapped_storage(shifted, w_prime, release_early=not first_order):
        loss_j = evaluate_loss(closure_j, "j")
        h_j = list(differentiate(loss_j, params, loss_scale, "j", create_graph=False))
    loss_j = loss_j.detach()
    if average is not None:  # task j is the union of every process's task j
        loss_j, h_j = _averaged(average, loss_j, h_j, params)
    # line 6: J = L_i(w) + eta * L_j(w')
    objective = loss_i + eta * loss_j
    # dJ/dalpha = -eta * <h_j,S, g_i,S> over the entries each alpha scales (half precision in float32)
    scale = -eta if s is None else -eta / s
    alpha_result = None
    if alpha_grads:
        h_selected = [_or_zeros(h_j[k], params[k]) for k in selected]
        alpha_result = _foreach.alpha_gradients(
            space.alpha_groups, h_selected, g_selected, alphas, alpha_of, scale
        )
        del h_selected
    # dJ/dw = g_i + eta * h_j (first order: dw'/dw = I), in g_i's buffers ...
    param_grads = _foreach.add_scaled(space.param_groups, g_i, h_j, eta)
    if not first_order:  # ... - eta * H_i[:, S] (alpha * h_j,S): one Hessian-vector product, into them
        present = [n for n, k in enumerate(selected) if h_j[k] is not None and g_graph[k] is not None]
        # h_j's storage, every entry present
        vectors = cast(
            "list[Tensor]", _foreach.owned([_or_zeros(h_j[k], params[k]) for k in selected], shifted)
        )
        factors = {a: alphas[a].detach() * scale for a in set(alpha_of)}
        _foreach.scale_by(space.selected_groups, vectors, [factors[a] for a in alpha_of])
        outputs = cast("list[Tensor]", [g_graph[selected[n]] for n in present])
        vectors = [vectors[n] for n in present]
        del g_graph, h_j  # the product frees each vector (h_j's storage) when it is used
        with _explaining_double_backward():
            param_grads = _foreach.accumulate_hessian_term(outputs, vectors, params, param_grads)
        if average is not None:  # the Hessian term is each process's own: average the sum
            param_grads = average(param_grads, params)
    return MLTPGradients(objective, loss_i, loss_j, param_grads, alpha_result)


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
        selected: indices into ``params`` of the lookahead set ``S``.
        alphas: the step-size tensors; ``alphas[alpha_of[n]]`` is the step size of ``params[selected[n]]``
            and broadcasts against it (scalar or same shape).
        eta: weight of the task-j loss.
        first_order: take ``dw'/dw`` as the identity (MLTP_FO) instead of the exact Jacobian.
        alpha_grads: also return ``dJ/dalpha`` (skip it when alpha is a fixed hyperparameter).
        loss_scale: differentiate ``s * L`` instead of ``L`` (mixed precision); the returned gradients are
            scaled, the lookahead is not.
        average: averages gradients over processes whose tasks together form task i and task j.
        guard_lookahead: when ``g_i`` is not finite, run task j at ``w`` (``w' = w``, decided on the device)
            so that its forward pass, and BatchNorm's running statistics, never see non-finite weights;
            always on with ``loss_scale``.
        foreach: ``True`` for :func:`multi_tensor_mltp` (plain dense tensors only), ``False`` for
            :func:`single_tensor_mltp`; ``None`` takes the fused path wherever :func:`fast_path_applies`.
        workspace: what the fused path may keep between calls with the same tensors.
    """
    if foreach is None:
        foreach = fast_path_applies(params, alphas)
    options: dict[str, Any] = dict(
        alpha_grads=alpha_grads, loss_scale=loss_scale, average=average, guard_lookahead=guard_lookahead
    )
    args = (closure_i, closure_j, params, selected, alphas, alpha_of, eta, first_order)
    if foreach:
        return multi_tensor_mltp(*args, **options, workspace=workspace)
    return single_tensor_mltp(*args, **options)


def fast_path_applies(params: Sequence[Tensor], alphas: Sequence[Tensor]) -> bool:
    """Whether the fused multi-tensor path can take these tensors: plain dense tensors (a tensor subclass such
    as ``DTensor`` takes the single-tensor path)."""
    return all(type(t) in (Tensor, nn.Parameter) and t.layout == torch.strided for t in (*params, *alphas))


# -- the steps both paths share ---------------------------------------------------------------------------
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


def scaled_step_sizes(alphas: Sequence[Tensor], alpha_of: Sequence[int], loss_scale: Tensor) -> list[Tensor]:
    """Each selected tensor's step size ``alpha / s`` (``g_i`` is scaled by ``s``), in the alpha's dtype."""
    scaled = {a: (alphas[a].detach() / loss_scale).to(alphas[a].dtype) for a in set(alpha_of)}
    return [scaled[a] for a in alpha_of]


@contextmanager
def swapped_storage(
    params: Sequence[Tensor], values: list[Tensor], release_early: bool = False
) -> Iterator[None]:
    """Make each ``params[k]`` hold ``values[k]`` inside the block (task j at ``w'``); restore after.

    The swap exchanges storage (``.data``), so the restore is exact and copies nothing, and autograd's
    leaves (and a module's references to them) stay the same objects.

    With ``release_early`` each parameter of at least :data:`~torch_mltp.constants.EARLY_RELEASE_FROM`
    entries gets its own storage back as soon as autograd has computed its gradient inside the block (all of
    its uses are then differentiated), and ``values`` is emptied: a value that nothing else holds is freed
    during the backward pass, not after it.
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


def _averaged(
    average: Average, loss: Tensor, grads: Sequence[Optional[Tensor]], params: Sequence[Tensor]
) -> tuple[Tensor, list[Optional[Tensor]]]:
    """A task's loss and gradients averaged over processes, in one call of ``average``."""
    mean_loss, *mean_grads = average([loss, *grads], [loss, *params])
    return cast(Tensor, mean_loss), mean_grads


def _or_zeros(grad: Optional[Tensor], param: Tensor) -> Tensor:
    return torch.zeros_like(param) if grad is None else grad


def _total(param: Tensor, *terms: tuple[Optional[Tensor], float]) -> Optional[Tensor]:
    """``sum(scale * term)`` over the present terms as a new tensor laid out like ``param``; ``None`` when no
    term is present."""
    present = [(t, scale) for t, scale in terms if t is not None]
    if not present:
        return None
    total = torch.zeros_like(param, memory_format=torch.preserve_format)
    for term, scale in present:
        total.add_(term.detach(), alpha=scale)
    return total


# -- autograd's usual failures, with their causes ---------------------------------------------------------
def raise_if_differentiated_twice(err: RuntimeError, task: str) -> None:
    """Re-raise autograd's failure to differentiate a loss that its closure already differentiated."""
    if "backward through the graph a second time" in str(err):
        raise RuntimeError(
            f"closure_{task} must return its loss without calling .backward() on it: MLTP "
            "differentiates the loss itself"
        ) from err


@contextmanager
def _explaining_double_backward() -> Iterator[None]:
    """Differentiate through ``g_i``'s graph (the Hessian term), explaining autograd's failure to."""
    try:
        yield
    except RuntimeError as err:
        raise_if_not_twice_differentiable(err)
        raise


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
