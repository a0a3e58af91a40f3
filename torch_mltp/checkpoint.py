"""``MLTPOptimizer``'s state dict: the base optimizer's, plus an ``"mltp"`` entry, loaded atomically.

The ``"mltp"`` entry holds the alphas' values and the settings that a resumed run must share
(``mode``, ``alpha_per``, ``learn_alpha``) or carries on (``eta``, ``alpha_min``, ``nonfinite``,
``skipped_steps``).  Loading checks the whole checkpoint first and changes nothing when any
check fails; a failure inside the base optimizer's own ``load_state_dict`` puts its previous
state back.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .optimizer import MLTPOptimizer

MLTP_STATE_KEY = "mltp"
ALPHA_GROUP_KEY = "mltp_alpha"
"""Marks the alphas' param group (``group["mltp_alpha"] is True``), always the last group."""
NONFINITE_POLICIES = ("raise", "skip")
_MUST_MATCH = ("mode", "alpha_per", "learn_alpha")
_REQUIRED = (*_MUST_MATCH, "eta", "nonfinite", "skipped_steps", "alphas")


def snapshot(opt: MLTPOptimizer) -> dict[str, Any]:
    """The ``"mltp"`` entry of ``opt.state_dict()``."""
    return {
        "mode": opt.mode.describe(),
        "alpha_per": opt.alpha_per,
        "learn_alpha": opt.learn_alpha,
        "eta": opt.eta,
        "alpha_min": opt.alpha_min,
        "nonfinite": opt.nonfinite,
        "skipped_steps": opt.skipped_steps,
        "alphas": {name: alpha.detach().clone() for name, alpha in opt.alphas.items()},
    }


def restore(opt: MLTPOptimizer, state_dict: Any) -> None:
    """Load ``state_dict`` into ``opt`` after checking all of it; on any failure nothing changes."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    base_state = dict(state_dict)
    if MLTP_STATE_KEY not in base_state:
        raise ValueError("not an MLTPOptimizer state dict: it has no 'mltp' entry")
    saved = base_state.pop(MLTP_STATE_KEY)
    _check_entry(opt, saved)
    _check_base_state(opt, base_state)

    base = opt.base_optimizer
    previous = (base.state, base.param_groups)
    try:
        base.load_state_dict(base_state)
    except Exception:
        base.state, base.param_groups = previous
        raise
    finally:
        opt._link_base()
    with torch.no_grad():
        for name, alpha in opt.alphas.items():
            alpha.copy_(saved["alphas"][name])
    opt.eta = saved["eta"]
    opt.alpha_min = saved.get("alpha_min")
    opt.nonfinite = saved["nonfinite"]
    opt._progress.skipped_steps = saved["skipped_steps"]
    opt._progress.skip_pending = False


def _check_entry(opt: MLTPOptimizer, saved: Any) -> None:
    if not isinstance(saved, dict):
        raise ValueError(f"the state dict's 'mltp' entry must be a dict, got {type(saved).__name__}")
    missing = [key for key in _REQUIRED if key not in saved]
    if missing:
        raise ValueError(f"the state dict's 'mltp' entry lacks {', '.join(missing)}")
    for key in _MUST_MATCH:
        current = opt.mode.describe() if key == "mode" else getattr(opt, key)
        if saved[key] != current:
            raise ValueError(
                f"state dict was saved with {key}={saved[key]!r}, this optimizer has {current!r}"
            )
    eta = saved["eta"]
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"the state dict's eta must be a finite number >= 0, got {eta!r}")
    alpha_min = saved.get("alpha_min")
    if alpha_min is not None and (
        isinstance(alpha_min, bool) or not isinstance(alpha_min, numbers.Real) or not math.isfinite(alpha_min)
    ):
        raise ValueError(f"the state dict's alpha_min must be None or a finite number, got {alpha_min!r}")
    if saved["nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(
            f"the state dict's nonfinite must be one of {NONFINITE_POLICIES}, got {saved['nonfinite']!r}"
        )
    skipped = saved["skipped_steps"]
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        raise ValueError(f"the state dict's skipped_steps must be an int >= 0, got {skipped!r}")
    alphas = saved["alphas"]
    if not isinstance(alphas, dict) or list(alphas) != list(opt.alphas):
        names = list(alphas) if isinstance(alphas, dict) else alphas
        raise ValueError(f"state dict holds alphas for layers {names}, this optimizer has {list(opt.alphas)}")
    for name, value in alphas.items():
        current = opt.alphas[name]
        if not isinstance(value, torch.Tensor) or value.shape != current.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"alpha {name!r} in the state dict is {shape}, expected shape {tuple(current.shape)}"
            )
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(f"alpha {name!r} in the state dict is not a finite floating-point tensor")


def _check_base_state(opt: MLTPOptimizer, base_state: dict) -> None:
    """The parts of the base state that ``torch.optim.Optimizer.load_state_dict`` leaves unchecked
    and that concern the alphas: their group and the shape of their per-tensor state."""
    for key in ("state", "param_groups"):
        if key not in base_state:
            raise ValueError(f"the state dict lacks the base optimizer's {key!r}")
    groups = base_state["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        count = len(groups) if isinstance(groups, list) else groups
        raise ValueError(
            f"the state dict has {count} param groups, this optimizer has {len(opt.param_groups)}"
        )
    if not opt.learn_alpha:
        return
    saved_group = groups[-1]
    if not isinstance(saved_group, dict) or not saved_group.get(ALPHA_GROUP_KEY):
        raise ValueError("the state dict's last param group is not the alphas' group")
    buckets = opt._alphas.buckets
    if len(saved_group.get("params", ())) != len(buckets):
        raise ValueError(
            f"the state dict's alpha group holds {len(saved_group.get('params', ()))} tensors, "
            f"this optimizer keeps its alphas in {len(buckets)}"
        )
    for index, bucket in zip(saved_group["params"], buckets):
        for key, value in base_state["state"].get(index, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != bucket.shape:
                raise ValueError(
                    f"the optimizer state {key!r} of the alphas is shaped {tuple(value.shape)}, "
                    f"expected {tuple(bucket.shape)}"
                )
