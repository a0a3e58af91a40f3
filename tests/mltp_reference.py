"""An independent float64 computation of the MLTP objective and its gradients, for the tests.

Written from the paper's equations with ``torch.func.functional_call`` and plain double backward:
the lookahead ``w' = w - alpha * dL_i/dw`` is an ordinary differentiable expression, and one
``autograd.grad`` of ``J`` gives every gradient.  It shares no code with ``torch_mltp``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def alphas_by_parameter(model: nn.Module, alphas: dict[str, torch.Tensor], alpha_per: str) -> dict:
    """Map each shifted parameter's name to the alpha tensor that scales it."""
    if alpha_per != "layer":
        return dict(alphas)
    mapping = {}
    for layer_name, alpha in alphas.items():
        module = model.get_submodule(layer_name)
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                mapping[f"{layer_name}.{param_name}" if layer_name else param_name] = alpha
    return mapping


def objective(model, loss_fn, task_i, task_j, step_sizes, eta, first_order=False, create_graph=True):
    """``J = L_i(w) + eta * L_j(w - alpha * dL_i/dw)`` (paper eq. 4) as a differentiable function.

    ``step_sizes`` maps parameter names to alpha tensors (a shared tensor for a shared alpha).
    With ``first_order`` the inner gradient is a constant (``dw'/dw = I``), alpha stays exact.
    Returns ``(J, L_i, L_j)``.
    """
    params = trainable(model)
    names = list(params)
    loss_i = loss_fn(functional_call(model, params, (task_i[0],)), task_i[1])
    grads = torch.autograd.grad(
        loss_i, [params[n] for n in names], create_graph=create_graph, allow_unused=True
    )
    shifted = dict(params)
    for name, grad in zip(names, grads):
        if name in step_sizes and grad is not None:
            inner = grad.detach() if first_order else grad
            shifted[name] = params[name] - step_sizes[name] * inner
    loss_j = loss_fn(functional_call(model, shifted, (task_j[0],)), task_j[1])
    return loss_i + eta * loss_j, loss_i, loss_j


def gradients(model, loss_fn, task_i, task_j, step_sizes, eta, first_order=False):
    """``dJ/dw`` for every trainable parameter (by name) and ``dJ/dalpha`` for every distinct alpha."""
    params = trainable(model)
    unique_alphas = list({id(a): a for a in step_sizes.values()}.values())
    J, _, _ = objective(model, loss_fn, task_i, task_j, step_sizes, eta, first_order)
    grads = torch.autograd.grad(J, list(params.values()) + unique_alphas, allow_unused=True)
    weight_grads = dict(zip(params, grads[: len(params)]))
    alpha_grads = {id(a): g for a, g in zip(unique_alphas, grads[len(params) :])}
    return J.detach(), weight_grads, alpha_grads
