"""The single-tensor path (``foreach=False``) and the fused multi-tensor path compute the same step.

Both are checked against the float64 double-backward reference in ``test_gradients.py`` and
``test_training_loops.py``; here they are checked against each other through the functional API on
generated models whose tensors fall on both sides of the fast path's size thresholds
(``LARGE_TENSOR``, ``EARLY_RELEASE_FROM``), with the thresholds as they ship.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from torch_mltp import MLTPOptimizer, constants, task_closures
from torch_mltp.functional import mltp_gradients

# 300 x 300 = 90,000 entries: released early; 1030 x 1030 = 1,060,900: processed one by one
WIDTHS = st.lists(st.sampled_from([3, 7, 300, 1030]), min_size=2, max_size=4)


def build(seed, widths):
    torch.manual_seed(seed)
    layers = []
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(n_in, n_out)] + ([nn.Tanh()] if k < len(widths) - 2 else [])
    return nn.Sequential(*layers).double()


def selection(model, chosen, alpha_per, seed):
    """``selected``, ``alphas`` and ``alpha_of`` for the chosen linear layers."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    selected, alphas, alpha_of = [], [], []
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for n, layer in enumerate(linears):
        if n not in chosen:
            continue
        for t, tensor in enumerate((layer.weight, layer.bias)):
            if alpha_per != "layer" or t == 0:
                shape = tensor.shape if alpha_per == "element" else ()
                alphas.append(0.05 + 0.05 * torch.rand(shape, generator=gen, dtype=torch.float64))
            selected.append(next(k for k, p in enumerate(params) if p is tensor))
            alpha_of.append(len(alphas) - 1)
    return params, selected, alphas, alpha_of


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    widths=WIDTHS,
    chosen=st.sets(st.integers(0, 2), min_size=1),
    alpha_per=st.sampled_from(["layer", "tensor", "element"]),
    first_order=st.booleans(),
    eta=st.floats(0.0, 2.0),
    scale=st.sampled_from([None, 2.0**10, 0.1]),
    guard=st.booleans(),
    alpha_grads=st.booleans(),
)
@example(0, [1030, 1030, 300, 7], {0, 1, 2}, "layer", False, 0.7, 2.0**10, True, True)  # both thresholds
@example(1, [300, 1030, 3], {1}, "tensor", True, 1.3, None, False, True)
@example(2, [1030, 1030, 3], {0}, "element", False, 1.0, None, True, True)
def test_both_paths_compute_the_same_step(
    seed, widths, chosen, alpha_per, first_order, eta, scale, guard, alpha_grads
):
    model = build(seed, widths)
    chosen = {n for n in chosen if n < len(widths) - 1} or {0}
    params, selected, alphas, alpha_of = selection(model, chosen, alpha_per, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(8, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (8,), generator=gen)
    results = [
        mltp_gradients(
            lambda: F.cross_entropy(model(x[:4]), y[:4]),
            lambda: F.cross_entropy(model(x[4:]), y[4:]),
            params,
            selected,
            alphas,
            alpha_of,
            eta,
            first_order,
            alpha_grads=alpha_grads,
            loss_scale=None if scale is None else torch.tensor(scale, dtype=torch.float64),
            guard_lookahead=guard,
            foreach=foreach,
        )
        for foreach in (False, True)
    ]
    single, fused = results
    for name in ("objective", "loss_i", "loss_j"):
        torch.testing.assert_close(getattr(fused, name), getattr(single, name), rtol=1e-12, atol=0)
    for k, (a, b) in enumerate(zip(single.param_grads, fused.param_grads)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13, msg=f"dJ/dw[{k}]")
    assert (single.alpha_grads is None) == (not alpha_grads)
    for a, (s, f) in enumerate(zip(single.alpha_grads or (), fused.alpha_grads or ())):
        torch.testing.assert_close(f, s, rtol=1e-10, atol=1e-13, msg=f"dJ/dalpha[{a}]")


def test_the_generated_models_reach_both_sides_of_the_thresholds():
    sizes = {p.numel() for p in build(0, [1030, 1030, 300, 7]).parameters()}
    assert max(sizes) >= constants.LARGE_TENSOR > 90_000 >= constants.EARLY_RELEASE_FROM > min(sizes)


class Marked(torch.Tensor):
    """A tensor subclass, as ``DTensor`` is one: the fused path does not take it."""


@pytest.mark.parametrize("foreach", [None, False, True])
def test_a_tensor_subclass_takes_the_single_tensor_path_and_foreach_true_refuses_it(foreach):
    model = build(0, [3, 4, 2])
    twin = build(0, [3, 4, 2])
    model[0].weight = nn.Parameter(model[0].weight.detach().as_subclass(Marked))
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    grads = []
    for m in (model, twin):
        torch.manual_seed(1)
        opt = MLTPOptimizer(torch.optim.SGD(m.parameters(), lr=0.0), m, mode="fo", foreach=foreach)
        closures = task_closures(lambda a, b, m=m: F.cross_entropy(m(a), b), x, y)
        if foreach and m is model:
            with pytest.raises(ValueError, match="foreach=True needs plain dense tensors"):
                opt.step(*closures)
            return
        opt.step(*closures)
        grads.append([p.grad for p in m.parameters()] + [a.grad for a in opt.alphas.values()])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got.as_subclass(torch.Tensor), expected, rtol=1e-12, atol=1e-14)
