"""The engines that users launch on several processes, each on 2 CPU processes (gloo): ``MLTPTrainer``
under ``torchrun`` and under ``accelerate launch`` (DistributedDataParallel), Lightning's DDP strategy and
its ``ModelParallelStrategy`` with FSDP2's ``fully_shard`` (float64, against one process computing the
same steps on the union of the processes' tasks), the documented accelerate loop under both launchers,
the documented Lightning FSDP2 script, and ``MLTPTrainer``'s refusal of FSDP."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spawn import accelerate_launch, repo_env, torchrun

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from trainer_worker import MLTP, SETTINGS, tiny_bert  # noqa: E402

from torch_mltp import MLTPOptimizer, task_closures  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("trainer_worker.py")
LIGHTNING_WORKER = Path(__file__).with_name("lightning_worker.py")
TIMEOUT_S = 300
LAUNCHERS = {"torchrun": torchrun, "accelerate launch": accelerate_launch}


@pytest.fixture(scope="module", params=list(LAUNCHERS))
def ranks(request, tmp_path_factory):
    """What each of the two processes saw and ended with, started by ``torchrun`` or by ``accelerate
    launch`` (one launch each for every test of the Trainer)."""
    out = tmp_path_factory.mktemp("trainer")
    done = LAUNCHERS[request.param](str(WORKER), str(out), cwd=out, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = [torch.load(out / f"rank{rank}.pt") for rank in range(2)]
    assert [s["accelerate_launch"] for s in saved] == [request.param == "accelerate launch"] * 2
    return saved


def test_the_trainer_runs_two_processes_with_global_tasks(ranks):
    assert [saved["world_size"] for saved in ranks] == [2, 2]
    assert [saved["distributed_type"] for saved in ranks] == ["MULTI_CPU"] * 2  # one gloo group
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
    {
        "weights": trained,
        "alphas": alphas,
        "restored": restored,
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "accelerate_launch": "ACCELERATE_MIXED_PRECISION" in os.environ,  # set by accelerate launch only
    },
    f"rank{accelerator.process_index}.pt",
)
dist.barrier()
os._exit(0)  # past Python's finalisation, where a gloo thread can abort the process after the work is done
"""


@pytest.fixture(scope="module", params=list(LAUNCHERS))
def accelerate_ranks(request, tmp_path_factory):
    """The documented accelerate loop, with an epilogue, under ``torchrun --nproc_per_node=2`` or
    ``accelerate launch`` of 2 processes."""
    from test_integrations import documented_accelerate_loop

    out = tmp_path_factory.mktemp("accelerate")
    script = out / "loop.py"
    script.write_text(documented_accelerate_loop() + ACCELERATE_EPILOGUE)
    done = LAUNCHERS[request.param](
        str(script), cwd=out, timeout=TIMEOUT_S, env={"ACCELERATE_USE_CPU": "true"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = [torch.load(out / f"rank{rank}.pt") for rank in range(2)]
    assert [s["accelerate_launch"] for s in saved] == [request.param == "accelerate launch"] * 2
    return saved


def test_the_documented_accelerate_loop_on_two_processes(accelerate_ranks):
    """Under DDP with each process's own tasks (``tasks="local"``, the default for a DDP model): the
    processes end identical, equal to one process averaging the processes' objectives; save_state and
    load_state restore the weights and the alphas on both."""
    first, second = accelerate_ranks
    assert first["world_size"] == 2 and first["restored"] and second["restored"]
    assert first["distributed_type"] == second["distributed_type"] == "MULTI_CPU"
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


@pytest.fixture(scope="module", params=[("ddp", "fo"), ("ddp", "full"), ("fsdp2", "fo")], ids=str)
def lightning_ranks(request, tmp_path_factory):
    """Lightning on 2 processes (Lightning starts the second one itself): the DDP strategy, or
    ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with FSDP2."""
    pytest.importorskip("lightning")
    strategy, mode = request.param
    out = tmp_path_factory.mktemp("lightning")
    env = {**repo_env(), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(LIGHTNING_WORKER), str(out), mode, strategy]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return strategy, mode, [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_lightning_steps_as_one_process_on_the_union_of_the_tasks(lightning_ranks):
    """Manual optimization with ``tasks="global"``, the optimizer built in ``configure_optimizers``: under
    DDP on the module inside Lightning's wrapper, whose first backward finds the wrapper; under
    ``ModelParallelStrategy`` on the network that ``configure_model`` sharded with ``fully_shard`` (every
    parameter a shard). Both processes end identical, equal to one process stepping on the union of their
    tasks (float64)."""
    from lightning_worker import ALPHA, LR, net

    strategy, mode, ranks = lightning_ranks
    first, second = ranks
    assert first["sharded"] == second["sharded"] == [strategy == "fsdp2"] * 4
    assert not torch.equal(first["seen"][0][0], second["seen"][0][0])  # each process its own batches
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


def test_the_trainer_refuses_fsdp_and_names_what_works(ranks):
    """On CPUs the ``Trainer`` accepts ``fsdp=`` on several processes but does not shard (accelerate shards
    only on GPUs), and ``accelerate launch --use_fsdp`` on CPUs starts DDP processes: ``MLTPTrainer``
    refuses both, naming DDP and first-order MLTP under FSDP2."""
    for saved in ranks:
        assert saved["fsdp_ignored_by_the_trainer"]  # what MLTPTrainer would otherwise silently do
        for asked in ("fsdp=", "ACCELERATE_USE_FSDP"):
            refusal = saved["fsdp_refusals"][asked]
            assert refusal.startswith("MLTPTrainer does not support FSDP"), refusal
            for what_works in (
                "DistributedDataParallel",
                "mode='fo'",
                "fully_shard",
                "ModelParallelStrategy",
            ):
                assert what_works in refusal, refusal


LIGHTNING_FSDP2_EPILOGUE = """
# -- what the test reads: each process's shards and alphas, and a ShardedCheckpoint round trip after fit
import os

import torch.distributed.checkpoint as dcp

from torch_mltp import ShardedCheckpoint

net, opt = trainer.lightning_module.net, trainer.optimizers[0]
shards = {n: p.to_local().detach().clone() for n, p in net.named_parameters()}
alphas = {n: a.detach().clone() for n, a in opt.alphas.items()}
dcp.save({"train": ShardedCheckpoint(net, opt)}, checkpoint_id="checkpoint")
with torch.no_grad():
    for p in net.parameters():
        p.zero_()
    for a in opt.alphas.values():
        a.fill_(0.5)
dcp.load({"train": ShardedCheckpoint(net, opt)}, checkpoint_id="checkpoint")
restored = all(torch.equal(p.to_local(), shards[n]) for n, p in net.named_parameters())
restored = restored and all(torch.equal(a, alphas[n]) for n, a in opt.alphas.items())
saved = {"shards": shards, "alphas": alphas, "restored": restored, "world_size": trainer.world_size}
torch.save(saved, f"rank{trainer.global_rank}.pt")
torch.distributed.barrier()
os._exit(0)  # past Python's finalisation, where a gloo thread can abort the process after the work is done
"""


def documented_lightning_fsdp2_script() -> str:
    """The script of docs/training-loops.md for Lightning's ``ModelParallelStrategy``."""
    text = (REPO / "docs/training-loops.md").read_text()
    (block,) = [
        b for b in re.findall(r"^```py\n(.*?)^```", text, re.S | re.M) if "ModelParallelStrategy" in b
    ]
    return block


def test_the_documented_lightning_fsdp2_script_runs_on_two_processes(tmp_path):
    """``python train_fsdp2.py`` as documented (Lightning starts the second process): every tensor is
    sharded over the two processes, the alphas (replicated) end the same in both, and a
    ``ShardedCheckpoint`` saved after ``fit`` restores the shards and the alphas."""
    pytest.importorskip("lightning")
    script = tmp_path / "train_fsdp2.py"
    script.write_text(documented_lightning_fsdp2_script() + LIGHTNING_FSDP2_EPILOGUE)
    env = {**repo_env(), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    assert first["world_size"] == 2 and first["restored"] and second["restored"]
    shapes = {"0.weight": (32, 20), "0.bias": (32,), "2.weight": (4, 32), "2.bias": (4,)}
    for name, shape in shapes.items():  # FSDP2 shards dimension 0: each process holds half the rows
        assert first["shards"][name].shape[0] == second["shards"][name].shape[0] == shape[0] // 2, name
        assert not torch.equal(first["shards"][name], second["shards"][name]), name
    assert first["alphas"].keys() == {"0", "2"}
    for name, alpha in first["alphas"].items():
        assert torch.equal(alpha, second["alphas"][name]) and alpha.item() != 0.5, name
