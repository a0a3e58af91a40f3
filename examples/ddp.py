import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torch_mltp import MLTPOptimizer, task_closures


def main():
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])  # set by torchrun
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights in every process
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).to(device)
    ddp_model = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    base = torch.optim.Adam(ddp_model.parameters(), lr=1e-3)
    opt = MLTPOptimizer(base, ddp_model, mode="full", tasks="local")

    data = TensorDataset(torch.randn(1024, 40), torch.randint(0, 10, (1024,)))
    sampler = DistributedSampler(data, shuffle=True, seed=0, drop_last=True)  # one shard per process
    loader = DataLoader(data, batch_size=128, sampler=sampler, drop_last=True)  # two tasks of 64

    def loss_fn(x, y):
        return F.cross_entropy(ddp_model(x), y)

    for epoch in range(2):
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            J = opt.backward(*task_closures(loss_fn, x, y))  # averaged over the processes
            opt.step()
        if dist.get_rank() == 0:
            alphas = {name: round(alpha.item(), 5) for name, alpha in opt.alphas.items()}
            print(f"epoch {epoch}: J = {J.item():.3f}, alphas {alphas}")
    dist.barrier()  # every process's last collective has finished before the group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
