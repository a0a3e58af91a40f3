"""dJ/dw and dJ/dalpha of every MLTP variant against independent float64 computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from mltp_reference import alphas_by_parameter, gradients, objective, trainable
from torch import nn

from torch_mltp import MLTPOptimizer, Mode, _foreach, constants, functional, task_closures

ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "relu": nn.ReLU}


def make_mlp(seed, widths, activation="tanh"):
    torch.manual_seed(seed)
    layers = []
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if k < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers).double()


def make_cnn(seed, channels, classes, activation="tanh", batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, channels, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(channels))
    layers += [ACTIVATIONS[activation](), nn.Conv2d(channels, channels, 3), ACTIVATIONS[activation]()]
    layers += [
        nn.AvgPool2d(2),  # smooth: central differences must not straddle a max-pool switch
        nn.Flatten(),
        nn.Linear(channels * 2 * 2, 6),
        nn.Tanh(),
        nn.Linear(6, classes),
    ]
    return nn.Sequential(*layers).double()


def make_tasks(seed, in_shape, classes, batch):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2 * batch, *in_shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (2 * batch,), generator=gen)
    return (x[:batch], y[:batch]), (x[batch:], y[batch:])


def mltp_step_gradients(model, task_i, task_j, **kwargs):
    """One step with SGD(lr=0): the weights stay put and .grad holds dJ/dw, dJ/dalpha."""
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, **kwargs)
    step_sizes = {n: a.detach().clone().requires_grad_() for n, a in opt.alphas.items()}
    opt.zero_grad()
    J = opt.step(
        lambda: F.cross_entropy(model(task_i[0]), task_i[1]),
        lambda: F.cross_entropy(model(task_j[0]), task_j[1]),
    )
    return opt, J, step_sizes


def assert_matches_reference(
    model, task_i, task_j, mode, eta, alpha_per="layer", first_order=None, foreach=None
):
    """One step of either path (``foreach``) against the float64 double-backward reference."""
    opt, J, alpha_copies = mltp_step_gradients(
        model,
        task_i,
        task_j,
        eta=eta,
        alpha_init=(0.05, 0.05),
        mode=mode,
        alpha_per=alpha_per,
        foreach=foreach,
    )
    step_sizes = alphas_by_parameter(model, alpha_copies, alpha_per)
    first_order = opt.first_order if first_order is None else first_order
    J_ref, weight_grads, alpha_grads = gradients(
        model, F.cross_entropy, task_i, task_j, step_sizes, eta, first_order=first_order
    )
    torch.testing.assert_close(J, J_ref, rtol=1e-10, atol=1e-12)
    for name, param in trainable(model).items():
        expected = weight_grads[name]
        if expected is None:
            assert param.grad is None, name
        else:
            torch.testing.assert_close(param.grad, expected, rtol=1e-8, atol=1e-10, msg=name)
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(alpha.grad, alpha_grads[id(alpha_copies[name])], rtol=1e-8, atol=1e-10)
    return opt, step_sizes


mlp_widths = st.lists(st.integers(2, 6), min_size=2, max_size=5)
etas = st.floats(0.0, 2.0)
seeds = st.integers(0, 2**16)
paths = st.sampled_from([None, False])  # the fused multi-tensor path where it applies, the single-tensor one


@given(
    seed=seeds,
    widths=mlp_widths,
    eta=etas,
    batch=st.integers(1, 6),
    activation=st.sampled_from(list(ACTIVATIONS)),
    foreach=paths,
)
@pytest.mark.parametrize("mode", ["full", "fo", "fc"])
def test_mlp_gradients_match_double_backward(mode, seed, widths, eta, batch, activation, foreach):
    model = make_mlp(seed, widths, activation)
    task_i, task_j = make_tasks(seed, (widths[0],), widths[-1], batch)
    assert_matches_reference(model, task_i, task_j, mode, eta, foreach=foreach)


@pytest.mark.parametrize("mode", ["full", "fo"])
@pytest.mark.parametrize("alpha_per", ["layer", "tensor"])
def test_large_tensors_one_by_one_give_the_same_gradients(monkeypatch, mode, alpha_per):
    """Tensors above ``LARGE_TENSOR`` entries take the one-by-one path (lookahead, dJ/dalpha); with the
    threshold lowered, a CNN mixes both paths and still matches the reference."""
    monkeypatch.setattr(constants, "LARGE_TENSOR", 20)
    model = make_cnn(3, 3, classes=3, batchnorm=True)
    assert {p.numel() >= 20 for p in model.parameters()} == {True, False}
    task_i, task_j = make_tasks(3, (2, 6, 6), 3, 4)
    assert_matches_reference(model, task_i, task_j, mode, 0.7, alpha_per=alpha_per)


@given(
    seed=seeds,
    channels=st.integers(1, 3),
    eta=etas,
    batch=st.integers(1, 4),
    batchnorm=st.booleans(),
    foreach=paths,
)
@pytest.mark.parametrize("mode", ["full", "conv", "fc", "fo"])
def test_cnn_gradients_match_double_backward(mode, seed, channels, eta, batch, batchnorm, foreach):
    model = make_cnn(seed, channels, classes=3, batchnorm=batchnorm)
    task_i, task_j = make_tasks(seed, (2, 6, 6), 3, batch)
    opt, _ = assert_matches_reference(model, task_i, task_j, mode, eta, foreach=foreach)
    conv_layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linear_layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    expected_layers = {"conv": conv_layers, "fc": linear_layers}.get(mode)
    if expected_layers is not None:
        assert list(opt.alphas) == expected_layers


@given(
    seed=seeds,
    eta=etas,
    first_order=st.booleans(),
    alpha_per=st.sampled_from(["layer", "tensor", "element"]),
    foreach=paths,
)
@pytest.mark.parametrize(
    "layers",
    [
        "0",  # only the first conv layer (paper, end of III-E)
        ["6", "8"],  # by qualified name: the fully connected layers
        nn.Conv2d,  # by type
        lambda name, module: isinstance(module, nn.Linear) and module.out_features == 3,  # the last fc layer
    ],
    ids=["name", "names", "type", "predicate"],
)
def test_custom_selection_gradients(layers, seed, eta, first_order, alpha_per, foreach):
    model = make_cnn(seed, 2, classes=3)
    task_i, task_j = make_tasks(seed, (2, 6, 6), 3, 3)
    mode = Mode(layers=layers, first_order=first_order)
    assert_matches_reference(model, task_i, task_j, mode, eta, alpha_per, foreach=foreach)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("alpha_per", ["tensor", "element"])
@pytest.mark.parametrize("mode", ["full", "fo"])
def test_alpha_granularity_shapes_and_gradients(mode, alpha_per, foreach):
    model = make_mlp(3, [4, 5, 3])
    task_i, task_j = make_tasks(3, (4,), 3, 5)
    opt, _ = assert_matches_reference(model, task_i, task_j, mode, 0.7, alpha_per, foreach=foreach)
    params = trainable(model)
    assert list(opt.alphas) == list(params)
    for name, alpha in opt.alphas.items():
        assert alpha.shape == (params[name].shape if alpha_per == "element" else ())


def test_first_order_is_gi_plus_eta_hj_and_differs_from_full():
    """MLTP_FO: dJ/dw = g_i + eta * dL_j(w')/dw'; the exact gradient differs by the Hessian term."""
    model = make_mlp(5, [3, 6, 6, 3], "tanh")
    task_i, task_j = make_tasks(5, (3,), 3, 6)
    eta = 0.8
    mltp_step_gradients(model, task_i, task_j, eta=eta, alpha_init=0.3, mode="fo")
    fo_grads = {n: p.grad.clone() for n, p in trainable(model).items()}

    params = {n: p.detach().clone().requires_grad_() for n, p in trainable(model).items()}
    names = list(params)
    loss_i = F.cross_entropy(torch.func.functional_call(model, params, (task_i[0],)), task_i[1])
    g_i = dict(zip(names, torch.autograd.grad(loss_i, list(params.values()))))
    shifted = {n: (params[n] - 0.3 * g_i[n]).detach().requires_grad_() for n in names}
    loss_j = F.cross_entropy(torch.func.functional_call(model, shifted, (task_j[0],)), task_j[1])
    h_j = dict(zip(names, torch.autograd.grad(loss_j, list(shifted.values()))))
    for n in names:
        torch.testing.assert_close(fo_grads[n], g_i[n] + eta * h_j[n], rtol=1e-10, atol=1e-12)

    mltp_step_gradients(model, task_i, task_j, eta=eta, alpha_init=0.3, mode="full")
    difference = sum((p.grad - fo_grads[n]).norm() ** 2 for n, p in trainable(model).items()).sqrt()
    scale = sum(g.norm() ** 2 for g in fo_grads.values()).sqrt()
    assert difference > 1e-3 * scale


def test_layers_outside_the_selection_get_exact_cross_terms():
    """In "fc" mode the conv layers are not shifted, yet their gradient includes d(g_i,fc)/dw_conv."""
    model = make_cnn(11, 2, classes=3)
    task_i, task_j = make_tasks(11, (2, 6, 6), 3, 4)
    _, step_sizes = assert_matches_reference(model, task_i, task_j, "fc", 1.0)
    conv_names = [n for n in trainable(model) if n.startswith(("0.", "2."))]
    assert conv_names and not any(n in step_sizes for n in conv_names)
    # Without the cross terms (dw'/dw = I) the conv gradient would be different.
    _, fo_grads, _ = gradients(model, F.cross_entropy, task_i, task_j, step_sizes, 1.0, first_order=True)
    params = trainable(model)
    assert any((params[n].grad - fo_grads[n]).abs().max() > 1e-9 for n in conv_names)


@pytest.mark.parametrize("large_from", [constants.LARGE_TENSOR, 20])
@pytest.mark.parametrize("mode", ["fo", "full", "conv"])
def test_the_fused_kernel_path_gives_the_same_gradients(monkeypatch, mode, large_from):
    """Where fused multi-tensor kernels run (a GPU), the per-layer alphas are expanded to their tensors'
    shapes before the lookahead and the Hessian term; here that path runs on the CPU."""
    monkeypatch.setattr(_foreach, "_fused_kernels", lambda tensor: True)
    monkeypatch.setattr(constants, "LARGE_TENSOR", large_from)
    model = make_cnn(3, channels=3, classes=4)
    task_i, task_j = make_tasks(3, (2, 6, 6), 4, 5)
    assert_matches_reference(model, task_i, task_j, mode, 0.9)


class AppliedTwice(nn.Module):
    """One linear layer used twice in a forward pass: its gradient has two contributions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


@pytest.mark.parametrize("mode", ["full", "fo"])
def test_a_layer_applied_twice_is_shifted_for_both_uses(monkeypatch, mode):
    """Second order hands each weight its own storage back as soon as its gradient at w' is complete:
    after both uses of the twice-applied layer, not after the first."""
    monkeypatch.setattr(constants, "EARLY_RELEASE_FROM", 1)  # every tensor of this small model
    model = AppliedTwice().double()
    task_i, task_j = make_tasks(5, (4,), 3, 6)
    assert_matches_reference(model, task_i, task_j, mode, 0.8)


def test_release_early_gives_the_storage_back_once_the_gradient_is_complete(monkeypatch):
    """A tensor of at least EARLY_RELEASE_FROM entries gets its storage back as soon as its gradient is
    complete; a smaller one at the end of the block."""
    monkeypatch.setattr(constants, "EARLY_RELEASE_FROM", 3)
    large, small = (nn.Parameter(torch.ones(n, dtype=torch.float64)) for n in (3, 2))
    own = [large.data_ptr(), small.data_ptr()]
    values = [torch.full((3,), 2.0, dtype=torch.float64), torch.full((2,), 3.0, dtype=torch.float64)]
    with functional.swapped_storage([large, small], values, release_early=True):
        assert values == [] and large.data_ptr() != own[0] and large[0].item() == 2.0
        loss = (large * large).sum() + large.sum() ** 2 + small.sum()
        grad, _ = torch.autograd.grad(loss, [large, small])
        assert large.data_ptr() == own[0]  # back before the block ends
        assert small.data_ptr() != own[1] and small[0].item() == 3.0  # still w'
    assert torch.equal(grad, torch.full((3,), 2 * 2.0 + 2 * 6.0, dtype=torch.float64))
    assert [large.data_ptr(), small.data_ptr()] == own
    assert not large._backward_hooks and not small._backward_hooks


# -- finite differences --------------------------------------------------------------------------


def objective_value(model, task_i, task_j, step_sizes, eta, first_order=False):
    with torch.enable_grad():
        J, _, _ = objective(
            model, F.cross_entropy, task_i, task_j, step_sizes, eta, first_order, create_graph=False
        )
    return J.item()


@given(seed=seeds, eta=etas, mode=st.sampled_from(["full", "fc", "conv"]))
def test_gradients_match_central_finite_differences(seed, eta, mode):
    """dJ/dalpha and a directional derivative of J in w against central differences (float64)."""
    model = make_cnn(seed, 2, classes=3)
    task_i, task_j = make_tasks(seed, (2, 6, 6), 3, 3)
    opt, _, alpha_copies = mltp_step_gradients(
        model, task_i, task_j, eta=eta, alpha_init=(0.05, 0.05), mode=mode
    )
    step_sizes = alphas_by_parameter(model, {n: a.detach() for n, a in alpha_copies.items()}, "layer")
    h = 1e-5

    for name, alpha in alpha_copies.items():
        shifted = {}
        for sign in (1, -1):
            perturbed = dict(alpha_copies)
            perturbed[name] = alpha.detach() + sign * h
            shifted[sign] = objective_value(
                model, task_i, task_j, alphas_by_parameter(model, perturbed, "layer"), eta
            )
        numeric = (shifted[1] - shifted[-1]) / (2 * h)
        assert math.isclose(opt.alphas[name].grad.item(), numeric, rel_tol=1e-5, abs_tol=1e-8)

    gen = torch.Generator().manual_seed(seed)
    params = trainable(model)
    direction = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}
    analytic = sum((p.grad * direction[n]).sum() for n, p in params.items()).item()
    values = {}
    for sign in (1, -1):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(direction[n], alpha=sign * h)
        values[sign] = objective_value(model, task_i, task_j, step_sizes, eta)
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(direction[n], alpha=sign * h)
    numeric = (values[1] - values[-1]) / (2 * h)
    assert math.isclose(analytic, numeric, rel_tol=1e-5, abs_tol=1e-8)


# -- paper eq. (5) ---------------------------------------------------------------------------------


@given(seed=seeds, widths=mlp_widths, eta=st.floats(0.1, 2.0), alpha=st.floats(1e-3, 1e-2))
def test_taylor_expansion_eq5_residual_is_second_order(seed, widths, eta, alpha):
    """J - (L_i + eta L_j - eta sum_k alpha_k <g_i,k, g_j,k>) = O(alpha^2): halving alpha quarters it."""
    model = make_mlp(seed, widths, "tanh")
    task_i, task_j = make_tasks(seed, (widths[0],), widths[-1], 4)
    params = trainable(model)
    with torch.enable_grad():
        loss_i = F.cross_entropy(model(task_i[0]), task_i[1])
        loss_j = F.cross_entropy(model(task_j[0]), task_j[1])
        g_i = torch.autograd.grad(loss_i, list(params.values()))
        g_j = torch.autograd.grad(loss_j, list(params.values()))
    inner = sum((a * b).sum() for a, b in zip(g_i, g_j)).item()

    def residual(a):
        opt = MLTPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0), model, eta=eta, alpha_init=a, learn_alpha=False
        )
        J = opt.step(
            lambda: F.cross_entropy(model(task_i[0]), task_i[1]),
            lambda: F.cross_entropy(model(task_j[0]), task_j[1]),
        ).item()
        return J - (loss_i.item() + eta * loss_j.item() - eta * a * inner)

    r_full, r_half = residual(alpha), residual(alpha / 2)
    if abs(r_full) < 1e-13:  # no curvature along the step: nothing to measure in float64
        return
    assert 3.0 < r_full / r_half < 5.0


@pytest.mark.parametrize("mode", ["fo", "full"])
def test_several_sgd_steps_follow_the_reference_trajectory(mode):
    """Weights and alphas after 4 SGD steps equal plain SGD on the reference dJ/dw, dJ/dalpha."""
    model = make_mlp(21, [4, 6, 3])
    reference = make_mlp(21, [4, 6, 3])
    torch.manual_seed(5)
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, alpha_init=(0.1, 0.05), mode=mode)
    alphas = {n: a.detach().clone() for n, a in opt.alphas.items()}
    for step in range(4):
        task_i, task_j = make_tasks(100 + step, (4,), 3, 5)
        batch = (torch.cat([task_i[0], task_j[0]]), torch.cat([task_i[1], task_j[1]]))
        opt.zero_grad()
        opt.step(*task_closures(lambda x, y: F.cross_entropy(model(x), y), *batch))
        leaves = {n: a.clone().requires_grad_() for n, a in alphas.items()}
        step_sizes = alphas_by_parameter(reference, leaves, "layer")
        _, weight_grads, alpha_grads = gradients(
            reference, F.cross_entropy, task_i, task_j, step_sizes, 1.0, first_order=mode == "fo"
        )
        with torch.no_grad():
            for name, param in trainable(reference).items():
                param -= 0.1 * weight_grads[name]
            alphas = {n: a - 0.1 * alpha_grads[id(leaves[n])] for n, a in alphas.items()}
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(alpha.detach(), alphas[name], rtol=1e-10, atol=1e-12)
