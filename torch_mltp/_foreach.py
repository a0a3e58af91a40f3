"""The operations the fast path of an MLTP step is made of (:func:`torch_mltp.functional.multi_tensor_mltp`):
each takes lists of tensors and costs a number of kernel launches that does not grow with their number.

* Tensors are grouped by device and dtype once per layout (:class:`Workspace`), as ``torch.optim.Adam``'s
  foreach path groups them, and every operation runs group by group.
* Within a group, tensors of :data:`~torch_mltp.constants.LARGE_TENSOR` entries or more are processed one by
  one without temporaries (a launch costs less than an extra pass over memory); the others are batched
  into fused ``torch._foreach_*`` operations.
* Inner products of half-precision tensors are summed in float32.
* The finiteness checks of a step's results (:func:`all_finite` on the device, :func:`finite_on_host` on the
  host) read every tensor with a fixed number of reductions.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, cast

import torch
from torch import Tensor

from . import constants

_ACCUMULATE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
"""The dtype that sums of a dtype's entries accumulate in (itself unless listed)."""


# -- grouping ----------------------------------------------------------------------------------------
class Group(NamedTuple):
    """The indices of the tensors of one device and dtype, split by size (see the module docstring), and
    whether ``torch._foreach_*`` runs fused multi-tensor kernels on that device."""

    large: list[int]
    small: list[int]
    fused: bool


class AlphaGroup(NamedTuple):
    """The selected tensors of one device and dtype, as the sums of ``dJ/dalpha`` need them."""

    scalar_large: list[int]
    """positions (into ``selected``) of large tensors whose alpha is a scalar: one inner product each"""
    scalar_small: list[int]
    """positions of the small ones, ordered by alpha: their products form one segmented sum"""
    segments: Optional[Tensor]
    """how many entries of the concatenated small products each alpha sums (on the group's device)"""
    size: int
    """the number of those entries"""
    elementwise: list[int]
    """positions of tensors whose alpha has their shape: the products themselves"""


def grouped(tensors: Sequence[Tensor]) -> list[Group]:
    """The indices of ``tensors`` grouped by device and dtype (as
    ``Optimizer._group_tensors_by_device_and_dtype`` groups them) and split by size."""
    if not tensors:
        return []
    by_kind = torch.optim.Optimizer._group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    groups = []
    for _, indices in by_kind.values():
        large = [k for k in indices if tensors[k].numel() >= constants.LARGE_TENSOR]
        small = [k for k in indices if tensors[k].numel() < constants.LARGE_TENSOR]
        groups.append(Group(large, small, _fused_kernels(tensors[indices[0]])))
    return groups


class Workspace:
    """What the fast path derives from a step's tensors and keeps for the next step with the same tensors:
    their groups, and storage for ``w'`` (first order).  A cache: a fresh one gives the same results."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self.param_groups: list[Group] = []
        self.selected_groups: list[Group] = []
        self.alpha_groups: list[AlphaGroup] = []
        self._lookahead: list[Tensor] = []

    def prepare(
        self,
        params: Sequence[Tensor],
        selected: Sequence[int],
        alphas: Sequence[Tensor],
        alpha_of: Sequence[int],
    ) -> Workspace:
        """Group the tensors, unless they are the ones this workspace was prepared for."""
        key = (*map(id, params), *selected, *alpha_of, *(a.dim() for a in alphas))
        if key != self._key:
            chosen = [params[k] for k in selected]
            self.param_groups, self.selected_groups = grouped(params), grouped(chosen)
            self.alpha_groups = [_alpha_group(g, chosen, alphas, alpha_of) for g in self.selected_groups]
            self._key, self._lookahead = key, []
        return self

    def lookahead_storage(self, params: Sequence[Tensor]) -> list[Tensor]:
        """Storage shaped like ``params``, reused while they keep their shape, dtype and device."""
        kept = self._lookahead
        if len(kept) != len(params) or any(
            b.shape != p.shape or b.dtype != p.dtype or b.device != p.device for b, p in zip(kept, params)
        ):
            kept[:] = [torch.empty_like(p, requires_grad=False) for p in params]
        return kept


def _alpha_group(
    group: Group, chosen: list[Tensor], alphas: Sequence[Tensor], alpha_of: Sequence[int]
) -> AlphaGroup:
    positions = sorted(group.large + group.small)
    scalar = [n for n in positions if alphas[alpha_of[n]].dim() == 0]
    large, small = [n for n in scalar if n in group.large], [n for n in scalar if n not in group.large]
    small.sort(key=lambda n: alpha_of[n])  # each alpha's products consecutive: one segment each
    segments = None
    if small:
        lengths = [0] * len(alphas)
        for n in small:
            lengths[alpha_of[n]] += chosen[n].numel()
        segments = torch.tensor(lengths, device=chosen[small[0]].device)
    elementwise = [n for n in positions if alphas[alpha_of[n]].dim() > 0]
    return AlphaGroup(large, small, segments, sum(chosen[n].numel() for n in small), elementwise)


# -- the lookahead (eq. 3) -----------------------------------------------------------------------------
def lookahead(
    groups: Sequence[Group],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    step_sizes: Sequence[Tensor],
    out: Optional[Sequence[Tensor]] = None,
    finite: Optional[Tensor] = None,
) -> list[Tensor]:
    """``w' = w - alpha * g`` (eq. 3, Algorithm 1 line 4), into ``out`` if given; ``groups`` group ``params``.

    Each ``step_sizes[k]`` broadcasts against ``params[k]``.  With ``finite`` (a device bool) the step is
    taken only where it is true, otherwise ``w' = w``, decided on the device without a synchronisation.
    """
    with torch.no_grad():
        out = list(out) if out is not None else [torch.empty_like(p) for p in params]
        for group in groups:
            for k in group.large:  # one pass each (read w and g, write w'), and one more for the guard
                torch.addcmul(params[k], grads[k], step_sizes[k], value=-1, out=out[k])
                if finite is not None:
                    torch.where(finite, out[k], params[k], out=out[k])
            if group.small:
                small = group.small
                directions = [grads[k] for k in small]
                if finite is not None:
                    directions = _zero_unless(finite, directions)
                targets, origins = [out[k] for k in small], [params[k] for k in small]
                torch._foreach_copy_(targets, origins)
                factors = [step_sizes[k] for k in small]
                torch._foreach_addcmul_(
                    targets, directions, _expanded(factors, origins) if group.fused else factors, value=-1
                )
        return out


def scale_by(groups: Sequence[Group], tensors: list[Tensor], factors: Sequence[Tensor]) -> None:
    """``tensors[k] *= factors[k]`` in place (each factor broadcasts)."""
    for group in groups:
        for k in group.large:
            tensors[k].mul_(factors[k])
        if group.small:
            targets, operands = [tensors[k] for k in group.small], [factors[k] for k in group.small]
            torch._foreach_mul_(targets, _expanded(operands, targets) if group.fused else operands)


def _expanded(factors: list[Tensor], likes: list[Tensor]) -> list[Tensor]:
    """``factors`` broadcast to the shapes of ``likes`` (one group), in one concatenation.

    On the CPU ``_foreach_*`` loops over the tensors, and a factor that broadcasts (a per-layer alpha) costs
    nothing extra.  Elsewhere the fused kernel takes only operands of equal shapes and would otherwise launch
    one kernel per tensor: there the factors are expanded first."""
    block = torch.cat([f.to(like.dtype).expand_as(like).reshape(-1) for f, like in zip(factors, likes)])
    return _pieces(block, likes)


def _fused_kernels(tensor: Tensor) -> bool:
    """Whether ``torch._foreach_*`` runs fused multi-tensor kernels on this tensor's device."""
    return tensor.device.type != "cpu"


def _pieces(block: Tensor, likes: Sequence[Tensor]) -> list[Tensor]:
    """``block`` cut into views shaped like ``likes``."""
    return [piece.view_as(like) for piece, like in zip(block.split([like.numel() for like in likes]), likes)]


def _zero_unless(finite: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` (one group) when ``finite`` (a device bool) is true, else zeros, as views of one block."""
    block = torch.cat([t.reshape(-1) for t in tensors])
    return _pieces(
        torch.where(finite, block, torch.zeros((), dtype=block.dtype, device=block.device)), tensors
    )


# -- dJ/dalpha ----------------------------------------------------------------------------------------------
def alpha_gradients(
    groups: Sequence[AlphaGroup],
    h_selected: Sequence[Tensor],
    g_selected: Sequence[Tensor],
    alphas: Sequence[Tensor],
    alpha_of: Sequence[int],
    scale: float | Tensor,
) -> list[Optional[Tensor]]:
    """``scale * <h, g>`` over the entries each alpha scales, in the alpha's dtype; ``None`` for an alpha that
    scales no tensor of this step.

    Scalar alphas take, per group, one segmented sum over the concatenated products of the small tensors and
    one inner product per large tensor, all in float32 for half precision; alphas shaped like their tensors
    take the products themselves.
    """
    sums: Optional[Tensor] = None  # one entry per alpha, summed over the groups
    products: list[Optional[Tensor]] = [None] * len(alphas)
    for group in groups:
        if group.scalar_small:  # the products of the small tensors concatenated, summed per alpha
            hs, gs = [h_selected[n] for n in group.scalar_small], [g_selected[n] for n in group.scalar_small]
            accumulate = _ACCUMULATE.get(hs[0].dtype)
            if accumulate is None:
                products_block = torch.cat([p.reshape(-1) for p in torch._foreach_mul(hs, gs)])
            else:  # half precision: the factors in float32, so that no product is rounded or underflows
                products_block = hs[0].new_empty(group.size, dtype=accumulate)
                torch.cat([h.reshape(-1) for h in hs], out=products_block)
                products_block.mul_(
                    torch.cat([g.reshape(-1) for g in gs], out=torch.empty_like(products_block))
                )
            # unsafe: the lengths add up by construction, and checking them would synchronise with the device
            group_sums = torch.segment_reduce(products_block, "sum", lengths=group.segments, unsafe=True)
            sums = group_sums if sums is None else sums.to(group_sums.device) + group_sums
        for n in group.scalar_large:
            sums = _add_at(sums, alpha_of[n], _dot(h_selected[n], g_selected[n]), len(alphas))
        for n in group.elementwise:
            a = alpha_of[n]
            product, previous = h_selected[n] * g_selected[n], products[a]
            products[a] = product if previous is None else previous + product
    used = set(alpha_of)
    values = (sums * scale).unbind() if sums is not None else ()
    grads: list[Optional[Tensor]] = [
        (values[a] if alphas[a].dim() == 0 else cast(Tensor, products[a]) * scale) if a in used else None
        for a in range(len(alphas))
    ]
    return [
        g if g is None or g.dtype == alpha.dtype else g.to(alpha.dtype) for g, alpha in zip(grads, alphas)
    ]


def _add_at(sums: Optional[Tensor], index: int, value: Tensor, size: int) -> Tensor:
    if sums is None:
        sums = value.new_zeros(size)
    sums[index] += value.to(sums.device, sums.dtype)
    return sums


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` without a temporary of their size; half precision in float32, a block at a time."""
    if a.dtype not in _ACCUMULATE:
        return inner_product(a, b)
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    blocks = zip(flat_a.split(constants.LARGE_TENSOR), flat_b.split(constants.LARGE_TENSOR))
    return torch.stack([torch.dot(x.float(), y.float()) for x, y in blocks]).sum()


def inner_product(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` without a product-sized temporary when both are laid out alike."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.vdot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum()


# -- dJ/dw ------------------------------------------------------------------------------------------------
def add_scaled(
    groups: Sequence[Group], base: list[Optional[Tensor]], term: Sequence[Optional[Tensor]], scale: float
) -> list[Optional[Tensor]]:
    """``base[k] + scale * term[k]`` per tensor, absent entries read as zero, accumulated into ``base`` in
    place (owned tensors, see :func:`owned`)."""
    combined = list(base)
    present, terms = cast("list[Tensor]", combined), cast("Sequence[Tensor]", term)  # read at ``both`` only
    for group in groups:
        both = [k for k in group.large + group.small if combined[k] is not None and term[k] is not None]
        if both:
            torch._foreach_add_([present[k] for k in both], [terms[k] for k in both], alpha=scale)
    for k, value in enumerate(term):
        if value is not None and combined[k] is None:
            combined[k] = value * scale
    return combined


def owned(grads: Sequence[Optional[Tensor]], params: Sequence[Tensor]) -> list[Optional[Tensor]]:
    """Gradients that may be written in place: dense, laid out densely, and overlapping no other gradient.

    Autograd may return an expanded, stride-0 tensor (``loss + 0 * p.sum()``) or one tensor for several
    parameters (``F.linear(x, w + delta)``); those are copied, laid out like their parameter, as
    ``Tensor.backward`` would accumulate them.  Views of one block at distinct offsets (averaged gradients)
    are kept.
    """
    result = list(grads)
    spans = []
    for k, g in enumerate(grads):
        if g is None:
            continue
        if g.layout != torch.strided:
            raise ValueError(
                f"parameter {k} received a {g.layout} gradient; MLTP combines dense gradients "
                "(build embeddings with sparse=False)"
            )
        if g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last):
            spans.append((g.data_ptr(), g.data_ptr() + g.numel() * g.element_size(), k))
        else:
            result[k] = _copy_like(g, params[k])
    end = None
    for start, stop, k in sorted(spans):
        if end is not None and start < end:  # overlaps a gradient before it
            result[k] = _copy_like(cast(Tensor, result[k]), params[k])
        else:
            end = stop if end is None else max(end, stop)
    return result


def _copy_like(grad: Tensor, param: Tensor) -> Tensor:
    return torch.empty_like(param, memory_format=torch.preserve_format).copy_(grad)


def accumulate_hessian_term(
    grads_with_graph: list[Tensor],
    vectors: list[Tensor],
    params: Sequence[Tensor],
    targets: list[Optional[Tensor]],
) -> list[Optional[Tensor]]:
    """``targets[k] += d<g_i,S, v>/dw_k`` (``H_i[:, S] v``) for every parameter, in place.

    The product is the gradient of the scalar ``<g_i,S, v>``, taken by ``autograd.backward`` with ``targets``
    standing in as the parameters' ``.grad``: autograd adds each contribution as it is computed, no
    parameter-sized result is held beside the targets, and each ``v`` is freed as soon as its inner product
    has been differentiated (``vectors`` is emptied; ``None`` targets receive new tensors).  The parameters'
    own ``.grad`` is put back afterwards.  With post-accumulate-grad hooks on a parameter, which must not see
    these partial sums, the product is taken with ``autograd.grad`` and then added.
    """
    with torch.enable_grad():
        pairs = [(g, v) for g, v in zip(grads_with_graph, vectors) if g.requires_grad]
        vectors.clear()
        if not pairs:  # L_i is linear in the selected parameters: the Hessian block is zero
            return targets
        inner = torch.stack([inner_product(g, v) for g, v in pairs]).sum()
        del pairs
    if any(getattr(p, "_post_accumulate_grad_hooks", None) for p in params):
        terms = torch.autograd.grad(inner, params, allow_unused=True)
        combined = list(targets)
        for k, term in enumerate(terms):
            if term is not None:
                previous = combined[k]
                combined[k] = term if previous is None else previous.add_(term)
        return combined
    saved = [p.grad for p in params]
    try:
        for param, target in zip(params, targets):
            param.grad = target
        torch.autograd.backward(inner, inputs=list(params))
        return [p.grad for p in params]
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad


# -- finiteness ------------------------------------------------------------------------------------------
def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """A device bool: every entry of ``tensors`` is finite (no host synchronisation)."""
    return _bounds(tensors).isfinite().all()


def finite_on_host(tensors: Sequence[Tensor]) -> bool:
    """Every entry of ``tensors`` is finite, read with one synchronisation.

    On the CPU a sum decides the common case in one reduction: a NaN or an infinity propagates to it, so a
    finite sum means finite entries.  A sum that is not finite (a non-finite entry, or finite entries whose
    sum overflows), and an accelerator's tensors, are read exactly through :func:`_bounds`."""
    if not tensors:
        return True
    if all(t.is_cpu for t in tensors):  # the sum of every entry: small tensors concatenated, large ones alone
        small, sums = [], []
        for t in _real(tensors):
            if t.numel() < constants.LARGE_TENSOR:
                small.append(t.reshape(-1))
            else:
                sums.append(t.sum(dtype=_ACCUMULATE.get(t.dtype)))
        if small:
            block = torch.cat(small)
            sums.append(block.sum(dtype=_ACCUMULATE.get(block.dtype)))
        if math.isfinite((sums[0] if len(sums) == 1 else torch.stack(sums).sum()).item()):
            return True
    return bool(_bounds(tensors).isfinite().all().item())


def _real(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Complex tensors as pairs of real entries (finite when both parts are)."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _bounds(tensors: Sequence[Tensor]) -> Tensor:
    """A short 1-D tensor whose entries are all finite exactly when every entry of ``tensors`` is.

    On an accelerator, one fused reduction: the largest magnitude per tensor (it cannot overflow, as a norm
    can).  On the CPU that reduction is neither fused nor vectorised, so there the minimum and maximum are
    taken instead (both are finite exactly when every entry is; a NaN propagates to both): one pair over the
    concatenated small tensors, one pair per large tensor, which is never copied."""
    tensors = _real(tensors)
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
