"""The engines that users launch on several processes: ``MLTPTrainer`` under ``torchrun
--nproc_per_node=2`` (DistributedDataParallel on gloo, float64), against one process computing the same
steps on the union of the processes' tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spawn import torchrun

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from trainer_worker import MLTP, SETTINGS, tiny_bert  # noqa: E402

from torch_mltp import MLTPOptimizer  # noqa: E402

WORKER = Path(__file__).with_name("trainer_worker.py")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two processes saw and ended with."""
    out = tmp_path_factory.mktemp("trainer")
    done = torchrun(str(WORKER), str(out), cwd=out, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_the_trainer_runs_two_processes_with_global_tasks(ranks):
    assert [saved["world_size"] for saved in ranks] == [2, 2]
    assert [saved["tasks"] for saved in ranks] == ["global", "global"]
    first, second = ranks
    assert not torch.equal(first["seen"][0]["input_ids"], second["seen"][0]["input_ids"])  # own batches


def test_every_process_ends_with_the_same_weights_and_alphas(ranks):
    first, second = ranks
    for key in ("weights", "alphas"):
        for name, value in first[key].items():
            assert torch.equal(value, second[key][name]), name


def test_the_steps_equal_one_process_on_the_union_of_the_tasks(ranks):
    """Each micro-batch's task i is the union of the processes' first halves, task j of their second
    halves; weight 1/k per micro-batch, clipping, AdamW (fused, as the Trainer's), in float64."""
    model = tiny_bert()
    opt = MLTPOptimizer(
        torch.optim.AdamW(model.parameters(), lr=SETTINGS["learning_rate"], weight_decay=0.0, fused=True),
        model,
        **MLTP,
    )
    k = SETTINGS["gradient_accumulation_steps"]
    objectives = []
    for step in range(SETTINGS["max_steps"]):
        opt.zero_grad()
        objective = 0.0
        for m in range(k):
            batches = [saved["seen"][step * k + m] for saved in ranks]
            task_i, task_j = (
                {key: torch.cat([b[key].chunk(2)[half] for b in batches]) for key in batches[0]}
                for half in (0, 1)
            )
            J = opt.backward(lambda: model(**task_i)["loss"], lambda: model(**task_j)["loss"], weight=1 / k)
            objective += J.item() / k
        torch.nn.utils.clip_grad_norm_(model.parameters(), SETTINGS["max_grad_norm"])
        opt.step()
        objectives.append(objective)
    for name, param in model.named_parameters():
        torch.testing.assert_close(
            ranks[0]["weights"][name], param.detach(), rtol=1e-10, atol=1e-12, msg=name
        )
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(ranks[0]["alphas"][name], alpha, rtol=1e-10, atol=1e-12, msg=name)
    assert ranks[0]["losses"] == pytest.approx(objectives, rel=1e-6)  # the Trainer logs float32
