"""One training run: the same loop for every procedure, checkpointed so that a resume is exact.

The procedure only decides how the optimizer is built (:func:`build_optimizer`) and how a step is
taken (:func:`training_step`). Before every ``cosine_every``-th step, for every procedure, a
measurement that leaves the training unchanged records the cosine between the gradients of the
batch's two halves (:func:`.probes.gradient_cosine`). The data order of epoch ``e`` is drawn from a
generator seeded by ``(seed, e)``, and each epoch's checkpoint holds the model, the optimizer (with
the alphas), the scheduler and the torch / CUDA / Python / NumPy RNG states (of every process), so a
run resumed from any epoch ends with the same weights as an uninterrupted one (bit-identical on CPU).

Under ``torchrun`` the model is wrapped in ``DistributedDataParallel`` (or, with ``fsdp``, sharded with
FSDP2's ``fully_shard``: :mod:`.sharding`), each process trains on its shard of every epoch
(``DistributedSampler``) with the recipe's batch size, the metrics are summed over processes, and only
the main process writes the run folder (:mod:`.runs`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

import torch_mltp
from torch_mltp import MLTPOptimizer, task_closures
from torch_mltp.constants import ALPHA_GROUP_KEY, TASK_SCOPES
from torch_mltp.data import DataSplits, load_dataset
from torch_mltp.models import build_model

from . import distributed, sharding
from .distributed import SINGLE_PROCESS, Processes
from .probes import gradient_cosine
from .recipes import ALPHA_POLICIES, MLTP_MODES, TRAIN_SUBSET_SEED, VALIDATION_SEED, Recipe, unused_fields
from .runs import TENSORBOARD_DIR, ExperimentError, RunFolder, json_normal

log = logging.getLogger(__name__)

__all__ = [
    "Experiment",
    "ExperimentError",
    "RunOptions",
    "RunResult",
    "build_model_for",
    "build_optimizer",
    "check_procedures",
    "evaluate",
    "split_training",
    "train_run",
    "training_step",
    "training_subset",
    "validation_split",
]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(output, target)``: the mean loss of a batch."""

DEFAULT_COSINE_EVERY = 4
"""Measure the gradient cosine before every 4th step: a measurement costs about one step of standard
training, so this adds about a quarter of standard training's time and less to MLTP's."""


@dataclass(frozen=True)
class Experiment:
    """What a run trains, apart from the procedure and the seed."""

    dataset: str
    model: str
    recipe: Recipe
    limit_train_batches: Optional[int] = None
    """Train on at most this many batches per epoch (smoke tests)."""
    limit_test_batches: Optional[int] = None
    """Evaluate on at most this many test batches."""
    make_model: Optional[Callable[[], nn.Module]] = field(default=None, compare=False, repr=False)
    """The user's model: a function of no argument that returns an ``nn.Module``, called after the seed is
    set (``model`` is then its name); ``None``: the registered model ``model``."""
    loss: Optional[Loss] = field(default=None, compare=False, repr=False)
    """``loss(output, target)``, the batch's mean loss, in place of cross-entropy (training and test loss);
    its name is ``loss_name``."""
    loss_name: Optional[str] = None

    def to_dict(self) -> dict:
        """The settings as plain data (a run's config): the user's functions by name only."""
        settings = {
            "dataset": self.dataset,
            "model": self.model,
            "recipe": self.recipe.to_dict(),
            "limit_train_batches": self.limit_train_batches,
            "limit_test_batches": self.limit_test_batches,
        }
        if self.loss is not None:
            settings["loss"] = self.loss_name
        return settings

    @property
    def criterion(self) -> Loss:
        """The loss of a batch: the user's, else cross-entropy."""
        return F.cross_entropy if self.loss is None else self.loss


@dataclass(frozen=True)
class RunOptions:
    """How and where runs execute; nothing here changes the results of a single process on a given
    device (``tasks`` matters only under ``torchrun``)."""

    data_root: str = "data"
    download: bool = False
    device: str = "auto"
    num_workers: Optional[int] = None
    """DataLoader workers; ``None``: 0 on CPU, 4 on CUDA (workers are seeded per epoch)."""
    tensorboard: bool = False
    progress: bool = True
    log_epochs: bool = True
    """Print one line per epoch (``compare`` prints one line per run instead)."""
    overwrite: bool = False
    require_checkpoint: bool = False
    """``--resume``: fail unless the run folder holds a checkpoint to continue from."""
    tasks: str = "local"
    """Under torchrun: MLTP's tasks per process (``local``) or over all processes (``global``)."""
    fsdp: bool = False
    """Under torchrun: shard the model with FSDP2 (``fully_shard``) instead of wrapping it in DDP
    (first-order MLTP with ``tasks="global"``, or standard training; no gradient cosine)."""
    cosine_every: int = DEFAULT_COSINE_EVERY
    """Measure the gradient cosine of the two tasks (:func:`.probes.gradient_cosine`) before every
    ``cosine_every``-th training step of an epoch, starting with its first; 0: never. The measurement
    does not change the training."""
    command: Optional[str] = None
    """The ``torch-mltp`` command that writes the runs (``train``, ``compare``, ``reproduce``), kept in each
    run's config.json: a folder that another command wrote is refused without offering ``--overwrite``."""


@dataclass
class RunResult:
    """A finished run: its folder and one metrics record per epoch."""

    run_dir: Path
    procedure: str
    seed: int
    history: List[dict]
    reused: bool = False  # found finished in run_dir with the same settings, not trained again

    @property
    def final(self) -> dict:
        return self.history[-1]


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else is checked for availability."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ExperimentError(f"--device {name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExperimentError(
            f"--device {name} asked for CUDA, but torch sees no CUDA device; use --device cpu"
        )
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' * (threads != 1)})"


def _base_optimizer(recipe: Recipe) -> Tuple[type, dict]:
    """The recipe's optimizer class and its settings."""
    if recipe.optimizer == "adam":
        return torch.optim.Adam, {"lr": recipe.lr, "weight_decay": recipe.weight_decay}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD, {
            "lr": recipe.lr,
            "momentum": recipe.momentum,
            "weight_decay": recipe.weight_decay,
        }
    raise ExperimentError(f"unknown optimizer {recipe.optimizer!r}; choose adam or sgd")


def _sam(model: nn.Module, recipe: Recipe, kind: type, settings: dict) -> torch.optim.Optimizer:
    """``pytorch_optimizer.SAM`` with the recipe's optimizer as its base and radius ``recipe.sam_rho``."""
    try:
        from pytorch_optimizer import SAM
    except ImportError:
        raise ExperimentError(
            "--procedure sam needs the pytorch-optimizer package: pip install 'torch-mltp[vision]'"
        ) from None
    return SAM(model.parameters(), kind, rho=recipe.sam_rho, **settings)


def build_optimizer(
    model: nn.Module, recipe: Recipe, procedure: str, tasks: str = "local"
) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``; MLTP procedures wrap it in ``MLTPOptimizer``, ``sam`` in
    ``pytorch_optimizer.SAM``."""
    kind, settings = _base_optimizer(recipe)
    if procedure == "sam":
        return _sam(model, recipe, kind, settings)
    base = kind(model.parameters(), **settings)
    mode = MLTP_MODES[procedure]
    if mode is None:
        return base
    if recipe.alpha_policy not in ALPHA_POLICIES:
        raise ExperimentError(
            f"unknown alpha policy {recipe.alpha_policy!r}; choose from {', '.join(ALPHA_POLICIES)}"
        )
    if recipe.alpha_policy == "fixed" and recipe.alpha_lr is not None:
        raise ExperimentError(
            "--alpha-lr is the learning rate of learned alphas: drop it with --alpha-policy fixed"
        )
    nonpositive = recipe.alpha_policy == "nonpositive"
    try:
        return MLTPOptimizer(
            base,
            model,
            eta=recipe.eta,
            alpha_init=(-recipe.alpha_mean if nonpositive else recipe.alpha_mean, recipe.alpha_std),
            mode=mode,
            learn_alpha=recipe.alpha_policy != "fixed",
            alpha_lr=recipe.alpha_lr,
            alpha_min=0.0 if recipe.alpha_policy == "nonnegative" else None,
            alpha_max=0.0 if nonpositive else None,
            tasks=tasks,
        )
    except ValueError as err:
        raise ExperimentError(f"procedure {procedure} cannot train this model: {err}") from None


def alpha_learning_rate(optimizer: torch.optim.Optimizer) -> Optional[float]:
    """The current learning rate of the learned alphas; ``None`` when ``optimizer`` learns none."""
    for group in optimizer.param_groups:
        if group.get(ALPHA_GROUP_KEY):
            return group["lr"]
    return None


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
    held_out = math.floor(fraction * len(dataset) + 0.5)
    if not 0 < fraction < 1 or not 1 <= held_out <= len(dataset) - 2:
        raise ExperimentError(
            f"--val-fraction {fraction} of {len(dataset)} training samples leaves no validation sample or "
            "fewer than 2 to train on"
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(VALIDATION_SEED)).tolist()
    return Subset(dataset, sorted(order[held_out:])), Subset(dataset, sorted(order[:held_out]))


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


def build_model_for(experiment: Experiment, data: DataSplits) -> nn.Module:
    """The experiment's model: the user's (``make_model()``), or the registered one shaped for ``data``."""
    if experiment.make_model is not None:
        model = experiment.make_model()
        if not isinstance(model, nn.Module):
            raise ExperimentError(
                f"the model function {experiment.model} must return a torch.nn.Module, got "
                f"{type(model).__name__}"
            )
        return model
    try:
        return build_model(experiment.model, data.num_classes, data.input_shape)
    except (ValueError, TypeError) as err:
        raise ExperimentError(f"cannot build {experiment.model} for {experiment.dataset}: {err}") from None


def check_procedures(experiment: Experiment, procedures, data: DataSplits) -> None:
    """Fail before training if a procedure cannot train the model (mltp_conv without convolutions)."""
    model = build_model_for(experiment, data)
    for procedure in procedures:
        build_optimizer(model, experiment.recipe, procedure)


def training_step(
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    perturbed_loss_fn: Optional[Callable] = None,
):
    """One step on the batch ``(x, y)``; returns the minimised objective (detached).

    Standard: the loss of the whole batch. MLTP: ``J`` of eq. 4 with task i the first half of the
    batch and task j the second half. SAM: the loss of the whole batch at the current weights; its step
    (``pytorch_optimizer.SAM.step``) moves the weights up that gradient by ``rho``, takes the batch's
    gradient there with ``perturbed_loss_fn`` (default ``loss_fn``), moves back and lets the base optimizer
    step with that gradient.
    """
    optimizer.zero_grad()
    if isinstance(optimizer, MLTPOptimizer):
        return optimizer.step(*task_closures(loss_fn, x, y))
    loss = loss_fn(x, y)
    loss.backward()
    if _is_sam(optimizer):
        perturbed = loss_fn if perturbed_loss_fn is None else perturbed_loss_fn
        optimizer.step(lambda: perturbed(x, y).backward())
    else:
        optimizer.step()
    return loss.detach()


def _is_sam(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "SAM" and type(optimizer).__module__.startswith("pytorch_optimizer")


class TrainTally:
    """Loss and correct predictions of every forward pass that computed a training loss.

    For MLTP these are task i at ``w`` and task j at ``w' = w - alpha * dL_i/dw``, so the train
    accuracy counts every sample of the batch once, each with the weights its loss was taken at.
    Sums stay on the device; reading them synchronises.
    """

    def __init__(self, device: torch.device):
        # loss sum, correct predictions, objective sum, samples, steps, cosine sum, cosines: one all-reduce
        self.sums = torch.zeros(7, dtype=torch.float64, device=device)

    def loss_fn(
        self, model: nn.Module, criterion: Loss = F.cross_entropy
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``criterion`` (default cross-entropy) of ``model`` on a batch, recorded in this tally."""

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = model(x)
            loss = criterion(logits, y)
            self.sums[0] += loss.detach().double() * len(y)
            self.sums[1] += (logits.detach().argmax(dim=1) == y).sum()
            self.sums[3] += len(y)
            return loss

        return loss_fn

    def add_objective(self, objective: torch.Tensor) -> None:
        self.sums[2] += objective.double()
        self.sums[4] += 1

    def add_cosine(self, cosine: torch.Tensor) -> None:
        """Count a measured gradient cosine; a NaN one (a zero gradient) is left out."""
        finite = cosine.isfinite()
        self.sums[5] += torch.where(finite, cosine.double(), 0.0)
        self.sums[6] += finite

    def summary(self, processes: Processes = SINGLE_PROCESS) -> Dict[str, float]:
        """Means over every process's samples (and steps, and measured cosines)."""
        loss_sum, correct, objective_sum, samples, steps, cosine_sum, cosines = processes.sum(
            self.sums.clone()
        ).tolist()
        summary = {
            "train_loss": loss_sum / samples,
            "train_acc": 100.0 * correct / samples,
            "train_objective": objective_sum / steps,
            "train_samples": int(samples),
        }
        if cosines:
            summary["grad_cosine"] = cosine_sum / cosines
            summary["grad_cosine_steps"] = int(cosines)
        return summary


def data_order_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The generator that shuffles epoch ``epoch`` of seed ``seed`` (and seeds its workers)."""
    entropy = [seed, epoch] if rank == 0 else [seed, epoch, rank]
    (state,) = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state))


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


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    limit: Optional[int],
    description: str,
    progress: bool,
    processes: Processes = SINGLE_PROCESS,
    cosine_every: int = 0,
    probed_model: Optional[nn.Module] = None,
    criterion: Loss = F.cross_entropy,
) -> Dict[str, float]:
    """Train ``model`` for one epoch; the train metrics, and the mean gradient cosine of the steps
    measured (every ``cosine_every``-th, on ``probed_model``, by default ``model``; the time the
    measurements took is ``grad_cosine_time_s``)."""
    from tqdm.auto import tqdm

    model.train()
    probed_model = model if probed_model is None else probed_model
    tally = TrainTally(device)
    loss_fn = tally.loss_fn(model, criterion)
    probe_seconds = 0.0
    total = len(loader) if limit is None else min(limit, len(loader))
    with tqdm(total=total, desc=description, leave=False, disable=not progress, unit="batch") as bar:
        for index, (x, y) in enumerate(itertools.islice(loader, total)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cosine_every and index % cosine_every == 0 and len(x) >= 2:  # two tasks need two samples
                started = time.perf_counter()
                tally.add_cosine(gradient_cosine(probed_model, _plain_loss(probed_model, criterion), x, y))
                probe_seconds += time.perf_counter() - started
            tally.add_objective(training_step(optimizer, loss_fn, x, y, _plain_loss(model, criterion)))
            bar.update()
            if progress and (index % 10 == 0 or index + 1 == total):
                stats = tally.summary()
                bar.set_postfix(loss=f"{stats['train_loss']:.3f}", acc=f"{stats['train_acc']:.1f}%")
    summary = tally.summary(processes)
    if cosine_every:
        summary["grad_cosine_time_s"] = probe_seconds
    return summary


def _plain_loss(model: nn.Module, criterion: Loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``criterion`` of ``model`` on a batch, recorded nowhere."""
    return lambda x, y: criterion(model(x), y)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    topk: Tuple[int, ...],
    limit: Optional[int],
    processes: Processes = SINGLE_PROCESS,
    lockstep: bool = False,
    criterion: Optional[Loss] = None,
) -> Dict[str, float]:
    """Test loss (``criterion``, default cross-entropy) and top-k accuracies (percent): ``test_acc`` is
    top-1, ``test_top5`` top-5.

    Under torchrun each process evaluates its share of the test set and the sums are combined.
    ``lockstep`` (a model sharded with FSDP, whose forward pass is a collective): every process runs as
    many forward passes as the process with the most batches, the extra ones on no sample.
    """
    model.eval()
    sums = torch.zeros(2 + len(topk), dtype=torch.float64, device=device)  # loss, samples, hits per k
    batches = 0
    for x, y in itertools.islice(loader, limit):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        if criterion is None:
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        else:
            sums[0] += criterion(logits, y).double() * len(y)
        sums[1] += len(y)
        hits = logits.topk(max(topk), dim=1).indices == y[:, None]
        sums[2:] += torch.stack([hits[:, :k].any(dim=1).sum() for k in topk]).double()
        batches += 1
    if lockstep:
        most = processes.sum(torch.tensor([batches], device=device), op=torch.distributed.ReduceOp.MAX)
        for _ in range(int(most.item()) - batches):
            model(loader.dataset[0][0].unsqueeze(0)[:0].to(device))
    loss_sum, samples, *correct = processes.sum(sums).tolist()
    metrics = {"test_loss": loss_sum / samples}
    for k, count in zip(topk, correct):
        metrics[metric_name(k)] = 100.0 * count / samples
    return metrics


def evaluation_loader(
    dataset: Dataset, batch_size: int, processes: Processes, workers: int, pin: bool
) -> DataLoader:
    """The test set in a fixed order; under torchrun every ``world_size``-th sample from ``rank``."""
    if processes.distributed:
        dataset = Subset(dataset, range(processes.rank, len(dataset), processes.world_size))
    return make_loader(dataset, batch_size, torch.Generator().manual_seed(0), False, workers, pin)


def metric_name(k: int) -> str:
    """The metrics key of the top-k test accuracy."""
    return "test_acc" if k == 1 else f"test_top{k}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_states() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # as tensors and plain numbers, so that torch.load(weights_only=True) accepts them
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def versions() -> Dict[str, str]:
    return {
        "torch_mltp": torch_mltp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def run_config(
    experiment: Experiment, procedure: str, seed: int, processes: Processes, tasks: str, fsdp: bool = False
) -> dict:
    """The settings that determine a run's results (the number of epochs may grow on resume).

    A run records the recipe fields that its procedure does not use (:func:`.recipes.unused_fields`: a
    standard run's MLTP and SAM settings) as ``None``.
    """
    config = {"experiment": experiment.to_dict(), "procedure": procedure, "seed": seed}
    config["experiment"]["recipe"].update(dict.fromkeys(unused_fields(procedure)))
    if processes.distributed:
        config["distributed"] = {"processes": processes.world_size, "tasks": tasks}
        if fsdp:
            config["distributed"]["fsdp"] = True
    return json_normal(config)


def settings_ignored_by(procedure: str) -> Tuple[str, ...]:
    """Dotted names of the recipe settings that a run of ``procedure`` does not depend on."""
    return tuple(f"experiment.recipe.{name}" for name in unused_fields(procedure))


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ExperimentError(
            "--tensorboard needs the tensorboard package: pip install 'torch-mltp[tensorboard]'"
        ) from None
    return SummaryWriter


def _epoch_line(procedure: str, seed: int, record: dict, epochs: int) -> str:
    top5 = f" top5 {record['test_top5']:.2f}%" if "test_top5" in record else ""
    cosine = f" | grad cosine {record['grad_cosine']:.3f}" if "grad_cosine" in record else ""
    return (
        f"{procedure} seed {seed} epoch {record['epoch']}/{epochs}: "
        f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}% | "
        f"test loss {record['test_loss']:.4f} acc {record['test_acc']:.2f}%{top5}{cosine} | "
        f"{record['epoch_time_s']:.1f}s"
    )


def _open_folder(
    folder: RunFolder, config: dict, procedure: str, epochs: int, options: RunOptions, processes: Processes
):
    """The main process checks (and, with ``overwrite``, clears) the folder; every process gets
    its verdict: the last checkpointed epoch, or the error to raise."""
    verdict: Tuple[Optional[int], Optional[str]] = (None, None)
    if processes.is_main:
        try:
            last_epoch = folder.prepare(
                config,
                epochs,
                options.overwrite,
                options.require_checkpoint,
                defaults=json_normal({"experiment": {"recipe": Recipe.field_defaults()}}),
                ignored=settings_ignored_by(procedure),
                writer=options.command,
            )
            verdict = (last_epoch, None)
        except ExperimentError as err:
            verdict = (None, str(err))
    last_epoch, error = processes.share(verdict)
    if error is not None:
        raise ExperimentError(error)
    return last_epoch


@dataclass
class _Training:
    """The objects one run trains with."""

    model: nn.Module  # the user's module (what the checkpoints hold)
    trained: nn.Module  # what the loop calls: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sharded: bool = False  # FSDP: the checkpoints gather the shards into whole tensors

    def model_state(self) -> dict:
        """The model's state dict (whole tensors; under FSDP a collective of every process)."""
        return sharding.whole(self.model.state_dict()) if self.sharded else self.model.state_dict()

    def checkpoint(self, epoch: int, processes: Processes) -> Optional[dict]:
        """This epoch's checkpoint, on the main process; every process hands in its RNG states."""
        states = processes.gather(rng_states())
        model, optimizer = self.model_state(), self.optimizer.state_dict()
        if self.sharded:
            optimizer = sharding.whole(optimizer)
        if not processes.is_main:
            return None
        return {
            "epoch": epoch,
            "model": model,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": states[0] if not processes.distributed else states,
        }

    def restore(self, checkpoint: dict, processes: Processes) -> None:
        if self.sharded:
            sharding.load_model(self.model, checkpoint["model"])
            sharding.load_optimizer(self.optimizer, checkpoint["optimizer"])
        else:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        states = checkpoint["rng"]
        saved_processes = len(states) if isinstance(states, list) else 1
        if saved_processes != processes.world_size:
            raise ExperimentError(
                f"the checkpoint was written by {saved_processes} process(es); resume it with as many "
                f"(this run has {processes.world_size})"
            )
        restore_rng_states(states[processes.rank] if isinstance(states, list) else states)


def _build_training(
    experiment: Experiment,
    procedure: str,
    data: DataSplits,
    device: torch.device,
    processes: Processes,
    tasks: str,
    fsdp: bool = False,
) -> _Training:
    model = build_model_for(experiment, data).to(device)
    trained = model
    if fsdp:
        trained = sharding.shard(model, device, processes)
    elif processes.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer = build_optimizer(trained, experiment.recipe, procedure, tasks)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, list(experiment.recipe.milestones), gamma=experiment.recipe.lr_decay
    )
    return _Training(model, trained, optimizer, scheduler, sharded=fsdp)


def train_run(
    experiment: Experiment,
    procedure: str,
    seed: int,
    run_dir: Path,
    options: RunOptions = RunOptions(),
    data: Optional[DataSplits] = None,
) -> RunResult:
    """Train one run into ``run_dir``, resuming from its checkpoint when it holds the same run.

    ``data`` avoids reloading the data set for every run of a comparison. A run folder with
    other settings is refused unless ``options.overwrite``.  Under ``torchrun`` every process
    calls this with the same arguments.
    """
    recipe = experiment.recipe
    if MLTP_MODES[procedure] is not None and recipe.batch_size < 2:
        raise ExperimentError("MLTP splits each batch into two tasks: --batch-size must be at least 2")
    if options.tasks not in TASK_SCOPES:
        raise ExperimentError(f"tasks must be one of {TASK_SCOPES}, got {options.tasks!r}")
    if options.cosine_every < 0:
        raise ExperimentError(f"cosine_every must be >= 0, got {options.cosine_every}")
    processes = distributed.current()
    if options.fsdp:
        sharding.check(procedure, processes, options.tasks)
    device = resolve_device(processes.device(options.device))
    folder = RunFolder(Path(run_dir))
    config = run_config(experiment, procedure, seed, processes, options.tasks, options.fsdp)
    last_epoch = _open_folder(folder, config, procedure, recipe.epochs, options, processes)
    if folder.finished(last_epoch, recipe.epochs):
        return RunResult(folder.path, procedure, seed, folder.history(last_epoch), reused=True)
    summary_writer = _summary_writer_class() if options.tensorboard and processes.is_main else None
    if data is None:
        data = load_dataset(experiment.dataset, options.data_root, download=options.download)
    train, validation = split_training(data, experiment, processes)
    data = dataclasses.replace(data, train=train)

    seed_everything(seed)
    training = _build_training(experiment, procedure, data, device, processes, options.tasks, options.fsdp)
    if last_epoch is not None:
        training.restore(folder.load_checkpoint(), processes)
    history = folder.history(last_epoch)
    if processes.is_main:
        folder.start(
            {
                **config,
                "epochs": recipe.epochs,
                "resumed_from_epoch": last_epoch,
                "options": dataclasses.asdict(options),
                "device": describe_device(device),
                "processes": processes.world_size,
                "versions": versions(),
                "command": sys.argv,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            history,
        )
    writer = None
    if summary_writer is not None:
        writer = summary_writer(log_dir=str(folder.path / TENSORBOARD_DIR), purge_step=(last_epoch or 0) + 1)
    workers, pin = _workers(options, device), device.type == "cuda"
    evaluation = evaluation_loader(data.test, 2 * recipe.batch_size, processes, workers, pin)
    held_out = None
    if validation is not None:
        held_out = evaluation_loader(validation, 2 * recipe.batch_size, processes, workers, pin)
    for epoch in range((last_epoch or 0) + 1, recipe.epochs + 1):
        record = _train_epoch(experiment, procedure, seed, epoch, training, data, device, processes, options)
        if held_out is not None:
            metrics = evaluate(
                training.model,
                held_out,
                device,
                (1,),
                experiment.limit_test_batches,
                processes,
                lockstep=training.sharded,
                criterion=experiment.loss,
            )
            record.update(val_loss=metrics["test_loss"], val_acc=metrics["test_acc"])
        record.update(_timed_evaluation(training, evaluation, device, experiment, processes))
        history.append(record)
        checkpoint = training.checkpoint(epoch, processes)
        if processes.is_main:
            folder.append_metrics(record)
            folder.save_checkpoint(checkpoint)
            if writer is not None:
                _log_tensorboard(writer, record)
            if options.log_epochs:
                log.info("%s", _epoch_line(procedure, seed, record, recipe.epochs))
    if writer is not None:
        writer.close()
    final_state = training.model_state()
    if processes.is_main:
        folder.finish(
            final_state,
            {**config, "epochs": recipe.epochs, "final": history[-1], "versions": versions()},
        )
    processes.barrier()  # the folder is complete before any process moves on
    return RunResult(folder.path, procedure, seed, history)


def _train_epoch(
    experiment: Experiment,
    procedure: str,
    seed: int,
    epoch: int,
    training: _Training,
    data: DataSplits,
    device: torch.device,
    processes: Processes,
    options: RunOptions,
) -> dict:
    """Train one epoch and step the scheduler; the epoch's record without the test metrics."""
    recipe = experiment.recipe
    loader = train_loader(
        data.train,
        recipe.batch_size,
        seed,
        epoch,
        processes,
        _workers(options, device),
        device.type == "cuda",
    )
    lr = training.optimizer.param_groups[0]["lr"]
    started = time.perf_counter()
    try:
        metrics = train_one_epoch(
            training.trained,
            training.optimizer,
            loader,
            device,
            experiment.limit_train_batches,
            f"{procedure} seed {seed} epoch {epoch}/{recipe.epochs}",
            options.progress and processes.is_main,
            processes,
            0 if options.fsdp else options.cosine_every,
            training.model,  # outside a DistributedDataParallel wrapper: a measurement, no gradient sync
            experiment.criterion,
        )
    except FloatingPointError as err:
        raise ExperimentError(f"training diverged in epoch {epoch} ({err}); lower --lr") from None
    record = {"epoch": epoch, "lr": lr, **metrics, "epoch_time_s": time.perf_counter() - started}
    alpha_lr = alpha_learning_rate(training.optimizer)
    if alpha_lr is not None:
        record["alpha_lr"] = alpha_lr
    training.scheduler.step()
    if isinstance(training.optimizer, MLTPOptimizer):
        record["alphas"] = {name: a.detach().cpu().tolist() for name, a in training.optimizer.alphas.items()}
    return record


def _workers(options: RunOptions, device: torch.device) -> int:
    if options.num_workers is not None:
        return options.num_workers
    return 4 if device.type == "cuda" else 0


def _timed_evaluation(
    training: _Training,
    loader: DataLoader,
    device: torch.device,
    experiment: Experiment,
    processes: Processes,
) -> dict:
    started = time.perf_counter()
    metrics = evaluate(
        training.model,
        loader,
        device,
        experiment.recipe.topk,
        experiment.limit_test_batches,
        processes,
        lockstep=training.sharded,
        criterion=experiment.loss,
    )
    return {**metrics, "eval_time_s": time.perf_counter() - started}


def _log_tensorboard(writer, record: dict) -> None:
    step = record["epoch"]
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(key.replace("_", "/", 1), value, step)
    for name, alpha in record.get("alphas", {}).items():
        if isinstance(alpha, float):
            writer.add_scalar(f"alpha/{name}", alpha, step)
    writer.flush()
