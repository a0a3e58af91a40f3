"""One process: the :class:`LocalBackend`, and :class:`AlphaStore`, the alphas as every process holds them
whole (this backend and DDP's).

The alphas are stored flat, one tensor per device and dtype, and seen per layer through views.  The base
optimizer updates one tensor (a *bucket*) instead of one tiny tensor per layer, which keeps the cost of
learning the alphas independent of the number of layers.  ``views[name]`` is the alpha of one layer (or
tensor, or element block) as a view of its bucket: reading it, or its ``.grad`` after a backward pass, gives
that layer's part.

A layer that receives no gradient in a step (frozen) must not move, although its bucket does:
:meth:`AlphaStore.hold` puts the values and the per-element optimizer state of such alphas back after the
base step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional import Average, mltp_gradients
from .backend import Backend, Outcome, Step


class LocalBackend(Backend):
    """One process: the step of :func:`torch_mltp.functional.mltp_gradients` on the layout's path."""

    average_tasks: Optional[Average] = None
    """averages the tasks' gradients over processes (``tasks="global"`` under DDP)"""

    def make_alphas(self, *args: Any) -> AlphaStore:
        return AlphaStore(*args)

    def gradients(self, step: Step) -> Outcome:
        layout = step.layout
        scale = None
        if step.scaler is not None or step.weight != 1.0:  # in float32 at least: weight is not rounded
            one = torch.ones(
                (), dtype=torch.promote_types(layout.dtype, torch.float32), device=layout.params[0].device
            )
            scale = (one if step.scaler is None else step.scaler.scale(one)) * step.weight
        result = mltp_gradients(
            step.closure_i,
            step.closure_j,
            layout.params,
            layout.selected,
            step.alphas,
            layout.alpha_of,
            step.eta,
            step.first_order,
            alpha_grads=step.alpha_grads,
            loss_scale=scale,
            average=self.average_tasks,
            guard_lookahead=step.guard_lookahead,
            foreach=layout.foreach,
            workspace=layout.workspace,
        )
        return Outcome(result)


class Span(NamedTuple):
    """Where an alpha lives: its bucket, its slice there, and its shape."""

    bucket: int
    start: int
    stop: int
    shape: torch.Size


class AlphaStore:
    """The alphas of one optimizer: ``buckets`` (leaves the base optimizer updates) and ``views``.

    ``shapes[a]`` and ``likes[a]`` give alpha ``a``'s shape and the tensor whose device and dtype it
    takes; values are drawn in order from ``N(mean, std)`` and clamped to ``[minimum, maximum]``
    (``None``: no bound).
    """

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        likes: Sequence[Tensor],
        mean: float,
        std: float,
        minimum: Optional[float],
        maximum: Optional[float],
        learn: bool,
    ):
        kinds: dict[tuple[torch.device, torch.dtype], int] = {}
        sizes: list[int] = []
        self.spans: list[Span] = []
        for shape, like in zip(shapes, likes):
            bucket = kinds.setdefault((like.device, like.dtype), len(kinds))
            if bucket == len(sizes):
                sizes.append(0)
            numel = torch.Size(shape).numel()
            self.spans.append(Span(bucket, sizes[bucket], sizes[bucket] + numel, torch.Size(shape)))
            sizes[bucket] += numel
        self.buckets = [
            torch.empty(size, dtype=dtype, device=device) for (device, dtype), size in zip(kinds, sizes)
        ]
        self.names = list(names)
        self.views = self._make_views()
        self.members = _members(self.spans, len(self.buckets))
        with torch.no_grad():
            for view in self.views.values():
                view.normal_(mean, std) if std > 0 else view.fill_(mean)
            self.clamp(minimum, maximum)
        for storage in self.buckets:
            storage.requires_grad_(learn)

    def _make_views(self) -> dict[str, Tensor]:
        views = {
            name: self.buckets[span.bucket].detach()[span.start : span.stop].view(span.shape)
            for name, span in zip(self.names, self.spans)
        }
        self.values = list(views.values())
        """The alphas in order (the views)."""
        return views

    def __getstate__(self) -> dict:
        return {"names": self.names, "spans": self.spans, "buckets": self.buckets}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.views = self._make_views()  # pickle does not keep views aliased with their base
        self.members = _members(self.spans, len(self.buckets))

    def clamp(self, minimum: Optional[float], maximum: Optional[float]) -> None:
        """Keep every alpha in ``[minimum, maximum]``; a ``None`` bound is not applied."""
        with torch.no_grad():
            if minimum is not None:
                torch._foreach_clamp_min_(self.buckets, minimum)
            if maximum is not None:
                torch._foreach_clamp_max_(self.buckets, maximum)

    def broadcast_from_first_rank(self, process_group: Any) -> None:
        """Overwrite the alphas in every process of the group with the values of its first process."""
        source = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        with torch.no_grad():
            for bucket in self.buckets:
                dist.broadcast(bucket.data, src=source, group=process_group)

    # -- gradients -----------------------------------------------------------------------------
    def accumulate(self, grads: Sequence[Optional[Tensor]], received: set) -> None:
        """Add per-alpha gradients (``None``: none) to their buckets' ``.grad``, as autograd accumulates, and
        give each view its part; ``received`` (updated) holds the indices of the alphas that have one."""
        for bucket, members in zip(self.buckets, self.members):
            if all(grads[a] is None for a in members):
                continue
            parts = [self._zeros(a) if (g := grads[a]) is None else g for a in members]
            if all(part.dim() == 0 for part in parts):
                whole = torch.stack(parts)
            else:
                whole = torch.cat([part.reshape(-1) for part in parts])
            if whole.dtype != bucket.dtype:
                whole = whole.to(bucket.dtype)
            if bucket.grad is None:
                bucket.grad = whole
            else:
                bucket.grad.add_(whole)
        received.update(a for a, g in enumerate(grads) if g is not None)
        self.publish_gradients(received)

    def _zeros(self, a: int) -> Tensor:
        bucket = self.buckets[self.spans[a].bucket]
        return torch.zeros(self.spans[a].shape, dtype=bucket.dtype, device=bucket.device)

    def publish_gradients(self, received: set) -> None:
        """Give each view the matching part of its bucket's ``.grad``; ``None`` for the alphas that
        received no gradient (``received`` holds the indices of those that did)."""
        views = list(self.views.values())
        for bucket, members in zip(self.buckets, self.members):
            grad = bucket.grad
            parts: Optional[Sequence[Tensor]] = None
            if grad is not None:  # the bucket's gradient cut into its alphas' views, in one operation
                spans = [self.spans[a] for a in members]
                if all(span.shape == torch.Size() for span in spans):
                    parts = grad.unbind()
                else:
                    pieces = grad.split([span.stop - span.start for span in spans])
                    parts = [piece.view(span.shape) for piece, span in zip(pieces, spans)]
            for position, a in enumerate(members):
                view = views[a]
                if parts is None or a not in received:
                    if view.grad is not None:
                        view.grad = None
                elif view.grad is None or view.grad._base is not grad:
                    view.grad = parts[position]

    # -- alphas that must rest -----------------------------------------------------------------------
    @contextmanager
    def hold(self, resting: Sequence[int], state: dict) -> Iterator[None]:
        """Inside the block the base optimizer steps; afterwards the ``resting`` alphas (and the parts
        of their buckets' optimizer state shaped like a bucket) are as they were before it."""
        kept = []
        with torch.no_grad():
            for a in resting:
                span = self.spans[a]
                bucket = self.buckets[span.bucket]
                tensors = [bucket] + [
                    value
                    for value in state.get(bucket, {}).values()
                    if isinstance(value, Tensor) and value.shape == bucket.shape
                ]
                kept += [(t, span, t[span.start : span.stop].clone()) for t in tensors]
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, span, value in kept:
                    tensor[span.start : span.stop] = value


def _members(spans: Sequence[Span], num_buckets: int) -> list[list[int]]:
    """The alphas of each bucket, in the order they lie in it."""
    members: list[list[int]] = [[] for _ in range(num_buckets)]
    for a, span in enumerate(spans):
        members[span.bucket].append(a)
    return members
