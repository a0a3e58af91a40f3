"""Lightning's DDP strategy on 2 CPU processes (float64), manual optimization with ``MLTPOptimizer(...,
tasks="global")``: saves the batches this process trained on and where it ended as OUT/rank{r}.pt.

    python tests/lightning_worker.py OUT MODE      # Lightning starts the second process itself
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
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

    def configure_optimizers(self):
        base = torch.optim.Adam(self.net.parameters(), lr=LR)
        return MLTPOptimizer(base, self.net, mode=self.mode, alpha_init=ALPHA, tasks="global")

    def training_step(self, batch, batch_idx):
        self.seen.append([t.clone() for t in batch])
        opt = self.optimizers()
        opt.zero_grad()
        opt.backward(*task_closures(lambda x, y: F.cross_entropy(self.net(x), y), *batch))
        opt.step()


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    module = MLTPClassifier(mode)
    trainer = lightning.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(dataset(), batch_size=BATCH, drop_last=True))
    opt = module.trainer.optimizers[0]
    saved = {
        "seen": module.seen,
        "weights": {n: p.detach().clone() for n, p in module.net.named_parameters()},
        "alphas": {n: a.detach().clone() for n, a in opt.alphas.items()},
    }
    torch.save(saved, out / f"rank{trainer.global_rank}.pt")
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(
        0
    )  # past Python's finalisation, where a gloo thread can abort the process after the work is done


if __name__ == "__main__":
    main()
