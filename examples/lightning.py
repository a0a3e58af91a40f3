import lightning
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from torch_mltp import MLTPOptimizer, task_closures


class MLTPClassifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))

    def configure_optimizers(self):
        return MLTPOptimizer(torch.optim.Adam(self.net.parameters(), lr=1e-3), self.net, mode="full")

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        J = opt.backward(*task_closures(lambda x, y: F.cross_entropy(self.net(x), y), *batch))
        opt.step()
        self.log("J", J)


data = TensorDataset(torch.randn(256, 20), torch.randint(0, 4, (256,)))
trainer = lightning.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False)
trainer.fit(MLTPClassifier(), DataLoader(data, batch_size=64, drop_last=True))
