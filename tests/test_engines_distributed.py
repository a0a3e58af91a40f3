"""The engines that users launch on several processes, each on 2 CPU processes (DistributedDataParallel on
gloo): ``MLTPTrainer`` under ``torchrun`` and Lightning's DDP strategy (float64, against one process
computing the same steps on the union of the processes' tasks), and the documented accelerate loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spawn import repo_env, torchrun

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from trainer_worker import MLTP, SETTINGS, tiny_bert  # noqa: E402

from torch_mltp import MLTPOptimizer, task_closures  # noqa: E402

WORKER = Path(__file__).with_name("trainer_worker.py")
LIGHTNING_WORKER = Path(__file__).with_name("lightning_worker.py")
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


def test_a_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(ranks):
    """``resume_from_checkpoint`` on two processes: the weights and alphas end bit for bit where an
    uninterrupted run ends."""
    for saved in ranks:
        resumed, uninterrupted = saved["resumed"], saved["uninterrupted"]
        assert resumed.keys() == uninterrupted.keys() and any(k.startswith("alpha:") for k in resumed)
        for name, value in resumed.items():
            assert torch.equal(value, uninterrupted[name]), name


@pytest.mark.parametrize("across_devices", [True, False])
def test_micro_batches_weigh_by_the_tokens_of_every_process(ranks, across_devices):
    """A causal LM with ``num_items_in_batch``: ``w_m`` is micro-batch m's tokens over the step's, counted
    over both processes (by the Trainer with ``average_tokens_across_devices``, else by MLTP), and each
    task's loss is the mean of the processes' means: one process computing exactly that ends where both
    processes end (float64)."""
    from test_integrations import items, llama

    runs = [saved[f"counted/{across_devices}"] for saved in ranks]
    for name, value in runs[0]["weights"].items():
        assert torch.equal(value, runs[1]["weights"][name]), name
    model = llama().double()
    opt = MLTPOptimizer(
        torch.optim.AdamW(model.parameters(), lr=SETTINGS["learning_rate"], weight_decay=0.0, fused=True),
        model,
        **MLTP,
    )
    k = SETTINGS["gradient_accumulation_steps"]
    for step in range(SETTINGS["max_steps"]):
        opt.zero_grad()
        micro = [[run["seen"][step * k + m] for run in runs] for m in range(k)]
        total = sum(items(batch) for batches in micro for batch in batches)
        for batches in micro:
            halves = [
                [{key: value.chunk(2)[half] for key, value in b.items()} for b in batches] for half in (0, 1)
            ]
            closure_i, closure_j = (
                lambda tasks=tasks: sum(model(**task)["loss"] for task in tasks) / len(tasks)
                for tasks in halves
            )
            opt.backward(closure_i, closure_j, weight=sum(items(b) for b in batches) / total)
        torch.nn.utils.clip_grad_norm_(model.parameters(), SETTINGS["max_grad_norm"])
        opt.step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(runs[0]["weights"][name], param.detach(), rtol=1e-9, atol=1e-11, msg=name)
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(runs[0]["alphas"][name], alpha, rtol=1e-9, atol=1e-11, msg=name)


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
            closure_i, closure_j = (lambda t=t: model(**t)["loss"] for t in (task_i, task_j))
            J = opt.backward(closure_i, closure_j, weight=1 / k)
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


ACCELERATE_EPILOGUE = """
# -- what the test reads: each process's weights and alphas, and a save_state/load_state round trip
import os

import torch.distributed as dist

trained = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
alphas = {n: a.detach().clone() for n, a in mltp.alphas.items()}
accelerator.save_state("state")
accelerator.wait_for_everyone()  # process 0 has written the files
with torch.no_grad():
    for p in model.parameters():
        p.zero_()
    for a in mltp.alphas.values():
        a.fill_(0.5)
accelerator.load_state("state")
restored = all(torch.equal(p, trained[n]) for n, p in accelerator.unwrap_model(model).named_parameters())
restored = restored and all(torch.equal(a, alphas[n]) for n, a in mltp.alphas.items())
torch.save(
    {"weights": trained, "alphas": alphas, "restored": restored, "world_size": accelerator.num_processes},
    f"rank{accelerator.process_index}.pt",
)
dist.barrier()
os._exit(0)  # past Python's finalisation, where a gloo thread can abort the process after the work is done
"""


@pytest.fixture(scope="module")
def accelerate_ranks(tmp_path_factory):
    """The documented accelerate loop under ``torchrun --nproc_per_node=2``, with an epilogue."""
    from test_integrations import documented_accelerate_loop

    out = tmp_path_factory.mktemp("accelerate")
    script = out / "loop.py"
    script.write_text(documented_accelerate_loop() + ACCELERATE_EPILOGUE)
    done = torchrun(str(script), cwd=out, timeout=TIMEOUT_S, env={"ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_the_documented_accelerate_loop_on_two_processes(accelerate_ranks):
    """Under DDP with each process's own tasks (``tasks="local"``, the default for a DDP model): the
    processes end identical, equal to one process averaging the processes' objectives; save_state and
    load_state restore the weights and the alphas on both."""
    first, second = accelerate_ranks
    assert first["world_size"] == 2 and first["restored"] and second["restored"]
    for key in ("weights", "alphas"):
        for name, value in first[key].items():
            assert torch.equal(value, second[key][name]), name
    torch.manual_seed(0)  # the block's model, data and alphas, rebuilt
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x, y = torch.randn(256, 20), torch.randint(0, 4, (256,))
    opt = MLTPOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, mode="fo", eta=1.0)
    opt.zero_grad()
    for micro in range(2):  # process r's micro-batch m is the loader's batch 2m + r
        for rank in range(2):
            batch = slice(64 * (2 * micro + rank), 64 * (2 * micro + rank + 1))
            closures = task_closures(
                lambda a, b: torch.nn.functional.cross_entropy(model(a), b), x[batch], y[batch]
            )
            opt.backward(*closures, weight=0.5 * 0.5)  # 1/k, and the mean of 2 processes
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(first["weights"][name], param.detach(), rtol=1e-5, atol=1e-7, msg=name)
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(first["alphas"][name], alpha, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module", params=["fo", "full"])
def lightning_ranks(request, tmp_path_factory):
    """Lightning's DDP strategy on 2 processes (Lightning starts the second one itself)."""
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("lightning")
    env = {**repo_env(), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(LIGHTNING_WORKER), str(out), request.param]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return request.param, [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_lightning_ddp_steps_as_one_process_on_the_union_of_the_tasks(lightning_ranks):
    """Manual optimization with ``tasks="global"``: the optimizer, built in ``configure_optimizers`` on the
    module inside Lightning's DDP wrapper, finds the wrapper at the first backward; both processes end
    identical, equal to one process stepping on the union of their tasks (float64)."""
    from lightning_worker import ALPHA, LR, net

    mode, ranks = lightning_ranks
    first, second = ranks
    for key in ("weights", "alphas"):
        for name, value in first[key].items():
            assert torch.equal(value, second[key][name]), name
    model = net()
    opt = MLTPOptimizer(torch.optim.Adam(model.parameters(), lr=LR), model, mode=mode, alpha_init=ALPHA)
    loss = torch.nn.functional.cross_entropy
    for batches in zip(first["seen"], second["seen"]):
        task_i, task_j = (
            [torch.cat([b[k].chunk(2)[half] for b in batches]) for k in (0, 1)] for half in (0, 1)
        )
        opt.zero_grad()
        opt.step(lambda t=task_i: loss(model(t[0]), t[1]), lambda t=task_j: loss(model(t[0]), t[1]))
    for name, param in model.named_parameters():
        torch.testing.assert_close(first["weights"][name], param.detach(), rtol=1e-10, atol=1e-12, msg=name)
    for name, alpha in opt.alphas.items():
        torch.testing.assert_close(first["alphas"][name], alpha, rtol=1e-10, atol=1e-12, msg=name)
