"""MLTP steps in low precision and in corner cases of the selection, against independent computations.

* bfloat16 / float16 models with layers of 1e5 to 1e6 entries: ``dJ/dalpha`` and ``dJ/dw`` of a
  first-order step equal the MLTP formulas evaluated with plain ``torch.autograd.grad`` in the same
  dtype and summed in float64, on both the fused and the per-tensor path;
* a selection whose every tensor has at least ``LARGE_TENSOR`` entries trains, with the float64
  double-backward reference's gradients;
* a selection whose layers are all frozen, with a guarded lookahead (``nonfinite="skip"`` or a
  ``weight``), takes the plain gradient of ``L_i + eta * L_j`` at ``w`` and leaves the alpha alone;
* a trainable complex parameter outside the selection is trained, not shifted, with the reference's
  gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mltp_reference import alphas_by_parameter, gradients, trainable
from torch import nn

from torch_mltp import MLTPOptimizer, Mode, constants, task_closures

ETA = 0.7
LR = 0.1
PATHS = pytest.mark.parametrize("foreach", [None, False], ids=["fused", "single"])


def loss_closure(model, task):
    x, y = task
    return lambda: F.cross_entropy(model(x), y)


# -- half precision -----------------------------------------------------------------------------------

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# rtol of dJ/dalpha: a few unit roundoffs of the dtype (the result is rounded to it)
ALPHA_RTOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}
# torch.testing.assert_close's default (rtol, atol) for the dtype
DEFAULT_TOLERANCE = {torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (1e-3, 1e-5)}
# layer "0" has 4.9e5 / 1.05e6 entries (the latter's weight has LARGE_TENSOR entries), "2" 7e3 / 1.0e5
HALF_WIDTHS = [(700, 700, 10), (1024, 1024, 100)]


def half_mlp(widths, dtype):
    torch.manual_seed(0)
    n_in, hidden, classes = widths
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def half_tasks(widths, dtype, batch=16):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * batch, widths[0], generator=gen).to(dtype)
    y = torch.randint(0, widths[-1], (2 * batch,), generator=gen)
    return (x[:batch], y[:batch]), (x[batch:], y[batch:])


def first_order_terms(model, task_i, task_j, step_sizes, rounded_once):
    """``g_i`` at ``w`` and ``h_j`` at ``w' = w - alpha * g_i`` by name, in the model's dtype, on a copy.

    The lookahead is rounded to the dtype twice (``alpha * g_i``, then the difference) or, with
    ``rounded_once``, once (the exact ``w - alpha * g_i`` rounded, as a fused multiply-add does)."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    loss_i = loss_closure(model, task_i)()
    g = dict(zip(params, torch.autograd.grad(loss_i, list(params.values()))))
    with torch.no_grad():
        for name, param in params.items():
            alpha = step_sizes[name].to(param.dtype)
            if rounded_once:
                param.copy_(param.double() - alpha.double() * g[name].double())
            else:
                param.sub_(alpha * g[name])
    loss_j = loss_closure(model, task_j)()
    h = dict(zip(params, torch.autograd.grad(loss_j, list(params.values()))))
    return g, h


def alpha_gradient(terms, names):
    """``-eta * sum <h_j, g_i>`` over ``names`` in float64, and the products ``h_j * g_i``."""
    g, h = terms
    products = torch.cat([(h[n].double() * g[n].double()).reshape(-1) for n in names])
    return -ETA * products.sum(), products


def assert_alpha_gradients(opt, original, task_i, task_j, step_sizes, dtype):
    """Each layer's ``alpha.grad`` is ``-eta * sum <h_j, g_i>`` from ``original``'s gradients, summed in
    float64, up to the dtype's rounding; returns the two references (lookahead rounded twice, once)."""
    twice = first_order_terms(original, task_i, task_j, step_sizes, rounded_once=False)
    once = first_order_terms(original, task_i, task_j, step_sizes, rounded_once=True)
    unit_roundoff = torch.finfo(dtype).eps / 2
    for layer, alpha in opt.alphas.items():
        names = [n for n in step_sizes if n.rpartition(".")[0] == layer]
        expected, products = alpha_gradient(twice, names)
        # atol: each product h_j * g_i may be rounded to the dtype (a relative error of at most the unit
        # roundoff u) before a sum carried in float32 or wider. Those errors are independent and of mean
        # zero: their sum has a standard deviation below u * ||h_j * g_i||_2, and 8 of them bound it. The
        # lookahead may be rounded once or twice, which moves h_j: the spread of the two references is
        # added. A sum carried in the dtype itself is far less accurate (every addition rounds the running
        # sum, an error that grows with the number of entries) and falls outside.
        spread = (alpha_gradient(once, names)[0] - expected).abs()
        atol = (8 * unit_roundoff * products.norm() + spread).item()
        torch.testing.assert_close(
            alpha.grad.double().cpu(),
            expected.cpu(),
            rtol=ALPHA_RTOL[dtype],
            atol=atol,
            msg=lambda m, n=layer: f"{n}: {m}",
        )
    return twice, once


def assert_within(actual, expected, *, rtol, atol, slack, msg):
    """``|actual - expected| <= atol + rtol * |expected| + slack`` entry by entry, in float64."""
    error = (actual.double() - expected).abs()
    allowed = atol + rtol * expected.abs() + slack
    outside = error > allowed
    worst = error.argmax()
    assert not outside.any(), (
        f"{msg}: {int(outside.sum())} of {error.numel()} entries outside the tolerance, largest error "
        f"{error.flatten()[worst].item():.3g} where {allowed.flatten()[worst].item():.3g} is allowed"
    )


@PATHS
@pytest.mark.parametrize("widths", HALF_WIDTHS, ids=["x".join(map(str, w)) for w in HALF_WIDTHS])
@pytest.mark.parametrize("dtype", list(HALF_DTYPES.values()), ids=list(HALF_DTYPES))
def test_half_precision_gradients_match_an_independent_computation(dtype, widths, foreach):
    """In bfloat16 and float16, dJ/dalpha of each layer is ``-eta * sum <h_j, g_i>`` up to the dtype's
    precision however many entries the layer has, and dJ/dw is ``g_i + eta * h_j``."""
    model = half_mlp(widths, dtype)
    original = copy.deepcopy(model)
    task_i, task_j = half_tasks(widths, dtype)
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        model,
        eta=ETA,
        alpha_init=0.05,
        mode="fo",
        foreach=foreach,
    )
    step_sizes = alphas_by_parameter(model, {n: a.detach().clone() for n, a in opt.alphas.items()}, "layer")
    opt.zero_grad()
    opt.backward(loss_closure(model, task_i), loss_closure(model, task_j))

    twice, once = assert_alpha_gradients(opt, original, task_i, task_j, step_sizes, dtype)
    unit_roundoff = torch.finfo(dtype).eps / 2

    # dJ/dw: torch.testing's default tolerances for the dtype, widened by the rounding of eta * h_j (and of
    # g_i) to the dtype before they are added, which matters where the two cancel, and by the spread of the
    # two roundings of the lookahead
    rtol, atol = DEFAULT_TOLERANCE[dtype]
    for name, param in model.named_parameters():
        (g, h), (g_once, h_once) = ((t[0][name].double(), t[1][name].double()) for t in (twice, once))
        expected = g + ETA * h
        spread = (g_once + ETA * h_once - expected).abs()
        rounded_terms = unit_roundoff * (g.abs() + ETA * h.abs())
        assert param.grad is not None and param.grad.dtype == dtype, name
        assert_within(param.grad, expected, rtol=rtol, atol=atol, slack=spread + rounded_terms, msg=name)


# -- a selection of only large tensors ---------------------------------------------------------------


@pytest.mark.parametrize("first_order", [True, False], ids=["fo", "full"])
@PATHS
def test_a_selection_of_only_large_tensors_trains(foreach, first_order):
    """When every selected tensor has at least ``LARGE_TENSOR`` entries (a scalar alpha per layer), the
    step computes dJ/dw and dJ/dalpha of the double-backward reference and the base optimizer takes them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(4096, 256), nn.Flatten(), nn.Linear(512, 3)).double()
    assert model[0].weight.numel() >= constants.LARGE_TENSOR
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 4096, (4, 2), generator=gen)
    x = torch.cat([rows, rows.flip(1)])  # task j looks up task i's rows, in other positions
    y = torch.randint(0, 3, (8,), generator=gen)
    mode = Mode(layers="0", first_order=first_order)
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        model,
        eta=ETA,
        alpha_init=0.05,
        mode=mode,
        foreach=foreach,
    )
    assert list(opt.alphas) == ["0"] and opt.alphas["0"].dim() == 0
    alpha = opt.alphas["0"].detach().clone()
    step_sizes = {"0.weight": alpha.clone().requires_grad_()}

    opt.zero_grad()
    J = opt.step(*task_closures(lambda xs, ys: F.cross_entropy(model(xs), ys), x, y))

    J_ref, weight_grads, alpha_grads = gradients(
        reference, F.cross_entropy, (x[:4], y[:4]), (x[4:], y[4:]), step_sizes, ETA, first_order
    )
    alpha_grad = alpha_grads[id(step_sizes["0.weight"])]
    assert alpha_grad.abs() > 1e-6  # the tasks share rows: the lookahead changes L_j
    torch.testing.assert_close(J, J_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.alphas["0"].grad, alpha_grad, rtol=1e-8, atol=1e-12)
    for (name, param), before in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, weight_grads[name], rtol=1e-8, atol=1e-12, msg=name)
        torch.testing.assert_close(param.detach(), before - LR * weight_grads[name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.alphas["0"], alpha - LR * alpha_grad, rtol=1e-10, atol=1e-12)


# -- a frozen selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("nonfinite", "weight"), [("skip", 1.0), ("raise", 0.5)], ids=["skip", "weight"])
@PATHS
def test_a_frozen_selection_with_a_guarded_lookahead(foreach, nonfinite, weight):
    """With every selected layer frozen nothing is shifted, also when the lookahead is guarded: the other
    layers receive ``weight`` times the gradient of ``L_i + eta * L_j`` at ``w``, the frozen layer and its
    alpha stay where they are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=gen)
    opt = MLTPOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01),
        model,
        eta=ETA,
        alpha_init=0.05,
        mode=Mode(layers="0"),
        nonfinite=nonfinite,
        foreach=foreach,
    )
    closures = task_closures(lambda xs, ys: F.cross_entropy(model(xs), ys), x, y)
    opt.step(*closures)  # a step with layer "0" trainable: Adam holds state for its alpha
    opt.zero_grad()
    model[0].requires_grad_(False)

    frozen = [p.detach().clone() for p in model[0].parameters()]
    trained = [p.detach().clone() for p in model[1].parameters()]
    alpha = opt.alphas["0"].detach().clone()
    with torch.enable_grad():
        plain = closures[0]() + ETA * closures[1]()
        expected = torch.autograd.grad(weight * plain, list(model[1].parameters()))

    opt.backward(*closures, weight=weight)
    for param, grad in zip(model[1].parameters(), expected):
        torch.testing.assert_close(param.grad, grad, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model[0].parameters())

    opt.step()
    assert opt.skipped_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))
    assert all(not torch.equal(p, q) for p, q in zip(model[1].parameters(), trained))
    assert torch.equal(opt.alphas["0"], alpha)


# -- a complex parameter outside the selection --------------------------------------------------------


class WithComplexParameter(nn.Module):
    """A real linear layer and a complex parameter that adds ``|z|^2`` to the logits."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2, dtype=torch.float64)
        self.z = nn.Parameter(torch.randn(2, dtype=torch.complex128))

    def forward(self, x):
        return self.lin(x) + (self.z * self.z.conj()).real


@pytest.mark.parametrize("first_order", [True, False], ids=["fo", "full"])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("weight", [1.0, 0.5])
@PATHS
def test_a_complex_parameter_outside_the_selection_trains(foreach, weight, nonfinite, first_order):
    """A trainable complex tensor that no alpha scales stays at ``w`` during task j and receives
    ``weight`` times the reference's dJ/dz (first order: ``dL_i/dz + eta * dL_j/dz`` at ``w'``); the
    shifted layer's lookahead moves by the unweighted ``dL_i/dw``, and a finite step is taken."""
    torch.manual_seed(0)
    model = WithComplexParameter()
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=gen)
    task_i, task_j = (x[:4], y[:4]), (x[4:], y[4:])
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        model,
        eta=ETA,
        alpha_init=0.05,
        mode=Mode(layers="lin", first_order=first_order),
        nonfinite=nonfinite,
        foreach=foreach,
    )
    assert list(opt.alphas) == ["lin"]
    alpha = opt.alphas["lin"].detach().clone()
    step_sizes = alphas_by_parameter(reference, {"lin": alpha.clone().requires_grad_()}, "layer")
    seen_by_task_j = {}

    def closure_j():
        seen_by_task_j.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return loss_closure(model, task_j)()

    opt.zero_grad()
    opt.backward(loss_closure(model, task_i), closure_j, weight=weight)

    _, weight_grads, alpha_grads = gradients(
        reference, F.cross_entropy, task_i, task_j, step_sizes, ETA, first_order
    )
    before = trainable(reference)
    torch.testing.assert_close(seen_by_task_j["z"], before["z"], rtol=0, atol=0)  # not shifted
    g_i = torch.autograd.grad(loss_closure(reference, task_i)(), [before["lin.weight"], before["lin.bias"]])
    for name, g in zip(["lin.weight", "lin.bias"], g_i):
        torch.testing.assert_close(seen_by_task_j[name], before[name] - alpha * g, rtol=1e-12, atol=1e-14)
    for name, param in model.named_parameters():
        assert param.grad.dtype == param.dtype, name
        torch.testing.assert_close(param.grad, weight * weight_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    alpha_grad = alpha_grads[id(step_sizes["lin.weight"])]
    torch.testing.assert_close(opt.alphas["lin"].grad, weight * alpha_grad, rtol=1e-10, atol=1e-12)

    opt.step()
    assert opt.skipped_steps == 0
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), before[name] - LR * weight * weight_grads[name], msg=name)
    torch.testing.assert_close(opt.alphas["lin"], alpha - LR * weight * alpha_grad)
