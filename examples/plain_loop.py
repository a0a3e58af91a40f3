import torch
import torch.nn.functional as F

from torch_mltp import MLTPOptimizer, task_closures

model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
opt = MLTPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, eta=1.0, mode="full")
x, y = torch.randn(128, 40), torch.randint(0, 10, (128,))
opt.zero_grad()
J = opt.step(*task_closures(lambda xb, yb: F.cross_entropy(model(xb), yb), x, y))
alphas = {name: round(alpha.item(), 5) for name, alpha in opt.alphas.items()}  # layer name -> its alpha
print(f"J = {J.item():.3f}, L_i = {opt.last_result.loss_i.item():.3f}, alphas: {alphas}")
