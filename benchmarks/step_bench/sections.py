"""The report's five sections: time per step, peak memory, scaling with depth, stability, torch.compile.

Each section is a function ``Settings -> markdown``; the numbers the targets need go into ``Findings``.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .contestants import CONTESTANTS
from .lineup import CHECK_ALPHA, instantiate, mltp_reference_gradients
from .memory import measure_memory, memory_probe
from .report import markdown_table, ms, one_line, ratio_text
from .timing import Contestant, time_rounds
from .workloads import BATCH, SCALING_WIDTH, WORKLOADS, build_model, make_batches, scaling_workload

CPU_STEP_CAPS = {"cnet1": (10, 2), "cnet4": (4, 1), "resnet18": (3, 1)}  # (timed steps, warm-up) on CPU


@dataclass
class Settings:
    models: list[str]
    steps: int
    warmup: int
    device: torch.device
    seed: int
    memory_steps: int
    stability_steps: int
    scaling_depths: tuple[int, ...]
    scaling_steps: int
    compile_steps: int
    quick: bool
    block: int = 1


@dataclass
class Findings:
    """What the target checks need from the sections."""

    median: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> contestant -> seconds
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> contestant -> MiB
    stability: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (time ratio, MiB)


def steps_for(label: str, settings: Settings) -> tuple[int, int, str]:
    """Timed steps and warm-up for ``label``: capped on CPU for the big models (and said so)."""
    if settings.device.type == "cpu" and label in CPU_STEP_CAPS and not settings.quick:
        cap_steps, cap_warmup = CPU_STEP_CAPS[label]
        if cap_steps < settings.steps or cap_warmup < settings.warmup:
            steps, warmup = min(cap_steps, settings.steps), min(cap_warmup, settings.warmup)
            return steps, warmup, f" (CPU: reduced to {steps} timed steps after {warmup} warm-up)"
    return settings.steps, settings.warmup, ""


def time_section(settings: Settings, findings: Findings, plans: dict) -> str:
    parts = [f"## 1. Time per training step (batch {BATCH}; MLTP tasks {BATCH // 2}+{BATCH // 2}; Adam)"]
    for label in settings.models:
        workload = WORKLOADS[label]
        names, skipped = plans[label]
        steps, warmup, note = steps_for(label, settings)
        contestants = instantiate(names, workload, settings.device, settings.seed)
        batches = make_batches(workload, 4, BATCH, settings.device)
        timings = time_rounds(
            contestants, batches, steps, warmup, settings.device, settings.seed, block=settings.block
        )
        medians = {n: statistics.median(s) for n, s in timings.seconds.items() if s}
        findings.median[label] = medians
        rows = []
        for name in names:
            if name not in medians:
                rows.append(
                    [f"`{name}`", "-", "-", "-", "-", f"failed: {timings.failures.get(name, 'no data')}"]
                )
                continue
            samples = timings.seconds[name]
            rows.append(
                [
                    f"`{name}`",
                    ms(medians[name]),
                    f"{ms(min(samples))}-{ms(max(samples))}",
                    ratio_text(medians[name] / medians["standard"] if "standard" in medians else None),
                    ratio_text(medians[name] / medians["halves"] if "halves" in medians else None),
                    "",
                ]
            )
        rows += [[f"`{name}`", "-", "-", "-", "-", f"skipped: {why}"] for name, why in skipped.items()]
        parts.append(f"### {label}: median of {steps} interleaved steps after {warmup} warm-up{note}")
        parts.append(
            markdown_table(["contestant", "median ms", "min-max ms", "x standard", "x halves", "note"], rows)
        )
    return "\n\n".join(parts)


def memory_section(settings: Settings, findings: Findings, plans: dict) -> str:
    unit = "CUDA max_memory_allocated" if settings.device.type == "cuda" else "peak RSS (VmHWM)"
    parts = [
        f"## 2. Peak memory per step ({unit}; each configuration in its own process, "
        f"{settings.memory_steps} steps; 'above setup' = peak minus the value after building model, "
        "optimizer and data)"
    ]
    for label in settings.models:
        names, skipped = plans[label]
        findings.memory[label] = {}
        rows = []
        for name in names:
            result = measure_memory(label, name, settings.device, settings.memory_steps, settings.seed)
            if "error" in result:
                rows.append([f"`{name}`", "-", "-", "-", "-", result["error"]])
                continue
            findings.memory[label][name] = result["delta_mib"]
            base = findings.memory[label].get("standard")
            rows.append(
                [
                    f"`{name}`",
                    f"{result['delta_mib']:.1f}",
                    ratio_text(result["delta_mib"] / base if base else None),
                    f"{result['peak_mib']:.1f}",
                    f"{result['base_mib']:.1f}",
                    result["how"],
                ]
            )
        rows += [[f"`{name}`", "-", "-", "-", "-", f"skipped: {why}"] for name, why in skipped.items()]
        parts.append(f"### {label}")
        parts.append(
            markdown_table(
                ["contestant", "above setup MiB", "x standard", "peak MiB", "after setup MiB", "how"], rows
            )
        )
    return "\n\n".join(parts)


def scaling_section(settings: Settings) -> str:
    rows = []
    for depth in settings.scaling_depths:
        workload = scaling_workload(depth)
        contestants = instantiate(["halves", "fo"], workload, settings.device, settings.seed)
        batches = make_batches(workload, 4, BATCH, settings.device)
        timings = time_rounds(
            contestants,
            batches,
            settings.scaling_steps,
            settings.warmup,
            settings.device,
            block=settings.block,
        )
        halves, fo = (statistics.median(timings.seconds[n]) for n in ("halves", "fo"))
        params = sum(p.numel() for p in build_model(workload, torch.device("cpu"), 0).parameters())
        rows.append([str(depth), f"{params:,}", ms(halves), ms(fo), ms(fo - halves), ratio_text(fo / halves)])
    ratios = [float(r[-1]) for r in rows]
    return "\n\n".join(
        [
            f"## 3. Scaling: `fo` over `halves` for MLPs of width {SCALING_WIDTH} "
            f"(median of {settings.scaling_steps} interleaved steps)",
            markdown_table(["layers", "params", "halves ms", "fo ms", "fo - halves ms", "fo / halves"], rows),
            f"Ratio at {settings.scaling_depths[-1]} layers / ratio at {settings.scaling_depths[0]} layers: "
            f"{ratios[-1] / ratios[0]:.2f} (flat = about 1).",
        ]
    )


def stability_section(settings: Settings, findings: Findings) -> str:
    steps = settings.stability_steps
    window = max(1, min(100, steps // 4))
    memory_name = "allocated MiB" if settings.device.type == "cuda" else "RSS MiB"
    rows = []
    for name in ("fo", "full"):
        workload = WORKLOADS["mlp"]
        contestants = instantiate([name], workload, settings.device, settings.seed)
        samples, probe = memory_probe((1, window, steps), settings.device)
        timings = time_rounds(
            contestants,
            make_batches(workload, 16, BATCH, settings.device),
            steps,
            0,
            settings.device,
            after_round=probe,
        )
        seconds = timings.seconds.get(name)
        if not seconds:
            rows.append([f"`{name}`", "-", "-", "-", "-", "-", "-", "-", timings.failures.get(name, "")])
            continue
        first, last = statistics.median(seconds[:window]), statistics.median(seconds[-window:])
        growth = samples[steps] - samples[window]
        findings.stability[name] = (last / first, growth)
        rows.append(
            [
                f"`{name}`",
                ms(first),
                ms(last),
                ratio_text(last / first),
                f"{samples[1]:.1f}",
                f"{samples[window]:.1f}",
                f"{samples[steps]:.1f}",
                f"{growth:+.1f}",
                "",
            ]
        )
    return "\n\n".join(
        [
            f"## 4. Stability over {steps} steps (MLP; each mode alone; windows of {window} steps)",
            markdown_table(
                [
                    "mode",
                    f"first {window} median ms",
                    f"last {window} median ms",
                    "last / first",
                    f"{memory_name} after step 1",
                    f"after step {window}",
                    f"after step {steps}",
                    f"growth from step {window}",
                    "note",
                ],
                rows,
            ),
        ]
    )


def compiled_gradients(base: nn.Module, mode: str, x: Tensor, y: Tensor):
    """torch_mltp's gradients on ``torch.compile`` of a copy of ``base``, and a note; ``None`` if it fails.

    A failure that names torch's ``donated_buffer`` setting is retried once with it off, as the
    error message advises, so that the report says whether that is enough.
    """
    errors: list[str] = []
    for setting in ({}, {"donated_buffer": False}):
        with torch._functorch.config.patch(**setting):
            try:
                grads = mltp_reference_gradients(torch.compile(copy.deepcopy(base)), mode, CHECK_ALPHA, x, y)
            except Exception as error:  # the failure is the finding
                errors.append(one_line(error))
                if "donated_buffer" not in errors[-1]:
                    break
                continue
        return grads, ("only with torch._functorch.config.donated_buffer=False; " if setting else "")
    return None, " -- then, with donated_buffer=False: ".join(errors)


def compile_section(settings: Settings) -> str:
    """Does MLTP run unchanged on ``torch.compile(model)``; same gradients; cost vs compiled halves."""
    workload = WORKLOADS["mlp"]
    base = build_model(workload, settings.device, settings.seed)
    x, y = make_batches(workload, 1, BATCH, settings.device)[0]
    rows = []
    for mode in ("fo", "full"):
        eager = mltp_reference_gradients(copy.deepcopy(base), mode, CHECK_ALPHA, x, y)
        compiled, note = compiled_gradients(base, mode, x, y)
        if compiled is None:
            rows.append([f"`{mode}`", "no", "-", note])
            continue
        pairs = list(zip(compiled[0] + compiled[1], eager[0] + eager[1]))
        worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in pairs)
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in pairs)
        rows.append(
            [f"`{mode}`", "yes", "yes" if same else "NO", f"{note}largest relative difference {worst:.1e}"]
        )
    parts = [
        "## 5. torch.compile (MLP, default backend)",
        markdown_table(["mode", "runs on compiled model", "gradients match eager (rtol 1e-4)", "note"], rows),
    ]

    def fresh(kind: str) -> nn.Module:
        model = copy.deepcopy(base)
        return torch.compile(model) if kind == "compiled" else model

    contestants = [
        Contestant(f"{name} ({kind})", CONTESTANTS[name](fresh(kind)))
        for kind in ("eager", "compiled")
        for name in ("halves", "fo")
    ]
    timings = time_rounds(
        contestants,
        make_batches(workload, 4, BATCH, settings.device),
        settings.compile_steps,
        max(settings.warmup, 3),
        settings.device,
        block=settings.block,
    )
    medians = {n: statistics.median(s) for n, s in timings.seconds.items() if s}
    rows = [
        [f"`{c.name}`", ms(medians[c.name]) if c.name in medians else "-", timings.failures.get(c.name, "")]
        for c in contestants
    ]
    ratio = {
        kind: medians.get(f"fo ({kind})", math.nan) / medians.get(f"halves ({kind})", math.nan)
        for kind in ("eager", "compiled")
    }
    parts += [
        markdown_table(["contestant", "median ms", "error"], rows),
        f"`fo` / `halves`: compiled {ratio_text(ratio['compiled'])}, eager {ratio_text(ratio['eager'])} "
        f"(median of {settings.compile_steps} interleaved steps; compilation in the warm-up).",
    ]
    return "\n\n".join(parts)
