"""The paper's tables as one command: plan (run count and time estimate), then one comparison per model."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from torch_mltp.data import load_dataset
from torch_mltp.models import default_num_classes

from .compare import compare, write_outputs
from .recipes import TABLES, TRAIN_SET_SIZES, recipe_for
from .training import (
    Experiment,
    RunOptions,
    TrainTally,
    build_model_for,
    build_optimizer,
    describe_device,
    resolve_device,
    training_step,
)

log = logging.getLogger(__name__)

INPUT_SHAPES = {
    "mnist1d": (40,),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "tiny-imagenet": (3, 64, 64),
}
"""One sample's shape per data set, for timing steps without loading the data."""


@dataclass(frozen=True)
class _ShapeOnly:
    """Stands in for ``DataSplits`` when only the model's shape matters."""

    num_classes: int
    input_shape: Tuple[int, ...]


@dataclass(frozen=True)
class TableRow:
    experiment: Experiment
    procedures: Tuple[str, ...]


def table_rows(
    table: str, overrides: dict, limit_train_batches=None, limit_test_batches=None
) -> List[TableRow]:
    """The experiments of one of the paper's tables, each with the paper's recipe and ``overrides``."""
    spec = TABLES[table]
    return [
        TableRow(
            Experiment(
                spec.dataset,
                model,
                recipe_for(spec.dataset, model).replace(**overrides),
                limit_train_batches,
                limit_test_batches,
            ),
            procedures,
        )
        for model, procedures in spec.rows
    ]


def train_samples(experiment: Experiment) -> int:
    """The number of training samples: the recipe's ``train_samples``, else the whole training set."""
    return experiment.recipe.train_samples or TRAIN_SET_SIZES[experiment.dataset]


def steps_per_epoch(experiment: Experiment) -> int:
    steps = math.ceil(train_samples(experiment) / experiment.recipe.batch_size)
    return steps if experiment.limit_train_batches is None else min(steps, experiment.limit_train_batches)


def measure_step_seconds(experiment: Experiment, procedure: str, device: torch.device, steps: int) -> float:
    """Seconds per training step, timed over ``steps`` steps on a random batch after one warm-up step."""
    shape = _ShapeOnly(default_num_classes(experiment.model), INPUT_SHAPES[experiment.dataset])
    model = build_model_for(experiment, shape).to(device)
    optimizer = build_optimizer(model, experiment.recipe, procedure)
    generator = torch.Generator().manual_seed(0)
    batch = experiment.recipe.batch_size
    x = torch.randn((batch, *shape.input_shape), generator=generator).to(device)
    y = torch.randint(shape.num_classes, (batch,), generator=generator).to(device)
    loss_fn = TrainTally(device).loss_fn(model)
    model.train()
    for index in range(steps + 1):
        if index == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        training_step(optimizer, loss_fn, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def plan_lines(
    table: str, rows: Sequence[TableRow], seeds: Sequence[int], device: torch.device, timing_steps: int
) -> Iterator[str]:
    """What ``reproduce`` will run and (``timing_steps > 0``) roughly how long it takes on ``device``, line
    by line: each setting's line comes as soon as its steps are timed, so that a caller can show progress.

    The estimate times one warm-up step and ``timing_steps`` steps of every (model, procedure) on a random
    batch, and multiplies by the steps of a run: training only, on this machine with its current load.
    """
    settings = [(row.experiment, procedure) for row in rows for procedure in row.procedures]
    first = rows[0].experiment
    yield f"{table}: {TABLES[table].title}"
    yield (
        f"{len(settings)} (model, procedure) settings x {len(seeds)} seed(s) {tuple(seeds)} = "
        f"{len(settings) * len(seeds)} runs "
        f"of {first.recipe.epochs} epochs, {steps_per_epoch(first)} steps per epoch "
        f"(batch {first.recipe.batch_size}, {train_samples(first)} training samples)"
    )
    for row in rows:
        yield f"{row.experiment.model}: {row.experiment.recipe}"
    yield f"device: {describe_device(device)}"
    if timing_steps <= 0:
        yield "no time estimate (--timing-steps 0)"
        return
    yield (
        f"timing {len(settings)} settings: 1 warm-up step and {timing_steps} timed step(s) each "
        f"on a random batch of {first.recipe.batch_size} (--timing-steps sets how many)"
    )
    started = time.perf_counter()
    total = 0.0
    width = len(str(len(settings)))
    for index, (experiment, procedure) in enumerate(settings, start=1):
        seconds = measure_step_seconds(experiment, procedure, device, timing_steps)
        run = seconds * steps_per_epoch(experiment) * experiment.recipe.epochs
        total += run * len(seeds)
        yield (
            f"  [{index:{width}d}/{len(settings)}] {experiment.model:<9} {procedure:<10} "
            f"{seconds:8.4f} s/step  ~{_hours(run)} per run"
        )
    yield (
        f"estimated total: ~{_hours(total)} on {describe_device(device)} (training steps only, timed in "
        f"{time.perf_counter() - started:.0f} s over {timing_steps} step(s) per setting after a warm-up "
        "step; test evaluation and data loading come on top; the estimate depends on the machine and "
        "on what else runs on it)"
    )


def plan(
    table: str, rows: Sequence[TableRow], seeds: Sequence[int], device: torch.device, timing_steps: int
) -> str:
    """:func:`plan_lines` as one text."""
    return "\n".join(plan_lines(table, rows, seeds, device, timing_steps))


def reproduce(
    table: str,
    rows: Sequence[TableRow],
    seeds: Sequence[int],
    root: Path,
    options: RunOptions,
    timing_steps: int,
    dry_run: bool,
) -> Optional[List[dict]]:
    """Print the plan as it is made, then (unless ``dry_run``) run every row's comparison under ``root``.

    Each model gets its own folder ``<dataset>-<model>`` with its table and figures; ``root``
    gets the combined table (with the paper's numbers) and results.json.
    """
    data = None if dry_run else load_dataset(rows[0].experiment.dataset, options.data_root, options.download)
    for line in plan_lines(table, rows, seeds, resolve_device(options.device), timing_steps):
        log.info("%s", line)  # line by line: timing every setting takes a while
    if dry_run:
        return None
    results = []
    for row in rows:
        experiment = row.experiment
        folder = Path(root) / f"{experiment.dataset}-{experiment.model}"
        result = compare(experiment, row.procedures, seeds, folder, options, data)
        write_outputs(folder, [result])
        results.append(result)
    write_outputs(Path(root), results, reported=TABLES[table].reported, figures=False)
    return results
