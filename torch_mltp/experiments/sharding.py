"""``train --fsdp``: the model sharded with FSDP2 (``fully_shard``) over the processes of torchrun.

Each child module that holds parameters is sharded on its own, then the root, over a one-dimensional
device mesh of all processes (gloo on the CPU, nccl on CUDA).  MLTP runs first order with
``tasks="global"`` (see ``docs/distributed.md``).  The checkpoints and ``final.pt`` hold whole tensors,
gathered from the shards, so that a run folder looks as it does under DDP; a resume cuts them into the
shards again.  The gradient cosine is not measured (it differentiates with ``torch.autograd.grad``,
which the shards do not allow).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch
from torch import Tensor, nn

from torch_mltp.parallel.fsdp import dtensor_class

from .distributed import Processes
from .recipes import MLTP_MODES
from .runs import ExperimentError


def check(procedure: str, processes: Processes, tasks: str) -> None:
    """Refuse what ``--fsdp`` cannot train, with the options that work."""
    if not processes.distributed:
        raise ExperimentError(
            "--fsdp shards the model over the processes of torchrun: start the command with "
            "torchrun --nproc_per_node=N (N >= 2)"
        )
    if MLTP_MODES[procedure] not in (None, "fo"):
        raise ExperimentError(
            f"--fsdp trains first-order MLTP only: use --procedure mltp_fo (or standard), not {procedure}"
        )
    if tasks != "global":
        raise ExperimentError(
            "--fsdp averages the gradients over the processes in its backward pass: use --tasks global "
            "(the default with --fsdp)"
        )


def shard(model: nn.Module, device: torch.device, processes: Processes) -> nn.Module:
    """``fully_shard`` every child of ``model`` that holds parameters, then ``model`` (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (processes.world_size,))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def whole(state: Any) -> Any:
    """``state`` with every ``DTensor`` gathered into a whole tensor on the CPU (a collective: every
    process calls it, with the same structure)."""
    return _map(state, lambda t: t.full_tensor().cpu() if _is_dtensor(t) else t)


def load_model(model: nn.Module, state: Dict[str, Any]) -> None:
    """Load a state dict of whole tensors into a sharded ``model``."""
    current = model.state_dict()
    model.load_state_dict({k: _like(v, current.get(k)) for k, v in state.items()})


def load_optimizer(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Load an optimizer state dict of whole tensors: each per-parameter state shaped like its sharded
    parameter (and each alpha shaped like a sharded alpha) is cut into shards as that one is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [index for group in state["param_groups"] for index in group["params"]]
    param_of = dict(zip(saved, params))
    state = dict(state)
    state["state"] = {
        index: {key: _like(value, param_of.get(index)) for key, value in entry.items()}
        for index, entry in state["state"].items()
    }
    if "mltp" in state:
        alphas = getattr(optimizer, "alphas", {})
        state["mltp"] = dict(state["mltp"])
        state["mltp"]["alphas"] = {n: _like(v, alphas.get(n)) for n, v in state["mltp"]["alphas"].items()}
    optimizer.load_state_dict(state)


def _like(value: Any, template: Any) -> Any:
    """``value`` sharded as ``template`` when ``template`` is a ``DTensor`` of its shape."""
    if not (_is_dtensor(template) and isinstance(value, Tensor) and value.shape == template.shape):
        return value
    try:
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import distribute_tensor
    device = template.to_local().device
    return distribute_tensor(value.to(device, template.dtype), template.device_mesh, template.placements)


def _is_dtensor(value: Any) -> bool:
    return isinstance(value, dtensor_class())


def _map(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return fn(value)
