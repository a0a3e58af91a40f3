"""On a CUDA GPU: exact gradients, and the host synchronisations each non-finite policy costs.

Skipped without a GPU. The gradients are compared with the independent float64 computation run on
the CPU; synchronisations are what ``torch.cuda.set_sync_debug_mode`` reports (every operation that
makes the host wait for the device).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mltp_reference import alphas_by_parameter, gradients, trainable
from test_gradients import make_cnn, make_tasks, mltp_step_gradients

from torch_mltp import MLTPOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_bench.opcount import synchronisations_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on(device, task):
    return tuple(t.to(device) for t in task)


@pytest.mark.parametrize("mode", ["full", "conv", "fo"])
def test_gradients_on_the_gpu_match_the_float64_reference(mode):
    model = make_cnn(0, channels=3, classes=4)
    task_i, task_j = make_tasks(0, (2, 6, 6), 4, batch=5)
    gpu_model = copy.deepcopy(model).cuda()
    opt, J, alpha_copies = mltp_step_gradients(
        gpu_model, on("cuda", task_i), on("cuda", task_j), eta=0.7, alpha_init=(0.05, 0.05), mode=mode
    )
    on_cpu = {name: alpha.detach().cpu().requires_grad_() for name, alpha in alpha_copies.items()}
    step_sizes = alphas_by_parameter(model, on_cpu, "layer")
    J_ref, weight_grads, alpha_grads = gradients(
        model, F.cross_entropy, task_i, task_j, step_sizes, 0.7, first_order=opt.first_order
    )
    torch.testing.assert_close(J.cpu(), J_ref, rtol=1e-10, atol=1e-12)
    gpu_params = trainable(gpu_model)
    for name in trainable(model):
        torch.testing.assert_close(gpu_params[name].grad.cpu(), weight_grads[name], rtol=1e-8, atol=1e-10)
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(alpha.grad.cpu(), alpha_grads[id(on_cpu[name])], rtol=1e-8, atol=1e-10)


def training(nonfinite, fused):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).cuda()
    base = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    opt = MLTPOptimizer(base, model, mode="fo", alpha_init=0.05, nonfinite=nonfinite)
    x, y = torch.randn(8, 6, device="cuda"), torch.randint(0, 3, (8,), device="cuda")

    def step(poison=False):
        opt.zero_grad()
        scale = float("nan") if poison else 1.0
        opt.step(
            lambda: F.cross_entropy(model(x[:4]), y[:4]) * scale, lambda: F.cross_entropy(model(x[4:]), y[4:])
        )

    for _ in range(2):  # the optimizer's state and the step's buffers exist from here on
        step()
    return model, opt, step


def snapshot(model, opt):
    return [t.detach().clone() for t in (*model.parameters(), *opt.alphas.values())]


def test_skip_with_a_fused_base_optimizer_never_waits_for_the_gpu():
    model, opt, step = training("skip", fused=True)
    assert synchronisations_of(step) == 0
    before, state = snapshot(model, opt), copy.deepcopy(opt.base_optimizer.state_dict()["state"])
    assert synchronisations_of(lambda: step(poison=True)) == 0
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), before))
    after = opt.base_optimizer.state_dict()["state"]
    assert all(torch.equal(after[k][n], state[k][n]) for k in state for n in state[k])
    assert opt.skipped_steps == 1  # reading the count waits for the device, once, here
    step()
    assert not all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), before))


def test_raise_waits_for_the_gpu_once_per_step():
    model, opt, step = training("raise", fused=False)
    assert synchronisations_of(step) == 1
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="L_i"):
        step(poison=True)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), before))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_alpha_gradients_on_the_fused_gpu_path(dtype):
    """A model held in bfloat16 / float16 on the GPU, on the default (fused) path: each layer's dJ/dalpha is
    ``-eta * sum <h_j, g_i>`` summed in float64 from the same dtype's gradients (computed on the GPU with
    plain autograd), up to the dtype's rounding, on layers of 1e5 to 1e6 entries."""
    from test_precision import ETA, assert_alpha_gradients, half_mlp

    widths = (1024, 1024, 100)
    model = half_mlp(widths, dtype).cuda()
    original = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, widths[0], generator=gen).to("cuda", dtype)
    y = torch.randint(0, widths[-1], (32,), generator=gen).cuda()
    task_i, task_j = (x[:16], y[:16]), (x[16:], y[16:])
    opt = MLTPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, eta=ETA, alpha_init=0.05, mode="fo"
    )
    step_sizes = alphas_by_parameter(model, {n: a.detach().clone() for n, a in opt.alphas.items()}, "layer")
    opt.zero_grad()
    opt.backward(
        lambda: F.cross_entropy(model(task_i[0]), task_i[1]),
        lambda: F.cross_entropy(model(task_j[0]), task_j[1]),
    )
    assert_alpha_gradients(opt, original, task_i, task_j, step_sizes, dtype)
