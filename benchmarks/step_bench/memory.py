"""Memory in use and peak memory of a step: RSS on the CPU, the CUDA allocator on a GPU.

A peak is measured in a fresh process per (model, contestant): ``bench_step.py --memory-child``.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from .contestants import CONTESTANTS
from .workloads import BATCH, WORKLOADS, build_model, make_batches

MIB = 1024.0 * 1024.0
ENTRY_POINT = Path(__file__).resolve().parents[1] / "bench_step.py"


def read_status_kib(field_name: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or ``None`` off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; ``False`` where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def memory_child(label: str, name: str, device: torch.device, steps: int, seed: int) -> dict:
    """Measure one configuration in this (fresh) process: peak memory above model + optimizer + data.

    One step of the same contestant on a throw-away copy of the model first, so that one-time lazy
    set-up (BLAS / oneDNN buffers, autograd threads, imports) is not charged to the measured steps.
    """
    workload = WORKLOADS[label]
    batches = make_batches(workload, 2, BATCH, device)
    model = build_model(workload, device, seed)
    CONTESTANTS[name](copy.deepcopy(model))(*batches[0])
    gc.collect()
    torch.manual_seed(seed + 1)
    step = CONTESTANTS[name](model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        how = "torch.cuda.max_memory_allocated"
    else:
        base = (read_status_kib("VmRSS") or 0) * 1024
        # ru_maxrss, the peak of the whole process life, is the fallback: an upper bound.
        how = "VmHWM after reset" if reset_peak_rss() else "ru_maxrss"
    for k in range(steps):
        step(*batches[k % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    elif how == "VmHWM after reset":
        peak = (read_status_kib("VmHWM") or 0) * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"base_mib": base / MIB, "peak_mib": peak / MIB, "delta_mib": (peak - base) / MIB, "how": how}


def measure_memory(label: str, name: str, device: torch.device, steps: int, seed: int) -> dict:
    """Run :func:`memory_child` in a subprocess and return its result (or ``{"error": ...}``)."""
    command = [sys.executable, str(ENTRY_POINT), "--memory-child", label, name, "--device", device.type]
    command += ["--memory-steps", str(steps), "--seed", str(seed), "--threads", str(torch.get_num_threads())]
    # A fixed mmap threshold makes glibc return freed tensors to the OS, so RSS follows live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("MEMORY_RESULT "):
            return json.loads(line[len("MEMORY_RESULT ") :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {done.returncode}: {tail}"}


def current_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    return (read_status_kib("VmRSS") or 0) / 1024.0


def memory_probe(marks: tuple[int, ...], device: torch.device):
    """A dict and an ``after_round`` callback that records the memory in use after the rounds ``marks``."""
    samples: dict[int, float] = {}

    def probe(done: int) -> None:
        if done in marks:
            samples[done] = current_memory_mib(device)

    return samples, probe
