"""What is benchmarked: the training setting, the models and their synthetic data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

LR = 1e-3  # Adam, for weights and alphas alike (the paper's setting)
ETA = 1.0
ALPHA_INIT = (1e-3, 1e-3)
BATCH = 128  # split 64 + 64 into task i and task j
SCALING_DEPTHS = (2, 4, 8, 16, 32, 64)
SCALING_WIDTH = 64


@dataclass(frozen=True)
class Workload:
    """A model to benchmark and the shape of its synthetic data."""

    label: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int


def paper_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torch_mltp.models import build_model

        return build_model(name)

    return build


def deep_mlp(depth: int, width: int = SCALING_WIDTH, inputs: int = 40, classes: int = 10) -> nn.Module:
    """``depth`` linear layers, ReLU between them: inputs -> width -> ... -> classes."""
    sizes = [inputs] + [width] * (depth - 1) + [classes]
    layers: list[nn.Module] = []
    for k, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.ReLU()] if k < depth - 1 else [])
    return nn.Sequential(*layers)


WORKLOADS = {
    "mlp": Workload("mlp", paper_model("mnist1d_mlp"), (40,), 10),
    "cnet1": Workload("cnet1", paper_model("cnet1"), (3, 32, 32), 10),
    "cnet4": Workload("cnet4", paper_model("cnet4"), (3, 32, 32), 10),
    "resnet18": Workload("resnet18", paper_model("resnet18"), (3, 64, 64), 200),
}


def scaling_workload(depth: int) -> Workload:
    return Workload(f"mlp{depth}", lambda: deep_mlp(depth), (40,), 10)


def make_batches(workload: Workload, count: int, batch: int, device: torch.device, dtype=torch.float32):
    """``count`` synthetic batches (standard normal inputs, uniform labels) from a fixed seed."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(count):
        x = torch.randn(batch, *workload.input_shape, generator=generator, dtype=dtype)
        y = torch.randint(0, workload.num_classes, (batch,), generator=generator)
        batches.append((x.to(device), y.to(device)))
    return batches


def build_model(workload: Workload, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return workload.build().to(device)
