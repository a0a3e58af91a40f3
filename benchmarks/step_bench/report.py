"""Formatting of the report: markdown tables, milliseconds, ratios, verdicts, one-line errors."""

from __future__ import annotations

import math
from typing import Optional


def one_line(error: BaseException, limit: int = 300) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:limit]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def ratio_text(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def verdict(value: Optional[float], limit: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "PASS" if value <= limit else "MISS"
