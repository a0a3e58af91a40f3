"""``MLTPOptimizer``'s checkpoints: its state dict (the base optimizer's, plus an ``"mltp"`` entry, checked
whole), and :class:`ShardedCheckpoint`, a model and its optimizer as one entry of a
``torch.distributed.checkpoint``.

The ``"mltp"`` entry holds the alphas' values and the settings that a resumed run must share (what
the mode selected and whether it is first order, ``alpha_per``, ``learn_alpha``) or carries on
(``eta``, ``alpha_min``, ``alpha_max``, ``nonfinite``, ``skipped_steps``).  ``check_entry`` and
``check_base_state`` look at the whole checkpoint before the optimizer changes anything.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from .constants import ALPHA_GROUP_KEY, MLTP_STATE_KEY, NONFINITE_POLICIES

__all__ = [
    "ALPHA_GROUP_KEY",
    "MLTP_STATE_KEY",
    "ShardedCheckpoint",
    "check_base_state",
    "check_entry",
    "snapshot",
]

_MUST_MATCH = ("alpha_per", "learn_alpha")
_REQUIRED = ("mode", "alpha_per", "learn_alpha", "eta", "nonfinite", "skipped_steps", "alphas")


def snapshot(settings: dict[str, Any], alphas: dict[str, Tensor]) -> dict[str, Any]:
    """The ``"mltp"`` entry: ``settings`` (see the module docstring) and copies of the alphas."""
    return {**settings, "alphas": {name: alpha.detach().clone() for name, alpha in alphas.items()}}


def check_entry(saved: Any, settings: dict[str, Any], alphas: dict[str, Tensor]) -> None:
    """Refuse an ``"mltp"`` entry that does not fit an optimizer with these settings and alphas."""
    if not isinstance(saved, dict):
        raise ValueError(f"the state dict's 'mltp' entry must be a dict, got {type(saved).__name__}")
    missing = [key for key in _REQUIRED if key not in saved]
    if missing:
        raise ValueError(f"the state dict's 'mltp' entry lacks {', '.join(missing)}")
    _check_selection(saved, settings)
    for key in _MUST_MATCH:
        if saved[key] != settings[key]:
            raise ValueError(
                f"state dict was saved with {key}={saved[key]!r}, this optimizer has {settings[key]!r}"
            )
    eta = saved["eta"]
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"the state dict's eta must be a finite number >= 0, got {eta!r}")
    # absent from entries written before them
    bounds: list[Any] = [saved.get("alpha_min"), saved.get("alpha_max")]
    for name, bound in zip(("alpha_min", "alpha_max"), bounds):
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not math.isfinite(bound)
        ):
            raise ValueError(f"the state dict's {name} must be None or a finite number, got {bound!r}")
    if None not in bounds and bounds[0] > bounds[1]:
        raise ValueError(f"the state dict's alpha_min {bounds[0]} is above its alpha_max {bounds[1]}")
    if saved["nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(
            f"the state dict's nonfinite must be one of {NONFINITE_POLICIES}, got {saved['nonfinite']!r}"
        )
    skipped = saved["skipped_steps"]
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        raise ValueError(f"the state dict's skipped_steps must be an int >= 0, got {skipped!r}")
    _check_alphas(saved["alphas"], alphas)


def _check_selection(saved: dict, settings: dict[str, Any]) -> None:
    """The same layers shifted, and the same order of ``dw'/dw``.  An entry that does not record its
    layers (written before version 0.3) is compared by the mode's description."""
    if "layers" in saved:
        same = saved["layers"] == settings["layers"] and saved.get("first_order") == settings["first_order"]
    else:
        same = saved["mode"] == settings["mode"]
    if not same:
        raise ValueError(
            f"state dict was saved with mode {saved['mode']} (first order: {saved.get('first_order')}, "
            f"layers {saved.get('layers')}), this optimizer has mode {settings['mode']} (first order: "
            f"{settings['first_order']}, layers {settings['layers']})"
        )


def _check_alphas(saved: Any, alphas: dict[str, Tensor]) -> None:
    if not isinstance(saved, dict) or list(saved) != list(alphas):
        names = list(saved) if isinstance(saved, dict) else saved
        raise ValueError(f"state dict holds alphas for layers {names}, this optimizer has {list(alphas)}")
    for name, value in saved.items():
        current = alphas[name]
        if not isinstance(value, Tensor) or value.shape != current.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"alpha {name!r} in the state dict is {shape}, expected shape {tuple(current.shape)}"
            )
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(f"alpha {name!r} in the state dict is not a finite floating-point tensor")


def check_base_state(base_state: Any, groups: list[dict], alpha_group: bool) -> None:
    """Refuse a base state that does not fit the param groups ``groups`` (the alphas' last when
    ``alpha_group``): their number, the alphas' group, and the shape of every per-tensor state entry,
    which ``torch.optim.Optimizer.load_state_dict`` leaves unchecked (see :func:`_fits`).  Saved
    indices map to tensors in param-group order, as torch maps them."""
    for key in ("state", "param_groups"):
        if key not in base_state:
            raise ValueError(f"the state dict lacks the base optimizer's {key!r}")
    state, saved_groups = base_state["state"], base_state["param_groups"]
    if not isinstance(state, dict):
        raise ValueError(f"the state dict's 'state' must be a dict, got {type(state).__name__}")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        count = len(saved_groups) if isinstance(saved_groups, list) else saved_groups
        raise ValueError(f"the state dict has {count} param groups, this optimizer has {len(groups)}")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups):
        raise ValueError("every param group of the state dict must be a dict with a 'params' list")
    if alpha_group:
        if not saved_groups[-1].get(ALPHA_GROUP_KEY):
            raise ValueError("the state dict's last param group is not the alphas' group")
        saved, held = len(saved_groups[-1]["params"]), len(groups[-1]["params"])
        if saved != held:
            raise ValueError(
                f"the state dict's alpha group holds {saved} tensors, this optimizer keeps its alphas "
                f"in {held}"
            )
    for saved_group, group in zip(saved_groups, groups):
        alphas = "the alphas' " if group.get(ALPHA_GROUP_KEY) else ""
        for index, param in zip(saved_group["params"], group["params"]):
            for key, value in state.get(index, {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and not _fits(value.shape, param.shape):
                    raise ValueError(
                        f"the optimizer state {key!r} of {alphas}parameter {index} is shaped "
                        f"{tuple(value.shape)}, that parameter is {tuple(param.shape)}: the checkpoint is "
                        "of another model (or of this model at another size)"
                    )


def _fits(shape: torch.Size, like: torch.Size) -> bool:
    """Whether a state entry fits its tensor: the tensor's shape, or sizes of 1 where it holds a statistic
    over a dimension (Adafactor's factored moments).  An entry with another number of dimensions (a
    quantisation table, a block's scales) is the optimizer's own affair."""
    return len(shape) != len(like) or all(size in (expected, 1) for size, expected in zip(shape, like))


class ShardedCheckpoint:
    """A model and its :class:`~torch_mltp.MLTPOptimizer` as one entry of a ``torch.distributed.checkpoint``
    (DCP) checkpoint: the weights and the optimizer state shard by shard, the alphas, the settings.

    ``dcp.save({"train": ShardedCheckpoint(model, opt)}, checkpoint_id=folder)`` writes it and
    ``dcp.load({"train": ShardedCheckpoint(model, opt)}, checkpoint_id=folder)`` restores it into a
    freshly built model and optimizer (DCP calls :meth:`state_dict` and :meth:`load_state_dict`, the
    protocol of ``torch.distributed.checkpoint.stateful.Stateful``).  DCP loads into the tensors that
    :meth:`state_dict` returns, so they are copies: a checkpoint that the optimizer refuses leaves the
    model and the optimizer as they were (saving holds a second copy of this process's state while it
    writes).  When the base optimizer has no state yet, :meth:`state_dict` creates it (a step with zero
    gradients and learning rate 0, undone at once) and records that it was empty; a checkpoint written
    before the first step restores an optimizer without state.  Works as well for a model that is not
    sharded.
    """

    def __init__(self, model: nn.Module, optimizer: Any):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        base = self.optimizer.base_optimizer
        stepped = bool(base.state)
        if not stepped:
            _create_state(base)
        try:
            return {
                "model": _copies(self.model.state_dict()),
                "optimizer": _copies(self.optimizer.state_dict()),
                "optimizer_has_state": torch.tensor(int(stepped)),
            }
        finally:
            if not stepped:
                base.state.clear()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The optimizer checks the whole of its state before it changes; the model is loaded after it."""
        self.optimizer.load_state_dict(state["optimizer"])
        if not int(state["optimizer_has_state"]):
            self.optimizer.base_optimizer.state.clear()
        self.model.load_state_dict(state["model"])


def _copies(value: Any) -> Any:
    """``value`` with every tensor in its dicts, lists and tuples replaced by a copy (a ``DTensor`` by a
    ``DTensor`` sharded alike); a dict keeps its type and attributes (a module state dict's ``_metadata``)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        copied = copy.copy(value)
        for key, item in value.items():
            copied[key] = _copies(item)
        return copied
    if type(value) in (list, tuple):
        return type(value)(map(_copies, value))
    return value


def _create_state(base: torch.optim.Optimizer) -> None:
    """Create ``base``'s per-tensor state with one step that changes nothing (zero gradients, learning
    rate 0); the gradients and learning rates are put back."""
    params = [p for group in base.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    rates = [group.get("lr") for group in base.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        for group, lr in zip(base.param_groups, rates):
            if lr is not None:
                group["lr"] = torch.zeros_like(lr) if isinstance(lr, Tensor) else 0.0
        base.step()
    finally:
        for group, lr in zip(base.param_groups, rates):
            if lr is not None:
                group["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad
