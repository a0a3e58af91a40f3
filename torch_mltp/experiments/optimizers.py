"""What a procedure changes in training: how its optimizer is built and how it takes a step."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from torch_mltp import MLTPOptimizer, task_closures
from torch_mltp.constants import ALPHA_GROUP_KEY

from .recipes import ALPHA_POLICIES, MLTP_MODES, Recipe
from .runs import ExperimentError


def _base_optimizer(recipe: Recipe) -> Tuple[type, dict]:
    """The recipe's optimizer class and its settings."""
    if recipe.optimizer == "adam":
        return torch.optim.Adam, {"lr": recipe.lr, "weight_decay": recipe.weight_decay}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD, {
            "lr": recipe.lr,
            "momentum": recipe.momentum,
            "weight_decay": recipe.weight_decay,
        }
    raise ExperimentError(f"unknown optimizer {recipe.optimizer!r}; choose adam or sgd")


def build_optimizer(
    model: nn.Module, recipe: Recipe, procedure: str, tasks: str = "local"
) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``; MLTP procedures wrap it in ``MLTPOptimizer``, ``sam`` in
    ``pytorch_optimizer.SAM`` (radius ``recipe.sam_rho``)."""
    kind, settings = _base_optimizer(recipe)
    if procedure == "sam":
        try:
            from pytorch_optimizer import SAM
        except ImportError:
            raise ExperimentError(
                "--procedure sam needs the pytorch-optimizer package: pip install 'torch-mltp[vision]'"
            ) from None
        return SAM(model.parameters(), kind, rho=recipe.sam_rho, **settings)
    base = kind(model.parameters(), **settings)
    mode = MLTP_MODES[procedure]
    if mode is None:
        return base
    if recipe.alpha_policy not in ALPHA_POLICIES:
        raise ExperimentError(
            f"unknown alpha policy {recipe.alpha_policy!r}; choose from {', '.join(ALPHA_POLICIES)}"
        )
    if recipe.alpha_policy == "fixed" and recipe.alpha_lr is not None:
        raise ExperimentError(
            "--alpha-lr is the learning rate of learned alphas: drop it with --alpha-policy fixed"
        )
    nonpositive = recipe.alpha_policy == "nonpositive"
    try:
        return MLTPOptimizer(
            base,
            model,
            eta=recipe.eta,
            alpha_init=(-recipe.alpha_mean if nonpositive else recipe.alpha_mean, recipe.alpha_std),
            mode=mode,
            learn_alpha=recipe.alpha_policy != "fixed",
            alpha_lr=recipe.alpha_lr,
            alpha_min=0.0 if recipe.alpha_policy == "nonnegative" else None,
            alpha_max=0.0 if nonpositive else None,
            tasks=tasks,
        )
    except ValueError as err:
        raise ExperimentError(f"procedure {procedure} cannot train this model: {err}") from None


def alpha_learning_rate(optimizer: torch.optim.Optimizer) -> Optional[float]:
    """The current learning rate of the learned alphas; ``None`` when ``optimizer`` learns none."""
    for group in optimizer.param_groups:
        if group.get(ALPHA_GROUP_KEY):
            return group["lr"]
    return None


def training_step(
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    perturbed_loss_fn: Optional[Callable] = None,
):
    """One step on the batch ``(x, y)``; returns the minimised objective (detached).

    Standard: the loss of the whole batch. MLTP: ``J`` of eq. 4 with task i the first half of the
    batch and task j the second half. SAM: the loss of the whole batch at the current weights; its step
    (``pytorch_optimizer.SAM.step``) moves the weights up that gradient by ``rho``, takes the batch's
    gradient there with ``perturbed_loss_fn`` (default ``loss_fn``), moves back and lets the base optimizer
    step with that gradient.
    """
    optimizer.zero_grad()
    if isinstance(optimizer, MLTPOptimizer):
        return optimizer.step(*task_closures(loss_fn, x, y))
    loss = loss_fn(x, y)
    loss.backward()
    if _is_sam(optimizer):
        perturbed = loss_fn if perturbed_loss_fn is None else perturbed_loss_fn
        optimizer.step(lambda: perturbed(x, y).backward())
    else:
        optimizer.step()
    return loss.detach()


def _is_sam(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "SAM" and type(optimizer).__module__.startswith("pytorch_optimizer")
