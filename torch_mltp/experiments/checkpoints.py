"""What one run trains with (model, optimizer, scheduler) and the checkpoints that resume it exactly.

Each epoch's checkpoint holds the model, the optimizer (with the alphas), the scheduler and the torch /
CUDA / Python / NumPy RNG states of every process, so a run resumed from any epoch ends with the same
weights as an uninterrupted one (bit-identical on CPU).

Under FSDP the checkpoints hold whole tensors, as under DDP: torch's ``get_model_state_dict`` and
``set_model_state_dict`` gather and cut the model's; the optimizer's own state dict (``MLTPOptimizer``'s
carries the alphas, which torch's optimizer helpers cannot name) is gathered with ``DTensor.full_tensor``
and cut again with ``distribute_tensor``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from torch_mltp.parallel.fsdp import dtensor_class

from .distributed import Processes
from .runs import ExperimentError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_states() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # as tensors and plain numbers, so that torch.load(weights_only=True) accepts them
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


@dataclass
class Training:
    """The objects one run trains with."""

    model: nn.Module  # the user's module (what the checkpoints hold)
    trained: nn.Module  # what the loop calls: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sharded: bool = False  # FSDP: the checkpoints gather the shards into whole tensors

    def model_state(self) -> dict:
        """The model's state dict of whole tensors; under FSDP a collective of every process, whose
        result only the main process holds."""
        if not self.sharded:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def checkpoint(self, epoch: int, processes: Processes) -> Optional[dict]:
        """This epoch's checkpoint, on the main process; every process hands in its RNG states."""
        states = processes.gather(rng_states())
        model, optimizer = self.model_state(), self.optimizer.state_dict()
        if self.sharded:
            optimizer = tree_map_only(dtensor_class(), lambda shard: shard.full_tensor().cpu(), optimizer)
        if not processes.is_main:
            return None
        return {
            "epoch": epoch,
            "model": model,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": states[0] if not processes.distributed else states,
        }

    def restore(self, checkpoint: dict, processes: Processes) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(
                self.model, checkpoint["model"], options=StateDictOptions(full_state_dict=True)
            )
        else:
            self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.sharded:
            _shard_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        states = checkpoint["rng"] if isinstance(checkpoint["rng"], list) else [checkpoint["rng"]]
        if len(states) != processes.world_size:
            raise ExperimentError(
                f"the checkpoint was written by {len(states)} process(es); resume it with as many "
                f"(this run has {processes.world_size})"
            )
        restore_rng_states(states[processes.rank])


def _shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Cut each whole state tensor shaped like its sharded parameter (Adam's moments, SGD's momentum) into
    that parameter's shards (a collective)."""
    from torch.distributed.tensor import distribute_tensor

    for param, entry in optimizer.state.items():
        if isinstance(param, dtensor_class()):
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    entry[key] = distribute_tensor(value, param.device_mesh, param.placements)
