"""What a backend is: how one :meth:`MLTPOptimizer.backward <torch_mltp.MLTPOptimizer.backward>` computes its
gradients on one engine.

The optimizer lays out the step (:class:`Layout`), hands it to its backend with the call's arguments
(:class:`Step`), and finishes the step itself from what comes back (:class:`Outcome`): the non-finite
judgement, the accumulation into ``.grad`` and ``last_result``.  A backend also makes the alphas, since where
they live (replicated or sharded) is the engine's business.  The backends:

* :class:`~torch_mltp.parallel.local.LocalBackend`: one process
  (:func:`torch_mltp.functional.mltp_gradients`);
* :class:`~torch_mltp.parallel.ddp.DDPBackend`: ``DistributedDataParallel`` or a process group, each process's
  own tasks (``tasks="local"``) or their unions (``"global"``);
* :class:`~torch_mltp.parallel.fsdp.FSDPBackend`: a model sharded with FSDP2's ``fully_shard`` (first order),
  from two ordinary backward passes whose averaging is FSDP's own.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .._foreach import Workspace
from ..functional import Closure, MLTPGradients


class Layout(NamedTuple):
    """A step's tensors: ``w`` (the trainable tensors of the weight groups), the indices of the selected ones
    in it, the alpha of each, the dtype of the gradients, the path that computes the step (``foreach``) and
    the fast path's workspace."""

    params: list
    selected: list
    alpha_of: list
    dtype: torch.dtype
    foreach: bool
    workspace: Workspace


class Step(NamedTuple):
    """One ``backward`` call as a backend receives it."""

    closure_i: Closure
    closure_j: Closure
    layout: Layout
    alphas: list
    eta: float
    first_order: bool
    alpha_grads: bool
    """whether ``dJ/dalpha`` is wanted (``learn_alpha``)"""
    weight: float
    scaler: Optional[Any]
    guard_lookahead: bool
    """``nonfinite="skip"``: task j never runs at non-finite weights"""


class Outcome(NamedTuple):
    """What a backend computed: the gradients to accumulate (``weight`` and the scaler's scale applied), and
    what the non-finite judgement reads when it is not ``result`` itself: quantities that are the same in
    every process (``None``: ``result`` is)."""

    result: MLTPGradients
    verdict: Optional[MLTPGradients] = None


class Backend:
    """The interface every backend implements (see the module docstring)."""

    tasks: str = "local"
    """``"local"`` or ``"global"`` (``MLTPOptimizer``'s ``tasks``); the two are the same in one process."""

    def make_alphas(
        self,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        likes: Sequence[Tensor],
        mean: float,
        std: float,
        minimum: Optional[float],
        maximum: Optional[float],
        learn: bool,
    ) -> Any:
        """The alphas' storage (an :class:`~torch_mltp.parallel.local.AlphaStore` or its like): ``names[a]``
        has shape ``shapes[a]``, the device and dtype of ``likes[a]``, values from ``N(mean, std)`` clamped to
        ``[minimum, maximum]``, the same in every process that holds them."""
        raise NotImplementedError

    def gradients(self, step: Step) -> Outcome:
        """``J``, ``weight * dJ/dw`` and ``weight * dJ/dalpha`` of ``step`` (times the scaler's scale)."""
        raise NotImplementedError
