"""One training run: the same loop for every procedure, checkpointed so that a resume is exact.

The procedure only decides how the optimizer is built and steps (:mod:`.optimizers`). Under ``torchrun``
the model is wrapped in ``DistributedDataParallel`` (or, with ``fsdp``, its children that hold parameters,
then the root, are sharded with FSDP2's ``fully_shard``), each process trains on its shard of every epoch
with the recipe's batch size, the metrics are summed over processes, and only the main process writes the
run folder (:mod:`.runs`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import torch_mltp
from torch_mltp import MLTPOptimizer
from torch_mltp.constants import TASK_SCOPES
from torch_mltp.data import DataSplits, load_dataset
from torch_mltp.models import build_model

from . import distributed
from .checkpoints import Training, seed_everything
from .distributed import Processes
from .loaders import evaluation_loader, split_training, train_loader
from .loop import Loss, evaluate, train_one_epoch
from .optimizers import alpha_learning_rate, build_optimizer
from .recipes import MLTP_MODES, Recipe, unused_fields
from .runs import TENSORBOARD_DIR, ExperimentError, RunFolder, json_normal

log = logging.getLogger(__name__)

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


def check_options(recipe: Recipe, procedure: str, options: RunOptions, processes: Processes) -> None:
    """Refuse settings that no run can train with, and what ``--fsdp`` cannot train, with what works."""
    if MLTP_MODES[procedure] is not None and recipe.batch_size < 2:
        raise ExperimentError("MLTP splits each batch into two tasks: --batch-size must be at least 2")
    if options.tasks not in TASK_SCOPES:
        raise ExperimentError(f"tasks must be one of {TASK_SCOPES}, got {options.tasks!r}")
    if options.cosine_every < 0:
        raise ExperimentError(f"cosine_every must be >= 0, got {options.cosine_every}")
    if not options.fsdp:
        return
    if not processes.distributed:
        raise ExperimentError(
            "--fsdp shards the model over the processes of torchrun: start the command with "
            "torchrun --nproc_per_node=N (N >= 2)"
        )
    if MLTP_MODES[procedure] not in (None, "fo"):
        raise ExperimentError(
            f"--fsdp trains first-order MLTP only: use --procedure mltp_fo (or standard), not {procedure}"
        )
    if options.tasks != "global":
        raise ExperimentError(
            "--fsdp averages the gradients over the processes in its backward pass: use --tasks global "
            "(the default with --fsdp)"
        )


def _fully_shard(model: nn.Module, device: torch.device, processes: Processes) -> nn.Module:
    """``fully_shard`` every child of ``model`` that holds parameters, then ``model`` (in place). The
    gradient cosine is not measured: ``torch.autograd.grad`` cannot differentiate with respect to shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (processes.world_size,))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@dataclass
class _Run:
    """One run's settings and surroundings, shared by the parts of :func:`train_run`."""

    experiment: Experiment
    procedure: str
    seed: int
    options: RunOptions
    processes: Processes
    device: torch.device
    folder: RunFolder

    def open_folder(self, config: dict) -> Optional[int]:
        """The main process checks (and, with ``overwrite``, clears) the folder; every process gets
        its verdict: the last checkpointed epoch, or the error to raise."""
        verdict: Tuple[Optional[int], Optional[str]] = (None, None)
        if self.processes.is_main:
            try:
                last_epoch = self.folder.prepare(
                    config,
                    self.experiment.recipe.epochs,
                    self.options.overwrite,
                    self.options.require_checkpoint,
                    defaults=json_normal({"experiment": {"recipe": Recipe.field_defaults()}}),
                    ignored=[f"experiment.recipe.{name}" for name in unused_fields(self.procedure)],
                    writer=self.options.command,
                )
                verdict = (last_epoch, None)
            except ExperimentError as err:
                verdict = (None, str(err))
        last_epoch, error = self.processes.share(verdict)
        if error is not None:
            raise ExperimentError(error)
        return last_epoch

    def build_training(self, data: DataSplits) -> Training:
        model = build_model_for(self.experiment, data).to(self.device)
        trained = model
        if self.options.fsdp:
            trained = _fully_shard(model, self.device, self.processes)
        elif self.processes.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            trained = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        recipe = self.experiment.recipe
        optimizer = build_optimizer(trained, recipe, self.procedure, self.options.tasks)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, list(recipe.milestones), gamma=recipe.lr_decay
        )
        return Training(model, trained, optimizer, scheduler, sharded=self.options.fsdp)

    def start_folder(self, config: dict, last_epoch: Optional[int], history: List[dict]) -> None:
        """Write the run's configuration and the history it resumes from (main process)."""
        self.folder.start(
            {
                **config,
                "epochs": self.experiment.recipe.epochs,
                "resumed_from_epoch": last_epoch,
                "options": dataclasses.asdict(self.options),
                "device": describe_device(self.device),
                "processes": self.processes.world_size,
                "versions": versions(),
                "command": sys.argv,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            history,
        )

    @property
    def workers(self) -> int:
        if self.options.num_workers is not None:
            return self.options.num_workers
        return 4 if self.device.type == "cuda" else 0

    def evaluation_batches(self, dataset: Dataset) -> DataLoader:
        """``dataset`` in batches of twice the training batch, for this process."""
        batch_size, pin = 2 * self.experiment.recipe.batch_size, self.device.type == "cuda"
        return evaluation_loader(dataset, batch_size, self.processes, self.workers, pin)


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
    processes = distributed.current()
    check_options(recipe, procedure, options, processes)
    device = resolve_device(processes.device(options.device))
    run = _Run(experiment, procedure, seed, options, processes, device, RunFolder(run_dir))
    config = run_config(experiment, procedure, seed, processes, options.tasks, options.fsdp)
    last_epoch = run.open_folder(config)
    if run.folder.finished(last_epoch, recipe.epochs):
        return RunResult(run.folder.path, procedure, seed, run.folder.history(last_epoch), reused=True)
    summary_writer = _summary_writer_class() if options.tensorboard and processes.is_main else None
    if data is None:
        data = load_dataset(experiment.dataset, options.data_root, download=options.download)
    train, validation = split_training(data, experiment, processes)
    data = dataclasses.replace(data, train=train)

    seed_everything(seed)
    training = run.build_training(data)
    if last_epoch is not None:
        training.restore(run.folder.load_checkpoint(), processes)
    history = run.folder.history(last_epoch)
    if processes.is_main:
        run.start_folder(config, last_epoch, history)
    log_dir, first = str(run.folder.path / TENSORBOARD_DIR), (last_epoch or 0) + 1
    writer = None if summary_writer is None else summary_writer(log_dir=log_dir, purge_step=first)
    _train_epochs(run, training, data, validation, first, history, writer)
    if writer is not None:
        writer.close()
    final_state = training.model_state()
    if processes.is_main:
        run.folder.finish(
            final_state, {**config, "epochs": recipe.epochs, "final": history[-1], "versions": versions()}
        )
    processes.barrier()  # the folder is complete before any process moves on
    return RunResult(run.folder.path, procedure, seed, history)


def _train_epochs(
    run: _Run,
    training: Training,
    data: DataSplits,
    validation: Optional[Dataset],
    first: int,
    history: List[dict],
    writer,
) -> None:
    """Train epochs ``first..epochs``; each one's record joins ``history`` and, with its checkpoint, the
    run folder."""
    experiment, processes = run.experiment, run.processes
    evaluation = run.evaluation_batches(data.test)
    held_out = None if validation is None else run.evaluation_batches(validation)
    for epoch in range(first, experiment.recipe.epochs + 1):
        record = _train_epoch(run, epoch, training, data)
        if held_out is not None:
            metrics = _evaluation(run, training, held_out, (1,))
            record.update(val_loss=metrics["test_loss"], val_acc=metrics["test_acc"])
        started = time.perf_counter()
        record.update(_evaluation(run, training, evaluation, experiment.recipe.topk))
        record["eval_time_s"] = time.perf_counter() - started
        history.append(record)
        checkpoint = training.checkpoint(epoch, processes)
        if processes.is_main:
            run.folder.append_metrics(record)
            run.folder.save_checkpoint(checkpoint)
            if writer is not None:
                _log_tensorboard(writer, record)
            if run.options.log_epochs:
                log.info("%s", _epoch_line(run.procedure, run.seed, record, experiment.recipe.epochs))


def _train_epoch(run: _Run, epoch: int, training: Training, data: DataSplits) -> dict:
    """Train one epoch and step the scheduler; the epoch's record without the test metrics."""
    experiment, options, processes, seed = run.experiment, run.options, run.processes, run.seed
    recipe = experiment.recipe
    pin = run.device.type == "cuda"
    loader = train_loader(data.train, recipe.batch_size, seed, epoch, processes, run.workers, pin)
    lr = training.optimizer.param_groups[0]["lr"]
    started = time.perf_counter()
    try:
        metrics = train_one_epoch(
            training.trained,
            training.optimizer,
            loader,
            run.device,
            experiment.limit_train_batches,
            f"{run.procedure} seed {seed} epoch {epoch}/{recipe.epochs}",
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


def _evaluation(run: _Run, training: Training, loader: DataLoader, topk: Tuple[int, ...]) -> dict:
    """The model's loss and top-k accuracies on ``loader``, over all processes."""
    return evaluate(
        training.model,
        loader,
        run.device,
        topk,
        run.experiment.limit_test_batches,
        run.processes,
        lockstep=training.sharded,
        criterion=run.experiment.loss,
    )


def _log_tensorboard(writer, record: dict) -> None:
    step = record["epoch"]
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(key.replace("_", "/", 1), value, step)
    for name, alpha in record.get("alphas", {}).items():
        if isinstance(alpha, float):
            writer.add_scalar(f"alpha/{name}", alpha, step)
    writer.flush()
