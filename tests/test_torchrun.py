"""``torchrun --nproc_per_node=2 -m torch_mltp.experiments train`` on the CPU (gloo): shards, one writer,
and a resume that ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str) -> str:
    """Run the command line in 2 processes; returns what they printed (both stdout and stderr)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "torch_mltp.experiments", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def options(data_root: Path, out: Path, epochs: int) -> list:
    return [
        "train", "--procedure", "mltp", "--model", "mnist1d_cnn", "--tasks", "global",
        "--data-root", str(data_root), "--device", "cpu", "--no-progress", "--dist-timeout", "120",
        "--limit-train-batches", "3", "--limit-test-batches", "2", "--epochs", str(epochs), "--out", str(out),
    ]  # fmt: skip


def test_two_processes_train_their_shards_write_once_and_resume_exactly(data_root, tmp_path):
    printed = torchrun(*options(data_root, tmp_path / "whole", 2))
    assert printed.count("mltp seed 0 epoch 1/2") == 1 and printed.count("final test accuracy") == 1
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["train_samples"] == 2 * 3 * 128 for r in records)  # 3 batches of 128 in each process
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["distributed"] == {"processes": 2, "tasks": "global"} and config["processes"] == 2

    torchrun(*options(data_root, tmp_path / "resumed", 1))
    printed = torchrun(*options(data_root, tmp_path / "resumed", 2))
    assert "epoch 1/2" not in printed and printed.count("mltp seed 0 epoch 2/2") == 1
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    resumed_records = [
        json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in resumed_records] == [
        {k: v for k, v in r.items() if not k.endswith("_time_s")} for r in records
    ]
