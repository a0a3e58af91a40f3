"""MLTPOptimizer as a torch optimizer: trajectories, checkpoints, schedulers, hooks, bad input, faults."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from mltp_reference import gradients
from torch import nn

from torch_mltp import MLTPOptimizer, Mode, _foreach, constants, functional, optimizer, task_closures


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(3 * 3 * 3, 8),
        nn.Tanh(),
        nn.Linear(8, 4),
    )


def batches(n, seed=0, size=8):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, 6, 6, generator=gen), torch.randint(0, 4, (size,), generator=gen))
        for _ in range(n)
    ]


def loss_of(model):
    return lambda x, y: F.cross_entropy(model(x), y)


def snapshot(model, opt=None):
    """The weights (and alphas); BatchNorm's running statistics are updated by any forward pass."""
    tensors = {n: t.detach().clone() for n, t in model.named_parameters()}
    if opt is not None:
        tensors.update({f"alpha:{n}": a.detach().clone() for n, a in opt.alphas.items()})
    return tensors


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def optimizer_state(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return buffer.getvalue()


# -- trajectories equal to plain training -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "fo"])
def test_eta_zero_trajectory_equals_standard_training_on_task_i(mode):
    data = batches(5)
    model = small_cnn().eval()  # no dropout/batch-statistics noise between the two runs
    reference = copy.deepcopy(model)
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, eta=0.0, mode=mode)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for x, y in data:
        opt.zero_grad()
        opt.step(*task_closures(loss_of(model), x, y))
        ref_opt.zero_grad()
        F.cross_entropy(reference(x[:4]), y[:4]).backward()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0 if mode == "fo" else 1e-6, msg=name)


@pytest.mark.parametrize("mode", ["full", "conv", "fc", "fo"])
def test_alpha_zero_step_is_a_base_step_on_gi_plus_eta_gj(mode):
    model = small_cnn().double().eval()
    reference = copy.deepcopy(model)
    x, y = batches(1)[0]
    x = x.double()
    eta = 0.7
    opt = MLTPOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1),  # eq. (6): J + beta R(w)
        model,
        eta=eta,
        alpha_init=0.0,
        mode=mode,
        learn_alpha=False,
    )
    opt.step(*task_closures(loss_of(model), x, y))
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=0.1)
    (F.cross_entropy(reference(x[:4]), y[:4]) + eta * F.cross_entropy(reference(x[4:]), y[4:])).backward()
    ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
    assert all(a.grad is None and a.item() == 0.0 for a in opt.alphas.values())


def test_gradients_accumulate_like_backward():
    model = small_cnn().double().eval()
    x, y = batches(1)[0]
    x = x.double()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, mode="fo")
    opt.step(*task_closures(loss_of(model), x, y))
    once = {n: p.grad.clone() for n, p in model.named_parameters()}
    alpha_once = {n: a.grad.clone() for n, a in opt.alphas.items()}
    opt.step(*task_closures(loss_of(model), x, y))  # no zero_grad: gradients add up
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n])
    for n, a in opt.alphas.items():
        torch.testing.assert_close(a.grad, 2 * alpha_once[n])
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert all(a.grad is None for a in opt.alphas.values())


# -- checkpoints --------------------------------------------------------------------------------------


def make_training(kind, seed):
    model = small_cnn(seed)
    if kind == "adam":
        base = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    else:
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt = MLTPOptimizer(base, model, eta=0.5, alpha_init=(1e-2, 1e-2), mode="full")
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 5], gamma=0.5)
    return model, opt, scheduler


def train(model, opt, scheduler, data, seed):
    torch.manual_seed(seed)  # dropout masks
    for x, y in data:
        opt.zero_grad()
        opt.step(*task_closures(loss_of(model), x, y))
        scheduler.step()


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_resume_is_bit_identical_to_uninterrupted(kind):
    data = batches(7)
    model, opt, scheduler = make_training(kind, seed=1)
    train(model, opt, scheduler, data[:3], seed=10)
    train(model, opt, scheduler, data[3:], seed=11)
    uninterrupted = snapshot(model, opt)

    model, opt, scheduler = make_training(kind, seed=1)
    train(model, opt, scheduler, data[:3], seed=10)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer
    )

    model, opt, scheduler = make_training(kind, seed=2)  # fresh weights and alphas, overwritten by the load
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    scheduler.load_state_dict(checkpoint["sched"])
    train(model, opt, scheduler, data[3:], seed=11)
    assert_same(snapshot(model, opt), uninterrupted)


def test_state_dict_holds_alphas_and_settings_and_rejects_a_mismatch():
    model = small_cnn()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, eta=0.3, alpha_init=0.01, mode="conv")
    opt.eta = 0.25
    state = opt.state_dict()
    assert state["mltp"]["eta"] == 0.25 and state["mltp"]["mode"] == "conv"
    assert set(state["mltp"]["alphas"]) == {"0"}
    other = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, eta=1.0, alpha_init=0.5, mode="conv")
    other.load_state_dict(state)
    assert other.eta == 0.25 and other.alphas["0"].item() == pytest.approx(0.01)
    mismatch = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode="fc")
    with pytest.raises(ValueError, match="mode"):
        mismatch.load_state_dict(state)
    with pytest.warns(UserWarning, match="plain optimizer's"):  # starts MLTP from a plain run
        other.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())


# -- a torch.optim.Optimizer like any other -------------------------------------------------------------


def test_scheduler_moves_alpha_lr_with_the_weights_and_alpha_lr_overrides():
    model = small_cnn()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    alpha_group = [g for g in opt.param_groups if g.get("mltp_alpha")]
    assert len(alpha_group) == 1  # the alphas, stored flat: one tensor holds them all
    assert sum(p.numel() for p in alpha_group[0]["params"]) == len(opt.alphas)
    assert alpha_group[0]["weight_decay"] == 0.0
    x, y = batches(1)[0]
    opt.step(*task_closures(loss_of(model), x, y))
    scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01])

    model = small_cnn()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, alpha_lr=1e-4)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1e-4]


def test_learn_alpha_false_keeps_alpha_fixed_and_out_of_the_optimizer():
    model = small_cnn()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, alpha_init=0.02, learn_alpha=False)
    x, y = batches(1)[0]
    opt.step(*task_closures(loss_of(model), x, y))
    assert len(opt.param_groups) == 1
    assert all(a.item() == pytest.approx(0.02) and a.grad is None for a in opt.alphas.values())


def test_step_hooks_run_and_repr_is_informative():
    model = small_cnn()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode="fo")
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    x, y = batches(1)[0]
    opt.step(*task_closures(loss_of(model), x, y))
    assert calls == ["pre", "post"]
    text = repr(opt)
    assert "mode=fo" in text and "Adam" in text and "eta=1.0" in text


def test_alpha_init_normal_is_seedable_and_layer_alpha_is_shared_by_weight_and_bias():
    model = small_cnn()
    torch.manual_seed(3)
    first = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, alpha_init=(1e-3, 1e-3))
    torch.manual_seed(3)
    second = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, alpha_init=(1e-3, 1e-3))
    torch.manual_seed(3)
    expected = torch.empty(len(first.alphas), dtype=torch.float32)
    for k in range(len(expected)):
        expected[k] = torch.empty(()).normal_(1e-3, 1e-3)
    assert list(first.alphas) == ["0", "1", "6", "8"]  # conv, batchnorm, two linear layers
    assert torch.equal(torch.stack(list(first.alphas.values())), torch.stack(list(second.alphas.values())))
    assert torch.equal(torch.stack(list(first.alphas.values())), expected)


def test_batchnorm_running_statistics_see_both_tasks():
    model = small_cnn().train()
    bn = model[1]
    x, y = batches(1)[0]
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, mode="fo", alpha_init=0.0)
    opt.step(*task_closures(loss_of(model), x, y))
    assert bn.num_batches_tracked.item() == 2
    reference = small_cnn().train()
    reference[1].momentum = bn.momentum
    with torch.no_grad():
        reference(x[:4])
        reference(x[4:])
    torch.testing.assert_close(bn.running_mean, reference[1].running_mean)
    torch.testing.assert_close(bn.running_var, reference[1].running_var)


class TiedNet(nn.Module):
    """Encoder and decoder share one weight; a frozen layer and an unused layer ride along."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.decoder(torch.tanh(self.encoder(self.frozen(x))))


def test_tied_frozen_and_unused_parameters():
    torch.manual_seed(0)
    model = TiedNet().double()
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    opt = MLTPOptimizer(torch.optim.SGD(trainable_params, lr=0.0), model, alpha_init=(0.1, 0.05), eta=0.5)
    # The tied weight belongs to the first module that owns it; the decoder's alpha scales its bias alone.
    assert list(opt.alphas) == ["encoder", "decoder", "unused"]
    frozen_before = {n: p.clone() for n, p in model.frozen.named_parameters()}
    x = torch.randn(6, 4, dtype=torch.float64)
    alpha_copies = {n: a.detach().clone().requires_grad_() for n, a in opt.alphas.items()}
    opt.step(*task_closures(lambda a: F.mse_loss(model(a), a), x))

    assert model.unused.weight.grad is None and model.unused.bias.grad is None
    assert opt.alphas["unused"].grad.item() == 0.0
    assert all(p.grad is None for p in model.frozen.parameters())
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.frozen.named_parameters())

    step_sizes = {
        "encoder.weight": alpha_copies["encoder"],
        "encoder.bias": alpha_copies["encoder"],
        "decoder.bias": alpha_copies["decoder"],
    }
    _, weight_grads, alpha_grads = gradients(
        model, lambda out, target: F.mse_loss(out, target), (x[:3], x[:3]), (x[3:], x[3:]), step_sizes, 0.5
    )
    for name in ("encoder.weight", "encoder.bias", "decoder.bias"):
        torch.testing.assert_close(model.get_parameter(name).grad, weight_grads[name], msg=name)
    for name in ("encoder", "decoder"):
        torch.testing.assert_close(opt.alphas[name].grad, alpha_grads[id(alpha_copies[name])], msg=name)


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eta": -1.0}, ValueError, "eta must be >= 0"),
        ({"eta": float("nan")}, ValueError, "eta must be finite"),
        ({"eta": "1"}, TypeError, "eta must be a real number"),
        ({"alpha_init": (1e-3,)}, ValueError, r"\(mean, std\)"),
        ({"alpha_init": (1e-3, -1.0)}, ValueError, "std must be >= 0"),
        ({"alpha_init": float("inf")}, ValueError, "alpha_init must be finite"),
        ({"alpha_init": "big"}, TypeError, "alpha_init must be a real number"),
        ({"mode": "second"}, ValueError, "unknown mode 'second'"),
        ({"mode": 3}, TypeError, "mode must be a str"),
        ({"mode": Mode(layers="head.*")}, ValueError, "selects no layer"),
        ({"mode": Mode(layers=nn.LSTM)}, ValueError, "selects no layer"),
        ({"alpha_per": "row"}, ValueError, "alpha_per must be one of"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite must be one of"),
        ({"alpha_lr": 0.0}, ValueError, "alpha_lr must be > 0"),
        ({"learn_alpha": 1}, TypeError, "learn_alpha must be a bool"),
    ],
)
def test_bad_arguments_raise_actionable_errors(kwargs, error, match):
    model = small_cnn()
    with pytest.raises(error, match=match):
        MLTPOptimizer(torch.optim.Adam(model.parameters()), model, **kwargs)


def test_bad_layer_spec_and_foreign_optimizer():
    model = small_cnn()
    with pytest.raises(TypeError, match=r"Mode\.layers must be"):
        Mode(layers=[nn.Linear, "0"])
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        MLTPOptimizer(object(), model)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        MLTPOptimizer(torch.optim.Adam(model.parameters()), lambda x: x)
    other = small_cnn()
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        MLTPOptimizer(torch.optim.Adam(other.parameters()), model)
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model)
    with pytest.raises(TypeError, match="already an MLTPOptimizer"):
        MLTPOptimizer(opt, model)
    with pytest.raises(ValueError, match="already holds MLTP alphas"):
        MLTPOptimizer(opt.base_optimizer, model)


def per_sample_loss(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def detached_loss(model, x, y):
    return F.cross_entropy(model(x), y).detach()


@pytest.mark.parametrize(
    ("closure_i", "closure_j", "error", "match"),
    [
        (per_sample_loss, None, ValueError, "closure_i must return a scalar"),
        (None, detached_loss, ValueError, "closure_j returned a loss that does not require grad"),
        (lambda m, x, y: 1.0, None, TypeError, "closure_i must return a scalar loss tensor"),
    ],
)
def test_bad_closures_raise_and_change_nothing(closure_i, closure_j, error, match):
    model = small_cnn()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model)
    x, y = batches(1)[0]
    good = lambda m, a, b: F.cross_entropy(m(a), b)
    before = snapshot(model, opt)
    with pytest.raises(error, match=match):
        opt.step(
            lambda: (closure_i or good)(model, x[:4], y[:4]),
            lambda: (closure_j or good)(model, x[4:], y[4:]),
        )
    assert_same(snapshot(model, opt), before)
    loss = F.cross_entropy(model(x), y)
    with pytest.raises(TypeError, match="two callables"):
        opt.step(loss, loss)


def test_task_closures_validates_the_batch():
    with pytest.raises(ValueError, match="same size along dim 0"):
        task_closures(F.cross_entropy, torch.zeros(4, 2), torch.zeros(6))
    with pytest.raises(ValueError, match=r"cannot be split into two tasks.*drop_last=True"):
        task_closures(F.cross_entropy, torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(ValueError, match="at least one batched tensor"):
        task_closures(F.cross_entropy, 3)


# -- faults inside a step ---------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("failing", ["i", "j"])
@pytest.mark.parametrize("mode", ["full", "fo", "conv"])
def test_exception_in_a_closure_leaves_weights_bit_for_bit(failing, mode):
    model = small_cnn().eval()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode=mode, alpha_init=0.5)
    data = batches(2)
    opt.step(*task_closures(loss_of(model), *data[0]))  # some optimizer state to protect
    before, state_before = snapshot(model, opt), optimizer_state(opt)
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters()}

    def closure(task):
        def run():
            loss = F.cross_entropy(model(data[1][0]), data[1][1])
            if task == failing:
                raise Boom(task)
            return loss

        return run

    with pytest.raises(Boom):
        opt.step(closure("i"), closure("j"))
    assert_same(snapshot(model, opt), before)
    assert optimizer_state(opt) == state_before
    assert all(torch.equal(p.grad, grads_before[n]) for n, p in model.named_parameters())


def nan_gradient_loss(model, x, y):
    """A finite loss (0 + CE) whose gradient is NaN: d sqrt(u)/du at u = 0."""
    w = model[0].weight
    return F.cross_entropy(model(x), y) + torch.sqrt(((w - w.detach()) ** 2).sum())


@pytest.mark.parametrize(
    ("loss_i", "loss_j", "quantity"),
    [
        (lambda m, x, y: F.cross_entropy(m(x), y) * float("nan"), None, "L_i"),
        (None, lambda m, x, y: F.cross_entropy(m(x), y) + float("inf"), "L_j"),
        (None, nan_gradient_loss, "dJ/dw"),
    ],
)
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_step_raises_or_skips_and_changes_nothing(loss_i, loss_j, quantity, policy):
    model = small_cnn().eval()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters()), model, mode="fo", nonfinite=policy)
    data = batches(2)
    opt.step(*task_closures(loss_of(model), *data[0]))
    opt.zero_grad()
    before, state_before = snapshot(model, opt), optimizer_state(opt)
    good = lambda m, a, b: F.cross_entropy(m(a), b)
    x, y = data[1]
    closures = (lambda: (loss_i or good)(model, x[:4], y[:4]), lambda: (loss_j or good)(model, x[4:], y[4:]))
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=quantity):
            opt.step(*closures)
    else:
        J = opt.step(*closures)
        assert opt.skipped_steps == 1 and opt.last_result.skipped
        assert quantity == "dJ/dw" or not math.isfinite(J.item())
    assert_same(snapshot(model, opt), before)
    assert all(p.grad is None for p in model.parameters())
    state_after = optimizer_state(opt)
    if policy == "skip":  # the saved state differs only by the skip counter
        opt.skipped_steps = 0
        state_after = optimizer_state(opt)
    assert state_after == state_before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("large_from", [constants.LARGE_TENSOR, 4])  # 4: a 3x3 gradient counts as large
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_the_finiteness_check_finds_one_bad_entry_and_no_overflow(monkeypatch, large_from, bad, dtype):
    monkeypatch.setattr(constants, "LARGE_TENSOR", large_from)
    huge = -0.9 * torch.finfo(dtype).max  # finite, but a norm or a sum of such entries overflows
    grads = [torch.ones(2, dtype=dtype), torch.full((3, 3), huge, dtype=dtype)]
    if bad is not None:
        grads[1][1, 2] = bad
    result = functional.MLTPGradients(
        torch.tensor(3.0), torch.tensor(1.0), torch.tensor(2.0), grads, [torch.ones(())]
    )
    checked = [result.loss_i, result.loss_j, *grads, *result.alpha_grads]
    if bad is not None:
        assert optimizer._first_nonfinite(result) == "dJ/dw[1]"
    assert _foreach.finite_on_host(grads) == (bad is None)  # the fast check alone, no search
    assert (not _foreach.all_finite(checked).item()) == (bad is not None)
    # the lookahead's guard (GradScaler, nonfinite="skip"): w' = w - alpha * g when g is finite, else w
    for direction in (grads, grads[1:]):
        weights = [torch.full_like(g, 2.0) for g in direction]
        w_prime = _foreach.lookahead(
            _foreach.grouped(weights),
            weights,
            direction,
            [torch.tensor(0.5)] * len(direction),
            finite=_foreach.all_finite(direction),
        )
        expected = [w if bad is not None else w - 0.5 * g for w, g in zip(weights, direction)]
        assert all(torch.equal(s, e) for s, e in zip(w_prime, expected))


def test_freezing_a_selected_layer_and_adding_a_group_after_wrapping():
    model = small_cnn().double().eval()
    extra = nn.Linear(4, 4).double()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, mode="fo", alpha_init=0.1)
    x, y = batches(1)[0]
    x = x.double()
    model[0].requires_grad_(False)  # freeze the first conv layer mid-training
    opt.add_param_group({"params": extra.parameters()})  # and train a new head beside it
    loss = lambda a, b: F.cross_entropy(extra(model(a)), b)
    opt.step(*task_closures(loss, x, y))
    assert model[0].weight.grad is None and opt.alphas["0"].grad is None  # a frozen layer's alpha rests
    assert extra.weight.grad is not None and model[8].weight.grad is not None


@pytest.mark.parametrize("mode", ["full", "fo"])
def test_every_selected_layer_frozen_leaves_plain_two_task_gradients(mode):
    model = small_cnn().double().eval()
    head = nn.Linear(4, 4).double()
    opt = MLTPOptimizer(torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.0), model, mode=mode)
    model.requires_grad_(False)  # every layer with an alpha is frozen: nothing is shifted
    x, y = batches(1)[0]
    x = x.double()
    opt.step(*task_closures(lambda a, b: F.cross_entropy(head(model(a)), b), x, y))
    reference = copy.deepcopy(head)
    (
        F.cross_entropy(reference(model(x[:4])), y[:4]) + F.cross_entropy(reference(model(x[4:])), y[4:])
    ).backward()
    for p, q in zip(head.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
