"""One process of the FSDP2 tests (tests/test_fsdp.py starts two).

Usage: ``python fsdp_worker.py OUT_DIR`` with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT).  Runs every scenario on gloo in float64 with a model sharded by ``fully_shard`` and saves
what it saw, gathered into whole tensors, to ``OUT_DIR/rank{RANK}.pt``; the test process compares
the ranks with each other and with the same training on one process on the union of their tasks.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from ddp_worker import SHARD, global_batch, shard
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from torch_mltp import MLTPOptimizer, Mode, ShardedCheckpoint, task_closures

ALPHA_PER = ("layer", "tensor", "element")
MODES = {  # every layer; one by name; every nn.Linear by type; one by predicate
    "fo": "fo",
    "name": Mode(layers=["out"], first_order=True),
    "type": Mode(layers=nn.Linear, first_order=True),
    "predicate": Mode(layers=lambda name, module: name == "hidden", first_order=True),
}
STEPS = 3


class Net(nn.Module):
    """A small MLP whose tensors do not split evenly over two processes (7 and 3 rows)."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(5, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def make_model() -> nn.Module:
    """The same float64 model in every process."""
    torch.manual_seed(0)
    return Net().double()


def union_tasks(step: int) -> tuple[tuple, tuple]:
    """Task i and task j of one process training on the union of both processes' tasks."""
    x, y = global_batch(step)
    half = SHARD // 2
    firsts = torch.cat([torch.arange(r * SHARD, r * SHARD + half) for r in range(2)])
    seconds = firsts + half
    return (x[firsts], y[firsts]), (x[seconds], y[seconds])


def sharded(mp_policy=None) -> nn.Module:
    model = make_model()
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    fully_shard(model.hidden, **kwargs)
    fully_shard(model.out, **kwargs)
    fully_shard(model, **kwargs)
    return model


def closures(model: nn.Module, x, y):
    return task_closures(lambda a, b: F.cross_entropy(model(a), b), x, y)


def full(tensor):
    return None if tensor is None else tensor.full_tensor().detach().clone()


def snapshot(model: nn.Module, opt: MLTPOptimizer) -> dict:
    """Whole weights and alphas (a collective: every process calls it)."""
    values = {n: full(p) for n, p in model.named_parameters()}
    values.update({f"alpha:{n}": full(a) if a.dim() else a.detach().clone() for n, a in opt.alphas.items()})
    return values


def gradients(model: nn.Module, opt: MLTPOptimizer) -> dict:
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    for n, a in opt.alphas.items():
        grads[f"alpha:{n}"] = None if a.grad is None else (full(a.grad) if a.dim() else a.grad.clone())
    return grads


def build(alpha_per: str, mode="fo", lr: float = 1e-2, rank: int = 0, **kwargs):
    model = sharded(kwargs.pop("mp_policy", None))
    torch.manual_seed(100 + rank)  # the processes draw different alphas: scalar ones are rank 0's
    base = torch.optim.Adam(model.parameters(), lr=lr)
    opt = MLTPOptimizer(base, model, alpha_init=(0.05, 0.02), mode=mode, alpha_per=alpha_per, **kwargs)
    return model, opt


def one_step(alpha_per: str, mode, rank: int, **kwargs) -> dict:
    """Two accumulated backward passes (weight 1/2 each), then one step."""
    model, opt = build(alpha_per, mode, rank=rank, **kwargs)
    initial = snapshot(model, opt)
    opt.zero_grad()
    objectives = [opt.backward(*closures(model, *shard(step, rank)), weight=0.5) for step in (0, 1)]
    grads = gradients(model, opt)
    opt.step()
    return {"initial": initial, "J": objectives, "grads": grads, "after": snapshot(model, opt)}


def train(alpha_per: str, rank: int, steps: range, model=None, opt=None, **kwargs):
    if model is None:
        model, opt = build(alpha_per, rank=rank, **kwargs)
    for step in steps:
        opt.zero_grad()
        opt.step(*closures(model, *shard(step, rank)))
    return model, opt


def several_steps(alpha_per: str, rank: int) -> dict:
    model, opt = build(alpha_per, rank=rank)
    initial = snapshot(model, opt)
    train(alpha_per, rank, range(STEPS), model, opt)
    return {"initial": initial, "trained": snapshot(model, opt)}


def frozen_layer(alpha_per: str, rank: int) -> dict:
    """A layer frozen after construction: its alphas rest while the others learn."""
    model, opt = build(alpha_per, rank=rank)
    model.hidden.requires_grad_(False)
    initial = snapshot(model, opt)
    train(alpha_per, rank, range(2), model, opt)
    return {"initial": initial, "trained": snapshot(model, opt)}


def mixed_precision(rank: int) -> dict:
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model, opt = build("layer", rank=rank, mp_policy=policy)
    initial = snapshot(model, opt)
    objectives = []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = shard(step, rank)
        objectives.append(opt.step(*closures(model, x.to(torch.bfloat16), y)))
    return {"initial": initial, "trained": snapshot(model, opt), "J": objectives}


def resume(alpha_per: str, rank: int, folder: Path) -> dict:
    """Save after 2 steps with torch.distributed.checkpoint; fresh objects (other alphas, other weights)
    load it and train 2 more steps, as a process started after a kill would."""
    model, opt = train(alpha_per, rank, range(2))
    dcp.save({"train": ShardedCheckpoint(model, opt)}, checkpoint_id=folder)
    with torch.no_grad():
        model, opt = build(alpha_per, rank=rank + 7)
        for p in model.parameters():
            p.add_(1.0)
    dcp.load({"train": ShardedCheckpoint(model, opt)}, checkpoint_id=folder)
    train(alpha_per, rank, range(2, 4), model, opt)
    uninterrupted = train(alpha_per, rank, range(4))
    return {"resumed": snapshot(model, opt), "uninterrupted": snapshot(*uninterrupted)}


def refusals() -> dict:
    messages = {}
    for name, kwargs in {
        "full": dict(mode="full"),
        "fc": dict(mode="fc"),
        "local": dict(tasks="local"),
    }.items():
        try:
            build("layer", **kwargs)
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    only_root = make_model()
    fully_shard(only_root)
    try:  # a module inside the sharded root
        MLTPOptimizer(torch.optim.Adam(only_root.parameters()), only_root.hidden, mode="fo")
        messages["inner"] = None
    except ValueError as err:
        messages["inner"] = str(err)
    return messages


def failures(rank: int) -> dict:
    """A closure that raises (in both processes), a non-finite loss under "raise" and under "skip"."""
    model, opt = train("layer", rank, range(1))
    opt.zero_grad()
    x, y = shard(5, rank)
    opt.backward(*closures(model, x, y))  # .grad held before the failing calls
    before, grads_before = snapshot(model, opt), gradients(model, opt)

    def raising():
        F.cross_entropy(model(x[4:]), y[4:])
        raise KeyError("closure j failed")

    seen = {}
    try:
        opt.backward(lambda: F.cross_entropy(model(x[:4]), y[:4]), raising)
    except KeyError as err:
        seen["raised"] = str(err)
    seen["unchanged_after_raise"] = _same(before, snapshot(model, opt)) and _same(
        grads_before, gradients(model, opt)
    )
    bad = x.clone()
    bad[0, 0] = float("nan") if rank == 1 else 0.0  # only rank 1 sees a NaN: both must agree
    try:
        opt.backward(*closures(model, bad, y))
    except FloatingPointError as err:
        seen["nonfinite"] = str(err)
    seen["unchanged_after_nonfinite"] = _same(before, snapshot(model, opt)) and _same(
        grads_before, gradients(model, opt)
    )
    skipping, skip_opt = build("layer", rank=rank, nonfinite="skip")
    skip_before = snapshot(skipping, skip_opt)
    skip_opt.zero_grad()
    skip_opt.step(*closures(skipping, bad, y))
    seen["skipped_steps"] = skip_opt.skipped_steps
    seen["unchanged_after_skip"] = _same(skip_before, snapshot(skipping, skip_opt))
    train("layer", rank, range(1), skipping, skip_opt)
    seen["trains_after_skip"] = not _same(skip_before, snapshot(skipping, skip_opt))
    return seen


def _same(first: dict, second: dict) -> bool:
    return all(
        (first[k] is None and second[k] is None)
        or (first[k] is not None and second[k] is not None and torch.equal(first[k], second[k]))
        for k in first
    )


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    results = {}
    for alpha_per in ALPHA_PER:
        for name, mode in MODES.items():
            results[f"{alpha_per}/{name}/step"] = one_step(alpha_per, mode, rank)
        results[f"{alpha_per}/trained"] = several_steps(alpha_per, rank)
    results["frozen"] = {alpha_per: frozen_layer(alpha_per, rank) for alpha_per in ("layer", "element")}
    results["fixed_alphas"] = one_step("tensor", "fo", rank, learn_alpha=False)
    results["mixed_precision"] = mixed_precision(rank)
    results["resume"] = {
        alpha_per: resume(alpha_per, rank, out / alpha_per) for alpha_per in ("layer", "element")
    }
    results["refusals"] = refusals()
    results["failures"] = failures(rank)
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
