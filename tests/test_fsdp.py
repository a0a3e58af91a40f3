"""FSDP2 (``fully_shard``) on 2 gloo processes (float64): first-order MLTP on the shards equals one process
training on the union of the processes' tasks, for alphas per layer, tensor and element; bfloat16
mixed precision trains; a ``torch.distributed.checkpoint`` resume equals an uninterrupted run; what FSDP
cannot do is refused at construction; failures leave weights and ``.grad`` as they were.

The processes are started once for this file (tests/fsdp_worker.py) with a timeout; each test reads
its scenario from what they saved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fsdp_worker import ALPHA_PER, MODES, STEPS, make_model, union_tasks
from spawn import run_ranks

from torch_mltp import MLTPOptimizer

WORKER = Path(__file__).with_name("fsdp_worker.py")
TIMEOUT_S = 240
CLOSE = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the two processes; returns what rank 0 and rank 1 saved."""
    try:
        return run_ranks(WORKER, tmp_path_factory.mktemp("fsdp"), TIMEOUT_S)
    except RuntimeError as err:
        pytest.fail(str(err))


def one_process(alpha_per, mode, initial, **kwargs):
    """The same model and optimizer on one process, with the alphas the processes started from."""
    model = make_model()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = MLTPOptimizer(base, model, mode=mode, alpha_per=alpha_per, **kwargs)
    with torch.no_grad():
        for name, alpha in opt.alphas.items():
            alpha.copy_(initial[f"alpha:{name}"])
    for name, param in model.named_parameters():
        assert torch.equal(param, initial[name]), name
    return model, opt


def union_closures(model, step):
    (xi, yi), (xj, yj) = union_tasks(step)
    return (lambda: F.cross_entropy(model(xi), yi)), (lambda: F.cross_entropy(model(xj), yj))


def values(model, opt):
    found = {n: p.detach() for n, p in model.named_parameters()}
    found.update({f"alpha:{n}": a.detach() for n, a in opt.alphas.items()})
    return found


def assert_all_close(found: dict, expected: dict, **tolerance):
    assert found.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], msg=name, **(tolerance or CLOSE))


@pytest.mark.parametrize(
    "alpha_per, mode", [*((a, m) for a in ALPHA_PER for m in MODES), ("tensor", "fixed_alphas")]
)
def test_one_step_equals_one_process_on_the_union_of_the_tasks(ranks, alpha_per, mode):
    key = mode if mode == "fixed_alphas" else f"{alpha_per}/{mode}/step"
    first, second = (saved[key] for saved in ranks)
    assert all(torch.equal(first["initial"][k], second["initial"][k]) for k in first["initial"])
    fixed = dict(learn_alpha=False) if mode == "fixed_alphas" else {}
    model, opt = one_process(alpha_per, MODES.get(mode, "fo"), first["initial"], **fixed)
    opt.zero_grad()
    objectives = [opt.backward(*union_closures(model, step), weight=0.5) for step in (0, 1)]
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads.update({f"alpha:{n}": a.grad for n, a in opt.alphas.items()})
    opt.step()
    for saved in (first, second):
        for found, expected in zip(saved["J"], objectives):
            torch.testing.assert_close(found, expected, **CLOSE)
        assert_all_close(saved["grads"], grads)  # accumulated over two backward calls
        assert_all_close(saved["after"], values(model, opt))
    alphas = [n for n in grads if n.startswith("alpha:")]
    if fixed:
        assert all(first["grads"][n] is None for n in alphas)
    else:
        assert all(first["grads"][n] is not None and first["grads"][n].abs().sum() > 0 for n in alphas)


@pytest.mark.parametrize("alpha_per", ALPHA_PER)
def test_several_steps_stay_equal_to_one_process(ranks, alpha_per):
    saved = ranks[0][f"{alpha_per}/trained"]
    model, opt = one_process(alpha_per, "fo", saved["initial"])
    for step in range(STEPS):
        opt.zero_grad()
        opt.step(*union_closures(model, step))
    assert_all_close(saved["trained"], values(model, opt))
    assert not torch.equal(saved["trained"]["out.weight"], saved["initial"]["out.weight"])
    first, second = (r[f"{alpha_per}/trained"]["trained"] for r in ranks)
    assert all(torch.equal(first[k], second[k]) for k in first)  # the scalar alphas too


@pytest.mark.parametrize("alpha_per", ["layer", "element"])
def test_the_alphas_of_a_frozen_layer_rest(ranks, alpha_per):
    saved = ranks[0]["frozen"][alpha_per]
    initial, trained = saved["initial"], saved["trained"]
    for name in initial:
        unchanged = torch.equal(initial[name], trained[name])
        assert unchanged == ("hidden" in name), name


def test_bfloat16_mixed_precision_trains_close_to_float64(ranks):
    saved = ranks[0]["mixed_precision"]
    assert all(torch.isfinite(J) for J in saved["J"])
    model, opt = one_process("layer", "fo", saved["initial"])
    for step in range(STEPS):
        opt.zero_grad()
        opt.step(*union_closures(model, step))
    expected = values(model, opt)
    assert_all_close(saved["trained"], expected, rtol=0, atol=2e-2)
    alphas = [n for n in expected if n.startswith("alpha:")]
    assert any(not torch.equal(saved["trained"][n], saved["initial"][n]) for n in alphas)
    second = ranks[1]["mixed_precision"]["trained"]
    assert all(torch.equal(saved["trained"][n], second[n]) for n in alphas)


@pytest.mark.parametrize("alpha_per", ["layer", "element"])
def test_a_distributed_checkpoint_resumes_exactly(ranks, alpha_per):
    for saved in ranks:
        resumed, uninterrupted = (saved["resume"][alpha_per][k] for k in ("resumed", "uninterrupted"))
        assert resumed.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), resumed.keys()


def test_second_order_modes_and_local_tasks_are_refused_with_what_works(ranks):
    messages = ranks[0]["refusals"]
    for mode in ("full", "fc"):
        assert (
            messages[mode] is not None
            and "mode='fo'" in messages[mode]
            and "first_order=True" in messages[mode]
        )
    assert messages["local"] is not None and "tasks='global'" in messages["local"]
    assert messages["inner"] is not None and "the module that fully_shard was applied to" in messages["inner"]


def test_failures_leave_weights_and_gradients_as_they_were(ranks):
    for saved in ranks:
        seen = saved["failures"]
        assert seen["raised"] == "'closure j failed'" and seen["unchanged_after_raise"]
        assert seen["nonfinite"].startswith(
            "MLTP backward produced a non-finite L_i"
        )  # rank 1's NaN, both raise
        assert seen["unchanged_after_nonfinite"]
        assert seen["skipped_steps"] == 1 and seen["unchanged_after_skip"] and seen["trains_after_skip"]
