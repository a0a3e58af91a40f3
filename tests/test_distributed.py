"""DistributedDataParallel on 2 gloo processes (float64): each rank's step equals the single-process
computation of the same math, and after several steps both ranks hold identical weights and alphas.

The processes are started once per test session (tests/ddp_worker.py) with a timeout; each test
reads its scenario from what they saved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ddp_worker import MODES, SHARD, global_batch, make_model
from mltp_reference import alphas_by_parameter, gradients
from spawn import run_ranks

from torch_mltp import MLTPOptimizer

WORKER = Path(__file__).with_name("ddp_worker.py")
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the two processes; returns what rank 0 and rank 1 saved."""
    try:
        return run_ranks(WORKER, tmp_path_factory.mktemp("ddp"), TIMEOUT_S)
    except RuntimeError as err:
        pytest.fail(str(err))


def expected_step(tasks, mode, alphas):
    """The single-process computation: the mean of the per-rank objectives (local) or one
    objective on the union of the ranks' tasks (global)."""
    model = make_model()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, mode=mode)
    leaves = {n: a.clone().requires_grad_() for n, a in alphas.items()}
    step_sizes = alphas_by_parameter(model, leaves, "layer")
    x, y = global_batch(0)
    half = SHARD // 2
    if tasks == "global":
        firsts = torch.cat([torch.arange(r * SHARD, r * SHARD + half) for r in range(2)])
        seconds = firsts + half
        pieces = [((x[firsts], y[firsts]), (x[seconds], y[seconds]), 1.0)]
    else:
        pieces = [
            (
                (x[r * SHARD : r * SHARD + half], y[r * SHARD : r * SHARD + half]),
                (x[r * SHARD + half : (r + 1) * SHARD], y[r * SHARD + half : (r + 1) * SHARD]),
                0.5,
            )
            for r in range(2)
        ]
    J, weight_grads, alpha_grads = 0.0, {}, {}
    for task_i, task_j, share in pieces:
        J_piece, w_grads, a_grads = gradients(
            model, F.cross_entropy, task_i, task_j, step_sizes, 1.0, opt.first_order
        )
        J = J + share * J_piece
        for name, grad in w_grads.items():
            if grad is not None:
                weight_grads[name] = weight_grads.get(name, 0) + share * grad
        for name, leaf in leaves.items():
            grad = a_grads[id(leaf)]
            alpha_grads[name] = alpha_grads.get(name, 0) + share * (torch.zeros(()) if grad is None else grad)
    return J, weight_grads, alpha_grads


@pytest.mark.parametrize("tasks", ["local", "global"])
@pytest.mark.parametrize("mode", list(MODES))
def test_one_step_equals_the_single_process_computation(ranks, tasks, mode):
    assert_single_process_step([saved[f"{tasks}/{mode}/step"] for saved in ranks], tasks, mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_model_wrapped_after_the_optimizer_steps_as_one_process_on_the_union(ranks, mode):
    """``tasks="global"`` with the DDP wrapper made after the optimizer (as the engines do): the first
    backward finds it, and the step is the single-process step on the union of the tasks."""
    assert_single_process_step([saved[f"wrapped_later/{mode}"] for saved in ranks], "global", mode)


def test_global_tasks_without_a_wrapper_are_refused_at_the_first_backward(ranks):
    for saved in ranks:
        assert "DistributedDataParallel" in saved["never_wrapped"]


def assert_single_process_step(steps, tasks, mode):
    for name in steps[0]["alphas"]:  # rank 0's draw was broadcast
        assert torch.equal(steps[0]["alphas"][name], steps[1]["alphas"][name])
    J, weight_grads, alpha_grads = expected_step(tasks, MODES[mode], steps[0]["alphas"])
    for step in steps:
        torch.testing.assert_close(step["J"], J, rtol=1e-12, atol=1e-14)
        for name, grad in step["grads"].items():
            if name.startswith("unused."):  # used by no process: no gradient, as with plain DDP
                assert grad is None, name
            else:
                torch.testing.assert_close(grad, weight_grads[name], rtol=1e-10, atol=1e-12, msg=name)
        for name, grad in step["alpha_grads"].items():
            torch.testing.assert_close(
                grad, alpha_grads[name].to(grad.dtype), rtol=1e-10, atol=1e-12, msg=name
            )


@pytest.mark.parametrize("tasks", ["local", "global"])
@pytest.mark.parametrize("mode", list(MODES))
def test_several_steps_leave_identical_weights_and_alphas_on_both_ranks(ranks, tasks, mode):
    first, second = (saved[f"{tasks}/{mode}/trained"] for saved in ranks)
    initial = dict(make_model().named_parameters())
    assert any(not torch.equal(first[n], initial[n]) for n in initial if not n.startswith("unused."))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_ddp_reducer_still_averages_a_plain_backward_after_mltp_steps(ranks):
    first, second = (saved["plain_ddp"] for saved in ranks)
    for name, grad in first["grads"].items():
        assert torch.equal(first["weights"][name], second["weights"][name])
        if grad is None:
            assert second["grads"][name] is None
            continue
        torch.testing.assert_close(grad, second["grads"][name], rtol=0, atol=1e-15)


def test_resume_from_a_rank0_checkpoint_is_bit_identical(ranks):
    for saved in ranks:
        resumed, uninterrupted = saved["resume"]["resumed"], saved["resume"]["uninterrupted"]
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_batchnorm_running_statistics_stay_equal_across_ranks_as_in_plain_ddp(ranks):
    first, second = (saved["batchnorm"][True] for saved in ranks)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    first, second = (saved["batchnorm"][False] for saved in ranks)  # broadcast_buffers=False is honoured
    assert not torch.allclose(first["running_mean"], second["running_mean"], rtol=0, atol=1e-3)


def test_the_module_inside_a_ddp_wrapper_is_refused_with_the_fix(ranks):
    for saved in ranks:
        error = saved["inner_module"]["error"]
        assert error is not None and "MLTPOptimizer(base, ddp_model" in error


def test_a_compiled_ddp_model_is_looked_through_and_a_static_graph_is_refused(ranks):
    initial = dict(make_model().named_parameters())
    for saved in ranks:
        plain, compiled = saved["compiled"]["plain"], saved["compiled"]["compiled"]
        assert any(not torch.equal(plain[n], initial[n]) for n in initial if not n.startswith("unused."))
        for name in plain:
            assert torch.equal(compiled[name], plain[name]), name
        error = saved["compiled"]["static_graph_error"]
        assert error is not None and "static_graph" in error
    assert all(
        torch.equal(ranks[0]["compiled"]["compiled"][n], ranks[1]["compiled"]["compiled"][n]) for n in initial
    )


def test_a_raising_closure_restores_its_rank_and_the_other_rank_fails_instead_of_hanging(ranks):
    waiting, raising = (saved["failure"] for saved in ranks)
    assert raising["error"].startswith("KeyError") and raising["unchanged"] and raising["grads_none"]
    assert waiting["error"] is not None and waiting["unchanged"] and waiting["grads_none"]
    assert "timed out" in waiting["error"].lower() or "timeout" in waiting["error"].lower()
    assert waiting["seconds"] < 30  # the group's 5 s timeout, not a hang
