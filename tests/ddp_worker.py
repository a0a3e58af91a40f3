"""One process of the DistributedDataParallel tests (tests/test_distributed.py starts two).

Usage: ``python ddp_worker.py OUT_DIR`` with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT).  Runs every scenario on gloo in float64 and saves what it saw to
``OUT_DIR/rank{RANK}.pt``; the test process compares the ranks with each other and with
single-process computations.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torch_mltp import MLTPOptimizer, Mode, task_closures

SHARD = 8  # samples per process and step: tasks of 4
MODES = {"fo": "fo", "full": "full", "custom": Mode(layers=["out"])}


class Net(nn.Module):
    """A small MLP with a layer that no loss uses."""

    def __init__(self, batchnorm: bool):
        super().__init__()
        self.hidden = nn.Linear(5, 6)
        self.norm = nn.BatchNorm1d(6) if batchnorm else nn.Identity()
        self.out = nn.Linear(6, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.hidden(x))))


def make_model(batchnorm: bool = False) -> nn.Module:
    """The same float64 model in every process."""
    torch.manual_seed(0)
    return Net(batchnorm).double()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(2 * SHARD, 5, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (2 * SHARD,), generator=gen)


def shard(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    return x[rank * SHARD : (rank + 1) * SHARD], y[rank * SHARD : (rank + 1) * SHARD]


def closures(ddp: nn.Module, x, y):
    return task_closures(lambda a, b: F.cross_entropy(ddp(a), b), x, y)


def build(tasks: str, mode, rank: int, lr: float, batchnorm: bool = False, process_group=None):
    model = make_model(batchnorm)
    ddp = DistributedDataParallel(model, find_unused_parameters=True, process_group=process_group)
    torch.manual_seed(100 + rank)  # the processes draw different alphas: rank 0's must win
    base = torch.optim.SGD(ddp.parameters(), lr=lr) if lr == 0 else torch.optim.Adam(ddp.parameters(), lr=lr)
    opt = MLTPOptimizer(base, ddp, alpha_init=(0.05, 0.02), mode=mode, tasks=tasks)
    return model, ddp, opt


def snapshot(model: nn.Module, opt: MLTPOptimizer) -> dict:
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    values.update({f"alpha:{n}": a.detach().clone() for n, a in opt.alphas.items()})
    return values


def one_step_gradients(tasks: str, mode, rank: int) -> dict:
    model, ddp, opt = build(tasks, mode, rank, lr=0.0)
    return first_backward(model, ddp, opt, rank)


def first_backward(model: nn.Module, ddp: nn.Module, opt: MLTPOptimizer, rank: int) -> dict:
    """``J``, the alphas before it, and the gradients of one ``backward`` on this rank's first shard."""
    alphas = {n: a.detach().clone() for n, a in opt.alphas.items()}
    J = opt.backward(*closures(ddp, *shard(0, rank)))
    return {
        "J": J,
        "alphas": alphas,
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "alpha_grads": {n: None if a.grad is None else a.grad.clone() for n, a in opt.alphas.items()},
    }


def train(tasks: str, mode, rank: int, steps: range, state=None, batchnorm=True):
    model, ddp, opt = build(tasks, mode, rank, lr=1e-2, batchnorm=batchnorm)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    for step in steps:
        opt.zero_grad()
        opt.step(*closures(ddp, *shard(step, rank)))
    return model, ddp, opt


def plain_ddp_step_after_mltp(rank: int) -> dict:
    """DDP's own reducer must still work after MLTP steps: a standard backward is averaged."""
    model, ddp, opt = train("local", "full", rank, range(2), batchnorm=False)
    opt.zero_grad()
    x, y = shard(5, rank)
    F.cross_entropy(ddp(x), y).backward()
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
    }


def resume(rank: int, out: Path) -> dict:
    """Rank 0 saves model and optimizer state; every rank loads it and carries on."""
    model, _, opt = train("local", "fo", rank, range(2))
    path = out / "checkpoint.pt"
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    dist.barrier()
    state = torch.load(path, weights_only=True)
    model, _, opt = train("local", "fo", rank, range(2, 4), state=state)
    uninterrupted_model, _, uninterrupted_opt = train("local", "fo", rank, range(4))
    return {
        "resumed": snapshot(model, opt),
        "uninterrupted": snapshot(uninterrupted_model, uninterrupted_opt),
    }


def batchnorm_statistics(rank: int, broadcast_buffers: bool) -> dict:
    """Three MLTP steps and an evaluation forward pass: DDP broadcasts rank 0's buffers as it does in
    plain training (when ``broadcast_buffers`` is set)."""
    model = make_model(batchnorm=True)
    ddp = DistributedDataParallel(model, find_unused_parameters=True, broadcast_buffers=broadcast_buffers)
    opt = MLTPOptimizer(torch.optim.Adam(ddp.parameters(), lr=1e-2), ddp, mode="fo")
    for step in range(3):
        opt.zero_grad()
        opt.step(*closures(ddp, *shard(step, rank)))
    ddp.eval()
    with torch.no_grad():
        ddp(shard(7, rank)[0])
    return {name: buffer.clone() for name, buffer in model.norm.named_buffers()}


def inner_module_of_ddp(rank: int) -> dict:
    """MLTPOptimizer given the module inside a DDP wrapper is refused; an unwrapped model is not."""
    model = make_model()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)  # kept by the user
    try:
        MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, mode="fo")
        error = None
    except ValueError as err:
        error = str(err)
    plain = make_model()
    MLTPOptimizer(torch.optim.SGD(plain.parameters(), lr=0.1), plain, mode="fo")
    return {"error": error, "wrapped": ddp is not None}


def wrapped_after_the_optimizer(mode, rank: int) -> dict:
    """``tasks="global"`` for a model wrapped in DDP after the optimizer is built (as the Trainer,
    accelerate and Lightning do): one step's gradients, as ``one_step_gradients`` records them."""
    model = make_model()
    torch.manual_seed(100 + rank)  # the processes draw different alphas: rank 0's must win
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, mode=mode, tasks="global")
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    return first_backward(model, ddp, opt, rank)


def never_wrapped(rank: int) -> Optional[str]:
    """``tasks="global"`` over two processes without a DDP wrapper by the first backward: refused."""
    model = make_model()
    opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, mode="fo", tasks="global")
    try:
        opt.backward(*closures(model, *shard(0, rank)))
    except ValueError as err:
        return str(err)
    return None


def compiled_and_static_graph(rank: int) -> dict:
    """``torch.compile(DDP(model))`` is looked through: its steps equal ``DDP(model)``'s; a DDP model built
    with ``static_graph=True`` is refused when the optimizer is built."""
    trained = {}
    for label in ("plain", "compiled"):
        model = make_model()
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        wrapped = torch.compile(ddp, backend="eager") if label == "compiled" else ddp
        torch.manual_seed(7)
        opt = MLTPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.1), wrapped, mode="fo", tasks="global")
        for step in range(2):
            opt.zero_grad()
            opt.step(*closures(wrapped, *shard(step, rank)))
        trained[label] = snapshot(model, opt)
    try:
        static = DistributedDataParallel(make_model(), static_graph=True)
        MLTPOptimizer(torch.optim.SGD(static.parameters(), lr=0.1), static, mode="fo")
        error = None
    except ValueError as err:
        error = str(err)
    return {**trained, "static_graph_error": error}


def failing_closure(rank: int) -> dict:
    """Rank 1's closure raises: its weights are restored; rank 0 fails in the next collective."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=5))
    model, ddp, opt = build("local", "full", rank, lr=1e-2, process_group=group)
    before = snapshot(model, opt)
    x, y = shard(0, rank)

    def closure_j():
        loss = F.cross_entropy(ddp(x[4:]), y[4:])
        if rank == 1:
            raise KeyError("closure j failed on rank 1")
        return loss

    started = time.monotonic()
    try:
        opt.backward(lambda: F.cross_entropy(ddp(x[:4]), y[:4]), closure_j)
        error = None
    except Exception as err:  # what each rank sees
        error = f"{type(err).__name__}: {err}"
    after = snapshot(model, opt)
    if rank == 1:  # stay alive: rank 0 must give up after the group's timeout, not hang
        time.sleep(8)
    return {
        "error": error,
        "seconds": time.monotonic() - started,
        "unchanged": all(torch.equal(before[k], after[k]) for k in before),
        "grads_none": all(p.grad is None for p in model.parameters()),
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    results = {}
    for tasks in ("local", "global"):
        for name, mode in MODES.items():
            results[f"{tasks}/{name}/step"] = one_step_gradients(tasks, mode, rank)
            model, _, opt = train(tasks, mode, rank, range(3), batchnorm=tasks == "local")
            results[f"{tasks}/{name}/trained"] = snapshot(model, opt)
    results["plain_ddp"] = plain_ddp_step_after_mltp(rank)
    results["resume"] = resume(rank, out)
    results["batchnorm"] = {flag: batchnorm_statistics(rank, flag) for flag in (True, False)}
    results["inner_module"] = inner_module_of_ddp(rank)
    results["compiled"] = compiled_and_static_graph(rank)
    for name, mode in MODES.items():
        results[f"wrapped_later/{name}"] = wrapped_after_the_optimizer(mode, rank)
    results["never_wrapped"] = never_wrapped(rank)
    torch.save(results, out / f"rank{rank}.pt")  # before the failure scenario, which may break the group
    failure = failing_closure(rank)
    torch.save({**results, "failure": failure}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
