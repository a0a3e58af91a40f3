"""Lightning on 2 CPU processes (float64), manual optimization with ``MLTPOptimizer(..., tasks="global")``,
under the DDP strategy or under ``ModelParallelStrategy`` with a ``configure_model`` that shards the
network with FSDP2's ``fully_shard``: saves the batches this process trained on and where it ended (whole
tensors) as OUT/rank{r}.pt.

    python tests/lightning_worker.py OUT MODE [ddp|fsdp2]     # Lightning starts the second process itself
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from torch_mltp import MLTPOptimizer, task_closures

STEPS, BATCH, LR, ALPHA = 3, 16, 1e-2, 0.05


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).double()


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(256, 20, generator=gen, dtype=torch.float64), torch.randint(0, 4, (256,), generator=gen)
    )


class MLTPClassifier(lightning.LightningModule):
    def __init__(self, mode: str):
        super().__init__()
        self.automatic_optimization = False
        self.mode, self.net, self.seen = mode, net(), []

    def configure_model(self):
        """Under ``ModelParallelStrategy``: each layer, then the network, sharded over the data-parallel
        processes (under DDP Lightning calls this too, and there is no device mesh)."""
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self):
        base = torch.optim.Adam(self.net.parameters(), lr=LR)
        return MLTPOptimizer(base, self.net, mode=self.mode, alpha_init=ALPHA, tasks="global")

    def training_step(self, batch, batch_idx):
        self.seen.append([t.clone() for t in batch])
        opt = self.optimizers()
        opt.zero_grad()
        opt.backward(*task_closures(lambda x, y: F.cross_entropy(self.net(x), y), *batch))
        opt.step()


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective), or the tensor itself."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    sharded = sys.argv[3:] == ["fsdp2"]
    module = MLTPClassifier(mode)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "ddp"
    trainer = lightning.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(dataset(), batch_size=BATCH, drop_last=True))
    opt = module.trainer.optimizers[0]
    saved = {
        "seen": module.seen,
        "sharded": [isinstance(p, DTensor) for p in module.net.parameters()],
        "weights": {n: whole(p) for n, p in module.net.named_parameters()},
        "alphas": {n: whole(a) for n, a in opt.alphas.items()},
    }
    torch.save(saved, out / f"rank{trainer.global_rank}.pt")
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(
        0
    )  # past Python's finalisation, where a gloo thread can abort the process after the work is done


if __name__ == "__main__":
    main()
