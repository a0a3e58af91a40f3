"""MLTP in the Hugging Face ``Trainer`` (``pip install torch-mltp[transformers]``; ``docs/integrations.md``).

::

    trainer = MLTPTrainer(model=model, args=TrainingArguments(...), train_dataset=data,
                          mltp=dict(mode="fo", eta=1.0, alpha_init=(1e-3, 1e-3)))
    trainer.train()
"""

from __future__ import annotations

import os
from typing import Any, Optional, cast

import torch

from .. import MLTPOptimizer, task_closures
from . import require
from .accelerate import unwrap_optimizer

require("transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402


class MLTPTrainer(Trainer):
    r"""A ``Trainer`` whose steps minimise the MLTP objective
    ``J = L(w; i) + eta * L(w - alpha * dL(w; i)/dw; j)``, tasks i and j being the two halves of each
    batch.

    ``mltp``: the keyword arguments of :class:`~torch_mltp.MLTPOptimizer` (``mode``, by default ``"fo"``,
    ``eta``, ``alpha_init``, ...), which wraps the optimizer that the ``Trainer`` builds (its weight-decay
    groups included); the ``Trainer``'s scheduler is then built on the wrapper and moves the
    alphas' learning rate with the weights'.  An optimizer passed as ``optimizers=(opt, None)`` is
    wrapped the same way, or used as it is if it already is an ``MLTPOptimizer``.

    Every micro-batch ``m`` of an optimizer step adds ``w_m * dJ_m/dw`` to ``.grad``, with each task
    loss the model's own mean over that task, and ``w_m = n_m / N`` (``n_m`` the items of ``m`` that
    the ``Trainer`` counts for ``num_items_in_batch``, ``N`` their sum over the step) or
    ``w_m = 1 / k`` for ``k`` micro-batches when the ``Trainer`` counts none.  The logged ``loss``
    is ``sum_m w_m J_m``, and every alpha is logged as ``alpha/<name>`` (a name of ``opt.alphas``; the
    mean for ``alpha_per="element"``).

    On several processes (``torchrun`` or ``accelerate launch``; DistributedDataParallel) the tasks are
    the unions of every process's halves (``tasks="global"``): every process computes the step that one
    process computes on the union, and ``n_m`` and ``N`` are counted over all processes.  Every
    micro-batch's step averages its own gradients, also under the ``Trainer``'s ``no_sync`` between the
    micro-batches of one optimizer step.  FSDP (``fsdp=``), DeepSpeed and several GPUs in one process are
    refused at construction, with the ways that work.
    """

    def __init__(self, *args: Any, mltp: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        asked = self.args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
        if self.is_fsdp_enabled or asked:  # on CPUs accelerate ignores both and the Trainer runs DDP
            raise ValueError(
                "MLTPTrainer does not support FSDP (TrainingArguments(fsdp=...), accelerate launch "
                "--use_fsdp): drop fsdp to train under DistributedDataParallel (torchrun or accelerate "
                "launch), where every process computes the step of the union of the processes' tasks; to "
                "shard a model too large for one device, train first-order MLTP (mode='fo') on a model "
                "sharded with FSDP2's fully_shard in your own loop (docs/distributed.md) or under "
                "Lightning's ModelParallelStrategy (docs/training-loops.md)"
            )
        if self.args.n_gpu > 1 or self.is_deepspeed_enabled:
            raise ValueError(
                "MLTPTrainer trains one process per device, under DistributedDataParallel when there are "
                "several (torchrun or accelerate launch); several GPUs in one process (DataParallel) and "
                "DeepSpeed are not supported"
            )
        self.mltp = dict(mltp or {})
        self.add_callback(_ClearAlphaGradients())

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        """The ``Trainer``'s optimizer wrapped in an ``MLTPOptimizer`` built with ``mltp``."""
        optimizer = super().create_optimizer(model)
        if not isinstance(unwrap_optimizer(optimizer), MLTPOptimizer):
            settings = {"mode": "fo", **self.mltp}  # attention kernels are rarely twice differentiable
            if self.args.world_size > 1:  # every process computes the step of the union of the tasks
                settings.setdefault("tasks", "global")
            module = cast(torch.nn.Module, self.model if model is None else model)
            self.optimizer = MLTPOptimizer(optimizer, module, **settings)
        elif self.mltp:
            raise ValueError(
                "the optimizer is already an MLTPOptimizer: drop mltp= or pass a plain optimizer"
            )
        return cast(torch.optim.Optimizer, self.optimizer)

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """``opt.backward`` on the two halves of ``inputs`` with weight ``w_m``; returns ``w_m * J``.

        Where the ``Trainer`` counts items, a micro-batch without any (every label ``-100``) adds nothing, as
        in the plain ``Trainer``, and a task without any has the loss 0 of a sum over no items: with task j
        empty ``J = L_i``, with task i empty ``J = eta * L_j(w)`` (``g_i = 0``, so ``w' = w``)."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        if num_items_in_batch is None:
            weight = 1.0 / self.current_gradient_accumulation_steps
        else:  # the same in every process: the step's collectives then match
            items, total = self._counted_items(inputs), num_items_in_batch
            if self.args.world_size > 1 and not self.args.average_tokens_across_devices:
                gather = self.accelerator.gather
                items, total = (
                    gather(torch.as_tensor(n, device=self.args.device).reshape(1)).sum()
                    for n in (items, total)
                )
            if items == 0:
                return torch.zeros((), device=self.args.device)
            weight = float(items) / float(total)  # in double precision: the counts may be float32 tensors
        keys = list(inputs)

        def task_loss(*values: Any) -> torch.Tensor:
            task = dict(zip(keys, values))
            if num_items_in_batch is not None and self._counted_items(task) == 0:
                return _zero_loss(model)
            with self.compute_loss_context_manager():
                return cast(torch.Tensor, self.compute_loss(model, task))

        objective = self._mltp().backward(
            *task_closures(task_loss, *inputs.values()), weight=weight, scaler=self.accelerator.scaler
        )
        return objective * weight

    def _mltp(self) -> MLTPOptimizer:
        """The ``MLTPOptimizer`` that :meth:`create_optimizer` built, inside accelerate's wrapper."""
        return cast(MLTPOptimizer, unwrap_optimizer(cast(torch.optim.Optimizer, self.optimizer)))

    def _counted_items(self, inputs: dict[str, Any]) -> Any:
        """The items of ``inputs`` that the ``Trainer`` counts for ``num_items_in_batch`` (summed over the
        processes with ``average_tokens_across_devices``)."""
        return self.get_batch_samples(iter([inputs]), 1, self.args.device)[1]

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """The ``Trainer``'s logs, and with the training loss the alphas as ``alpha/<name>``."""
        if "loss" in logs:
            alphas = self._mltp().alphas
            logs.update({f"alpha/{name}": alpha.mean().item() for name, alpha in alphas.items()})
        super().log(logs, start_time)


def _zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """A loss of 0 whose gradient is zero: a sum over no items, tied to the graph of one parameter."""
    param = next(p for p in model.parameters() if p.requires_grad)
    return param.reshape(-1)[:1].sum() * 0.0


class _ClearAlphaGradients(TrainerCallback):
    """The ``Trainer`` clears the model's gradients after a step, not the alphas': clear both before
    each optimizer step's first micro-batch."""

    def on_step_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        unwrap_optimizer(optimizer).zero_grad()
