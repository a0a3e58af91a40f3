"""The performance targets, and the table that holds each measured ratio against its target."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

from .contestants import PEERS
from .report import markdown_table, verdict
from .sections import Findings

TIME_TARGETS = {  # fo / halves, per device type
    "cpu": {"mlp": 1.30, "cnet1": 1.05},
    "cuda": {"cnet1": 1.10, "resnet18": 1.10},
}
TIMED_PAIRS = {  # (MLTP contestant, its floor) judged against TIME_TARGETS, per device type
    "cpu": [("fo", "halves")],
    "cuda": [("fo", "halves"), ("fo-skip-fused", "halves-fused")],
}
FULL_VS_PEER_TARGET = 1.00  # full / faster peer: no slower
FO_MEMORY_TARGET = 1.25  # fo / standard
STABILITY_TIME_LIMIT = 1.10  # median of the last window / median of the first window
STABILITY_MEMORY_LIMIT_MIB = 8.0  # growth from the end of the first window to the end
CPU_MEMORY_RESOLUTION_MIB = 16.0  # peak-RSS differences below this are allocator noise: no verdict


def faster_peer(times: dict[str, float], fallback: dict[str, float]) -> Optional[str]:
    """The peer with the lower median step time (or, without timings, the lower ``fallback`` value)."""
    timed = [p for p in PEERS if p in times and p in fallback]
    if timed:
        return min(timed, key=times.__getitem__)
    present = [p for p in PEERS if p in fallback]
    return min(present, key=fallback.__getitem__) if present else None


class TargetRow(NamedTuple):
    target: str
    """The target, e.g. "time `fo` <= 1.30 x `halves`"."""
    quantity: str
    """What is measured for it, e.g. "time `fo` / `halves`"."""
    model: str
    measured: str
    verdict: str


def target_row(
    target: str, quantity: str, model: str, value: Optional[float], limit: float, unit: str = "x"
) -> TargetRow:
    shown = (
        "-"
        if value is None or math.isnan(value)
        else (f"{value:+.1f} MiB" if unit == "MiB" else f"{value:.2f}")
    )
    return TargetRow(target, quantity, model, shown, verdict(value, limit))


def target_rows(findings: Findings, device_type: str) -> list[TargetRow]:
    """One row per performance target the sections measured on a ``device_type`` device."""
    memory_floor_mib = CPU_MEMORY_RESOLUTION_MIB if device_type == "cpu" else 0.0
    time_targets = TIME_TARGETS.get(device_type, {})
    rows = []
    for label, times in findings.median.items():
        for mltp, floor in TIMED_PAIRS.get(device_type, []) if label in time_targets else []:
            limit = time_targets[label]
            value = times.get(mltp, math.nan) / times.get(floor, math.nan)
            rows.append(
                target_row(
                    f"time `{mltp}` <= {limit:.2f} x `{floor}`",
                    f"time `{mltp}` / `{floor}`",
                    label,
                    value,
                    limit,
                )
            )
        peer = faster_peer(times, times)
        value = times.get("full", math.nan) / times[peer] if peer else None
        rows.append(
            target_row(
                f"time `full` <= {FULL_VS_PEER_TARGET} x faster peer ({peer or 'none ran'})",
                f"time `full` / faster peer ({peer or 'none ran'})",
                label,
                value,
                FULL_VS_PEER_TARGET,
            )
        )
    for label, memory in findings.memory.items():
        standard = memory.get("standard", math.nan)
        if not standard >= memory_floor_mib:  # also catches NaN
            rows.append(
                TargetRow(
                    f"memory targets (`standard` uses {standard:.1f} MiB)",
                    f"memory (`standard` uses {standard:.1f} MiB, below the {memory_floor_mib:g} MiB "
                    "resolution of RSS)",
                    label,
                    "-",
                    f"n/a (below the {memory_floor_mib:g} MiB resolution of RSS)",
                )
            )
            continue
        value = memory.get("fo", math.nan) / standard
        rows.append(
            target_row(
                f"memory `fo` <= {FO_MEMORY_TARGET} x `standard`",
                "memory `fo` / `standard`",
                label,
                value,
                FO_MEMORY_TARGET,
            )
        )
        peer = faster_peer(findings.median.get(label, {}), memory)
        value = memory.get("full", math.nan) / memory[peer] if peer else None
        rows.append(
            target_row(
                f"memory `full` <= faster peer's ({peer or 'none ran'})",
                f"memory `full` / faster peer's ({peer or 'none ran'})",
                label,
                value,
                1.0,
            )
        )
    for name, (time_ratio, growth) in findings.stability.items():
        rows.append(
            target_row(
                f"stability: last / first step time <= {STABILITY_TIME_LIMIT}",
                "stability: last / first step time",
                f"mlp `{name}`",
                time_ratio,
                STABILITY_TIME_LIMIT,
            )
        )
        rows.append(
            target_row(
                f"stability: memory growth <= {STABILITY_MEMORY_LIMIT_MIB:g} MiB",
                "stability: memory growth",
                f"mlp `{name}`",
                growth,
                STABILITY_MEMORY_LIMIT_MIB,
                unit="MiB",
            )
        )
    return rows


SMOKE_RUN_NOTE = (
    "Smoke run (`--quick`): a few steps of the MLP, to show that every code path runs. These numbers "
    "swing from run to run and are not measurements, so nothing is judged against the targets; the full "
    "run does that (see docs/benchmarks.md)."
)


def targets_section(findings: Findings, device_type: str, judge: bool = True) -> str:
    """A PASS/MISS row per performance target the sections measured; with ``judge=False`` (a smoke run)
    only the quantities the targets use, without targets or verdicts."""
    rows = target_rows(findings, device_type)
    if judge:
        table = markdown_table(
            ["target", "model", "measured", "verdict"],
            [[r.target, r.model, r.measured, r.verdict] for r in rows],
        )
        return "## Targets\n\n" + (table if rows else "(no section ran)")
    table = markdown_table(
        ["quantity", "model", "measured"], [[r.quantity, r.model, r.measured] for r in rows]
    )
    return (
        "## Target quantities, not judged\n\n"
        + SMOKE_RUN_NOTE
        + "\n\n"
        + (table if rows else "(no section ran)")
    )
