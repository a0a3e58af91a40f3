"""Cost of one MLTP training step: torch_mltp against plain training and against ``higher`` / ``torchopt``.

The command line of ``benchmarks/bench_step.py``: options, the report's header, the sections in turn,
the targets, and the report written to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

import torch_mltp

from .contestants import PEERS
from .lineup import CHECK_ALPHA, CHECK_BATCH, plan_contestants
from .memory import memory_child
from .sections import (
    Findings,
    Settings,
    compile_section,
    memory_section,
    scaling_section,
    stability_section,
    time_section,
)
from .targets import targets_section
from .workloads import ALPHA_INIT, ETA, LR, SCALING_DEPTHS, WORKLOADS


def environment_header(settings: Settings, argv: list[str]) -> str:
    versions = [f"torch {torch.__version__}", f"torch_mltp {torch_mltp.__version__}"]
    for peer in PEERS:
        try:
            versions.append(f"{peer} {importlib.metadata.version(peer)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{peer} not available")
    device = (
        torch.cuda.get_device_name(settings.device)
        if settings.device.type == "cuda"
        else platform.processor()
    )
    return "\n".join(
        [
            "# torch_mltp step benchmark",
            "",
            f"- command: `python benchmarks/bench_step.py {' '.join(argv)}`".rstrip(),
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- device: {settings.device.type} ({device or platform.machine()}); {os.cpu_count()} CPUs, "
            f"torch threads {torch.get_num_threads()}; Python {platform.python_version()}",
            f"- versions: {', '.join(versions)}",
            f"- settings: Adam lr {LR} (alphas in a second param group), eta {ETA}, alpha_init {ALPHA_INIT}, "
            f"synthetic data; peers checked against torch_mltp `full` in float64 on {CHECK_BATCH} samples "
            f"(alpha {CHECK_ALPHA}) before anything is timed; one timing sample = {settings.block} step(s) "
            "between device syncs" + ("; QUICK smoke run, not a measurement" if settings.quick else ""),
        ]
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="mlp,cnet1,cnet4,resnet18", help=f"comma-separated, from {', '.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="timed rounds per model (capped on CPU for big ones)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--sections",
        default="time,memory,scaling,stability,compile",
        help="comma-separated subset of time,memory,scaling,stability,compile",
    )
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory subprocess")
    parser.add_argument("--stability-steps", type=int, default=2000)
    parser.add_argument("--scaling-steps", type=int, default=None, help="default: --steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--block",
        type=int,
        help="steps per timing sample between device syncs (default: 1 on CPU, 4 on CUDA)",
    )
    parser.add_argument("--out", type=Path, help="also write the report to this markdown file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="everything tiny, MLP only: a smoke check that every code path runs; prints the numbers "
        "without target verdicts",
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "CONTESTANT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(WORKLOADS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    block = args.block or (4 if device.type == "cuda" else 1)
    if args.quick:
        return Settings(
            models=["mlp"],
            steps=5,
            warmup=1,
            device=device,
            seed=args.seed,
            memory_steps=2,
            stability_steps=40,
            scaling_depths=(2, 4, 8),
            scaling_steps=5,
            compile_steps=5,
            quick=True,
            block=block,
        )
    return Settings(
        models=models,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        seed=args.seed,
        memory_steps=args.memory_steps,
        stability_steps=args.stability_steps,
        scaling_depths=SCALING_DEPTHS,
        scaling_steps=args.scaling_steps or args.steps,
        compile_steps=args.steps,
        quick=False,
        block=block,
    )


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        label, name = args.memory_child
        result = memory_child(label, name, torch.device(args.device), args.memory_steps, args.seed)
        print("MEMORY_RESULT " + json.dumps(result), flush=True)
        return 0
    settings = settings_from(args)
    sections = {s.strip() for s in args.sections.split(",")}
    report: list[str] = []

    def emit(text: str) -> None:
        report.append(text)
        print(text + "\n", flush=True)

    emit(environment_header(settings, argv))
    findings = Findings()
    plans = {}
    if sections & {"time", "memory"}:
        for label in settings.models:
            plans[label] = plan_contestants(WORKLOADS[label], settings.seed, settings.device.type)
    runs = [
        ("time", lambda: time_section(settings, findings, plans)),
        ("memory", lambda: memory_section(settings, findings, plans)),
        ("scaling", lambda: scaling_section(settings)),
        ("stability", lambda: stability_section(settings, findings)),
        ("compile", lambda: compile_section(settings)),
    ]
    for name, run in runs:
        if name not in sections:
            continue
        started = time.perf_counter()
        try:
            text = run()
        except Exception:  # one broken section must not hide the others
            text = f"## {name}: FAILED\n\n```\n{traceback.format_exc()}```"
        emit(text + f"\n\n_(section took {time.perf_counter() - started:.0f} s)_")
    emit(targets_section(findings, settings.device.type, judge=not settings.quick))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n\n".join(report) + "\n")
    return 0
