"""Checkpoints that do not fit, and checkpoints from elsewhere: a refused ``ShardedCheckpoint`` load and a
checkpoint of another width change nothing; a plain optimizer's state dict starts MLTP from a plain run;
an optimizer built on ``named_parameters()`` trains and checkpoints as one built on ``parameters()``."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn

from torch_mltp import MLTPOptimizer, ShardedCheckpoint, task_closures


def mlp(width=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def closures(model, seed):
    return task_closures(lambda a, b: F.cross_entropy(model(a), b), *batch(seed))


def build(width=8, seed=0, make=torch.optim.Adam, named=False, **kwargs):
    model = mlp(width, seed)
    params = model.named_parameters() if named else model.parameters()
    kwargs = {"mode": "fo", "alpha_init": 0.05, **kwargs}
    return model, MLTPOptimizer(make(params, lr=1e-2), model, **kwargs)


def train(model, opt, steps):
    for step in steps:
        opt.zero_grad()
        opt.step(*closures(model, step))
    return model, opt


def tensors(model, opt):
    """Copies of the weights, the alphas and every tensor of the base optimizer's state."""
    found = {f"weight {n}": p.detach().clone() for n, p in model.named_parameters()}
    found.update({f"alpha {n}": a.detach().clone() for n, a in opt.alphas.items()})
    params = [p for group in opt.param_groups for p in group["params"]]
    for k, param in enumerate(params):
        found.update({f"state {k} {key}": v.clone() for key, v in opt.state.get(param, {}).items()})
    return found


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def quiet():
    """DCP in one process without a process group says so with a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


# -- torch.distributed.checkpoint ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("other", "message"), [(dict(learn_alpha=False), "learn_alpha"), (dict(mode="full"), "mode")]
)
def test_a_refused_sharded_load_changes_nothing_and_one_that_fits_restores_the_checkpoint(
    tmp_path, other, message
):
    model, opt = train(*build(), range(2))
    saved = tensors(model, opt)
    with quiet():
        dcp.save({"train": ShardedCheckpoint(model, opt)}, checkpoint_id=tmp_path)
    for settings, refused in ((other, True), ({}, False)):
        target = train(*build(seed=5, **settings), range(5, 7))  # weights, moments and alphas of its own
        before = tensors(*target)
        with quiet(), pytest.raises(ValueError, match=message) if refused else contextlib.nullcontext():
            dcp.load({"train": ShardedCheckpoint(*target)}, checkpoint_id=tmp_path)
        assert same(tensors(*target), before if refused else saved)


# -- the shapes of the base state ----------------------------------------------------------------------


def plain_run(width, make, steps):
    """A model of ``width`` trained by the plain optimizer ``make`` on task i's loss."""
    model = mlp(width)
    base = make(model.parameters(), lr=1e-2)
    for step in steps:
        base.zero_grad()
        F.cross_entropy(model(batch(step)[0]), batch(step)[1]).backward()
        base.step()
    return model, base


@pytest.mark.parametrize("make", [torch.optim.Adam, torch.optim.Adafactor])
@pytest.mark.parametrize("source", ["mltp", "plain"])
def test_a_checkpoint_of_another_width_is_refused_before_anything_changes(make, source):
    if source == "mltp":
        state = train(*build(8, make=make), range(2))[1].state_dict()
    else:
        state = plain_run(8, make, range(2))[1].state_dict()
    wider = train(*build(16, make=make), range(3, 4))
    before = tensors(*wider)
    with pytest.raises(ValueError, match=r"of parameter 0 is shaped \(8, .*that parameter is \(16, 4\)"):
        wider[1].load_state_dict(state)
    assert same(tensors(*wider), before)

    fitting = train(*build(8, seed=3, make=make), range(3, 4))[1]
    with pytest.warns(UserWarning, match="plain") if source == "plain" else contextlib.nullcontext():
        fitting.load_state_dict(state)
    loaded = fitting.state_dict()["state"]
    for index, entry in state["state"].items():
        assert all(torch.equal(loaded[index][key], value) for key, value in entry.items())


# -- starting MLTP from a plain run ----------------------------------------------------------------------


@pytest.mark.parametrize("learn_alpha", [True, False])
def test_a_plain_optimizers_checkpoint_restores_the_weights_state_and_keeps_the_alphas(learn_alpha):
    model, plain = plain_run(8, torch.optim.Adam, range(2))
    plain_state = copy.deepcopy(plain.state_dict())
    opt = MLTPOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        model,
        mode="fo",
        alpha_init=0.05,
        learn_alpha=learn_alpha,
    )
    train(model, opt, range(2, 3))  # the alphas have moved and have optimizer state of their own
    twin_model, twin = copy.deepcopy((model, opt))
    alphas = {f"alpha {n}": a.detach().clone() for n, a in opt.alphas.items()}
    buckets = [p for g in opt.param_groups if g.get("mltp_alpha") for p in g["params"]]
    alpha_state = [{k: v.clone() for k, v in opt.state[b].items()} for b in buckets]
    alpha_group = {k: v for k, v in opt.param_groups[-1].items() if k != "params"} if learn_alpha else None

    with pytest.warns(UserWarning, match="plain optimizer's.*alphas"):
        opt.load_state_dict(plain.state_dict())

    weights = [p for g in opt.param_groups if not g.get("mltp_alpha") for p in g["params"]]
    assert len(weights) == len(plain_state["state"]) == 4
    for param, index in zip(weights, plain_state["param_groups"][0]["params"]):
        expected = plain_state["state"][index]
        assert opt.state[param].keys() == expected.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(opt.state[param][key], value) for key, value in expected.items())
    assert all(torch.equal(opt.alphas[n], alphas[f"alpha {n}"]) for n in opt.alphas)
    for bucket, kept in zip(buckets, alpha_state):
        assert opt.state[bucket].keys() == kept.keys() and all(
            torch.equal(opt.state[bucket][k], v) for k, v in kept.items()
        )
    if learn_alpha:
        assert opt.param_groups[-1]["mltp_alpha"] and opt.param_groups[-1]["params"] == buckets
        assert {k: v for k, v in opt.param_groups[-1].items() if k != "params"} == alpha_group

    # the next step is the step of an optimizer whose weights' state was set by hand
    for param, index in zip(
        [p for g in twin.param_groups if not g.get("mltp_alpha") for p in g["params"]],
        plain_state["param_groups"][0]["params"],
    ):
        twin.state[param] = {k: v.clone() for k, v in plain_state["state"][index].items()}
    train(model, opt, range(3, 4))
    train(twin_model, twin, range(3, 4))
    assert same(tensors(model, opt), tensors(twin_model, twin))

    if learn_alpha:  # an MLTPOptimizer's state dict without its entry is not a plain one
        lost = opt.state_dict()
        del lost["mltp"]
        before = tensors(model, opt)
        with pytest.raises(ValueError, match="'mltp' entry"):
            opt.load_state_dict(lost)
        assert same(tensors(model, opt), before)


# -- optimizers built on named_parameters() ----------------------------------------------------------------


def test_an_optimizer_on_named_parameters_trains_and_checkpoints_as_one_on_parameters():
    named = build(make=torch.optim.AdamW, named=True)
    unnamed = build(make=torch.optim.AdamW)
    assert named[1].param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert named[1].param_groups[-1]["param_names"] == ["mltp_alpha.0..2"]
    train(*named, range(1))
    train(*unnamed, range(1))
    assert same(tensors(*named), tensors(*unnamed))

    state = copy.deepcopy(named[1].state_dict())  # as torch.save would, shares no tensor with `named`
    resumed = build(seed=5, make=torch.optim.AdamW, named=True)
    resumed[0].load_state_dict(named[0].state_dict())
    resumed[1].load_state_dict(state)
    assert resumed[1].state_dict()["param_groups"] == state["param_groups"]
    train(*named, range(1, 3))
    train(*resumed, range(1, 3))
    assert same(tensors(*resumed), tensors(*named))

    per_tensor = build(make=torch.optim.AdamW, named=True, alpha_per="tensor")[1]
    assert per_tensor.param_groups[-1]["param_names"] == ["mltp_alpha.0.weight..2.bias"]
