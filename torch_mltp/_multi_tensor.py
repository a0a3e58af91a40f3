"""The fast path of an MLTP step: the computation of :func:`torch_mltp.functional.single_tensor_mltp`,
with a number of operations that does not grow with the number of tensors.

What it speeds up, and how:

* the host's work per tensor (the cost of a small model, and of any model on a fast GPU): the
  lookahead, ``g_i + eta * h_j``, the Hessian term's vectors and the alphas' gradients are fused
  multi-tensor operations (``torch._foreach_*``), and the scalar alphas' inner products are one
  segmented sum over the concatenated products;
* the fused multi-tensor kernels of a GPU, which take only operands of equal shapes: there the
  per-layer alphas are expanded to their tensors' shapes in one concatenation;
* memory: ``g_i + eta * h_j`` and the Hessian term accumulate in place into the gradients autograd
  returned; first-order steps write ``w'`` into storage kept from step to step (a :class:`Workspace`);
  second-order steps hand each large weight its storage back as soon as its gradient at ``w'`` is
  complete, so ``w'`` is freed during task j's backward pass;
* large tensors (:data:`~torch_mltp.constants.LARGE_TENSOR` entries or more) are processed one by one
  without temporaries, where a launch costs less than an extra pass over memory.

The results equal the single-tensor path's up to the order of floating-point additions.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import constants
from ._autograd import (
    Average,
    Closure,
    MLTPGradients,
    differentiate,
    evaluate_loss,
    raise_if_not_twice_differentiable,
    swapped_storage,
)
from .nonfinite import all_finite


class Workspace:
    """What the fast path keeps from one step to the next for the same tensors: storage for ``w'``
    (first order) and the scalar alphas' segment lengths on the device.  A cache: nothing in it is
    state, and a fresh one gives the same results."""

    def __init__(self) -> None:
        self.lookahead: list[Tensor] = []
        self.segments: Optional[Tensor] = None
        self.segmented: Optional[bool] = None

    def lookahead_storage(self, params: Sequence[Tensor]) -> list[Tensor]:
        """Storage shaped like ``params``, reused while they keep their shape, dtype and device."""
        kept = self.lookahead
        if len(kept) != len(params):
            kept[:] = [torch.empty_like(p, requires_grad=False) for p in params]
        for k, (buffer, p) in enumerate(zip(kept, params)):
            if buffer.shape != p.shape or buffer.dtype != p.dtype or buffer.device != p.device:
                kept[k] = torch.empty_like(p, requires_grad=False)
        return kept


def multi_tensor_mltp(
    closure_i: Closure,
    closure_j: Closure,
    params: list[Tensor],
    selected: Sequence[int],
    alphas: Sequence[Tensor],
    alpha_of: Sequence[int],
    eta: float,
    first_order: bool,
    *,
    alpha_grads: bool,
    loss_scale: Optional[Tensor],
    average: Optional[Average],
    guard_lookahead: bool,
    workspace: Optional[Workspace],
) -> MLTPGradients:
    """:func:`torch_mltp.functional.single_tensor_mltp` with fused multi-tensor operations."""
    with torch.enable_grad():
        loss_i = evaluate_loss(closure_i, "i")
        grads_i = differentiate(loss_i, params, loss_scale, "i", create_graph=not first_order)
    selected_params = [params[k] for k in selected]
    step_alphas = [alphas[a] for a in alpha_of]
    # From here on only values are combined (no_grad); g_i's graph serves the Hessian term alone.
    with torch.no_grad():
        # without create_graph the gradients carry no graph and need no detached copies of their handles
        values_i = _writable(list(grads_i) if first_order else [_detached(g) for g in grads_i], params)
        if average is not None:
            loss_i, *values_i = average([loss_i.detach(), *values_i], [loss_i, *params])
        g_selected = [g if (g := values_i[k]) is not None else torch.zeros_like(params[k]) for k in selected]
        inner_alphas, finite = step_alphas, None
        if loss_scale is not None or guard_lookahead:
            finite = all_finite(g_selected)
        if loss_scale is not None:
            inner_alphas = _scaled_alphas(alphas, alpha_of, loss_scale.reciprocal())
        storage = workspace.lookahead_storage(selected_params) if workspace and first_order else None
        w_prime = lookahead(selected_params, g_selected, inner_alphas, storage, finite)
    # second order: each w'_k is freed once task j's backward pass is done with it
    with torch.enable_grad(), swapped_storage(selected_params, w_prime, release_early=not first_order):
        loss_j = evaluate_loss(closure_j, "j")
        grads_j = differentiate(loss_j, params, loss_scale, "j", create_graph=False)
    del w_prime

    with torch.no_grad():
        if average is not None:
            loss_j, *grads_j = average([loss_j.detach(), *grads_j], [loss_j, *params])
        else:  # read only, unless the Hessian term's vectors take their storage
            grads_j = list(grads_j) if first_order else _writable(list(grads_j), params)
        scale = -eta if loss_scale is None else -eta / loss_scale
        alpha_result = None
        if alpha_grads:
            h_selected = [
                h if (h := grads_j[k]) is not None else torch.zeros_like(params[k]) for k in selected
            ]
            alpha_result = _alpha_gradients(h_selected, g_selected, alphas, alpha_of, scale, workspace)
            del h_selected
        param_grads = _add_terms(values_i, (grads_j, eta))  # g_i + eta * h_j, in g_i's buffers
        if not first_order and selected:
            # -eta * H_i[:, S] (alpha * h_j,S), accumulated into those buffers; the vectors take h_j's
            # storage, and a tensor that task i does not use has no Hessian row
            present = [n for n, k in enumerate(selected) if grads_j[k] is not None and grads_i[k] is not None]
            if present:
                vectors = [grads_j[selected[n]] for n in present]
                _scale_by(vectors, [step_alphas[n] for n in present])
                torch._foreach_mul_(vectors, scale)
                outputs = [grads_i[selected[n]] for n in present]
                del grads_i, grads_j  # the product frees each vector when it is used
                param_grads = _accumulate_hessian_term(outputs, vectors, params, param_grads)
            if average is not None:  # the shared terms are equal everywhere: average the sum
                param_grads = average(param_grads, params)
        objective = torch.add(loss_i, loss_j, alpha=eta)  # eq. (4), detached under no_grad
    return MLTPGradients(objective, loss_i.detach(), loss_j.detach(), param_grads, alpha_result)


def lookahead(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    alphas: Sequence[Tensor],
    out: Optional[Sequence[Tensor]] = None,
    finite: Optional[Tensor] = None,
) -> list[Tensor]:
    """The inner gradient step of eq. (3) / Algorithm 1 line 4: ``w' = w - alpha * g``.

    Each ``alphas[k]`` broadcasts against ``params[k]``.  With ``out`` the result is written into
    those tensors.  With ``finite`` (a device bool) the step is taken only where it is true:
    otherwise ``w' = w``, decided on the device without a host synchronisation.
    """
    if not params:
        return []
    with torch.no_grad():
        large, small = _by_size(params)
        out = list(out) if out is not None else [torch.empty_like(p) for p in params]
        for k in large:  # one pass each (read w and g, write w'), and one more for the guard
            torch.addcmul(params[k], grads[k], alphas[k], value=-1, out=out[k])
            if finite is not None:
                torch.where(finite, out[k], params[k], out=out[k])
        if small:  # a fixed number of launches for all of them
            directions = [grads[k] for k in small]
            if finite is not None:
                directions = _zero_unless(finite, directions)
            torch._foreach_copy_([out[k] for k in small], [params[k] for k in small])
            step_sizes = _foreach_operands([alphas[k] for k in small], [params[k] for k in small])
            torch._foreach_addcmul_([out[k] for k in small], directions, step_sizes, value=-1)
        return out


def _scale_by(tensors: list[Tensor], factors: list[Tensor]) -> None:
    """``tensors[k] *= factors[k]`` in place (each factor broadcasts), a fixed number of launches."""
    large, small = _by_size(tensors)
    for k in large:
        tensors[k].mul_(factors[k])
    if small:
        operands = _foreach_operands([factors[k] for k in small], [tensors[k] for k in small])
        torch._foreach_mul_([tensors[k] for k in small], operands)


def _foreach_operands(factors: list[Tensor], likes: list[Tensor]) -> list[Tensor]:
    """``factors`` ready to be the second operand of a ``_foreach_*`` operation over ``likes``.

    On the CPU ``_foreach_*`` loops over the tensors, and a factor that broadcasts (a per-layer alpha)
    costs nothing extra.  Elsewhere its fused multi-tensor kernel takes only operands of equal shapes,
    and would otherwise launch one kernel per tensor: the factors are then expanded to their tensors'
    shapes in one concatenation (see :func:`_shaped_like`)."""
    return _shaped_like(factors, likes) if _fused_kernels(likes[0]) else factors


def _fused_kernels(tensor: Tensor) -> bool:
    """Whether ``torch._foreach_*`` runs fused multi-tensor kernels on this tensor's device."""
    return tensor.device.type != "cpu"


def _shaped_like(tensors: list[Tensor], likes: list[Tensor]) -> list[Tensor]:
    """``tensors[k]`` broadcast to the shape of ``likes[k]`` and materialised, as views of one block."""
    expanded = [t.expand_as(like) for t, like in zip(tensors, likes)]
    block = _one_block(expanded)
    if block is None:
        return [t.contiguous() for t in expanded]
    return _pieces(block, likes)


def _one_block(tensors: list[Tensor]) -> Optional[Tensor]:
    """The entries of ``tensors`` concatenated into one flat tensor (one operation), or ``None`` when
    they differ in dtype or device."""
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        return None
    return torch.cat([t.reshape(-1) for t in tensors])


def _pieces(block: Tensor, likes: list[Tensor]) -> list[Tensor]:
    """``block`` cut into views shaped like ``likes`` (the inverse of :func:`_one_block`)."""
    return [piece.view_as(like) for piece, like in zip(block.split([like.numel() for like in likes]), likes)]


def _by_size(tensors: Sequence[Tensor]) -> tuple[list[int], list[int]]:
    """The indices of the large tensors (see :data:`~torch_mltp.constants.LARGE_TENSOR`) and of the
    others."""
    large = [k for k, t in enumerate(tensors) if t.numel() >= constants.LARGE_TENSOR]
    if not large:
        return large, list(range(len(tensors)))
    taken = set(large)
    return large, [k for k in range(len(tensors)) if k not in taken]


def _writable(grads: list[Optional[Tensor]], params: Sequence[Tensor]) -> list[Optional[Tensor]]:
    """Gradients that may be written in place: dense, and sharing storage with no other gradient.

    Autograd may return an expanded, stride-0 tensor (``loss + 0 * p.sum()``) or one tensor for
    several parameters (``F.linear(x, w + delta)``); those are copied, laid out like their
    parameter, as ``Tensor.backward`` would accumulate them.
    """
    seen: set[int] = set()
    owned = list(grads)
    for k, g in enumerate(grads):
        if g is None:
            continue
        if g.layout != torch.strided:
            raise ValueError(
                f"parameter {k} received a {g.layout} gradient; MLTP combines dense gradients "
                "(build embeddings with sparse=False)"
            )
        storage = g.data_ptr() - g.storage_offset() * g.element_size()  # where its storage starts
        if storage in seen or not (g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last)):
            owned[k] = torch.empty_like(params[k], memory_format=torch.preserve_format).copy_(g)
        seen.add(storage)
    return owned


def _zero_unless(finite: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` when ``finite`` (a device bool) is true, else zeros, as views of one new block."""

    def zeroed_unless_finite(t: Tensor) -> Tensor:
        return torch.where(finite, t, torch.zeros((), dtype=t.dtype, device=t.device))

    block = _one_block(tensors)
    if block is None:
        return [zeroed_unless_finite(t) for t in tensors]
    return _pieces(zeroed_unless_finite(block), tensors)


def _scaled_alphas(alphas: Sequence[Tensor], alpha_of: Sequence[int], factor: Tensor) -> list[Tensor]:
    scaled = {a: alphas[a] * factor.to(alphas[a].dtype) for a in set(alpha_of)}
    return [scaled[a] for a in alpha_of]


def _accumulate_hessian_term(
    grads_with_graph: list[Tensor],
    vectors: list[Tensor],
    params: Sequence[Tensor],
    targets: list[Optional[Tensor]],
) -> list[Optional[Tensor]]:
    """``targets[k] += d<g_i,S, v>/dw_k`` (``H_i[:, S] v``) for every parameter, in place.

    The product is the gradient of the scalar ``<g_i,S, v>``, taken by ``autograd.backward`` with
    ``targets`` standing in as the parameters' ``.grad``: autograd adds each contribution as it is
    computed, no parameter-sized result is held beside the targets, and each ``v`` is freed as soon
    as its inner product has been differentiated (``vectors`` is emptied; ``None`` targets receive
    new tensors).  The parameters' own ``.grad`` is put back afterwards.  With post-accumulate-grad
    hooks on a parameter, which must not see these partial sums, the product is taken apart with
    ``autograd.grad`` and then added.
    """
    with torch.enable_grad():
        pairs = [(g, v) for g, v in zip(grads_with_graph, vectors) if g.requires_grad]
        vectors.clear()
        if not pairs:  # L_i is linear in the selected parameters: the Hessian block is zero
            return targets
        inner = torch.stack([_inner_product(g, v) for g, v in pairs]).sum()
        del pairs
    try:
        if any(getattr(p, "_post_accumulate_grad_hooks", None) for p in params):
            terms = torch.autograd.grad(inner, params, allow_unused=True)
            return _add_terms(targets, (terms, 1.0))
        saved = [p.grad for p in params]
        try:
            for param, target in zip(params, targets):
                param.grad = target
            torch.autograd.backward(inner, inputs=list(params))
            return [p.grad for p in params]
        finally:
            for param, grad in zip(params, saved):
                param.grad = grad
    except RuntimeError as err:
        raise_if_not_twice_differentiable(err)
        raise


def _inner_product(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` without a product-sized temporary when both are laid out alike."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.vdot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum()


def _add_terms(
    base: list[Optional[Tensor]], *terms: tuple[Sequence[Optional[Tensor]], float]
) -> list[Optional[Tensor]]:
    """``base[k] + sum(scale * term[k])`` per tensor, absent entries read as zero.

    Accumulates into ``base`` (owned tensors, see :func:`_writable`) in place, one fused ``_foreach``
    call per term for the usual case where every entry is present.
    """
    combined = list(base)
    for values, scale in terms:
        both = [k for k, (b, t) in enumerate(zip(combined, values)) if b is not None and t is not None]
        if both:
            torch._foreach_add_([combined[k] for k in both], [values[k] for k in both], alpha=scale)
        for k, value in enumerate(values):
            if value is not None and combined[k] is None:
                combined[k] = value * scale
    return combined


def _alpha_gradients(
    h_selected: Sequence[Tensor],
    g_selected: Sequence[Tensor],
    alphas: Sequence[Tensor],
    alpha_of: Sequence[int],
    scale: float | Tensor,
    workspace: Optional[Workspace],
) -> list[Optional[Tensor]]:
    """``dJ/dalpha = -eta * <h_j, g_i>`` over the entries each alpha scales (``scale`` is ``-eta``,
    divided by the loss scale when the gradients are scaled); ``None`` for an alpha that scales no
    tensor of this step.

    Scalar alphas whose tensors come in alpha order (as :class:`~torch_mltp.MLTPOptimizer` lays them
    out) take one segmented sum over the concatenated products, a fixed number of operations however
    many tensors there are; the segments' lengths are kept in the ``workspace``.
    """
    grads: list[Optional[Tensor]] = [None] * len(alphas)
    if not h_selected:
        return grads
    used = set(alpha_of)
    segmented = workspace.segmented if workspace is not None else None
    if segmented is None:
        segmented = (
            all(alphas[a].dim() == 0 for a in used)
            and all(a <= b for a, b in zip(alpha_of, alpha_of[1:]))
            and len({h.device for h in h_selected}) == 1
        )
        if workspace is not None:
            workspace.segmented = segmented
    if not segmented:
        for h, g, a in zip(h_selected, g_selected, alpha_of):
            product = torch.vdot(h.reshape(-1), g.reshape(-1)) if alphas[a].dim() == 0 else h * g
            grads[a] = product if grads[a] is None else grads[a] + product
        return [None if g is None else g * scale for g in grads]
    large, small = _by_size(h_selected)
    segments = workspace.segments if workspace is not None else None
    if segments is None:
        lengths = [0] * len(alphas)
        for n in small:
            lengths[alpha_of[n]] += h_selected[n].numel()
        segments = torch.tensor(lengths, device=h_selected[0].device)
        if workspace is not None:
            workspace.segments = segments
    small_products = torch._foreach_mul([h_selected[n] for n in small], [g_selected[n] for n in small])
    products = torch.cat([p.reshape(-1) for p in small_products]) if small else h_selected[0].new_zeros(0)
    # unsafe: the lengths add up by construction, and checking them would synchronise with the device
    per_alpha = torch.segment_reduce(products, "sum", lengths=segments, unsafe=True)
    for n in large:
        per_alpha[alpha_of[n]].add_(_inner_product(h_selected[n], g_selected[n]))  # += would copy it back
    values = (per_alpha * scale).unbind()
    return [values[a] if a in used else None for a in range(len(alphas))]


def _detached(grad: Optional[Tensor]) -> Optional[Tensor]:
    return None if grad is None else grad.detach()
