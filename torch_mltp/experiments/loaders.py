"""The data of a run: the training samples it keeps, and the batches of each epoch in a fixed order."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from torch_mltp.data import DataSplits

from .distributed import SINGLE_PROCESS, Processes
from .recipes import TRAIN_SUBSET_SEED, VALIDATION_SEED, Recipe
from .runs import ExperimentError

if TYPE_CHECKING:
    from .training import Experiment


def training_subset(dataset: Dataset, samples: Optional[int]) -> Dataset:
    """The first ``samples`` indices of one fixed permutation of ``dataset`` (seed
    :data:`.recipes.TRAIN_SUBSET_SEED`, independent of the run seed); ``None``: the whole data set."""
    if samples is None:
        return dataset
    if not 1 <= samples <= len(dataset):
        raise ExperimentError(
            f"--train-samples {samples} does not fit the training set of {len(dataset)} samples"
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(TRAIN_SUBSET_SEED))
    return Subset(dataset, order[:samples].tolist())


def validation_split(dataset: Dataset, fraction: Optional[float]) -> Tuple[Dataset, Optional[Dataset]]:
    """``(train, validation)``: the validation part is the first ``round(fraction * len(dataset))`` indices
    of one fixed permutation of ``dataset`` (seed :data:`.recipes.VALIDATION_SEED`, independent of the run
    seed), the rest trains. ``None``: the whole data set trains, no validation part."""
    if fraction is None:
        return dataset, None
    held_out = validation_size(len(dataset), fraction)
    if not 0 < fraction < 1 or not 1 <= held_out <= len(dataset) - 2:
        raise ExperimentError(
            f"--val-fraction {fraction} of {len(dataset)} training samples leaves no validation sample or "
            "fewer than 2 to train on"
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(VALIDATION_SEED)).tolist()
    return Subset(dataset, sorted(order[held_out:])), Subset(dataset, sorted(order[:held_out]))


def validation_size(samples: int, fraction: float) -> int:
    """How many of ``samples`` training samples a validation fraction holds out (halves round up)."""
    return math.floor(fraction * samples + 0.5)


def split_training(
    data: DataSplits, experiment: Experiment, processes: Processes = SINGLE_PROCESS
) -> Tuple[Dataset, Optional[Dataset]]:
    """``(train, validation)``: the training samples after the recipe's ``train_samples`` and
    ``val_fraction`` (:func:`training_subset`, :func:`validation_split`). Refuses a batch larger than what
    one process trains on: the training samples, under torchrun each process's equal share of them."""
    recipe = experiment.recipe
    subset = training_subset(data.train, recipe.train_samples)
    train, validation = validation_split(subset, recipe.val_fraction)
    available = len(train) // processes.world_size
    if recipe.batch_size > available:
        given = (("--train-samples", recipe.train_samples), ("--val-fraction", recipe.val_fraction))
        chosen = " and ".join(f"{option} {value}" for option, value in given if value is not None)
        samples = f"the {len(train)} training samples of {experiment.dataset}" + (
            f" left by {chosen}" if chosen else ""
        )
        if processes.distributed:
            samples = f"each of the {processes.world_size} processes' share of {samples}"
        raise ExperimentError(
            f"argument --batch-size: a batch cannot be larger than the training set: expected at most "
            f"{available} ({samples}), got {recipe.batch_size}"
        )
    return train, validation


def data_order_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The generator that shuffles epoch ``epoch`` of seed ``seed`` (and seeds its workers)."""
    entropy = [seed, epoch] if rank == 0 else [seed, epoch, rank]
    (state,) = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state))


def batches_per_epoch(samples: int, batch_size: int, limit: Optional[int] = None) -> int:
    """The training batches of an epoch of ``samples`` samples, as :func:`make_loader` makes them (a last
    batch of one sample is dropped), at most ``limit``."""
    batches = math.ceil(samples / batch_size) - (samples % batch_size == 1)
    return batches if limit is None else min(batches, limit)


def run_steps(recipe: Recipe, total_samples: int, limit: Optional[int] = None) -> int:
    """The training steps of one run with ``recipe`` on a training set of ``total_samples`` samples: its
    epochs times the batches of an epoch (:func:`batches_per_epoch`) of the samples that
    :func:`split_training` keeps (one process)."""
    samples = recipe.train_samples or total_samples
    if recipe.val_fraction is not None:
        samples -= validation_size(samples, recipe.val_fraction)
    return recipe.epochs * batches_per_epoch(samples, recipe.batch_size, limit)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    generator: torch.Generator,
    shuffle: bool,
    num_workers: int,
    pin: bool,
    sampler: Optional[DistributedSampler] = None,
) -> DataLoader:
    """Batches of ``dataset`` (shuffled by ``generator``, or by a ``DistributedSampler``)."""
    size = len(sampler) if sampler is not None else len(dataset)
    # MLTP cannot split a batch of one sample into two tasks: drop such a last batch.
    drop_last = (shuffle or sampler is not None) and size % batch_size == 1
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin,
        drop_last=drop_last,
    )


def train_loader(
    dataset: Dataset, batch_size: int, seed: int, epoch: int, processes: Processes, workers: int, pin: bool
) -> DataLoader:
    """Epoch ``epoch``'s batches for this process: the whole shuffled set for a single process,
    else this process's shard of one shuffle shared by all (the same number of batches in each)."""
    sampler = None
    if processes.distributed:
        sampler = DistributedSampler(
            dataset, processes.world_size, processes.rank, shuffle=True, seed=seed, drop_last=True
        )
        sampler.set_epoch(epoch)
    generator = data_order_generator(seed, epoch, processes.rank)
    return make_loader(dataset, batch_size, generator, True, workers, pin, sampler)


def evaluation_loader(
    dataset: Dataset, batch_size: int, processes: Processes, workers: int, pin: bool
) -> DataLoader:
    """The test set in a fixed order; under torchrun every ``world_size``-th sample from ``rank``."""
    if processes.distributed:
        dataset = Subset(dataset, range(processes.rank, len(dataset), processes.world_size))
    return make_loader(dataset, batch_size, torch.Generator().manual_seed(0), False, workers, pin)
