"""One epoch: the training steps with their tally (and the gradient cosine, measured without changing
the training: :func:`.probes.gradient_cosine`), and the evaluation on held-out data.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .distributed import SINGLE_PROCESS, Processes
from .optimizers import training_step
from .probes import gradient_cosine

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(output, target)``: the mean loss of a batch."""


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
    perturbed_loss_fn, probed_loss_fn = plain_loss(model, criterion), plain_loss(probed_model, criterion)
    probe_seconds = 0.0
    total = len(loader) if limit is None else min(limit, len(loader))
    with tqdm(total=total, desc=description, leave=False, disable=not progress, unit="batch") as bar:
        for index, (x, y) in enumerate(itertools.islice(loader, total)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cosine_every and index % cosine_every == 0 and len(x) >= 2:  # two tasks need two samples
                started = time.perf_counter()
                tally.add_cosine(gradient_cosine(probed_model, probed_loss_fn, x, y))
                probe_seconds += time.perf_counter() - started
            tally.add_objective(training_step(optimizer, loss_fn, x, y, perturbed_loss_fn))
            bar.update()
            if progress and (index % 10 == 0 or index + 1 == total):
                stats = tally.summary()
                bar.set_postfix(loss=f"{stats['train_loss']:.3f}", acc=f"{stats['train_acc']:.1f}%")
    summary = tally.summary(processes)
    if cosine_every:
        summary["grad_cosine_time_s"] = probe_seconds
    return summary


def plain_loss(model: nn.Module, criterion: Loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
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


def metric_name(k: int) -> str:
    """The metrics key of the top-k test accuracy."""
    return "test_acc" if k == 1 else f"test_top{k}"
