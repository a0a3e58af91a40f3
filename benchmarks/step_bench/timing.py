"""The one timing loop: every contestant once per round, in a freshly shuffled order."""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from .contestants import Step
from .report import one_line


@dataclass
class Contestant:
    name: str
    step: Step


@dataclass
class Timings:
    """Per-step seconds of each contestant that ran, and why the others stopped."""

    seconds: dict[str, list[float]]
    failures: dict[str, str] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    contestants: list[Contestant],
    batches: list[tuple[Tensor, Tensor]],
    rounds: int,
    warmup: int,
    device: torch.device,
    seed: int = 0,
    after_round: Optional[Callable[[int], None]] = None,
    block: int = 1,
) -> Timings:
    """Run ``warmup + rounds`` rounds; each round times every contestant once, in a shuffled order.

    One sample is ``block`` consecutive steps between two device synchronisations, divided by
    ``block`` (more than one on a GPU, so that the host can run ahead of the device as in training).
    A contestant that raises is dropped (its error is kept); ``after_round(k)`` runs after round ``k``
    (1-based, warm-up included), outside the timed region.
    """
    order = list(contestants)
    shuffle = random.Random(seed).shuffle
    result = Timings({c.name: [] for c in contestants})
    gc.collect()
    for round_index in range(warmup + rounds):
        shuffle(order)
        x, y = batches[round_index % len(batches)]
        for contestant in list(order):
            try:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(block):
                    contestant.step(x, y)
                synchronize(device)
                elapsed = (time.perf_counter() - start) / block
            except Exception as error:  # reported in the table
                result.failures[contestant.name] = one_line(error)
                order.remove(contestant)
                continue
            if round_index >= warmup:
                result.seconds[contestant.name].append(elapsed)
        if after_round is not None:
            after_round(round_index + 1)
    for name in result.failures:
        result.seconds.pop(name, None)
    return result
