"""MLTP inside real training loops: backward/step split, accumulation, torch.optim closures, hooks,
clipping, GradScaler, torch.compile and Lightning, checked against float64 references."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from mltp_reference import alphas_by_parameter, gradients, trainable
from torch import nn

from torch_mltp import MLTPOptimizer, task_closures


def mlp(seed=0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


def batches(n, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=gen),
        )
        for _ in range(n)
    ]


def closures(model, x, y):
    return task_closures(lambda a, b: F.cross_entropy(model(a), b), x, y)


def weights_and_alphas(model, opt):
    tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors.update({f"alpha:{n}": a.detach().clone() for n, a in opt.alphas.items()})
    return tensors


def state_bytes(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return buffer.getvalue()


def reference_gradients(model, opt, x, y, eta=1.0):
    """dJ/dw (by name) and dJ/dalpha (by layer) of the current weights from the float64 reference."""
    leaves = {n: a.detach().clone().requires_grad_() for n, a in opt.alphas.items()}
    half = len(x) // 2
    _, weight_grads, alpha_grads = gradients(
        model,
        F.cross_entropy,
        (x[:half], y[:half]),
        (x[half:], y[half:]),
        alphas_by_parameter(model, leaves, "layer"),
        eta,
        first_order=opt.first_order,
    )
    return weight_grads, {n: alpha_grads[id(leaves[n])] for n in leaves}


# -- backward / step ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fo", "full"])
def test_backward_then_step_is_the_one_call_step(mode):
    runs = []
    for split in (False, True):
        model = mlp()
        torch.manual_seed(1)
        opt = MLTPOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-2), model, alpha_init=(0.05, 0.02), mode=mode
        )
        for x, y in batches(3):
            opt.zero_grad()
            if split:
                J = opt.backward(*closures(model, x, y))
                assert opt.step() is None
            else:
                J = opt.step(*closures(model, x, y))
            assert not J.requires_grad
        runs.append(weights_and_alphas(model, opt))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("mode", ["fo", "full"])
def test_backward_accumulates_like_loss_backward_and_never_steps(mode):
    model = mlp()
    opt = MLTPOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), model, alpha_init=(0.05, 0.02), mode=mode
    )
    before = weights_and_alphas(model, opt)
    (x1, y1), (x2, y2) = batches(2)
    grads_1, alpha_grads_1 = reference_gradients(model, opt, x1, y1)
    grads_2, alpha_grads_2 = reference_gradients(model, opt, x2, y2)
    opt.backward(*closures(model, x1, y1))
    opt.backward(*closures(model, x2, y2))
    after = weights_and_alphas(model, opt)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name, param in trainable(model).items():
        torch.testing.assert_close(param.grad, grads_1[name] + grads_2[name], rtol=1e-10, atol=1e-12)
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(
            alpha.grad, alpha_grads_1[name] + alpha_grads_2[name], rtol=1e-10, atol=1e-12
        )


def test_step_follows_torch_optim_closure_convention():
    model = mlp()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, mode="fo", alpha_init=0.05)
    x, y = batches(1)[0]
    opt.backward(*closures(model, x, y))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert opt.step() is None  # plain step: SGD on what .grad holds
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), start[name] - 0.1 * grads[name], rtol=0, atol=1e-15)

    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        return opt.backward(*closures(model, x, y))

    with torch.no_grad():
        value = opt.step(closure)  # positional, called under enable_grad
    assert seen == [True] and isinstance(value, torch.Tensor) and value.ndim == 0
    assert torch.equal(opt.step(closure=closure), opt.last_result.objective)  # keyword
    with pytest.raises(TypeError, match="closure twice"):
        opt.step(closure, closure=closure)
    with pytest.raises(TypeError, match="must be callable"):
        opt.step(3)
    with pytest.raises(TypeError, match="either two callables"):
        opt.step(None, closure)


@pytest.mark.parametrize("one_call", [True, False])
def test_a_clipping_pre_hook_on_the_wrapper_sees_the_mltp_gradients(one_call):
    """A step pre-hook runs after the gradients exist in both forms: clipping from a hook equals
    clipping in the loop, and the clipped norm is that of the reference gradients."""
    x, y = batches(1)[0]
    results, norms = [], []
    for use_hook in (True, False):
        model = mlp()
        opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, mode="full", alpha_init=0.05)
        expected, _ = reference_gradients(model, opt, x, y)
        if use_hook:
            params = list(model.parameters())
            opt.register_step_pre_hook(
                lambda o, args, kwargs, params=params: norms.append(
                    torch.nn.utils.clip_grad_norm_(params, 0.1)
                )
            )
            if one_call:
                opt.step(*closures(model, x, y))
            else:
                opt.backward(*closures(model, x, y))
                opt.step()
        else:
            opt.backward(*closures(model, x, y))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert len(norms) == 1
    reference_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()]))
    torch.testing.assert_close(norms[0], reference_norm, rtol=1e-10, atol=0)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("foreach", [None, False])
def test_gradient_accumulation_over_micro_batches_equals_the_mean_objective(foreach):
    """backward(..., weight=1/2) on two micro-batches gives the gradient of their objectives' mean."""
    model = mlp()
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), model, mode="full", alpha_init=0.05, foreach=foreach
    )
    micro = batches(2)
    expected = [reference_gradients(model, opt, x, y) for x, y in micro]
    for x, y in micro:
        opt.backward(*closures(model, x, y), weight=0.5)
    opt.step()
    for name, param in trainable(model).items():
        mean = (expected[0][0][name] + expected[1][0][name]) / 2
        torch.testing.assert_close(param.grad, mean, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("foreach", [None, False])
def test_weight_and_eta_keep_the_gradients_dtype(foreach):
    """In float64, ten backward passes with weight=0.1 equal one with weight=1, and a GradScaler run
    with eta=0.3 equals the unscaled one, to float64's rounding (no float32 scalar on the way)."""
    model = mlp()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, mode="full", foreach=foreach)
    x, y = batches(1)[0]
    for _ in range(10):
        opt.backward(*closures(model, x, y), weight=0.1)
    tenths = [p.grad.clone() for p in model.parameters()] + [a.grad.clone() for a in opt.alphas.values()]
    opt.zero_grad()
    opt.backward(*closures(model, x, y))
    whole = [p.grad for p in model.parameters()] + [a.grad for a in opt.alphas.values()]
    for got, expected in zip(tenths, whole):
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-16)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model = mlp()
        torch.manual_seed(1)
        opt = MLTPOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-2),
            model,
            eta=0.3,
            alpha_init=(0.05, 0.02),
            foreach=foreach,
        )
        scaler_loop(model, opt, batches(5), scaler)
        runs.append(weights_and_alphas(model, opt))
    for key in runs[0]:
        torch.testing.assert_close(runs[1][key], runs[0][key], rtol=1e-13, atol=1e-15, msg=key)


def test_a_plain_backward_before_step_warns_once():
    """``loss.backward(); opt.step()`` trains as the base optimizer alone: a UserWarning names the fix."""
    model = mlp()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, mode="fo")
    x, y = batches(1)[0]
    alphas = {n: a.clone() for n, a in opt.alphas.items()}
    with pytest.warns(UserWarning, match=r"opt\.backward\(closure_i, closure_j\)"):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(a, alphas[n]) for n, a in opt.alphas.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()  # once only
        for one_call in (True, False):  # the MLTP loop never warns
            opt.zero_grad()
            if one_call:
                opt.step(*closures(model, x, y))
            else:
                opt.backward(*closures(model, x, y))
                opt.step()


def test_model_zero_grad_does_not_let_the_alphas_gradients_pile_up():
    """``model.zero_grad()`` clears the weights' gradients only; the next backward clears the alphas'
    too (with a warning), so each step's dJ/dalpha is that step's alone."""
    x, y = batches(1)[0]
    grads = []
    for clear in ("model", "opt"):
        model = mlp()
        opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, mode="fo", alpha_init=0.05)
        for step in range(3):
            (model if clear == "model" else opt).zero_grad()
            if clear == "model" and step == 1:
                with pytest.warns(UserWarning, match=r"model\.zero_grad\(\).*opt\.zero_grad\(\)"):
                    opt.backward(*closures(model, x, y))
            else:
                opt.backward(*closures(model, x, y))
            opt.step()
        grads.append({n: a.grad.clone() for n, a in opt.alphas.items()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


# -- non-finite values in the split form ----------------------------------------------------------------


def nan_loss(model, x, y):
    return F.cross_entropy(model(x), y) * float("nan")


def test_skip_policy_in_the_split_form():
    model = mlp()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, mode="fo", nonfinite="skip")
    (x1, y1), (x2, y2) = batches(2)
    opt.step(*closures(model, x1, y1))
    opt.zero_grad()
    opt.backward(*closures(model, x1, y1))  # a good micro-batch ...
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before, state_before = weights_and_alphas(model, opt), state_bytes(opt)
    opt.backward(lambda: nan_loss(model, x2[:4], y2[:4]), lambda: F.cross_entropy(model(x2[4:]), y2[4:]))
    assert opt.last_result.skipped
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())  # ... nothing added
    opt.step()  # ... and the step that follows changes nothing
    after = weights_and_alphas(model, opt)
    assert all(torch.equal(before[k], after[k]) for k in before) and opt.skipped_steps == 1
    opt.skipped_steps = 0
    assert state_bytes(opt) == state_before

    # zero_grad cancels a pending skip: the next good backward steps as usual
    opt.backward(lambda: nan_loss(model, x2[:4], y2[:4]), lambda: F.cross_entropy(model(x2[4:]), y2[4:]))
    opt.zero_grad()
    opt.backward(*closures(model, x2, y2))
    opt.step()
    assert opt.skipped_steps == 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_raise_policy_in_the_split_form_leaves_grad_as_it_was():
    model = mlp()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, mode="full")
    (x1, y1), (x2, y2) = batches(2)
    opt.backward(*closures(model, x1, y1))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    alpha_grads = {n: a.grad.clone() for n, a in opt.alphas.items()}
    with pytest.raises(FloatingPointError, match="L_i"):
        opt.backward(lambda: nan_loss(model, x2[:4], y2[:4]), lambda: F.cross_entropy(model(x2[4:]), y2[4:]))
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(a.grad, alpha_grads[n]) for n, a in opt.alphas.items())


# -- GradScaler ------------------------------------------------------------------------------------------


def scaler_loop(model, opt, data, scaler, max_norm=1.0):
    for x, y in data:
        opt.zero_grad()
        if scaler is None:
            opt.backward(*closures(model, x, y))
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
        else:
            opt.backward(*closures(model, x, y), scaler=scaler)
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            scaler.step(opt)
            scaler.update()


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("mode", ["fo", "full"])
def test_gradscaler_leaves_scaled_gradients_of_the_reference(mode, foreach):
    model = mlp(batchnorm=False)
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        model,
        mode=mode,
        alpha_init=(0.05, 0.02),
        foreach=foreach,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batches(1)[0]
    expected, alpha_expected = reference_gradients(model, opt, x, y)
    opt.backward(*closures(model, x, y), scaler=scaler)
    for name, param in trainable(model).items():
        torch.testing.assert_close(param.grad, 2.0**10 * expected[name], rtol=1e-10, atol=1e-10)
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(alpha.grad, 2.0**10 * alpha_expected[name], rtol=1e-10, atol=1e-10)
    scaler.unscale_(opt)  # the alphas are in the optimizer's groups: they are unscaled too
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(alpha.grad, alpha_expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["fo", "full"])
def test_gradscaler_trajectory_equals_the_unscaled_one(mode):
    """With power-of-two scales every scaling is exact in float64: the trajectories are identical."""
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)):
        model = mlp(batchnorm=True)
        torch.manual_seed(1)
        opt = MLTPOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-2), model, mode=mode, alpha_init=(0.05, 0.02)
        )
        scaler_loop(model, opt, batches(5), scaler)
        runs.append(weights_and_alphas(model, opt))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def overflowing(model, x, y):
    """A finite loss whose backward pass overflows (as a float16 activation gradient would)."""
    hidden = model[0](x)
    hidden.register_hook(lambda grad: grad * float("inf"))
    return F.cross_entropy(model[1:](hidden), y)


@pytest.mark.parametrize("mode", ["fo", "full"])
@pytest.mark.parametrize("task", ["i", "j"])
def test_gradscaler_overflow_skips_the_step_and_lowers_the_scale(mode, task):
    model = mlp(batchnorm=True)
    opt = MLTPOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), model, mode=mode, alpha_init=(0.05, 0.02)
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler_loop(model, opt, batches(2), scaler)  # some state to protect
    before, state_before = weights_and_alphas(model, opt), state_bytes(opt)
    scale = scaler.get_scale()
    x, y = batches(1, seed=9)[0]
    loss_i = (
        (lambda: overflowing(model, x[:4], y[:4]))
        if task == "i"
        else (lambda: F.cross_entropy(model(x[:4]), y[:4]))
    )
    loss_j = (
        (lambda: overflowing(model, x[4:], y[4:]))
        if task == "j"
        else (lambda: F.cross_entropy(model(x[4:]), y[4:]))
    )
    opt.zero_grad()
    opt.backward(loss_i, loss_j, scaler=scaler)  # never raises: the scaler decides
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    after = weights_and_alphas(model, opt)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert state_bytes(opt) == state_before
    assert scaler.get_scale() == scale / 2
    # an overflow in task i's pass skips the lookahead, so task j's forward pass never sees inf weights
    assert torch.isfinite(model[1].running_mean).all() and torch.isfinite(model[1].running_var).all()


def test_a_base_optimizer_that_steps_through_a_gradscaler_is_probed_without_it(accelerator_state):
    """What accelerate's prepare returns shares its groups with the optimizer it holds and steps it
    through the GradScaler: wrapping it leaves the scaler untouched, and steps as the plain loop."""
    from accelerate import Accelerator

    runs = []
    for accelerator in (None, Accelerator(cpu=True)):
        model = mlp(batchnorm=True)
        torch.manual_seed(1)
        base = torch.optim.Adam(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        if accelerator is None:
            opt = MLTPOptimizer(base, model, alpha_init=(0.05, 0.02))
            scaler_loop(model, opt, batches(5), scaler)
        else:
            accelerator.scaler = scaler  # what Accelerator(mixed_precision="fp16") makes on a GPU
            opt = MLTPOptimizer(accelerator.prepare(base), model, alpha_init=(0.05, 0.02))
            assert scaler._scale is None  # the probe did not step the scaler
            for x, y in batches(5):
                opt.zero_grad()
                opt.backward(*closures(model, x, y), scaler=scaler)
                scaler.unscale_(opt.base_optimizer.optimizer)  # as accelerator.clip_grad_norm_ does
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()  # the prepared optimizer's step: scaler.step and scaler.update
        runs.append((weights_and_alphas(model, opt), scaler.state_dict()))
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert runs[0][1] == runs[1][1]


# -- torch.compile -----------------------------------------------------------------------------------------


def test_compiled_model_trains_first_order_and_second_order_is_refused_clearly():
    model = mlp()
    compiled = torch.compile(model, backend="aot_eager")
    x, y = batches(1)[0]
    eager = copy.deepcopy(model)
    opt = MLTPOptimizer(torch.optim.SGD(compiled.parameters(), lr=0.0), compiled, mode="fo", alpha_init=0.05)
    eager_opt = MLTPOptimizer(torch.optim.SGD(eager.parameters(), lr=0.0), eager, mode="fo", alpha_init=0.05)
    assert list(opt.alphas) == list(eager_opt.alphas) == ["0", "2"]  # no "_orig_mod." in the names
    opt.backward(*closures(compiled, x, y))
    eager_opt.backward(*closures(eager, x, y))
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"torch.compile'd model.*mode='fo'"):
        MLTPOptimizer(torch.optim.Adam(compiled.parameters()), compiled, mode="full")
    # compiled after the optimizer was built: the first step says what to do, and changes nothing
    full = MLTPOptimizer(torch.optim.Adam(eager.parameters()), eager, mode="full")
    late = torch.compile(eager, backend="aot_eager")
    before = {n: p.detach().clone() for n, p in eager.named_parameters()}
    eager.zero_grad()
    with pytest.raises(RuntimeError, match=r"torch.compile'd model.*mode='fo'"):
        full.step(*closures(late, x, y))
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in eager.named_parameters())


# -- Lightning ----------------------------------------------------------------------------------------------


def test_lightning_manual_optimization_matches_a_plain_loop():
    lightning = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class MLTPModule(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = mlp()

        def configure_optimizers(self):
            torch.manual_seed(3)
            base = torch.optim.Adam(self.net.parameters(), lr=1e-2)
            return MLTPOptimizer(base, self.net, mode="full", alpha_init=(0.05, 0.02))

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            J = opt.backward(*closures(self.net, *batch))
            opt.step()
            return J

    data = [b for b in batches(4)]
    dataset = TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    module = MLTPModule()
    trainer = lightning.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(dataset, batch_size=8))
    trained = module.trainer.optimizers[0]

    model = mlp()
    torch.manual_seed(3)
    opt = MLTPOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), model, mode="full", alpha_init=(0.05, 0.02)
    )
    for x, y in data:
        opt.zero_grad()
        opt.step(*closures(model, x, y))
    assert trainer.global_step == 4 and trained.last_result is not None
    for p, q in zip(module.net.parameters(), model.parameters()):
        assert torch.equal(p, q)
    for name in opt.alphas:
        assert torch.equal(trained.alphas[name], opt.alphas[name])
