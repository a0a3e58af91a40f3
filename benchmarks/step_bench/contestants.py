"""The contestants: each is a factory ``model -> step(x, y)`` that takes one training step.

``standard`` and ``halves`` are plain training; ``fo``, ``fc``, ``conv``, ``full`` and ``fo-fixed-alpha``
are torch_mltp's ``MLTPOptimizer``; ``higher`` and ``torchopt`` are the ``full`` objective written with
those libraries, as their documentation writes it (imported only when such a contestant is built);
``fo-by-hand`` is the first-order objective written directly into the loop, the floor of ``fo`` where
the host's work dominates (small tensors, on the CPU).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_mltp import MLTPOptimizer, task_closures
from torch_mltp.selection import model_layers

from .workloads import ALPHA_INIT, ETA, LR

MLTP_MODES = ("fo", "fc", "conv", "full")
PEERS = ("higher", "torchopt")

Step = Callable[[Tensor, Tensor], None]
Objective = Callable[[Tensor, Tensor], Tensor]


def cross_entropy_of(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda x, y: F.cross_entropy(model(x), y)


def standard_step(model: nn.Module) -> Step:
    """One forward/backward on the whole batch, one Adam step."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss = cross_entropy_of(model)

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss(x, y).backward()
        opt.step()

    return step


def halves_step(model: nn.Module, fused: bool = False) -> Step:
    """Two forward/backward passes of half a batch accumulated, one Adam step: the floor for ``fo``."""
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=fused or None)
    loss = cross_entropy_of(model)

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        for x_half, y_half in zip(x.chunk(2), y.chunk(2)):
            loss(x_half, y_half).backward()
        opt.step()

    return step


def mltp_step(
    mode: str, learn_alpha: bool = True, nonfinite: str = "raise", fused: bool = False
) -> Callable[[nn.Module], Step]:
    """torch_mltp's ``MLTPOptimizer`` around Adam in ``mode``, as its docstring shows.

    ``nonfinite="skip"`` with ``fused=True`` is the configuration without host synchronisation: the
    fused Adam kernel skips a non-finite step on the device."""

    def factory(model: nn.Module) -> Step:
        opt = MLTPOptimizer(
            torch.optim.Adam(model.parameters(), lr=LR, fused=fused or None),
            model,
            eta=ETA,
            alpha_init=ALPHA_INIT,
            mode=mode,
            learn_alpha=learn_alpha,
            nonfinite=nonfinite,
        )
        loss = cross_entropy_of(model)

        def step(x: Tensor, y: Tensor) -> None:
            opt.zero_grad()
            opt.step(*task_closures(loss, x, y))

        return step

    return factory


def higher_objective(model: nn.Module, alphas: list[Tensor]) -> Objective:
    """``J`` with higher, as in its MAML example (examples/maml-omniglot.py of facebookresearch/higher).

    ``innerloop_ctx(..., copy_initial_weights=False)`` makes the model's own weights the initial fast
    weights; the inner optimizer is a plain SGD with one param group per layer whose ``lr`` is
    overridden by that layer's alpha tensor (``override={'lr': [...]}``, higher's documented way to
    pass differentiable hyperparameters), so ``J.backward()`` reaches ``w`` and ``alpha``.
    """
    import higher

    groups = [{"params": list(layer.params)} for layer in model_layers(model)]
    inner = torch.optim.SGD(groups, lr=1.0)  # lr placeholder: overridden by the alphas every step

    def objective(x: Tensor, y: Tensor) -> Tensor:
        (x_i, x_j), (y_i, y_j) = x.chunk(2), y.chunk(2)
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False, override={"lr": alphas}) as (
            fmodel,
            diffopt,
        ):
            loss_i = F.cross_entropy(fmodel(x_i), y_i)
            diffopt.step(loss_i)
            return loss_i + ETA * F.cross_entropy(fmodel(x_j), y_j)

    return objective


def torchopt_objective(model: nn.Module, alphas: list[Tensor]) -> Objective:
    """``J`` with torchopt's functional API (README "Functional API"; examples/MAML-RL/func_maml.py).

    One ``torch.autograd.grad(create_graph=True)``, then per layer the differentiable update
    ``torchopt.sgd(lr=...).update(..., inplace=False)`` + ``torchopt.apply_updates(..., inplace=False)``
    (what ``torchopt.MetaSGD.step`` does inside), and task j through ``torch.func.functional_call``.
    The learnable per-layer step size is given as a schedule returning the alpha tensor: a tensor
    ``lr`` is checked ``>= 0`` once at construction, and a learnt alpha may turn negative.
    ``MetaSGD`` itself takes one ``lr`` per module and differentiates the loss once per param group.
    """
    import torchopt

    layers = model_layers(model)
    inners = [torchopt.sgd(lr=lambda _count, alpha=alpha: alpha) for alpha in alphas]
    params = [p for layer in layers for p in layer.params]

    def objective(x: Tensor, y: Tensor) -> Tensor:
        (x_i, x_j), (y_i, y_j) = x.chunk(2), y.chunk(2)
        loss_i = F.cross_entropy(model(x_i), y_i)
        grads = iter(torch.autograd.grad(loss_i, params, create_graph=True))
        adapted: dict[str, Tensor] = {}
        for layer, inner in zip(layers, inners):
            layer_grads = tuple(next(grads) for _ in layer.params)
            updates, _ = inner.update(
                layer_grads, inner.init(layer.params), params=layer.params, inplace=False
            )
            adapted.update(
                zip(layer.param_names, torchopt.apply_updates(layer.params, updates, inplace=False))
            )
        return loss_i + ETA * F.cross_entropy(torch.func.functional_call(model, adapted, (x_j,)), y_j)

    return objective


PEER_OBJECTIVES = {"higher": higher_objective, "torchopt": torchopt_objective}


def fo_by_hand_gradients(model: nn.Module, alphas: Tensor) -> Callable[[Tensor, Tensor], None]:
    """First-order MLTP's gradients written by hand: ``gradients(x, y)`` sets the weights' ``.grad`` to
    ``g_i + eta * h_j`` and ``alphas.grad`` to ``-eta * <h_j, g_i>`` per layer (``alphas[k]`` is the step
    size of ``model_layers(model)[k]``, which must hold every parameter).

    What ``MLTPOptimizer(mode="fo")`` computes, with the fewest operations: the lookahead
    ``w' = w - alpha * g_i`` with two foreach operations into storage kept between steps, task j run on
    ``w'`` by swapping the weights' storage, one segmented sum for the alphas, ``g_i + eta * h_j`` in
    place, and one read of a sum that is finite only when every gradient entry is.  No argument checks,
    accumulation, frozen layers, hooks or restoring on failure: the floor of the design, not a usable
    optimizer.
    """
    layers = model_layers(model)
    params = [p for layer in layers for p in layer.params]
    layer_of = [k for k, layer in enumerate(layers) for _ in layer.params]
    entries = torch.tensor([sum(p.numel() for p in layer.params) for layer in layers], device=alphas.device)
    shifted = [torch.empty_like(p) for p in params]
    loss = cross_entropy_of(model)

    def gradients(x: Tensor, y: Tensor) -> None:
        (x_i, x_j), (y_i, y_j) = x.chunk(2), y.chunk(2)
        g_i = list(torch.autograd.grad(loss(x_i, y_i), params))
        with torch.no_grad():
            step_sizes = alphas.detach().unbind()
            torch._foreach_copy_(shifted, params)
            torch._foreach_addcmul_(shifted, g_i, [step_sizes[k] for k in layer_of], value=-1)
        originals = [p.data for p in params]
        for p, w in zip(params, shifted):
            p.data = w
        try:
            h_j = torch.autograd.grad(loss(x_j, y_j), params)
        finally:
            for p, w in zip(params, originals):
                p.data = w
        with torch.no_grad():
            products = torch.cat([t.reshape(-1) for t in torch._foreach_mul(h_j, g_i)])
            alphas.grad = torch.segment_reduce(products, "sum", lengths=entries, unsafe=True).mul_(-ETA)
            torch._foreach_add_(g_i, h_j, alpha=ETA)
            if not math.isfinite(torch.cat([g.reshape(-1) for g in g_i]).sum().item()):
                raise FloatingPointError("a non-finite gradient")
            for p, g in zip(params, g_i):
                p.grad = g

    return gradients


def fo_by_hand_step(model: nn.Module) -> Step:
    """:func:`fo_by_hand_gradients` and one Adam step on the weights and, as a second group, the alphas
    (one tensor, as ``MLTPOptimizer`` keeps them)."""
    alphas = torch.empty(len(model_layers(model)), device=next(model.parameters()).device)
    alphas.normal_(*ALPHA_INIT).requires_grad_()
    gradients = fo_by_hand_gradients(model, alphas)
    opt = torch.optim.Adam([{"params": model.parameters()}, {"params": [alphas], "weight_decay": 0.0}], lr=LR)

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        gradients(x, y)
        opt.step()

    return step


def draw_alphas(model: nn.Module) -> list[Tensor]:
    """One alpha per layer drawn as torch_mltp draws them: N(1e-3, 1e-3)."""
    like = next(model.parameters())
    return [
        torch.empty((), dtype=like.dtype, device=like.device).normal_(*ALPHA_INIT).requires_grad_()
        for _ in model_layers(model)
    ]


def peer_step(peer: str) -> Callable[[nn.Module], Step]:
    """A peer's ``J``, ``J.backward()`` and one Adam step on the weights and alphas (``full`` mode)."""

    def factory(model: nn.Module) -> Step:
        alphas = draw_alphas(model)
        objective = PEER_OBJECTIVES[peer](model, alphas)
        weights = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam([{"params": weights}, {"params": alphas}], lr=LR)

        def step(x: Tensor, y: Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            objective(x, y).backward()
            opt.step()

        return step

    return factory


CONTESTANTS: dict[str, Callable[[nn.Module], Step]] = {
    "standard": standard_step,
    "halves": halves_step,
    **{mode: mltp_step(mode) for mode in MLTP_MODES},
    "fo-fixed-alpha": mltp_step("fo", learn_alpha=False),  # alpha as a hyperparameter (paper III-E)
    "fo-by-hand": fo_by_hand_step,
    # without host synchronisation (GPU only): fused Adam, and MLTP skipping non-finite steps on the device
    "halves-fused": lambda model: halves_step(model, fused=True),
    "fo-skip-fused": mltp_step("fo", nonfinite="skip", fused=True),
    **{peer: peer_step(peer) for peer in PEERS},
}
