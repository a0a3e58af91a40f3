"""``ShardedCheckpoint`` with ``torch.distributed.checkpoint`` in one process and a plain model (the
sharded case runs in tests/test_fsdp.py): a resume into freshly built objects equals an uninterrupted
run, also from a checkpoint written before the first step, and the optimizer saved is not changed."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from torch_mltp import MLTPOptimizer, ShardedCheckpoint, task_closures


def build(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    return model, MLTPOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, mode="fo")


def train(model, opt, steps):
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        opt.step(*task_closures(lambda a, b: F.cross_entropy(model(a), b), x, y))
    return model, opt


def values(model, opt) -> list:
    return [t.detach().clone() for t in (*model.parameters(), *opt.alphas.values())]


def save_and_load(model, opt, folder):
    with warnings.catch_warnings():  # one process without a process group: DCP says so
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"train": ShardedCheckpoint(model, opt)}, checkpoint_id=folder)
        resumed = build(seed=5)  # other weights and alphas, which the checkpoint replaces
        dcp.load({"train": ShardedCheckpoint(*resumed)}, checkpoint_id=folder)
    return resumed


@pytest.mark.parametrize("saved_after", [0, 2])
def test_a_resume_equals_an_uninterrupted_run(tmp_path, saved_after):
    model, opt = train(*build(seed=0), range(saved_after))
    before = opt.state_dict()
    resumed = save_and_load(model, opt, tmp_path / "checkpoint")
    assert len(opt.base_optimizer.state) == len(before["state"])  # saving changed nothing
    assert len(resumed[1].base_optimizer.state) == len(before["state"])
    train(*resumed, range(saved_after, 4))
    uninterrupted = train(*build(seed=0), range(4))
    assert all(torch.equal(a, b) for a, b in zip(values(*resumed), values(*uninterrupted)))
