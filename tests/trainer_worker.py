"""``MLTPTrainer`` on several processes (DistributedDataParallel on gloo, float64): trains a tiny BERT with
gradient accumulation and clipping, then an uninterrupted run with a checkpoint at every step and a run
resumed from its first; saves what this process saw and where each run ended as OUT/rank{r}.pt.

    torchrun --nproc_per_node=2 tests/trainer_worker.py OUT
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/trainer_worker.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from test_integrations import bert, language_data, llama

from torch_mltp.integrations.accelerate import unwrap_optimizer
from torch_mltp.integrations.transformers import MLTPTrainer

MLTP = dict(mode="fo", eta=0.5, alpha_init=0.05)
SETTINGS = dict(
    per_device_train_batch_size=8,
    gradient_accumulation_steps=2,
    max_steps=2,
    learning_rate=1e-2,
    max_grad_norm=0.05,
    lr_scheduler_type="constant",
)


def tiny_bert() -> transformers.PreTrainedModel:
    return bert().double()


def examples(n: int = 64, length: int = 8) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (n, length), generator=gen)
    return [{"input_ids": row, "labels": (row[0] < 50).long()} for row in ids]


class RecordingTrainer(MLTPTrainer):
    """Keeps the micro-batches this process was given."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = [*getattr(self, "seen", []), {k: v.detach().cpu().clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


def arguments(folder: Path, **overrides) -> transformers.TrainingArguments:
    settings = dict(use_cpu=True, ddp_backend="gloo", report_to="none", disable_tqdm=True, logging_steps=1)
    return transformers.TrainingArguments(output_dir=str(folder), **{**settings, **SETTINGS, **overrides})


def where_it_ended(trainer: MLTPTrainer) -> dict:
    opt = unwrap_optimizer(trainer.optimizer)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return {**weights, **{f"alpha:{n}": a.detach().clone() for n, a in opt.alphas.items()}}


def resumed_and_uninterrupted(folder: Path) -> tuple[dict, dict]:
    """An uninterrupted run that saves a checkpoint at every step, and a run resumed from its first."""
    args = arguments(folder, save_strategy="steps", save_steps=1)
    uninterrupted = MLTPTrainer(model=tiny_bert(), args=args, train_dataset=examples(), mltp=dict(MLTP))
    uninterrupted.train()
    resumed = MLTPTrainer(model=tiny_bert(), args=args, train_dataset=examples(), mltp=dict(MLTP))
    resumed.train(resume_from_checkpoint=str(folder / "checkpoint-1"))
    return where_it_ended(resumed), where_it_ended(uninterrupted)


def counted_items(folder: Path, across_devices: bool) -> dict:
    """A tiny Llama (float64), whose micro-batches the Trainer weighs by their tokens, counted over the
    processes or, without ``average_tokens_across_devices``, by each process and then summed by MLTP."""
    args = arguments(folder, save_strategy="no", average_tokens_across_devices=across_devices)
    trainer = RecordingTrainer(
        model=llama().double(), args=args, train_dataset=language_data(64), mltp=dict(MLTP)
    )
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return {
        "seen": trainer.seen,
        "weights": weights,
        "alphas": {n: a.detach().clone() for n, a in opt.alphas.items()},
    }


def fsdp_refusals(folder: Path) -> tuple[bool, dict]:
    """Whether the plain ``Trainer`` given ``fsdp=`` trains unsharded here (on CPUs accelerate shards only on
    GPUs), and what ``MLTPTrainer`` says to ``fsdp=`` and to ``accelerate launch --use_fsdp``'s variable."""
    args = arguments(folder, save_strategy="no", fsdp=True, fsdp_config={"version": 2})
    ignored = not transformers.Trainer(model=tiny_bert(), args=args, train_dataset=examples()).is_fsdp_enabled
    refusals = {}
    for asked, variable, settings in (("fsdp=", "false", args), ("ACCELERATE_USE_FSDP", "true", None)):
        os.environ["ACCELERATE_USE_FSDP"] = variable
        try:
            settings = settings or arguments(folder, save_strategy="no")
            MLTPTrainer(model=tiny_bert(), args=settings, train_dataset=examples(), mltp=dict(MLTP))
        except ValueError as err:
            refusals[asked] = str(err)
        finally:
            del os.environ["ACCELERATE_USE_FSDP"]
    return ignored, refusals


def main() -> None:
    out = Path(sys.argv[1])
    args = arguments(out / "trainer", save_strategy="no")
    trainer = RecordingTrainer(model=tiny_bert(), args=args, train_dataset=examples(), mltp=dict(MLTP))
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    resumed, uninterrupted = resumed_and_uninterrupted(out / "resume")
    saved = {
        "resumed": resumed,
        "uninterrupted": uninterrupted,
        "world_size": trainer.args.world_size,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "accelerate_launch": "ACCELERATE_MIXED_PRECISION" in os.environ,  # set by accelerate launch only
        "tasks": opt.tasks,
        "seen": trainer.seen,
        "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "alphas": {n: a.detach().clone() for n, a in opt.alphas.items()},
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    saved["fsdp_ignored_by_the_trainer"], saved["fsdp_refusals"] = fsdp_refusals(out / "fsdp")
    for across in (True, False):  # a causal LM, whose micro-batches hold different numbers of tokens
        saved[f"counted/{across}"] = counted_items(out / f"counted-{across}", across)
    torch.save(saved, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # past Python's finalisation, where a gloo thread can abort once the work is done


if __name__ == "__main__":
    main()
