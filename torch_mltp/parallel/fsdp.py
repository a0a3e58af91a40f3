"""First-order MLTP on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

A ``fully_shard``'ed model's parameters are ``DTensor`` shards: each process holds one piece of every
tensor, FSDP gathers the whole tensor for the forward and backward passes, and ``loss.backward()``
leaves in ``.grad`` the process's piece of the gradient averaged over all processes (a
reduce-scatter).  ``torch.autograd.grad`` cannot differentiate with respect to the shards, so a step is
computed from two ordinary backward passes, all on the shards (``R`` processes, each with the halves
``i_r``, ``j_r`` of its batch; task i is the union of the first halves, task j of the second ones, as
``tasks="global"`` under DDP)::

    g_i = dL_i/dw         = (1/R) sum_r dL_{i_r}/dw        task i's backward pass
    w'  = w - alpha * g_i                                   in place, on each shard
    h_j = dL_j/dw (w')    = (1/R) sum_r dL_{j_r}/dw (w')   task j's backward pass (FSDP gathers w')
    dJ/dw     = g_i + eta * h_j                             (first order: dw'/dw := I)
    dJ/dalpha = -eta * <h_j, g_i>                           per alpha: each process sums over its
                                                            shards, one all-reduce sums the processes

``w`` is put back exactly (a copy of the shards is kept) before anything else happens, also when a
closure raises.  The all-reduce also carries ``L_i``, ``L_j`` and which gradients are not finite, so
every process comes to the same verdict.  Only the first-order modes exist here: the exact ``dw'/dw``
would differentiate through FSDP's collectives.

Step sizes: one per layer or tensor (scalars, the same in every process, as without FSDP), or with
``alpha_per="element"`` one ``DTensor`` per tensor, sharded as the tensor it scales (each process holds
and learns the alphas of its own shard).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..functional import MLTPGradients, evaluate_loss, raise_if_differentiated_twice
from ..selection import Mode, unwrap_model
from .backend import Backend, Outcome, Step
from .local import AlphaStore

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """The modules of ``model`` that ``fully_shard`` was applied to (empty without FSDP2)."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None:
        return []
    return [m for m in unwrap_model(model).modules() if isinstance(m, fsdp_module)]


def _fsdp_module_class() -> Optional[type[FSDPModule]]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def dtensor_class() -> type[DTensor]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


def local(tensor: Tensor) -> Tensor:
    """A ``DTensor``'s local shard (the tensor itself otherwise): in-place changes reach the ``DTensor``."""
    return tensor._local_tensor if isinstance(tensor, dtensor_class()) else tensor


def fsdp_backend(
    model: nn.Module, mode: Mode, tasks: Optional[str], process_group: Optional[Any]
) -> Optional[FSDPBackend]:
    """The backend for ``model``, or ``None`` when ``model`` is not sharded with ``fully_shard``.

    Refuses, with the ways that work, what FSDP cannot do: second-order modes, ``tasks="local"``, a
    model only partly sharded, a mesh of more than one dimension."""
    modules = fsdp_modules(model)
    if not modules:
        dtensor = dtensor_class() if dist.is_available() else None
        if dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters()):
            raise ValueError(
                "the model's parameters are FSDP shards, but fully_shard was applied to no module inside "
                "it: give MLTPOptimizer the module that fully_shard was applied to (the root)"
            )
        return None
    if not mode.first_order:
        raise ValueError(
            f"mode {mode.describe()} differentiates the model twice, which a model sharded with FSDP "
            "(fully_shard) does not support: use mode='fo', or a torch_mltp.Mode(layers=..., "
            "first_order=True) for another selection of layers"
        )
    if tasks == "local":
        raise ValueError(
            "tasks='local' is not available with FSDP (fully_shard), whose backward pass averages the "
            "gradients over the processes before MLTP sees them: use tasks='global' (the default under "
            "FSDP): task i is the union of every process's first task, task j of every second task"
        )
    dtensor = dtensor_class()
    plain = [n for n, p in unwrap_model(model).named_parameters() if not isinstance(p, dtensor)]
    if plain:
        raise ValueError(
            f"{plain[0]} is not sharded although the model uses FSDP (fully_shard): apply fully_shard "
            "to the root module too (fully_shard(model) after its submodules), so that every parameter "
            "is a shard"
        )
    meshes = [cast("DTensor", p).device_mesh for p in unwrap_model(model).parameters()]
    mesh = meshes[0]
    if mesh.ndim != 1 or any(m != mesh for m in meshes):
        raise ValueError(
            "MLTP under FSDP supports one device mesh of one dimension (fully_shard(model) over all "
            "processes, or over one mesh); hybrid sharding (a 2-D mesh) is not supported"
        )
    group = mesh.get_group()
    if process_group is not None and process_group is not group:
        raise ValueError(
            "under FSDP the gradients are averaged over the model's device mesh: leave process_group unset"
        )
    return FSDPBackend(modules, mesh, group)


class FSDPBackend(Backend):
    """First-order MLTP on a ``fully_shard``'ed model, from two backward passes (see the module docstring)."""

    tasks = "global"

    def __init__(self, modules: list[FSDPModule], mesh: Any, group: Any):
        self.modules, self.mesh, self.group = modules, mesh, group
        self.world_size = dist.get_world_size(group)

    def make_alphas(self, names: Sequence[str], shapes: Sequence[torch.Size], *args: Any) -> Any:
        """Scalar alphas as without FSDP (drawn by the first process, the same everywhere); per element,
        :class:`ShardedAlphas`."""
        if any(len(shape) for shape in shapes):
            return ShardedAlphas(names, *args)
        store = AlphaStore(names, shapes, *args)
        if self.world_size > 1:
            store.broadcast_from_first_rank(self.group)
        return store

    def reshard(self) -> None:
        """Put every module back to its shards, so that the next forward pass gathers what they hold."""
        for module in self.modules:
            module.reshard()

    def gradients(self, step: Step) -> Outcome:
        if step.scaler is not None:
            raise ValueError(
                "a GradScaler is not supported under FSDP: train in bfloat16 with fully_shard(..., "
                "mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)), which needs none"
            )
        layout, alphas, eta, weight = step.layout, step.alphas, step.eta, step.weight
        params = layout.params
        g_i, h_j, loss_i, loss_j = self._two_passes(
            step.closure_i, step.closure_j, layout, alphas, step.guard_lookahead
        )
        sums, alpha_grads = _local_alpha_gradients(g_i, h_j, layout, alphas, eta * weight)
        grads = [_combined_in_place(g, h, eta, weight) for g, h in zip(g_i, h_j)]
        per_element = any(a.dim() for a in alphas)
        checked = grads + (alpha_grads if per_element else [])
        device = loss_i.device  # where the model computes (the shards may be offloaded to the CPU)
        losses = torch.stack([loss_i.to(device, sums.dtype), loss_j.to(device, sums.dtype)])
        vector = torch.cat([losses, sums.to(device), _nonfinite(checked, sums).to(device)])
        dist.all_reduce(vector, group=self.group)  # the step's one all-reduce
        loss_i, loss_j = vector[0] / self.world_size, vector[1] / self.world_size
        objective = loss_i + eta * loss_j
        if not per_element:  # dJ/dalpha = -eta <h_j, g_i>, summed over the processes' shards
            alpha_grads = [None if g is None else s for g, s in zip(alpha_grads, vector[2 : 2 + len(sums)])]
        marks: list[Optional[Tensor]] = list(torch.where(vector[2 + len(sums) :] > 0, math.nan, 0.0).unbind())
        judged = marks[len(params) :] if per_element else alpha_grads
        verdict = MLTPGradients(
            objective,
            loss_i,
            loss_j,
            marks[: len(params)],
            [None if g is None else m for g, m in zip(alpha_grads, judged)],
        )
        learned = alpha_grads if step.alpha_grads else None
        return Outcome(MLTPGradients(objective, loss_i, loss_j, grads, learned), verdict)

    def _two_passes(
        self, closure_i: Any, closure_j: Any, layout: Any, alphas: list[Tensor], guard: bool
    ) -> tuple[list, list, Tensor, Tensor]:
        """Task i's backward pass at ``w``, task j's at ``w'``; ``w`` and the ``.grad`` held before are put
        back however the passes end.  Returns ``g_i``, ``h_j`` (``DTensor`` or ``None`` per tensor),
        ``L_i`` and ``L_j`` (this process's, detached)."""
        params = layout.params
        shifted = [params[k] for k in layout.selected]
        kept = [p.grad for p in params]
        with torch.no_grad():
            saved = [local(p).clone() for p in shifted]
        try:
            for p in params:
                p.grad = None
            loss_i = _backward(closure_i, "i")
            g_i = _take_gradients(params)
            self.reshard()
            with torch.no_grad():
                steps = [
                    local(alphas[a]) * _local_or_zeros(g_i[k], p)
                    for k, a, p in zip(layout.selected, layout.alpha_of, shifted)
                ]
                if guard:  # w' = w when g_i is not finite anywhere: task j never sees non-finite weights
                    finite = self._all_finite([loss_i, *steps])
                    steps = [torch.where(finite, s, torch.zeros_like(s)) for s in steps]
                for p, step in zip(shifted, steps):
                    local(p).sub_(step)
                del steps
            loss_j = _backward(closure_j, "j")
            h_j = _take_gradients(params)
        finally:
            with torch.no_grad():
                for p, w in zip(shifted, saved):
                    local(p).copy_(w)
            for p, grad in zip(params, kept):
                p.grad = grad
            self.reshard()
        return g_i, h_j, loss_i, loss_j

    def _all_finite(self, tensors: list[Tensor]) -> Tensor:
        """A device bool, the same in every process: every entry of every process's ``tensors`` is finite."""
        device = tensors[0].device  # the loss's: where the model computes
        bad = torch.stack([(~torch.isfinite(t)).any().to(device) for t in tensors]).any().to(torch.float32)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        return bad == 0


def _local_alpha_gradients(
    g_i: list, h_j: list, layout: Any, alphas: list[Tensor], scale: float
) -> tuple[Tensor, list]:
    """This process's part of ``dJ/dalpha = -eta <h_j, g_i>`` (times ``weight``; ``scale = eta * weight``):
    for scalar alphas the local sums over the shards (a 1-D tensor, one entry per alpha, to be summed
    over the processes) and a list that is ``True`` where an alpha has a shifted tensor; for alphas per
    element no sums and the gradients themselves (``DTensor``s)."""
    params = layout.params
    per_element = any(a.dim() for a in alphas)
    sums = torch.zeros(0 if per_element else len(alphas), dtype=layout.dtype, device=local(params[0]).device)
    grads: list = [None] * len(alphas)
    for k, a in zip(layout.selected, layout.alpha_of):
        g, h = g_i[k], h_j[k]
        if per_element:
            product = torch.zeros_like(alphas[a]) if g is None or h is None else (h * g) * -scale
            grads[a] = product if grads[a] is None else grads[a] + product
        else:
            grads[a] = True
            if g is not None and h is not None:
                sums[a] += (local(h) * local(g)).sum().to(sums.dtype) * -scale
    return sums, grads


def _nonfinite(tensors: list, like: Tensor) -> Tensor:
    """1.0 for each tensor with a non-finite entry in this process's shard, else 0.0."""
    flags = [
        torch.zeros((), dtype=torch.bool, device=like.device)
        if t is None
        else (~torch.isfinite(local(t))).any().to(like.device)
        for t in tensors
    ]
    return torch.stack(flags).to(like.dtype) if flags else like.new_zeros(0)


def _backward(closure: Any, task: str) -> Tensor:
    """Run a task's closure and its backward pass (FSDP averages the gradients into ``.grad``)."""
    with torch.enable_grad():
        loss = evaluate_loss(closure, task)
        try:
            loss.backward()
        except RuntimeError as err:
            raise_if_differentiated_twice(err, task)
            raise
    return loss.detach()


def _take_gradients(params: list[Tensor]) -> list[Optional[Tensor]]:
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def _local_or_zeros(grad: Optional[Tensor], param: Tensor) -> Tensor:
    return torch.zeros_like(local(param)) if grad is None else local(grad)


def _combined_in_place(
    g: Optional[Tensor], h: Optional[Tensor], eta: float, weight: float
) -> Optional[Tensor]:
    """``weight * (g + eta * h)`` in the storage of ``g`` (or ``h``); ``None`` when neither exists."""
    if g is None and h is None:
        return None
    with torch.no_grad():
        if g is None:
            total = cast(Tensor, h)  # not None: one of g and h is
            local(total).mul_(eta)
        else:
            total = g
            if h is not None:
                local(total).add_(local(h), alpha=eta)
        if weight != 1.0:
            local(total).mul_(weight)
    return total


class ShardedAlphas:
    """Alphas per element under FSDP: one ``DTensor`` per shifted tensor, shaped and sharded as that
    tensor, so that each process holds the alphas of its own shard.  The base optimizer updates them as
    it updates the shards, and ``torch.distributed.checkpoint`` saves them shard by shard.

    Offers what :class:`~torch_mltp.alphas.AlphaStore` offers the optimizer, with one tensor per alpha
    (its "bucket" is the alpha itself).  The values are drawn shard by shard from each process's
    generator (``N(mean, std)``, clamped to ``[minimum, maximum]``)."""

    def __init__(
        self,
        names: Sequence[str],
        likes: Sequence[Tensor],
        mean: float,
        std: float,
        minimum: Optional[float],
        maximum: Optional[float],
        learn: bool,
    ):
        self.names = list(names)
        self.buckets = [torch.empty_like(like.detach()) for like in likes]
        with torch.no_grad():
            for alpha in self.buckets:
                local(alpha).normal_(mean, std) if std > 0 else local(alpha).fill_(mean)
            self.clamp(minimum, maximum)
        for alpha in self.buckets:
            alpha.requires_grad_(learn)
        self.spans = list(range(len(self.buckets)))

    @property
    def views(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.buckets))

    @property
    def values(self) -> list[Tensor]:
        return list(self.buckets)

    def clamp(self, minimum: Optional[float], maximum: Optional[float]) -> None:
        if minimum is None and maximum is None:
            return
        with torch.no_grad():
            for alpha in self.buckets:
                local(alpha).clamp_(minimum, maximum)

    def accumulate(self, grads: Sequence[Optional[Tensor]], received: set) -> None:
        """Add per-alpha gradients to the alphas' ``.grad``; ``received`` (updated) holds the indices of the
        alphas that have one."""
        for alpha, grad in zip(self.buckets, grads):
            if grad is not None:
                alpha.grad = grad if alpha.grad is None else alpha.grad.add_(grad)
        received.update(a for a, g in enumerate(grads) if g is not None)

    def publish_gradients(self, received: set) -> None:
        """Each alpha is its own bucket: its ``.grad`` is already the one to read."""

    @contextmanager
    def hold(self, resting: Sequence[int], state: dict) -> Iterator[None]:
        """The ``resting`` alphas, and their optimizer state, are as they were before the block."""
        kept = []
        with torch.no_grad():
            for a in resting:
                alpha = self.buckets[a]
                tensors = [alpha] + [v for v in state.get(alpha, {}).values() if isinstance(v, Tensor)]
                kept += [(t, local(t).clone()) for t in tensors]
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, value in kept:
                    local(tensor).copy_(value)
