"""Commands in other processes for the tests: free ports, and torchrun on the CPU with a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def repo_env() -> dict:
    """The environment with this checkout first on ``PYTHONPATH`` (the child may run in another folder)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def torchrun(*args: str, cwd: Path, timeout: float, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc ARGS`` in ``cwd`` on the CPU (gloo, one thread per process, no
    GPU visible); returns the finished process with its stdout and stderr."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args,
    ]  # fmt: skip
    env = {**repo_env(), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
