"""One training run: the same loop for every procedure, checkpointed so that a resume is exact.

The procedure only decides how the optimizer is built (:func:`build_optimizer`) and how a step is
taken (:func:`training_step`). The data order of epoch ``e`` is drawn from a generator seeded by
``(seed, e)``, and each epoch's checkpoint holds the model, the optimizer (with the alphas), the
scheduler and the torch / CUDA / Python / NumPy RNG states, so a run resumed from any epoch ends
with the same weights as an uninterrupted one (bit-identical on CPU).

Run folder layout::

    config.json     the full configuration, package and torch versions
    metrics.jsonl   one JSON object per epoch (accuracies in percent)
    checkpoint.pt   the state after the last finished epoch
    final.pt        the final model state_dict
    result.json     the final epoch's metrics and the configuration
    tensorboard/    with --tensorboard
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import torch_mltp
from torch_mltp import MLTPOptimizer, task_closures
from torch_mltp.data import DataSplits, load_dataset
from torch_mltp.models import build_model

from .recipes import MLTP_MODES, Recipe

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.pt"
RESULT_FILE = "result.json"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, FINAL_FILE, RESULT_FILE)


class ExperimentError(Exception):
    """A problem the user can fix (bad combination of settings, conflicting output folder, ...)."""


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

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "recipe": self.recipe.to_dict()}


@dataclass(frozen=True)
class RunOptions:
    """How and where runs execute; nothing here changes the results on a given device."""

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


@dataclass
class RunResult:
    """A finished run: its folder and one metrics record per epoch."""

    run_dir: Path
    procedure: str
    seed: int
    history: List[dict]

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


def build_optimizer(model: nn.Module, recipe: Recipe, procedure: str) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``; MLTP procedures wrap it in ``MLTPOptimizer``."""
    if recipe.optimizer == "adam":
        base = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    elif recipe.optimizer == "sgd":
        base = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
    else:
        raise ExperimentError(f"unknown optimizer {recipe.optimizer!r}; choose adam or sgd")
    mode = MLTP_MODES[procedure]
    if mode is None:
        return base
    try:
        return MLTPOptimizer(
            base, model, eta=recipe.eta, alpha_init=(recipe.alpha_mean, recipe.alpha_std), mode=mode
        )
    except ValueError as err:
        raise ExperimentError(f"procedure {procedure} cannot train this model: {err}") from None


def build_model_for(experiment: Experiment, data: DataSplits) -> nn.Module:
    """The experiment's model, shaped for ``data``."""
    try:
        return build_model(experiment.model, data.num_classes, data.input_shape)
    except (ValueError, TypeError) as err:
        raise ExperimentError(f"cannot build {experiment.model} for {experiment.dataset}: {err}") from None


def check_procedures(experiment: Experiment, procedures, data: DataSplits) -> None:
    """Fail before training if a procedure cannot train the model (mltp_conv without convolutions)."""
    model = build_model_for(experiment, data)
    for procedure in procedures:
        build_optimizer(model, experiment.recipe, procedure)


def training_step(optimizer: torch.optim.Optimizer, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor):
    """One step on the batch ``(x, y)``; returns the minimised objective (detached).

    Standard: the loss of the whole batch. MLTP: ``J`` of eq. 4 with task i the first half of the
    batch and task j the second half.
    """
    optimizer.zero_grad()
    if isinstance(optimizer, MLTPOptimizer):
        return optimizer.step(*task_closures(loss_fn, x, y))
    loss = loss_fn(x, y)
    loss.backward()
    optimizer.step()
    return loss.detach()


class TrainTally:
    """Loss and correct predictions of every forward pass that computed a training loss.

    For MLTP these are task i at ``w`` and task j at ``w' = w - alpha * dL_i/dw``, so the train
    accuracy counts every sample of the batch once, each with the weights its loss was taken at.
    Sums stay on the device; reading them synchronises.
    """

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.objective_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.samples = 0
        self.steps = 0

    def loss_fn(self, model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Cross-entropy of ``model`` on a batch, recorded in this tally."""

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            self.loss_sum += loss.detach().double() * len(y)
            self.correct += (logits.detach().argmax(dim=1) == y).sum()
            self.samples += len(y)
            return loss

        return loss_fn

    def add_objective(self, objective: torch.Tensor) -> None:
        self.objective_sum += objective.double()
        self.steps += 1

    def summary(self) -> Dict[str, float]:
        return {
            "train_loss": self.loss_sum.item() / self.samples,
            "train_acc": 100.0 * self.correct.item() / self.samples,
            "train_objective": self.objective_sum.item() / self.steps,
            "train_samples": self.samples,
        }


def data_order_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that shuffles epoch ``epoch`` of seed ``seed`` (and seeds its workers)."""
    (state,) = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state))


def make_loader(
    dataset: Dataset, batch_size: int, generator: torch.Generator, shuffle: bool, num_workers: int, pin: bool
) -> DataLoader:
    # MLTP cannot split a batch of one sample into two tasks: drop such a last batch.
    drop_last = shuffle and len(dataset) % batch_size == 1
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin,
        drop_last=drop_last,
    )


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    limit: Optional[int],
    description: str,
    progress: bool,
) -> Dict[str, float]:
    from tqdm.auto import tqdm

    model.train()
    tally = TrainTally(device)
    loss_fn = tally.loss_fn(model)
    total = len(loader) if limit is None else min(limit, len(loader))
    with tqdm(total=total, desc=description, leave=False, disable=not progress, unit="batch") as bar:
        for index, (x, y) in enumerate(itertools.islice(loader, total)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            tally.add_objective(training_step(optimizer, loss_fn, x, y))
            bar.update()
            if progress and (index % 10 == 0 or index + 1 == total):
                stats = tally.summary()
                bar.set_postfix(loss=f"{stats['train_loss']:.3f}", acc=f"{stats['train_acc']:.1f}%")
    return tally.summary()


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, topk: Tuple[int, ...], limit: Optional[int]
) -> Dict[str, float]:
    """Test loss and top-k accuracies (percent): ``test_acc`` is top-1, ``test_top5`` top-5."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(len(topk), dtype=torch.int64, device=device)
    samples = 0
    for x, y in itertools.islice(loader, limit):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        top = logits.topk(max(topk), dim=1).indices
        hits = top == y[:, None]
        correct += torch.stack([hits[:, :k].any(dim=1).sum() for k in topk])
        samples += len(y)
    metrics = {"test_loss": loss_sum.item() / samples}
    for k, count in zip(topk, correct.tolist()):
        metrics[metric_name(k)] = 100.0 * count / samples
    return metrics


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


def _json_normal(value):
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _config(experiment: Experiment, procedure: str, seed: int) -> dict:
    """The settings that determine a run's results (the number of epochs may grow on resume)."""
    return _json_normal({"experiment": experiment.to_dict(), "procedure": procedure, "seed": seed})


def _differences(stored: dict, wanted: dict, prefix: str = "") -> List[str]:
    found = []
    for key in sorted(set(stored) | set(wanted)):
        old, new = stored.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, f"{prefix}{key}.")
        elif old != new and f"{prefix}{key}" != "experiment.recipe.epochs":
            found.append(f"{prefix}{key}: {old!r} there, {new!r} now")
    return found


def _atomic_save(obj, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _write_json(obj, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(temporary, path)


def _read_history(run_dir: Path, last_epoch: int) -> List[dict]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if record["epoch"] <= last_epoch]


def _prepare_folder(run_dir: Path, config: dict, epochs: int, options: RunOptions) -> Optional[int]:
    """Check the run folder; returns the last checkpointed epoch, or ``None`` for a fresh start."""
    config_path = run_dir / CONFIG_FILE
    if options.overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)
    elif config_path.exists():
        stored = json.loads(config_path.read_text())
        changed = _differences({key: stored.get(key) for key in config}, config)
        if changed:
            raise ExperimentError(
                f"{run_dir} holds a run with other settings ({'; '.join(changed)}); "
                "pass --overwrite to replace it or choose another --out"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ExperimentError(
            f"{run_dir} exists and is not a run folder (no {CONFIG_FILE}); "
            "choose another --out or pass --overwrite"
        )
    checkpoint_path = run_dir / CHECKPOINT_FILE
    last_epoch = None
    if checkpoint_path.exists():
        last_epoch = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
        if last_epoch > epochs:
            raise ExperimentError(
                f"{run_dir} already trained for {last_epoch} epochs, more than the {epochs} asked for; "
                "pass --overwrite to start over"
            )
    elif options.require_checkpoint:
        raise ExperimentError(f"--resume: {run_dir} holds no {CHECKPOINT_FILE} to continue from")
    return last_epoch


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
    return (
        f"{procedure} seed {seed} epoch {record['epoch']}/{epochs}: "
        f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2f}% | "
        f"test loss {record['test_loss']:.4f} acc {record['test_acc']:.2f}%{top5} | "
        f"{record['epoch_time_s']:.1f}s"
    )


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
    other settings is refused unless ``options.overwrite``.
    """
    recipe = experiment.recipe
    if MLTP_MODES[procedure] is not None and recipe.batch_size < 2:
        raise ExperimentError("MLTP splits each batch into two tasks: --batch-size must be at least 2")
    run_dir = Path(run_dir)
    device = resolve_device(options.device)
    config = _config(experiment, procedure, seed)
    last_epoch = _prepare_folder(run_dir, config, recipe.epochs, options)
    if last_epoch == recipe.epochs and (run_dir / RESULT_FILE).exists():
        return RunResult(run_dir, procedure, seed, _read_history(run_dir, last_epoch))
    summary_writer = _summary_writer_class() if options.tensorboard else None
    if data is None:
        data = load_dataset(experiment.dataset, options.data_root, download=options.download)

    seed_everything(seed)
    model = build_model_for(experiment, data).to(device)
    optimizer = build_optimizer(model, recipe, procedure)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, list(recipe.milestones), gamma=recipe.lr_decay
    )
    history: List[dict] = []
    if last_epoch is not None:
        # on the CPU: the RNG states must stay there; load_state_dict moves the rest to the model's device
        checkpoint = torch.load(run_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_states(checkpoint["rng"])
        history = _read_history(run_dir, last_epoch)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(record) + "\n" for record in history))
    _write_json(
        {
            **config,
            "epochs": recipe.epochs,
            "resumed_from_epoch": last_epoch,
            "options": dataclasses.asdict(options),
            "device": describe_device(device),
            "versions": versions(),
            "command": sys.argv,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        run_dir / CONFIG_FILE,
    )

    writer = None
    if summary_writer is not None:
        writer = summary_writer(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=(last_epoch or 0) + 1)
    workers = options.num_workers if options.num_workers is not None else (4 if device.type == "cuda" else 0)
    pin = device.type == "cuda"
    test_loader = make_loader(
        data.test, 2 * recipe.batch_size, torch.Generator().manual_seed(0), False, workers, pin
    )
    for epoch in range((last_epoch or 0) + 1, recipe.epochs + 1):
        train_loader = make_loader(
            data.train, recipe.batch_size, data_order_generator(seed, epoch), True, workers, pin
        )
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        try:
            train_metrics = train_one_epoch(
                model,
                optimizer,
                train_loader,
                device,
                experiment.limit_train_batches,
                f"{procedure} seed {seed} epoch {epoch}/{recipe.epochs}",
                options.progress,
            )
        except FloatingPointError as err:
            raise ExperimentError(
                f"{run_dir}: training diverged in epoch {epoch} ({err}); lower --lr"
            ) from None
        train_time = time.perf_counter() - started
        scheduler.step()
        started = time.perf_counter()
        test_metrics = evaluate(model, test_loader, device, recipe.topk, experiment.limit_test_batches)
        record = {
            "epoch": epoch,
            "lr": lr,
            **train_metrics,
            **test_metrics,
            "epoch_time_s": train_time,
            "eval_time_s": time.perf_counter() - started,
        }
        if isinstance(optimizer, MLTPOptimizer):
            record["alphas"] = {
                name: alpha.detach().cpu().tolist() for name, alpha in optimizer.alphas.items()
            }
        history.append(record)
        with open(run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        _atomic_save(
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_states(),
            },
            run_dir / CHECKPOINT_FILE,
        )
        if writer is not None:
            _log_tensorboard(writer, record)
        if options.log_epochs:
            print(_epoch_line(procedure, seed, record, recipe.epochs), flush=True)
    if writer is not None:
        writer.close()
    _atomic_save(model.state_dict(), run_dir / FINAL_FILE)
    _write_json(
        {**config, "epochs": recipe.epochs, "final": history[-1], "versions": versions()},
        run_dir / RESULT_FILE,
    )
    return RunResult(run_dir, procedure, seed, history)


def _log_tensorboard(writer, record: dict) -> None:
    step = record["epoch"]
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(key.replace("_", "/", 1), value, step)
    for name, alpha in record.get("alphas", {}).items():
        if isinstance(alpha, float):
            writer.add_scalar(f"alpha/{name}", alpha, step)
    writer.flush()
