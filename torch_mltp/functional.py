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

Two optional inputs serve mixed precision and data parallelism without changing the math:

* ``loss_scale`` (a tensor ``s``, as ``torch.amp.GradScaler`` uses): both losses are multiplied by
  ``s`` before they are differentiated; the lookahead moves by the unscaled ``g_i`` and every
  returned gradient is ``s`` times its true value, ready for ``GradScaler.unscale_``.
* ``average`` (a function that averages gradients over processes): the tasks are then the unions
  of every process's task i and task j, and ``g_i``, ``h_j`` and the Hessian term are averaged
  before they are used, so every process computes the gradients of the union.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

Closure = Callable[[], Tensor]
Average = Callable[[Sequence[Optional[Tensor]], Sequence[Tensor]], list[Optional[Tensor]]]
"""``average(tensors, like)``: the mean over processes of each ``tensors[k]`` (``None`` reads as
zeros shaped like ``like[k]``; it stays ``None`` when it is ``None`` in every process)."""


class Workspace(NamedTuple):
    """What a caller may keep from step to step to save work: storage for ``w'`` (first order) and
    the alphas' segment lengths on the device (see :func:`_alpha_gradients`)."""

    lookahead: Optional[Sequence[Tensor]] = None
    alpha_segments: Optional[Tensor] = None


class MLTPGradients(NamedTuple):
    """Everything one MLTP step computes; every tensor is detached.

    ``param_grads[k]`` is ``dJ/dw_k`` (``None`` when ``w_k`` is used by neither loss) and
    ``alpha_grads[a]`` is ``dJ/dalpha_a`` (``None`` when no tensor scaled by ``alpha_a`` was
    shifted; the whole list is ``None`` when the alphas' gradients were not asked for).
    With a ``loss_scale`` the gradients are scaled by it; ``objective``, ``loss_i`` and ``loss_j``
    never are.
    """

    objective: Tensor
    loss_i: Tensor
    loss_j: Tensor
    param_grads: list[Optional[Tensor]]
    alpha_grads: Optional[list[Optional[Tensor]]]


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
            "forward pass with autograd enabled and must not call .detach()"
        )
    return loss if loss.dim() == 0 else loss.reshape(())


def lookahead(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    alphas: Sequence[Tensor],
    out: Optional[Sequence[Tensor]] = None,
    finite: Optional[Tensor] = None,
) -> list[Tensor]:
    """The inner gradient step of eq. (3) / Algorithm 1 line 4: ``w' = w - alpha * g``.

    Each ``alphas[k]`` broadcasts against ``params[k]`` (a scalar per layer or tensor, or one
    value per element).  With ``out`` the result is written into those tensors and they are
    returned.  With ``finite`` (a device bool) the step is taken only where it is true: otherwise
    ``w' = w``, decided on the device without a host synchronisation.
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
    """``tensors[k]`` broadcast to the shape of ``likes[k]`` and materialised, as views of one block.

    A fused ``_foreach_*`` kernel takes only operands of equal shapes; a per-layer alpha (a scalar)
    would send it down its one-launch-per-tensor path.  One concatenation writes all of them."""
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


LARGE_TENSOR = 2**20
"""Tensors of at least this many entries are processed one by one, without temporaries: for them a
kernel launch costs less than an extra pass over memory.  Smaller ones are batched into a fixed
number of fused operations (``torch._foreach_*``), however many there are."""


def _by_size(tensors: Sequence[Tensor]) -> tuple[list[int], list[int]]:
    """The indices of the large tensors (see :data:`LARGE_TENSOR`) and of the others."""
    large = [k for k, t in enumerate(tensors) if t.numel() >= LARGE_TENSOR]
    taken = set(large)
    return large, [k for k in range(len(tensors)) if k not in taken]


EARLY_RELEASE_FROM = 2**16
"""Entries from which :func:`swapped_storage` hands a parameter's storage back early: a hook costs the
host several microseconds per tensor and step, more than freeing a smaller value a little earlier is
worth (biases and normalisation weights keep theirs to the end of the block)."""


@contextmanager
def swapped_storage(
    params: Sequence[Tensor], values: list[Tensor], release_early: bool = False
) -> Iterator[None]:
    """Make each ``params[k]`` hold ``values[k]`` inside the block; restore the originals after.

    The swap exchanges storage (``.data``), so the restore is exact and copies nothing, and
    autograd's leaves (and a module's references to them) stay the same objects.

    With ``release_early`` each parameter of at least :data:`EARLY_RELEASE_FROM` entries gets its own
    storage back as soon as autograd has computed its gradient inside the block (all of its uses are
    then differentiated), and ``values`` is emptied: a value that nothing else holds is freed during
    the backward pass, not after it.
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
                if p.numel() >= EARLY_RELEASE_FROM
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
    *,
    loss_scale: Optional[Tensor] = None,
    average: Optional[Average] = None,
    guard_lookahead: bool = False,
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
        loss_scale: differentiate ``s * L`` instead of ``L`` (mixed precision); the returned
            gradients are scaled, the lookahead is not.  When a scaled ``g_i`` is not finite the
            lookahead is skipped (``w' = w``) so that task j's forward pass sees sane weights;
            the non-finite gradients are still returned for the scaler to see.
        average: averages gradients over processes whose tasks together form task i and task j.
        guard_lookahead: when ``g_i`` is not finite, run task j at ``w`` (``w' = w``, decided on the
            device) so that its forward pass, and BatchNorm's running statistics, never see
            non-finite weights; always on with ``loss_scale``.
    """
    return _mltp_gradients(
        closure_i,
        closure_j,
        list(params),
        shifted,
        alphas,
        alpha_of,
        eta,
        first_order,
        alpha_grads=alpha_grads,
        loss_scale=loss_scale,
        average=average,
        guard_lookahead=guard_lookahead,
        workspace=Workspace(),
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
    *,
    alpha_grads: bool,
    loss_scale: Optional[Tensor],
    average: Optional[Average],
    guard_lookahead: bool,
    workspace: Workspace,
) -> MLTPGradients:
    """:func:`mltp_gradients`, with a :class:`Workspace` that the caller keeps between steps."""
    with torch.enable_grad():
        loss_i = evaluate_loss(closure_i, "i")
        grads_i = _differentiate(loss_i, params, loss_scale, "i", create_graph=not first_order)
    shifted_params = [params[k] for k in shifted]
    step_alphas = [alphas[a] for a in alpha_of]
    # From here on only values are combined (no_grad); g_i's graph serves the Hessian term alone.
    with torch.no_grad():
        # without create_graph the gradients carry no graph and need no detached copies of their handles
        values_i = _owned(list(grads_i) if first_order else [_detached(g) for g in grads_i], params)
        if average is not None:
            loss_i, *values_i = average([loss_i.detach(), *values_i], [loss_i, *params])
        g_shift = [_value_or_zeros(values_i[k], params[k]) for k in shifted]
        inner_alphas, finite = step_alphas, None
        if loss_scale is not None or guard_lookahead:
            finite = _finite(g_shift)
        if loss_scale is not None:
            inner_alphas = _scaled_alphas(alphas, alpha_of, loss_scale.reciprocal())
        w_shifted = lookahead(shifted_params, g_shift, inner_alphas, workspace.lookahead, finite)
    # second order: each w'_k is freed once task j's backward pass is done with it (first order keeps
    # its storage from step to step)
    with torch.enable_grad(), swapped_storage(shifted_params, w_shifted, release_early=not first_order):
        loss_j = evaluate_loss(closure_j, "j")
        grads_j = _differentiate(loss_j, params, loss_scale, "j", create_graph=False)
    del w_shifted

    with torch.no_grad():
        if average is not None:
            loss_j, *grads_j = average([loss_j.detach(), *grads_j], [loss_j, *params])
        else:
            grads_j = _owned(list(grads_j), params)
        h_shift = [_value_or_zeros(grads_j[k], params[k]) for k in shifted]
        alpha_result = None
        if alpha_grads:
            scale = -eta if loss_scale is None else -eta / loss_scale
            alpha_result = _alpha_gradients(
                h_shift, g_shift, alphas, alpha_of, scale, workspace.alpha_segments
            )
        param_grads = _combine(values_i, (grads_j, eta))  # g_i + eta * h_j, in g_i's buffers
        if not first_order and shifted:
            # -eta * H_i[:, S] (alpha * h_j,S), accumulated into those buffers; the vectors take h_j's
            vectors = [grads_j[k] for k in shifted]
            present = [n for n, v in enumerate(vectors) if v is not None]
            _scale_by([vectors[n] for n in present], [step_alphas[n] for n in present])
            torch._foreach_mul_(
                [vectors[n] for n in present], -eta if loss_scale is None else -eta / loss_scale
            )
            outputs = [grads_i[k] for k in shifted]
            del grads_i, grads_j, h_shift
            vectors = [vectors[n] for n in present]  # handed over: the product frees each when used
            param_grads = _accumulate_hessian_term(
                [outputs[n] for n in present], vectors, params, param_grads
            )
            if average is not None:  # the shared terms are equal everywhere: average the sum
                param_grads = average(param_grads, params)
        objective = torch.add(loss_i, loss_j, alpha=eta)  # eq. (4), detached under no_grad
    return MLTPGradients(objective, loss_i.detach(), loss_j.detach(), param_grads, alpha_result)


def _differentiate(
    loss: Tensor, params: list[Tensor], loss_scale: Optional[Tensor], task: str, create_graph: bool
) -> tuple[Optional[Tensor], ...]:
    """``d(s * L)/dw`` with messages that name the cause of autograd's usual failures here."""
    scaled = loss if loss_scale is None else loss * loss_scale
    try:
        return torch.autograd.grad(scaled, params, create_graph=create_graph, allow_unused=True)
    except RuntimeError as err:
        if "backward through the graph a second time" in str(err):
            raise RuntimeError(
                f"closure_{task} must return its loss without calling .backward() on it: MLTP "
                "differentiates the loss itself"
            ) from err
        if create_graph and _is_double_backward_failure(err):
            raise RuntimeError(not_twice_differentiable_message(err)) from err
        raise


_DOUBLE_BACKWARD_FAILURES = ("derivative for", "double backward", "donated buffer", "not implemented")


def _is_double_backward_failure(err: RuntimeError) -> bool:
    text = str(err).lower()
    return any(marker in text for marker in _DOUBLE_BACKWARD_FAILURES)


def not_twice_differentiable_message(err: Exception) -> str:
    """Why a second-order step failed inside autograd, and the ways out."""
    text = str(err)
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
    return (
        f"second-order MLTP differentiates the model twice, and autograd cannot: "
        f"{text.splitlines()[0]}. {remedy[0].upper()}{remedy[1:]}"
    )


def _owned(grads: list[Optional[Tensor]], params: Sequence[Tensor]) -> list[Optional[Tensor]]:
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
        if not pairs:  # L_i is linear in the shifted parameters: the Hessian block is zero
            return targets
        inner = torch.stack([_inner_product(g, v) for g, v in pairs]).sum()
        del pairs
    try:
        if any(getattr(p, "_post_accumulate_grad_hooks", None) for p in params):
            terms = torch.autograd.grad(inner, params, allow_unused=True)
            return _combine(targets, (terms, 1.0))
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
        if _is_double_backward_failure(err):
            raise RuntimeError(not_twice_differentiable_message(err)) from err
        raise


def _inner_product(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` without a product-sized temporary when both are laid out alike."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.vdot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum()


def _combine(
    base: list[Optional[Tensor]], *terms: tuple[Sequence[Optional[Tensor]], float]
) -> list[Optional[Tensor]]:
    """``base[k] + sum(scale * term[k])`` per tensor, absent entries read as zero.

    Accumulates into ``base`` (owned tensors, see :func:`_owned`) in place, one fused ``_foreach``
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
    h_shift: Sequence[Tensor],
    g_shift: Sequence[Tensor],
    alphas: Sequence[Tensor],
    alpha_of: Sequence[int],
    scale: float | Tensor,
    segments: Optional[Tensor] = None,
) -> list[Optional[Tensor]]:
    """``dJ/dalpha = -eta * <h_j, g_i>`` over the entries each alpha scales (eq. 4 differentiated).

    ``scale`` is ``-eta`` (divided by the loss scale when the gradients are scaled).  A scalar
    alpha gets the inner product summed over its tensors; an element-wise alpha the element-wise
    product.  An alpha that scales no tensor of this step gets ``None``.

    Scalar alphas whose tensors come in alpha order (as :class:`MLTPOptimizer` lays them out) take
    one segmented sum over the concatenated products, a fixed number of operations however many
    tensors there are; ``segments`` (each alpha's number of entries, on the device) may be passed in.
    """
    grads: list[Optional[Tensor]] = [None] * len(alphas)
    if not h_shift:
        return grads
    used = set(alpha_of)
    segmented = (
        all(alphas[a].dim() == 0 for a in used)
        and all(a <= b for a, b in zip(alpha_of, alpha_of[1:]))
        and len({h.device for h in h_shift}) == 1
    )
    if segmented:
        large, small = _by_size(h_shift)
        if segments is None:
            segments = torch.tensor(
                alpha_segment_lengths(h_shift, alpha_of, len(alphas)), device=h_shift[0].device
            )
        small_products = torch._foreach_mul([h_shift[n] for n in small], [g_shift[n] for n in small])
        products = torch.cat([p.reshape(-1) for p in small_products]) if small else h_shift[0].new_zeros(0)
        # unsafe: the lengths add up by construction, and checking them would synchronise with the device
        per_alpha = torch.segment_reduce(products, "sum", lengths=segments, unsafe=True)
        for n in large:
            per_alpha[alpha_of[n]].add_(_inner_product(h_shift[n], g_shift[n]))  # += would copy it back
        values = (per_alpha * scale).unbind()
        return [values[a] if a in used else None for a in range(len(alphas))]
    for h, g, a in zip(h_shift, g_shift, alpha_of):
        product = torch.vdot(h.reshape(-1), g.reshape(-1)) if alphas[a].dim() == 0 else h * g
        grads[a] = product if grads[a] is None else grads[a] + product
    return [None if g is None else g * scale for g in grads]


def alpha_segment_lengths(shifted: Sequence[Tensor], alpha_of: Sequence[int], num_alphas: int) -> list[int]:
    """How many entries of the batched (not large) tensors in ``shifted`` each alpha scales."""
    lengths = [0] * num_alphas
    for tensor, a in zip(shifted, alpha_of):
        if tensor.numel() < LARGE_TENSOR:
            lengths[a] += tensor.numel()
    return lengths


def _detached(grad: Optional[Tensor]) -> Optional[Tensor]:
    return None if grad is None else grad.detach()


def _value_or_zeros(grad: Optional[Tensor], param: Tensor) -> Tensor:
    return torch.zeros_like(param) if grad is None else grad


def nonfinite_flag(result: MLTPGradients) -> Tensor:
    """1.0 (float32, on the device) when ``L_i``, ``L_j`` or a gradient is not finite, else 0.0."""
    return (~_all_finite(result)).float()


def _all_finite(result: MLTPGradients) -> Tensor:
    """A device bool: every entry of ``L_i``, ``L_j`` and the gradients is finite."""
    return _finite(_quantities(result))


def _quantities(result: MLTPGradients) -> list[Tensor]:
    """``L_i``, ``L_j`` and the gradients of a step (the present ones)."""
    grads = [g for g in (*result.param_grads, *(result.alpha_grads or ())) if g is not None]
    return [result.loss_i, result.loss_j, *grads]


def _finite(tensors: Sequence[Tensor]) -> Tensor:
    """A device bool: every entry of ``tensors`` is finite (no host synchronisation)."""
    return _extremes(tensors).isfinite().all()


def _finite_on_host(tensors: Sequence[Tensor]) -> bool:
    """Every entry of ``tensors`` is finite, read with one synchronisation.

    On the CPU the largest magnitude of the extremes is read (a NaN propagates to it, and it cannot
    overflow), which takes fewer operations than the device bool of :func:`_finite`."""
    extremes = _extremes(tensors)
    if not extremes.is_cpu:
        return bool(extremes.isfinite().all().item())
    return not extremes.numel() or math.isfinite(torch.linalg.vector_norm(extremes, math.inf).item())


def _extremes(tensors: Sequence[Tensor]) -> Tensor:
    """A short 1-D tensor whose entries are all finite exactly when every entry of ``tensors`` is.

    On an accelerator, one fused reduction: the largest magnitude per tensor (it cannot overflow, as a
    norm can).  On the CPU that reduction is neither fused nor vectorised (ten times slower than a sum
    at 2**25 entries), so there the minimum and maximum are taken instead (both are finite exactly when
    every entry is; a NaN propagates to both): one pair over the concatenated small tensors, one pair
    per large tensor (see :data:`LARGE_TENSOR`), which is never copied."""
    if not tensors:
        return torch.zeros(0)
    if not all(t.is_cpu for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, ord=math.inf))
    large, small = _by_size(tensors)
    extremes = [e for k in large for e in torch.aminmax(tensors[k])]
    pieces = [tensors[k].reshape(-1) for k in small if tensors[k].numel()]
    if pieces:
        extremes.extend(torch.aminmax(torch.cat(pieces)))
    return torch.stack(extremes) if extremes else torch.zeros(0)


def first_nonfinite(result: MLTPGradients) -> Optional[str]:
    """Name the first non-finite quantity of a step (``"L_i"``, ``"L_j"``, a gradient), else ``None``.

    One fused reduction decides the common, all-finite case; only a failure pays for a search.
    """
    if _finite_on_host(_quantities(result)):
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
