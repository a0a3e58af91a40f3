"""A model and a data set of your own, in one file: does MLTP help on them?

torch-mltp compare --model examples/my_model.py:make_model --dataset examples/my_model.py:make_data
python examples/my_model.py  # the same comparison from Python
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset


def make_model() -> nn.Module:
    """Called after each run's seed is set, so every arm starts from the same weights on a given seed."""
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def make_data():
    """(train, test): 2,000 and 1,000 points in 20 dimensions, labelled by a fixed random network, with a
    tenth of the training labels replaced at random so that generalisation matters."""
    generator = torch.Generator().manual_seed(0)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 4))
    for parameter in teacher.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator)
    inputs = torch.randn(3000, 20, generator=generator)
    with torch.no_grad():
        labels = teacher(inputs).argmax(dim=1)
    noisy = torch.rand(2000, generator=generator) < 0.1
    labels[:2000][noisy] = torch.randint(4, (int(noisy.sum()),), generator=generator)
    return TensorDataset(inputs[:2000], labels[:2000]), TensorDataset(inputs[2000:], labels[2000:])


if __name__ == "__main__":
    import logging

    from torch_mltp.experiments import compare

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress, with the time left
    decision = compare(make_model, make_data)  # runs under runs/compare/__main__-make_model
    print(decision.table())
