"""The paper's tables as one command: plan (run count and time estimate), then one comparison per model."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from torch_mltp.data import dataset_folder, dataset_present, load_dataset
from torch_mltp.models import default_num_classes

from . import loaders
from .comparison import BASELINE, compare, duration_text, write_outputs
from .cost import seconds_per_step
from .recipes import TABLES, TRAIN_SET_SIZES, recipe_for
from .training import Experiment, RunOptions, describe_device, resolve_device

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
    rows = []
    for model, procedures in spec.rows:
        recipe = recipe_for(spec.dataset, model).replace(**overrides)
        experiment = Experiment(spec.dataset, model, recipe, limit_train_batches, limit_test_batches)
        rows.append(TableRow(experiment, procedures))
    return rows


def run_steps(experiment: Experiment) -> int:
    """The training steps of one run of ``experiment`` on its whole data set (:func:`.loaders.run_steps`)."""
    recipe = experiment.recipe
    return loaders.run_steps(recipe, TRAIN_SET_SIZES[experiment.dataset], experiment.limit_train_batches)


STEP_COST = {
    "cpu": {"standard": 1.0, "mltp_fo": 1.0, "mltp_fc": 1.5, "mltp_conv": 2.0, "mltp": 2.0},
    "cuda": {"standard": 1.0, "mltp_fo": 2.0, "mltp_fc": 2.5, "mltp_conv": 4.0, "mltp": 4.5},
}
"""A step of each procedure in steps of standard training, by device type: about what
``benchmarks/bench_step.py`` measured on CNet1, CNet4 and ResNet-18 (docs/benchmarks.md) on a 2-core CPU
and on an H200 GPU, where standard training's full batch uses the device far better than MLTP's halves."""
WARM_UP_SAMPLES = 4
"""The warm-up step runs on this many samples: it pays the first call's costs at little expense."""


def measure_step_seconds(experiment: Experiment, device: torch.device, steps: int) -> float:
    """Seconds per step of standard training on a random batch of the recipe's size
    (``cost.seconds_per_step``), timed over ``steps`` steps after one warm-up step on
    :data:`WARM_UP_SAMPLES` samples."""
    shape = _ShapeOnly(default_num_classes(experiment.model), INPUT_SHAPES[experiment.dataset])
    generator = torch.Generator().manual_seed(0)
    batch = experiment.recipe.batch_size
    x = torch.randn((batch, *shape.input_shape), generator=generator)
    y = torch.randint(shape.num_classes, (batch,), generator=generator)
    warm_up = (x[:WARM_UP_SAMPLES], y[:WARM_UP_SAMPLES])
    seconds_per_step(experiment, BASELINE, shape, warm_up, 1, device, warm_up=0)
    return seconds_per_step(experiment, BASELINE, shape, (x, y), steps, device, warm_up=0)


def data_line(dataset: str, root: str) -> str:
    """Whether ``dataset`` is where ``root`` points, and if not, how to get it there."""
    folder = dataset_folder(dataset, root)
    if dataset_present(dataset, root):
        return f"data: {dataset} found in {folder}"
    how = {
        "cifar10": "add --download to fetch it",
        "cifar100": "add --download to fetch it",
        "tiny-imagenet": "download and unzip it by hand, see docs/data.md",
    }[dataset]
    return f"data: {dataset} NOT found in {folder} (--data-root {root}): {how}"


def plan_lines(
    table: str,
    rows: Sequence[TableRow],
    seeds: Sequence[int],
    data_root: str,
    device: torch.device,
    timing_steps: int,
) -> Iterator[str]:
    """What ``reproduce`` will run, whether its data set is under ``data_root`` and (``timing_steps > 0``)
    roughly how long it takes on ``device`` (:func:`timing_lines`), line by line, so that a caller can
    show progress."""
    settings = [(row.experiment, procedure) for row in rows for procedure in row.procedures]
    first = rows[0].experiment
    yield f"{table}: {TABLES[table].title}"
    yield (
        f"{len(settings)} (model, procedure) settings x {len(seeds)} seed(s) {tuple(seeds)} = "
        f"{len(settings) * len(seeds)} runs "
        f"of {first.recipe.epochs} epochs, {run_steps(first) // first.recipe.epochs} steps per epoch "
        f"(batch {first.recipe.batch_size}, {first.recipe.train_samples or TRAIN_SET_SIZES[first.dataset]} "
        "training samples)"
    )
    for row in rows:
        yield f"{row.experiment.model}: {row.experiment.recipe}"
    yield data_line(first.dataset, data_root)
    yield f"device: {describe_device(device)}"
    if timing_steps <= 0:
        yield "no time estimate (--timing-steps 0)"
        return
    yield from timing_lines(rows, seeds, device, timing_steps)


def timing_lines(
    rows: Sequence[TableRow], seeds: Sequence[int], device: torch.device, timing_steps: int
) -> Iterator[str]:
    """The time estimate, each model's line as soon as it is timed: one warm-up step and ``timing_steps``
    steps of standard training per model on a random batch, scaled by each procedure's :data:`STEP_COST`
    and multiplied by the steps of a run (training only, on this machine with its current load)."""
    cost = STEP_COST["cuda" if device.type == "cuda" else "cpu"]
    batch = rows[0].experiment.recipe.batch_size
    yield (
        f"timing {len(rows)} models: {timing_steps} step(s) of standard training each on a random batch of "
        f"{batch} after a warm-up step (--timing-steps sets how many); a step of "
        + ", ".join(
            f"{procedure} counted as {cost[procedure]:g}" for procedure in cost if procedure != BASELINE
        )
        + " standard steps"
    )
    started = time.perf_counter()
    total = 0.0
    width = len(str(len(rows)))
    for index, row in enumerate(rows, start=1):
        experiment = row.experiment
        seconds = measure_step_seconds(experiment, device, timing_steps)
        runs = {procedure: seconds * cost[procedure] * run_steps(experiment) for procedure in row.procedures}
        total += math.fsum(runs.values()) * len(seeds)
        yield (
            f"  [{index:{width}d}/{len(rows)}] {experiment.model:<9} {seconds:8.4f} s/step; per run: "
            + ", ".join(f"{procedure} ~{duration_text(run)}" for procedure, run in runs.items())
        )
    yield (
        f"estimated total: ~{duration_text(total)} on {describe_device(device)} (training steps only, "
        f"timed in {time.perf_counter() - started:.0f} s; test evaluation and data loading come on top; "
        "the estimate depends on the machine and on what else runs on it)"
    )


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
    for line in plan_lines(
        table, rows, seeds, options.data_root, resolve_device(options.device), timing_steps
    ):
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
