"""``alpha_min`` and ``alpha_max``: the alphas stay within them at initialisation and after every step,
the bounds travel with checkpoints and copies, and a negative initial step size needs ``alpha_max <= 0``."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_mltp import MLTPOptimizer, task_closures
from torch_mltp.constants import MLTP_STATE_KEY


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def step(model, opt, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=generator)
    opt.zero_grad()
    opt.step(*task_closures(lambda a, b: F.cross_entropy(model(a), b), x, y))


def alphas(opt):
    return [alpha.item() for alpha in opt.alphas.values()]


def wrapped(model, **kwargs):
    kwargs.setdefault("alpha_lr", 0.5)  # large alpha steps, so that the bounds are reached
    return MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, mode="fo", **kwargs)


def test_the_alphas_stay_within_their_bounds_at_every_step():
    model = mlp()
    free = wrapped(model, alpha_init=(0.0, 0.05))  # the model's seed draws the alphas too
    start = alphas(free)
    assert min(start) < -0.01 and max(start) > 0.01  # the draws reach beyond the bounds below
    free_path = []
    for seed in range(8):
        step(model, free, seed)
        free_path += alphas(free)
    assert min(free_path) < -0.02 and max(free_path) > 0.02  # unbounded, they leave [-0.01, 0.01]

    model = mlp()
    bounded = wrapped(model, alpha_init=(0.0, 0.05), alpha_min=-0.01, alpha_max=0.01)
    assert alphas(bounded) == [min(max(a, -0.01), 0.01) for a in start]  # clamped at initialisation
    hit = set()
    for seed in range(8):
        step(model, bounded, seed)
        values = alphas(bounded)
        assert all(-0.01 <= a <= 0.01 for a in values)
        hit.update(a for a in values if a in (-0.01, 0.01))
    assert hit  # the bounds were reached, and held


def test_alpha_max_zero_keeps_the_alphas_non_positive_and_they_can_turn_negative():
    model = mlp()
    opt = wrapped(model, alpha_init=(1e-3, 1e-3), alpha_max=0.0)
    assert alphas(opt) == [0.0, 0.0, 0.0]  # the paper's draws are all clamped to 0 at the start
    path = []
    for seed in range(8):
        step(model, opt, seed)
        path += alphas(opt)
    assert max(path) <= 0.0 and min(path) < 0.0

    mirrored = wrapped(mlp(), alpha_init=(-1e-3, 1e-3), alpha_max=0.0)
    paper = wrapped(mlp(), alpha_init=(1e-3, 1e-3))  # the same seed, so the same standard normal draws
    # N(-1e-3, 1e-3), the mirror image of the paper's N(1e-3, 1e-3), clamped at 0
    assert alphas(mirrored) == pytest.approx([min(a - 2e-3, 0.0) for a in alphas(paper)], abs=1e-15)
    assert min(alphas(mirrored)) < 0


def test_fixed_alphas_are_clamped_once_at_initialisation():
    opt = wrapped(mlp(), alpha_init=0.5, alpha_max=0.2, learn_alpha=False, alpha_lr=None)
    assert alphas(opt) == [0.2, 0.2, 0.2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha_max": float("nan")}, "alpha_max must be finite"),
        ({"alpha_max": "0"}, "alpha_max must be a real number"),
        ({"alpha_min": 0.1, "alpha_max": 0.0}, "alpha_min must be <= alpha_max"),
        ({"alpha_init": (-1e-3, 1e-3)}, "alpha_init mean must be >= 0"),
        ({"alpha_init": (-1e-3, 1e-3), "alpha_max": 0.1}, "allowed with alpha_max <= 0"),
        ({"alpha_init": -0.01, "alpha_min": -1.0}, "alpha_init must be >= 0"),
    ],
)
def test_bounds_that_make_no_sense_are_refused(kwargs, message):
    model = mlp()
    with pytest.raises((ValueError, TypeError), match=message):
        wrapped(model, **kwargs)


def test_a_negative_initial_step_size_is_accepted_with_alpha_max_at_most_zero():
    assert alphas(wrapped(mlp(), alpha_init=-0.01, alpha_max=0.0)) == [-0.01] * 3
    assert alphas(wrapped(mlp(), alpha_init=-0.01, alpha_max=-0.02)) == [-0.02] * 3


def test_checkpoints_record_and_restore_alpha_max():
    model = mlp()
    opt = wrapped(model, alpha_init=(-1e-3, 1e-3), alpha_min=-0.5, alpha_max=0.0)
    step(model, opt, 0)
    state = opt.state_dict()
    assert (state[MLTP_STATE_KEY]["alpha_min"], state[MLTP_STATE_KEY]["alpha_max"]) == (-0.5, 0.0)

    other = mlp()
    restored = wrapped(other)  # built without bounds: the checkpoint's bounds carry on
    restored.load_state_dict(state)
    assert (restored.alpha_min, restored.alpha_max) == (-0.5, 0.0)
    assert alphas(restored) == alphas(opt)
    other.load_state_dict(model.state_dict())
    for seed in range(1, 6):
        step(model, opt, seed)
        step(other, restored, seed)
    assert alphas(restored) == alphas(opt) and max(alphas(restored)) <= 0.0

    old = {**state, MLTP_STATE_KEY: dict(state[MLTP_STATE_KEY])}
    del old[MLTP_STATE_KEY]["alpha_max"]  # written before alpha_max existed: no upper bound
    reloaded = wrapped(mlp(), alpha_max=0.0)
    reloaded.load_state_dict(old)
    assert reloaded.alpha_max is None and reloaded.alpha_min == -0.5

    for bad, message in [(float("inf"), "alpha_max must be None or a finite number"), (-1.0, "is above")]:
        broken = {**state, MLTP_STATE_KEY: {**state[MLTP_STATE_KEY], "alpha_max": bad}}
        with pytest.raises(ValueError, match=message):
            wrapped(mlp()).load_state_dict(broken)


def test_copies_keep_alpha_max_and_an_old_pickle_gets_none():
    opt = wrapped(mlp(), alpha_max=0.0)
    assert pickle.loads(pickle.dumps(opt)).alpha_max == 0.0
    state = opt.__getstate__()
    del state["alpha_max"]  # as pickled before alpha_max existed
    old = MLTPOptimizer.__new__(MLTPOptimizer)
    old.__setstate__(state)
    assert old.alpha_max is None
