"""Commands in other processes for the tests: free ports, and torchrun and ``accelerate launch`` on the CPU
with a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def repo_env() -> dict:
    """The environment with this checkout first on ``PYTHONPATH`` (the child may run in another folder)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def torchrun(
    *args: str, cwd: Path, timeout: float, nproc: int = 2, env: Optional[dict] = None
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc ARGS`` in ``cwd`` on the CPU (gloo, one thread per process, no
    GPU visible), with ``env`` added to the environment; returns the finished process with its stdout and
    stderr."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args,
    ]  # fmt: skip
    cpu = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    env = {**repo_env(), **cpu, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def accelerate_launch(
    *args: str, cwd: Path, timeout: float, nproc: int = 2, env: Optional[dict] = None
) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``nproc`` processes with ARGS in ``cwd`` on the CPU (gloo, one thread per
    process, no GPU visible), with ``env`` added to the environment; returns the finished process with its
    stdout and stderr.  ``--cpu`` would start one process (accelerate's simple launcher): the multi-GPU
    launcher with ``ACCELERATE_USE_CPU=true`` starts ``nproc`` processes of one gloo group
    (``DistributedType.MULTI_CPU``), as ``accelerate launch --multi_gpu`` does on GPUs."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
        "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_ip=127.0.0.1",
        f"--main_process_port={free_port()}", *args,
    ]  # fmt: skip
    cpu = {
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "CUDA_VISIBLE_DEVICES": "",
        "ACCELERATE_USE_CPU": "true",
    }
    env = {**repo_env(), **cpu, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def run_ranks(worker: Path, out: Path, timeout: float, world_size: int = 2) -> list:
    """Start ``python WORKER OUT`` as ``world_size`` processes of one gloo group on 127.0.0.1 (torchrun's
    environment, one thread each) and wait for them; returns what each saved as ``OUT/rank{r}.pt``.
    Raises ``RuntimeError`` with their output when one of them saved nothing."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": os.pathsep.join([str(worker.parent), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, str(worker), str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world_size)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            process.kill()
    saved = [out / f"rank{rank}.pt" for rank in range(world_size)]
    if not all(path.exists() for path in saved):
        raise RuntimeError(f"the processes of {worker.name} failed:\n" + "\n".join(outputs))
    return [torch.load(path, weights_only=False) for path in saved]
