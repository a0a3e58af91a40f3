import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from torch_mltp import MLTPOptimizer, task_closures

device = "cuda" if torch.cuda.is_available() else "cpu"
model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(device)
data = TensorDataset(torch.randn(512, 40), torch.randint(0, 10, (512,)))
loader = DataLoader(data, batch_size=128, shuffle=True, drop_last=True)  # a batch of 128 = two tasks of 64

base = torch.optim.Adam(model.parameters(), lr=1e-3)
opt = MLTPOptimizer(base, model, eta=1.0, alpha_init=(1e-3, 1e-3), mode="fo")
scaler = torch.amp.GradScaler(device)
half = torch.float16 if device == "cuda" else torch.bfloat16


def loss_fn(x, y):
    with torch.autocast(device, dtype=half):
        return F.cross_entropy(model(x), y)


for x, y in loader:
    x, y = x.to(device), y.to(device)
    opt.zero_grad()
    J = opt.backward(*task_closures(loss_fn, x, y), scaler=scaler)  # was: scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    scaler.step(opt)
    scaler.update()
