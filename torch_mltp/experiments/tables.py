"""Markdown tables and the way their cells write numbers: one writer for every table of the experiments."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

from .stats import mean_std


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: the header, its rule, then one line per row (no trailing newline). An empty
    header cell (over a column of row names) is written as one space."""
    lines = [
        "|" + "|".join(f" {cell} " if cell else " " for cell in header) + "|",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def p_text(p: Optional[float]) -> str:
    """A p-value: three decimals, two significant digits below 0.001, ``—`` when there is none."""
    if p is None:
        return "—"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def mean_sd_text(values: Sequence[float]) -> str:
    """``mean ± sample sd`` with two decimals; the mean alone for one value."""
    mean, std = mean_std(values)
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def interval_text(difference: Optional[dict], digits: int = 2) -> str:
    """A paired difference (``stats.PairedDifference.to_dict()``): ``+0.12 [-0.30, +0.54]``; the mean alone
    without an interval (one pair); ``—`` when there is none."""
    if difference is None:
        return "—"
    mean = f"{difference['mean']:+.{digits}f}"
    if difference["low"] is None:
        return mean
    return f"{mean} [{difference['low']:+.{digits}f}, {difference['high']:+.{digits}f}]"


def arms_table(arms: Iterable[Tuple[str, int, Sequence[float], Sequence[float]]]) -> str:
    """The arms of a comparison, one row per (name, steps per run, test accuracy per seed, training seconds
    per seed): steps, mean ± sd of the accuracy, mean seconds."""
    rows = [
        [name, str(steps), mean_sd_text(accuracies), f"{math.fsum(seconds) / len(seconds):.1f}"]
        for name, steps, accuracies, seconds in arms
    ]
    return markdown(["arm", "steps", "test top-1 (%)", "train s/run"], rows)
