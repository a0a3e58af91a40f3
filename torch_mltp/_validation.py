"""The checks of ``MLTPOptimizer``'s arguments, and their messages: everything is refused before the
first step does, with a ``TypeError`` or ``ValueError`` that says what was expected."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .constants import ALPHA_GRANULARITIES, ALPHA_GROUP_KEY, NONFINITE_POLICIES
from .selection import Layer, Mode, unwrap_model


def check_settings(
    alpha_per: str,
    nonfinite: str,
    learn_alpha: Any,
    alpha_init: Any,
    alpha_lr: Any,
    alpha_min: Any,
    alpha_max: Any,
    foreach: Any,
) -> tuple[float, float]:
    """Check the keyword settings; returns ``(mean, std)`` of the initial alphas."""
    check_choice("alpha_per", alpha_per, ALPHA_GRANULARITIES)
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    if not isinstance(learn_alpha, bool):
        raise TypeError(f"learn_alpha must be a bool, got {type(learn_alpha).__name__}")
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None or a bool, got {type(foreach).__name__}")
    if alpha_lr is not None:
        if not learn_alpha:
            raise ValueError(
                "alpha_lr is the learning rate of learned alphas; with learn_alpha=False drop it"
            )
        check_real("alpha_lr", alpha_lr, positive=True)
    for name, bound in (("alpha_min", alpha_min), ("alpha_max", alpha_max)):
        if bound is not None:
            check_real(name, bound, positive=False, allow_negative=True)
    if alpha_min is not None and alpha_max is not None and alpha_min > alpha_max:
        raise ValueError(f"alpha_min must be <= alpha_max, got alpha_min={alpha_min}, alpha_max={alpha_max}")
    return _parse_alpha_init(alpha_init, negative=alpha_max is not None and alpha_max <= 0)


def _parse_alpha_init(alpha_init: Any, negative: bool) -> tuple[float, float]:
    """``(mean, std)`` of the initial alphas. A negative mean is refused unless ``negative`` (the alphas
    are kept ``<= alpha_max <= 0``): a negative step size flips the sign of eq. 5's alignment term, so
    MLTP would reward disagreement between the tasks, which only a user who asks for it should get."""
    if isinstance(alpha_init, (tuple, list)):
        if len(alpha_init) != 2:
            raise ValueError(f"alpha_init as a sequence must be (mean, std), got {alpha_init!r}")
        mean, std = alpha_init
        _check_mean("alpha_init mean", mean, negative)
        check_real("alpha_init std", std, positive=False)
        return float(mean), float(std)
    _check_mean("alpha_init", alpha_init, negative)
    return float(alpha_init), 0.0


def _check_mean(name: str, value: Any, negative: bool) -> None:
    check_real(name, value, positive=False, allow_negative=True)
    if value < 0 and not negative:
        raise ValueError(
            f"{name} must be >= 0, got {value} (a negative initial step size is allowed with alpha_max <= 0)"
        )


def check_real(name: str, value: Any, positive: bool, allow_negative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not allow_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_base_optimizer(base: Any) -> None:
    if not isinstance(base, torch.optim.Optimizer):
        raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base).__name__}")
    if any(group.get(ALPHA_GROUP_KEY) for group in base.param_groups):
        raise ValueError("base_optimizer already holds MLTP alphas; wrap a fresh optimizer")
    if isinstance(base, torch.optim.LBFGS):
        raise TypeError(
            "LBFGS cannot be wrapped: its step re-evaluates a closure several times per step, while "
            "MLTP's gradients come from its own backward pass; use a first-order optimizer (SGD, Adam, ...)"
        )
    if isinstance(base, torch.optim.SparseAdam):
        raise TypeError(
            "SparseAdam takes only sparse gradients, and MLTP's gradients are dense; use Adam or AdamW"
        )


def check_model(model: Any, mode: Mode) -> None:
    """Refuse a model that cannot work in ``mode``, before the first step does."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            raise ValueError(
                f"{name or 'the model'} is an embedding with sparse=True; MLTP combines dense gradients, "
                "build it with sparse=False"
            )
    if mode.first_order:
        return
    compiled = [n for n, m in model.named_modules() if isinstance(getattr(m, "_orig_mod", None), nn.Module)]
    if compiled:
        raise ValueError(
            f"mode {mode.describe()} differentiates the model twice, which a torch.compile'd model "
            f"({compiled[0] or 'the model'}) does not support; use mode='fo' with a compiled model, "
            "or pass the uncompiled model"
        )


def check_selected_dtypes(layers: list[Layer]) -> None:
    for layer in layers:
        for name, param in zip(layer.param_names, layer.params):
            if param.is_complex() or not param.is_floating_point():
                raise TypeError(
                    f"{name} is {param.dtype}: MLTP's step sizes are real and shift floating-point "
                    "tensors only; leave this layer out of the selection (Mode(layers=...))"
                )


def alpha_group_lr(base: torch.optim.Optimizer, alpha_lr: Optional[float]) -> Any:
    """The alphas' learning rate: ``alpha_lr``, else the base optimizer's (a tensor ``lr`` is copied,
    so that a scheduler can move the two groups apart)."""
    if alpha_lr is not None:
        return alpha_lr
    lr = base.defaults.get("lr", base.param_groups[0].get("lr"))
    if lr is None:
        raise ValueError(f"{type(base).__name__} has no 'lr' setting: pass alpha_lr for the alphas' group")
    return lr.detach().clone() if isinstance(lr, Tensor) else lr


def probe_alpha_step(base: torch.optim.Optimizer, alphas: list[Tensor]) -> None:
    """Run one base step on the alphas' group alone (zero gradients, lr 0) and undo it, so that an
    optimizer that cannot update a step-size tensor fails here rather than mid-training.  A wrapper
    that shares its param groups with the optimizer it holds as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, whose step also steps and updates a ``GradScaler``) is probed through
    that optimizer."""
    inner = getattr(base, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer) and inner.param_groups is base.param_groups:
        base, inner = inner, getattr(inner, "optimizer", None)
    group = base.param_groups[-1]
    others = [p for g in base.param_groups[:-1] for p in g["params"]]
    saved_grads = [p.grad for p in others]
    saved_values = [a.detach().clone() for a in alphas]
    saved_lr = group["lr"]
    try:
        for p in others:
            p.grad = None
        for a in alphas:
            a.grad = torch.zeros_like(a)
        group["lr"] = torch.zeros_like(saved_lr) if isinstance(saved_lr, Tensor) else 0.0
        base.step()
    except Exception as err:
        base.param_groups.pop()
        raise TypeError(
            f"{type(base).__name__} cannot update MLTP's step sizes (alpha tensors shaped like "
            f"{tuple(alphas[0].shape)}): its step failed with {type(err).__name__}: {err}. Use an optimizer "
            "that takes any tensor (SGD, Adam, AdamW, ...), or learn_alpha=False"
        ) from err
    finally:
        group["lr"] = saved_lr
        for p, grad in zip(others, saved_grads):
            p.grad = grad
        with torch.no_grad():
            for a, value in zip(alphas, saved_values):
                a.grad = None
                a.copy_(value)
                base.state.pop(a, None)
