"""What a training step of each procedure costs: seconds per step, measured side by side on one batch.

The ratios to standard training give the other arms of a comparison their equal-cost budgets
(``Recipe.scaled``): standard training or SAM given the time that an MLTP run takes.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Dict, Sequence, Tuple

import torch

from torch_mltp.data import DataSplits

from .loop import TrainTally, plain_loss
from .optimizers import build_optimizer, training_step
from .training import Experiment, build_model_for


def batch_of(dataset, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` samples of ``dataset`` as one batch ``(inputs, targets)``."""
    samples = [dataset[index] for index in range(min(size, len(dataset)))]
    inputs = torch.stack([torch.as_tensor(x) for x, _ in samples])
    targets = torch.stack([torch.as_tensor(y) for _, y in samples])
    return inputs, targets


def seconds_per_step(
    experiment: Experiment,
    procedure: str,
    data: DataSplits,
    batch: Tuple[torch.Tensor, torch.Tensor],
    steps: int,
    device: torch.device,
    warm_up: int = 1,
) -> float:
    """Seconds per training step of ``procedure`` on ``batch``: a model built with seed 0, ``warm_up``
    untimed steps, then the mean over ``steps`` timed ones (the device synchronised around them)."""
    torch.manual_seed(0)
    model = build_model_for(experiment, data).to(device)
    optimizer = build_optimizer(model, experiment.recipe, procedure)
    loss_fn = TrainTally(device).loss_fn(model, experiment.criterion)
    plain = plain_loss(model, experiment.criterion)

    x, y = (tensor.to(device) for tensor in batch)
    model.train()
    for _ in range(warm_up):
        training_step(optimizer, loss_fn, x, y, plain)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        training_step(optimizer, loss_fn, x, y, plain)
    _synchronize(device)
    return (time.perf_counter() - started) / steps


def step_costs(
    experiment: Experiment,
    procedures: Sequence[str],
    data: DataSplits,
    steps: int,
    rounds: int,
    device: torch.device,
) -> Dict[str, dict]:
    """Per procedure, the median over ``rounds`` rounds of its seconds per step on the first batch of the
    training set (each round times every procedure in turn, so that a slow spell of the machine falls on
    all of them), its ratio to the first procedure's (standard training) and every round's seconds."""
    batch = batch_of(data.train, experiment.recipe.batch_size)
    seconds: Dict[str, list] = {procedure: [] for procedure in procedures}
    for _ in range(rounds):
        for procedure in procedures:
            seconds[procedure].append(seconds_per_step(experiment, procedure, data, batch, steps, device))
    medians = {procedure: statistics.median(values) for procedure, values in seconds.items()}
    reference = medians[procedures[0]]
    return {
        procedure: {
            "seconds_per_step": median,
            "ratio": round(median / reference, 2),
            "seconds_per_round": seconds[procedure],
        }
        for procedure, median in medians.items()
    }


def steps_lasting(experiment: Experiment, data: DataSplits, seconds: float, device: torch.device) -> int:
    """How many steps of standard training take at least ``seconds`` (at least 20), from 5 timed ones."""
    probe = step_costs(experiment, ("standard",), data, 5, 1, device)["standard"]["seconds_per_step"]
    return max(20, math.ceil(seconds / probe))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
