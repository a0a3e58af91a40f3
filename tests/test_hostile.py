"""Hostile and unusual use: what must work, what must be refused with a message naming the cause."""

from __future__ import annotations

import copy
import io
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mltp_reference import alphas_by_parameter, gradients, trainable
from torch import nn
from torch.nn.utils import parametrizations

from torch_mltp import MLTPOptimizer, Mode, task_closures

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_bench.opcount import SYNC, data_ops


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batch(seed=0, size=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, 5, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (size,), generator=gen
    )


def closures(model, x, y, loss=F.cross_entropy):
    return task_closures(lambda a, b: loss(model(a), b), x, y)


def values(model, opt):
    tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors.update({f"alpha:{n}": a.detach().clone() for n, a in opt.alphas.items()})
    return tensors


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def state_bytes(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return buffer.getvalue()


# -- gradients autograd hands back in unusual forms ----------------------------------------------------


class WithSpare(nn.Module):
    """Uses the common trick of adding ``0 * sum(unused)`` so that DDP sees every parameter."""

    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.spare = nn.Linear(2, 2).double()

    def forward(self, x):
        return self.body(x) + 0.0 * sum(p.sum() for p in self.spare.parameters())


@pytest.mark.parametrize("mode", ["fo", "full"])
def test_expanded_zero_gradients_of_the_unused_parameter_trick(mode):
    model = WithSpare()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, mode=mode, alpha_init=0.05)
    x, y = batch()
    for _ in range(2):  # the second step accumulates into the .grad the first one wrote
        opt.step(*closures(model, x, y))
    for p in model.spare.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p)) and p.grad.stride() == p.stride()


class SharedGradient(nn.Module):
    """``F.linear(x, w + delta)``: autograd returns one tensor as the gradient of both ``w`` and ``delta``
    (with a flat ``delta``, the gradient of one is a view of the gradient of the other)."""

    def __init__(self, delta_shape=(3, 5)):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
        self.delta = nn.Parameter(0.1 * torch.randn(delta_shape, dtype=torch.float64))

    def forward(self, x):
        return F.linear(torch.tanh(x), self.w + self.delta.view_as(self.w))


@pytest.mark.parametrize("delta_shape", [(3, 5), (15,)])
@pytest.mark.parametrize("mode", ["fo", "full"])
def test_one_gradient_tensor_shared_by_two_parameters(mode, delta_shape):
    model = SharedGradient(delta_shape)
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), model, mode=mode, alpha_init=0.05, alpha_per="tensor"
    )
    leaves = {n: a.detach().clone().requires_grad_() for n, a in opt.alphas.items()}
    x, y = batch()
    opt.step(*closures(model, x, y))
    _, expected, _ = gradients(
        model, F.cross_entropy, (x[:4], y[:4]), (x[4:], y[4:]), leaves, 1.0, first_order=mode == "fo"
    )
    for name, param in trainable(model).items():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


# -- copies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_drives_its_own_model_and_trains_like_the_original(how):
    model = mlp()
    opt = MLTPOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), model, mode="fo", alpha_init=(0.05, 0.01)
    )
    x, y = batch()
    opt.step(*closures(model, x, y))
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        model2, opt2 = torch.load(buffer, weights_only=False)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert all(p is q for p, q in zip(opt2.param_groups[0]["params"], model2.parameters()))
    original = values(model, opt)
    for _ in range(2):
        x, y = batch(seed=1)
        opt2.zero_grad()
        opt2.step(*closures(model2, x, y))
    assert same(values(model, opt), original)  # the original is untouched
    for _ in range(2):
        opt.zero_grad()
        opt.step(*closures(model, x, y))
    assert same(values(model, opt), values(model2, opt2))


# -- checkpoints ---------------------------------------------------------------------------------------


def trained(mode="fo", learn_alpha=True):
    model = mlp()
    opt = MLTPOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        model,
        mode=mode,
        alpha_init=0.05,
        learn_alpha=learn_alpha,
    )
    x, y = batch()
    opt.step(*closures(model, x, y))
    return model, opt


def corrupted(state, change):
    state = copy.deepcopy(state)
    change(state)
    return state


BAD_CHECKPOINTS = {
    "missing alphas": (lambda s: s["mltp"].pop("alphas"), "lacks alphas"),
    "missing eta": (lambda s: s["mltp"].pop("eta"), "lacks eta"),
    "missing base state": (lambda s: s.pop("state"), "lacks the base optimizer's 'state'"),
    "wrong alpha shape": (lambda s: s["mltp"]["alphas"].update({"0": torch.zeros(3)}), "expected shape"),
    "nan alpha": (lambda s: s["mltp"]["alphas"].update({"0": torch.tensor(float("nan"))}), "not a finite"),
    "bogus policy": (lambda s: s["mltp"].update(nonfinite="bogus"), "nonfinite must be one of"),
    "negative eta": (lambda s: s["mltp"].update(eta=-1.0), "eta must be a finite number >= 0"),
    "other layers": (lambda s: s["mltp"]["alphas"].pop("2"), "alphas for layers"),
    "alpha state shape": (lambda s: s["state"][4].update(exp_avg=torch.zeros(3)), "exp_avg"),
    "group count": (lambda s: s["param_groups"].pop(), "param groups"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_refused_and_changes_nothing(case):
    change, message = BAD_CHECKPOINTS[case]
    _, source = trained()
    bad = corrupted(source.state_dict(), change)
    model, opt = trained()
    x, y = batch(3)
    opt.step(*closures(model, x, y))  # a state that differs from the checkpoint's
    before, before_state = values(model, opt), state_bytes(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert same(values(model, opt), before) and state_bytes(opt) == before_state


def test_a_failure_inside_the_base_load_restores_the_base_state():
    _, opt = trained()
    bad = opt.state_dict()
    bad["param_groups"][0]["params"] = bad["param_groups"][0]["params"][:-1]  # torch refuses the sizes
    before = state_bytes(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    assert state_bytes(opt) == before and opt.param_groups is opt.base_optimizer.param_groups


def test_compiled_and_eager_checkpoints_load_into_each_other():
    _, opt = trained()
    compiled = torch.compile(mlp(), backend="aot_eager")
    opt_compiled = MLTPOptimizer(
        torch.optim.Adam(compiled.parameters(), lr=1e-2), compiled, mode="fo", alpha_init=0.1
    )
    assert list(opt_compiled.alphas) == list(opt.alphas)
    opt_compiled.load_state_dict(opt.state_dict())
    assert all(torch.equal(opt_compiled.alphas[n], opt.alphas[n]) for n in opt.alphas)
    opt.load_state_dict(opt_compiled.state_dict())


# -- layers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parametrize", [parametrizations.weight_norm, parametrizations.spectral_norm, parametrizations.orthogonal]
)
@pytest.mark.parametrize("mode", ["fc", "full"])
def test_a_parametrized_layer_gets_one_alpha_and_all_its_tensors_shift(parametrize, mode):
    torch.manual_seed(0)
    model = nn.Sequential(parametrize(nn.Linear(5, 5)), nn.Tanh(), nn.Linear(5, 3)).double()
    if parametrize is parametrizations.spectral_norm:
        model.eval()  # no power iteration between the two forward passes: a fixed function of w
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), model, mode=mode, alpha_init=(0.05, 0.02)
    )
    assert list(opt.alphas) == ["0", "2"]
    leaves = {n: a.detach().clone().requires_grad_() for n, a in opt.alphas.items()}
    step_sizes = alphas_by_parameter(model, leaves, "layer")
    step_sizes.update(
        {
            f"0.parametrizations.weight.{n}": leaves["0"]
            for n, _ in model[0].parametrizations.weight.named_parameters()
        }
    )
    x, y = batch()
    opt.step(*closures(model, x, y))
    _, expected, expected_alpha = gradients(
        model, F.cross_entropy, (x[:4], y[:4]), (x[4:], y[4:]), step_sizes, 1.0
    )
    for name, param in trainable(model).items():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-8, atol=1e-10, msg=name)
    torch.testing.assert_close(opt.alphas["0"].grad, expected_alpha[id(leaves["0"])], rtol=1e-8, atol=1e-10)


def test_complex_parameters_in_the_selection_are_refused():
    model = nn.Sequential(nn.Linear(4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"complex64.*real"):
        MLTPOptimizer(torch.optim.Adam(model.parameters()), model)


def test_a_frozen_layer_gets_no_alpha_gradient_and_its_alpha_stays_put():
    model = mlp()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, mode="fo", alpha_init=0.05)
    x, y = batch()
    opt.step(*closures(model, x, y))
    model[0].requires_grad_(False)
    alpha = opt.alphas["0"].detach().clone()
    for seed in range(3):  # Adam's momentum would move a zero-gradient alpha
        opt.zero_grad()
        opt.step(*closures(model, *batch(seed)))
        assert opt.alphas["0"].grad is None
    assert torch.equal(opt.alphas["0"].detach(), alpha)


def test_a_layer_frozen_at_construction_and_unfrozen_later_is_shifted():
    """A frozen layer held by the base optimizer has an alpha from the start; once unfrozen it is
    shifted like any other (its gradient matches the float64 reference with the shift)."""
    model = mlp()
    model[0].requires_grad_(False)
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), model, mode="full", alpha_init=(0.05, 0.02)
    )
    assert list(opt.alphas) == ["0", "2"]
    model[0].requires_grad_(True)
    leaves = {n: a.detach().clone().requires_grad_() for n, a in opt.alphas.items()}
    x, y = batch()
    opt.step(*closures(model, x, y))
    step_sizes = alphas_by_parameter(model, leaves, "layer")
    _, expected, expected_alpha = gradients(
        model, F.cross_entropy, (x[:4], y[:4]), (x[4:], y[4:]), step_sizes, 1.0
    )
    for name, param in trainable(model).items():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(opt.alphas["0"].grad, expected_alpha[id(leaves["0"])], rtol=1e-10, atol=1e-12)


def test_a_parameter_added_after_wrapping_is_trained_and_the_user_is_told_it_is_not_shifted():
    model = mlp()
    model[2].requires_grad_(False)
    opt = MLTPOptimizer(
        torch.optim.Adam([p for p in model.parameters() if p.requires_grad]),
        model,
        mode="fo",
        alpha_init=0.05,
    )
    assert list(opt.alphas) == ["0"]
    model[2].requires_grad_(True)
    opt.add_param_group({"params": list(model[2].parameters())})
    x, y = batch()
    with pytest.warns(UserWarning, match="not shifted"):
        opt.step(*closures(model, x, y))
    assert model[2].weight.grad is not None


# -- what cannot work is refused at construction -------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda ps: torch.optim.LBFGS(ps), "LBFGS cannot be wrapped"),
        (lambda ps: torch.optim.SparseAdam(ps), "SparseAdam takes only sparse gradients"),
        (
            lambda ps: torch.optim.Muon([p for p in ps if p.dim() == 2], lr=0.01),
            "cannot update MLTP's step sizes",
        ),
    ],
)
def test_base_optimizers_that_cannot_work_are_refused(make, message):
    model = mlp().float()
    base = make(list(model.parameters()))
    groups_before = len(base.param_groups)
    with pytest.raises(TypeError, match=message):
        MLTPOptimizer(base, model, mode="fo")
    assert len(base.param_groups) == groups_before and not base.state


def test_muon_works_with_fixed_alphas():
    """Muon (2-D weights only) cannot learn the alphas, but steps on MLTP's gradients: the weights
    equal a plain Muon step on the float64 reference's dJ/dw."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False)).double()
    twin = copy.deepcopy(model)
    opt = MLTPOptimizer(
        torch.optim.Muon(model.parameters(), lr=0.01), model, mode="fo", alpha_init=0.1, learn_alpha=False
    )
    x, y = batch()
    leaves = {n: a.detach().clone().requires_grad_() for n, a in opt.alphas.items()}
    step_sizes = alphas_by_parameter(twin, leaves, "layer")
    _, expected, _ = gradients(twin, F.cross_entropy, (x[:4], y[:4]), (x[4:], y[4:]), step_sizes, 1.0, True)
    for name, param in twin.named_parameters():
        param.grad = expected[name]
    torch.optim.Muon(twin.parameters(), lr=0.01).step()
    opt.step(*closures(model, x, y))
    for (name, param), reference in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(param, reference, rtol=1e-12, atol=1e-12, msg=name)


def test_sparse_embeddings_are_refused():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"sparse=True.*sparse=False"):
        MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode="fo")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"alpha_init": -0.01}, ValueError, "alpha_init must be >= 0"),
        ({"alpha_init": (-1e-3, 1e-3)}, ValueError, "alpha_init mean must be >= 0"),
        ({"alpha_lr": 1e-3, "learn_alpha": False}, ValueError, "with learn_alpha=False drop it"),
        ({"alpha_min": float("nan")}, ValueError, "alpha_min must be finite"),
        ({"tasks": "all"}, ValueError, "tasks must be one of"),
        ({"tasks": "global"}, ValueError, "DistributedDataParallel model or a process_group"),
    ],
)
def test_settings_that_make_no_sense_are_refused(kwargs, error, message):
    model = mlp()
    with pytest.raises(error, match=message):
        MLTPOptimizer(torch.optim.Adam(model.parameters()), model, **kwargs)


# -- messages that name the real cause -----------------------------------------------------------------


def test_inference_mode_is_named():
    model = mlp()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode="fo")
    x, y = batch()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        opt.step(*closures(model, x, y))


def test_a_closure_that_calls_backward_itself_is_named():
    model = mlp()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode="fo")
    x, y = batch()

    def closure_i():
        loss = F.cross_entropy(model(x[:4]), y[:4])
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"closure_i must return its loss without calling \.backward\(\)"):
        opt.step(closure_i, lambda: F.cross_entropy(model(x[4:]), y[4:]))


def test_attention_in_full_mode_names_fo_and_the_math_backend():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten())
    model.append(nn.Linear(32, 3))
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode="full")
    x, y = torch.randn(6, 4, 8), torch.randint(0, 3, (6,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"mode='fo'.*SDPBackend\.MATH"):  # the fused CPU kernel
        opt.step(*task_closures(lambda a, b: F.cross_entropy(model(a), b), x, y))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        opt.zero_grad()
        opt.step(*task_closures(lambda a, b: F.cross_entropy(model(a), b), x, y))


# -- schedulers and hooks ------------------------------------------------------------------------------


def test_schedulers_with_one_value_per_group_take_the_alpha_group_last():
    model = mlp()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, mode="fo")
    with pytest.raises(ValueError, match="param_groups"):
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.1], total_steps=4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.1, 0.01], total_steps=4)
    lambdas = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=[lambda e: 1.0, lambda e: 0.5**e])
    x, y = batch()
    opt.step(*closures(model, x, y))
    scheduler.step()
    lambdas.step()
    assert opt.param_groups[-1]["mltp_alpha"] and opt.param_groups[-1]["lr"] < opt.param_groups[0]["lr"]


@pytest.mark.parametrize(("mode", "calls"), [("fo", 2), ("full", 3)])
def test_what_fires_for_tensor_hooks_and_post_accumulate_hooks(mode, calls):
    """As documented: a tensor hook sees every gradient autograd computes for the tensor (task i's,
    task j's, and in second order the Hessian-vector product); post-accumulate hooks do not fire."""
    model = mlp()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, mode=mode)
    seen, accumulated = [], []
    model[0].weight.register_hook(lambda grad: seen.append(grad.shape))
    model[0].weight.register_post_accumulate_grad_hook(lambda p: accumulated.append(p))
    opt.step(*closures(model, *batch()))
    assert len(seen) == calls and accumulated == []


# -- non-finite steps skipped on the device ----------------------------------------------------------------


def nan_loss(model, x, y):
    return F.cross_entropy(model(x), y) * float("nan")


def syncs_outside_the_base_step(run) -> int:
    """``aten::_local_scalar_dense`` (a host synchronisation on a GPU) outside the base optimizer's step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    count = 0
    for event in profile.events():
        if event.name != "aten::_local_scalar_dense":
            continue
        parent = event.cpu_parent
        while parent is not None and not (
            parent.name.startswith("Optimizer.step#") and "MLTPOptimizer" not in parent.name
        ):
            parent = parent.cpu_parent
        count += parent is None
    return count


@pytest.mark.parametrize("fused", [False, True])
def test_skip_with_a_fused_base_optimizer_needs_no_host_synchronisation(fused):
    model = mlp()
    base = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    opt = MLTPOptimizer(base, model, mode="fo", alpha_init=0.05, nonfinite="skip")
    x, y = batch()
    opt.step(*closures(model, x, y))
    opt.zero_grad()
    before, state_before = values(model, opt), state_bytes(opt)

    def bad_step():
        opt.zero_grad()
        opt.step(lambda: nan_loss(model, x[:4], y[:4]), lambda: F.cross_entropy(model(x[4:]), y[4:]))

    syncs = syncs_outside_the_base_step(bad_step)
    assert syncs == 0 if fused else syncs >= 1  # the host check (and a search for the culprit)
    assert same(values(model, opt), before) and opt.skipped_steps == 1
    opt.skipped_steps = 0
    assert state_bytes(opt) == state_before
    good = syncs_outside_the_base_step(lambda: (opt.zero_grad(), opt.step(*closures(model, x, y))))
    assert good == (0 if fused else 1) and not same(values(model, opt), before)


def test_skip_runs_task_j_at_w_when_task_i_gradient_is_not_finite():
    """BatchNorm's running statistics never see non-finite lookahead weights, so training can go on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = MLTPOptimizer(
        torch.optim.Adam(model.parameters()), model, mode="fo", alpha_init=0.5, nonfinite="skip"
    )
    x, y = batch()

    def overflowing_i():
        hidden = model[0](x[:4])
        hidden.register_hook(lambda grad: grad * float("inf"))
        return F.cross_entropy(model[1:](hidden), y[:4])

    reference = copy.deepcopy(model)
    opt.step(overflowing_i, lambda: F.cross_entropy(model(x[4:]), y[4:]))
    assert opt.skipped_steps == 1
    with torch.no_grad():  # the statistics of two forward passes at w
        reference(x[:4])
        reference(x[4:])
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)


def test_fo_extra_operations_do_not_grow_with_the_number_of_layers():
    """The first-order step's data-touching operations beyond two plain half-batch passes are a small
    constant, not one or more per tensor (each is a kernel launch on a GPU), with one host
    synchronisation (the non-finite check); counted with torch.profiler as benchmarks/count_ops.py does."""

    def counts(depth, use_mltp):
        torch.manual_seed(0)
        layers = [m for _ in range(depth) for m in (nn.Linear(8, 8), nn.Tanh())]
        model = nn.Sequential(*layers, nn.Linear(8, 3))
        base = torch.optim.Adam(model.parameters(), foreach=True)
        opt = MLTPOptimizer(base, model, mode="fo") if use_mltp else base

        def step(x, y):
            opt.zero_grad()
            if use_mltp:
                opt.step(*closures(model, x, y))
                return
            for a, b in zip(x.chunk(2), y.chunk(2)):
                F.cross_entropy(model(a), b).backward()
            opt.step()

        return data_ops(step, torch.randn(8, 8), torch.randint(0, 3, (8,)))

    extra, syncs = {}, {}
    for depth in (2, 16):
        mltp, halves = counts(depth, True), counts(depth, False)
        syncs[depth] = mltp.pop(SYNC) - halves.pop(SYNC)
        extra[depth] = sum((mltp - halves).values())
    assert extra[2] == extra[16] <= 40 and syncs == {2: 1, 16: 1}, (extra, syncs)


# -- tasks that use different parameters ----------------------------------------------------------------


class TwoHeads(nn.Module):
    """One body, two heads: a task of 4 features takes head ``a``, a task of 5 features head ``b``
    (as a multi-task model or a mixture of experts routes its inputs)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Linear(4, 6)
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        hidden = torch.tanh(self.body(x[:, :4]))
        return self.a(hidden) if x.shape[1] == 4 else self.b(hidden)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("mode", ["full", "fc", "fo", Mode(layers="b"), Mode(layers=["body", "a"])])
def test_task_j_using_a_parameter_that_task_i_does_not_use(mode, foreach):
    """dJ/dw equals autograd's (allow_unused) in every mode: head b has no Hessian row in L_i."""
    model = TwoHeads().double()
    gen = torch.Generator().manual_seed(4)
    task_i = (torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
    task_j = (torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), model, alpha_init=(0.2, 0.05), mode=mode, foreach=foreach
    )
    leaves = {n: a.detach().clone().requires_grad_() for n, a in opt.alphas.items()}
    J, expected, alpha_expected = gradients(
        model,
        F.cross_entropy,
        task_i,
        task_j,
        alphas_by_parameter(model, leaves, "layer"),
        1.0,
        opt.first_order,
    )
    got = opt.step(
        lambda: F.cross_entropy(model(task_i[0]), task_i[1]),
        lambda: F.cross_entropy(model(task_j[0]), task_j[1]),
    )
    torch.testing.assert_close(got, J, rtol=1e-12, atol=1e-12)
    for name, param in trainable(model).items():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    for name, alpha in opt.alphas.items():  # autograd's None: an alpha that scales a zero g_i
        expected_alpha = alpha_expected[id(leaves[name])]
        expected_alpha = torch.zeros_like(alpha) if expected_alpha is None else expected_alpha
        torch.testing.assert_close(alpha.grad, expected_alpha, rtol=1e-10, atol=1e-12, msg=name)


# -- skipped steps ----------------------------------------------------------------------------------------


def test_a_skipped_first_step_of_fused_sgd_with_momentum_leaves_the_next_steps_as_a_clean_run():
    """A fused kernel told to skip would leave the momentum buffers it creates unwritten: a step that
    creates the base state is decided on the host."""
    model = mlp().float()
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True),
        model,
        mode="fo",
        nonfinite="skip",
    )
    clean_model, clean_opt = copy.deepcopy((model, opt))
    x, y = batch()
    x = x.float()
    opt.zero_grad()
    opt.step(lambda: nan_loss(model, x[:4], y[:4]), lambda: F.cross_entropy(model(x[4:]), y[4:]))
    assert opt.skipped_steps == 1
    for m, o in ((model, opt), (clean_model, clean_opt)):
        for seed in range(3):
            xs, ys = batch(seed + 1)
            o.zero_grad()
            o.step(*closures(m, xs.float(), ys))
    assert same(values(model, opt), values(clean_model, clean_opt))


@pytest.mark.parametrize("split", [False, True])
def test_step_hooks_do_not_run_on_a_skipped_step(split):
    """As a GradScaler skip, which never calls step(): neither the pre- nor the post-hooks run."""
    model = mlp()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode="fo", nonfinite="skip")
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    x, y = batch()
    bad = (lambda: nan_loss(model, x[:4], y[:4]), lambda: F.cross_entropy(model(x[4:]), y[4:]))
    if split:
        opt.backward(*bad)
        opt.step()
    else:
        opt.step(*bad)
    assert opt.skipped_steps == 1 and calls == []
    opt.zero_grad()
    opt.step(*closures(model, x, y))
    assert calls == ["pre", "post"]


# -- param groups, learning rates and checkpoints --------------------------------------------------------


@pytest.mark.parametrize("through", ["wrapper", "base"])
def test_a_group_added_after_wrapping_goes_before_the_alphas_and_checkpoints_still_load(through):
    def build():
        model = mlp()
        opt = MLTPOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model, mode="fo")
        extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
        (opt if through == "wrapper" else opt.base_optimizer).add_param_group({"params": [extra], "lr": 0.05})
        return model, opt, extra

    model, opt, extra = build()
    x, y = batch()
    opt.step(lambda: F.cross_entropy(model(x[:4]), y[:4]) + extra.sum(), closures(model, x, y)[1])
    state = opt.state_dict()
    assert [g.get("mltp_alpha", False) for g in opt.param_groups] == [False, False, True]
    _, opt2, _ = build()
    opt2.load_state_dict(state)
    assert [g["lr"] for g in opt2.param_groups] == [0.1, 0.05, 0.1] and opt2.param_groups[-1]["mltp_alpha"]
    lambdas = torch.optim.lr_scheduler.LambdaLR(opt2, [lambda _: 1.0, lambda _: 1.0, lambda _: 0.5])
    assert lambdas.get_last_lr() == [0.1, 0.05, 0.05]


def test_a_tensor_lr_is_not_shared_with_the_alphas_group():
    model = mlp()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01)), model, mode="fo")
    torch.optim.lr_scheduler.LambdaLR(opt, [lambda _: 1.0, lambda _: 0.1])
    lrs = [float(g["lr"]) for g in opt.param_groups]
    assert lrs == pytest.approx([0.01, 0.001])


def test_state_dict_hooks_registered_on_the_wrapper_run():
    model = mlp()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode="fo")
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load pre", "extra" in sd)))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load post", o is opt)))
    state = opt.state_dict()
    assert state["extra"] == 1 and "mltp" in state
    opt.load_state_dict({k: v for k, v in state.items() if k != "extra"} | {"extra": 1})
    assert calls == [("pre", True), ("load pre", True), ("load post", True)]


def test_checkpoints_of_different_predicate_selections_are_told_apart_by_their_layers():
    """Two lambdas describe alike; what they select (the layer names) is compared."""
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    first = Mode(layers=lambda name, module: name == "0")
    last = Mode(layers=lambda name, module: name == "2")
    assert first.describe() == last.describe()
    state = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode=first).state_dict()
    assert state["mltp"]["layers"] == ["0"]
    other = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode=last)
    with pytest.raises(ValueError, match=r"layers \['0'\]\), this optimizer has .*layers \['2'\]"):
        other.load_state_dict(state)
    legacy = copy.deepcopy(state)
    del legacy["mltp"]["layers"], legacy["mltp"]["first_order"]  # as saved before the layers were recorded
    MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode=first).load_state_dict(legacy)
