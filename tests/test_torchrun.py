"""``torchrun --nproc_per_node=2 -m torch_mltp.experiments train`` on the CPU (gloo): shards, one writer,
a default folder of its own, a resume that ends with the same weights as an uninterrupted run, and an
error printed once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from spawn import torchrun

TIMEOUT_S = 300
DEFAULT_RUN = Path("runs/train") / (
    "mnist1d-mnist1d_cnn,epochs=2,limit-train-batches=3,limit-test-batches=2,processes=2,tasks=global"
)


def train(cwd: Path, *args: str) -> str:
    """Run ``train`` in 2 processes; returns what they printed on stdout."""
    done = torchrun("-m", "torch_mltp.experiments", "train", *args, cwd=cwd, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def options(data_root: Path, epochs: int, *out: str) -> list:
    return [
        "--procedure", "mltp", "--model", "mnist1d_cnn", "--tasks", "global",
        "--data-root", str(data_root), "--device", "cpu", "--no-progress", "--dist-timeout", "120",
        "--limit-train-batches", "3", "--limit-test-batches", "2", "--epochs", str(epochs), *out,
    ]  # fmt: skip


def test_two_processes_train_their_shards_write_once_and_resume_exactly(data_root, tmp_path):
    printed = train(tmp_path, *options(data_root, 2))  # into the default folder
    whole = tmp_path / DEFAULT_RUN / "mltp-seed0"
    assert [path.relative_to(tmp_path) for path in (tmp_path / "runs").glob("*/*/*")] == [
        DEFAULT_RUN / "mltp-seed0"
    ]
    assert printed.count("mltp seed 0 epoch 1/2") == 1 and printed.count("final test accuracy") == 1
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["train_samples"] == 2 * 3 * 128 for r in records)  # 3 batches of 128 in each process
    config = json.loads((whole / "config.json").read_text())
    assert config["distributed"] == {"processes": 2, "tasks": "global"} and config["processes"] == 2

    resumed = tmp_path / "resumed"
    train(tmp_path, *options(data_root, 1, "--out", str(resumed)))
    printed = train(tmp_path, *options(data_root, 2, "--out", str(resumed)))
    assert "epoch 1/2" not in printed and printed.count("mltp seed 0 epoch 2/2") == 1
    whole_weights = torch.load(whole / "final.pt", weights_only=True)
    resumed_weights = torch.load(resumed / "final.pt", weights_only=True)
    assert whole_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(whole_weights[k], resumed_weights[k]) for k in whole_weights)
    resumed_records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in resumed_records] == [
        {k: v for k, v in r.items() if not k.endswith("_time_s")} for r in records
    ]


def test_an_error_is_printed_once_by_process_0(tmp_path):
    done = torchrun(
        "-m", "torch_mltp.experiments", "train", "--lr", "-0.1", "--device", "cpu", cwd=tmp_path, timeout=120
    )  # fmt: skip
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("torch-mltp")]
    assert ours == ["torch-mltp train: error: argument --lr: expected a positive number, got -0.1"]
    assert done.stderr.startswith(ours[0])  # before torchrun's own report of the failed processes
    assert not (tmp_path / "runs").exists()


def fsdp_options(data_root: Path, epochs: int, *extra: str) -> list:
    """``mltp_fo`` with the tasks left to their default (``global``, with ``--fsdp``)."""
    shared = options(data_root, epochs, *extra)
    at = shared.index("--procedure")
    at_tasks = shared.index("--tasks")
    shared[at + 1] = "mltp_fo"
    del shared[at_tasks : at_tasks + 2]
    return shared


def test_fsdp_trains_as_ddp_with_global_tasks_does_and_resumes_exactly(data_root, tmp_path):
    printed = train(tmp_path, "--fsdp", *fsdp_options(data_root, 2))
    assert printed.count("mltp_fo seed 0 epoch 2/2") == 1
    (whole,) = (tmp_path / "runs/train").glob("*,processes=2,tasks=global,fsdp=True/mltp_fo-seed0")
    config = json.loads((whole / "config.json").read_text())
    assert config["distributed"] == {"processes": 2, "tasks": "global", "fsdp": True}
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and not any("grad_cosine" in r for r in records)

    resumed = tmp_path / "resumed"
    train(tmp_path, "--fsdp", *fsdp_options(data_root, 1, "--out", str(resumed)))
    train(tmp_path, "--fsdp", *fsdp_options(data_root, 2, "--out", str(resumed)))
    whole_weights = torch.load(whole / "final.pt", weights_only=True)
    resumed_weights = torch.load(resumed / "final.pt", weights_only=True)
    assert whole_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(whole_weights[k], resumed_weights[k]) for k in whole_weights)

    replicated = tmp_path / "ddp"  # the same math with the model replicated: equal up to float32 rounding
    train(tmp_path, *fsdp_options(data_root, 2, "--tasks", "global", "--out", str(replicated)))
    ddp_weights = torch.load(replicated / "final.pt", weights_only=True)
    for name, weight in whole_weights.items():
        torch.testing.assert_close(weight, ddp_weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_refuses_what_it_cannot_train_with_the_options_that_work():
    from torch_mltp.experiments.distributed import Processes
    from torch_mltp.experiments.recipes import recipe_for
    from torch_mltp.experiments.runs import ExperimentError
    from torch_mltp.experiments.training import RunOptions, check_options

    recipe, two = recipe_for("mnist1d", "mnist1d_cnn"), Processes(rank=0, world_size=2)
    fsdp, local = RunOptions(fsdp=True, tasks="global"), RunOptions(fsdp=True, tasks="local")
    with pytest.raises(ExperimentError, match="--procedure mltp_fo"):
        check_options(recipe, "mltp", fsdp, two)
    with pytest.raises(ExperimentError, match="--tasks global"):
        check_options(recipe, "mltp_fo", local, two)
    with pytest.raises(ExperimentError, match="torchrun --nproc_per_node"):
        check_options(recipe, "mltp_fo", fsdp, Processes())
    check_options(recipe, "standard", fsdp, two)
