import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from torch_mltp import MLTPOptimizer, task_closures

torch.manual_seed(0)
accelerator = Accelerator(gradient_accumulation_steps=2)  # mixed_precision="fp16" / "bf16" as usual
model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
data = TensorDataset(torch.randn(256, 20), torch.randint(0, 4, (256,)))
loader = DataLoader(data, batch_size=64, drop_last=True)  # a batch of 64 = two tasks of 32

model, loader = accelerator.prepare(model, loader)
mltp = MLTPOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, mode="fo", eta=1.0)
schedule = torch.optim.lr_scheduler.LinearLR(mltp, start_factor=1.0, end_factor=0.5, total_iters=2)
optimizer, schedule = accelerator.prepare(mltp, schedule)

for x, y in loader:
    with accelerator.accumulate(model):
        J = mltp.backward(
            *task_closures(lambda a, b: F.cross_entropy(model(a), b), x, y),
            weight=1 / accelerator.gradient_accumulation_steps,  # what accelerator.backward(loss) divides by
            scaler=accelerator.scaler,  # None unless mixed_precision="fp16"
        )
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
