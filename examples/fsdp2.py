import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torch_mltp import MLTPOptimizer, ShardedCheckpoint, task_closures


def build(device):
    """The model sharded over all processes, and its optimizer (the same in every run)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).to(device)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)  # the root last: every parameter is now a DTensor shard
    base = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, MLTPOptimizer(base, model, mode="fo")  # tasks="global" under FSDP


def main():
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])  # set by torchrun
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    model, opt = build(device)

    data = TensorDataset(torch.randn(1024, 40), torch.randint(0, 10, (1024,)))
    sampler = DistributedSampler(data, shuffle=True, seed=0, drop_last=True)  # one shard per process
    loader = DataLoader(data, batch_size=128, sampler=sampler, drop_last=True)  # two tasks of 64

    def loss_fn(x, y):
        return F.cross_entropy(model(x), y)

    for epoch in range(2):
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            J = opt.backward(*task_closures(loss_fn, x, y))  # J of the union of all processes' tasks
            opt.step()
        if dist.get_rank() == 0:
            alphas = {name: round(alpha.item(), 5) for name, alpha in opt.alphas.items()}
            print(f"epoch {epoch}: J = {J.item():.3f}, alphas {alphas}")

    # Each process writes its shards (the folder must be one that every process sees).
    dcp.save({"train": ShardedCheckpoint(model, opt)}, checkpoint_id="checkpoint-fsdp")
    # A run started anew builds the same model and optimizer, then loads the checkpoint into them.
    resumed, resumed_opt = build(device)
    dcp.load({"train": ShardedCheckpoint(resumed, resumed_opt)}, checkpoint_id="checkpoint-fsdp")
    weights = all(
        torch.equal(a.full_tensor(), b.full_tensor())
        for a, b in zip(model.parameters(), resumed.parameters())
    )
    alphas = all(torch.equal(a, b) for a, b in zip(opt.alphas.values(), resumed_opt.alphas.values()))
    if dist.get_rank() == 0:
        print(f"resumed: the same weights {weights}, the same alphas {alphas}")
    dist.barrier()  # every process's last collective has finished before the group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
