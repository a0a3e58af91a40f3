"""Summary statistics over seeds: mean ± std, and the paired difference to a baseline with a Student-t
interval, a paired t-test and a sign-flip permutation test.

A pair is one seed: the same initial weights and data order for both procedures, so the difference of a
pair is free of the variation between seeds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import stats

MAX_EXACT_SIGN_FLIPS = 20
"""Up to this many pairs the sign-flip test enumerates all ``2**n`` sign patterns (about a million for
20); beyond it, it draws :data:`SIGN_FLIP_DRAWS` random patterns."""
SIGN_FLIP_DRAWS = 100_000
SIGN_FLIP_SEED = 0
"""Seed of the Monte-Carlo sign patterns, so that a summary is reproducible."""
TIE_SCALE = 1000.0
"""Sums of sign patterns within ``100 * TIE_SCALE`` ulps of the sum of the absolute differences of the
observed one tie with it (see :func:`_flipped_size`)."""


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; NaN for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass(frozen=True)
class SignFlipTest:
    """Two-sided sign-flip permutation test of ``mean(differences) = 0``."""

    p_value: float
    draws: Optional[int]
    """``None``: exact (every sign pattern); else the number of random patterns drawn."""


def _flipped_size(differences: np.ndarray, axis: int) -> np.ndarray:
    """``|sum of d_k|`` plus :data:`TIE_SCALE` times ``sum of |d_k|``, which no sign flip changes. scipy
    counts a pattern as extreme as the observed one within 100 ulps of this statistic: differences of
    accuracies such as 91.3 - 90.6 carry rounding errors of the accuracies' size, far more ulps of the
    differences, and a pattern whose sum equals the observed one must still count."""
    return np.abs(np.sum(differences, axis=axis)) + TIE_SCALE * np.sum(np.abs(differences), axis=axis)


def sign_flip_test(differences: Sequence[float]) -> SignFlipTest:
    """P(|sum of s_k d_k| >= |sum of d_k|) over independent random signs s_k = ±1
    (``scipy.stats.permutation_test`` of the paired samples).

    Under the null hypothesis that each paired difference is symmetric around 0, every sign pattern is
    equally likely. Up to :data:`MAX_EXACT_SIGN_FLIPS` differences all ``2**n`` patterns are enumerated
    (the observed one included), so the p-value is a multiple of ``2**-n``; with more, the p-value is
    ``(1 + hits) / (1 + draws)`` over :data:`SIGN_FLIP_DRAWS` patterns drawn with seed
    :data:`SIGN_FLIP_SEED`. Sums within a few ulps of the observed one count as hits.
    """
    values = np.asarray(differences, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("sign_flip_test needs a non-empty sequence of differences")
    if values.size == 1:  # scipy needs two: +d and -d are equally extreme
        return SignFlipTest(1.0, None)
    exact = values.size <= MAX_EXACT_SIGN_FLIPS
    result = stats.permutation_test(
        (values,),
        _flipped_size,
        permutation_type="samples",
        vectorized=True,
        n_resamples=2**values.size if exact else SIGN_FLIP_DRAWS,
        batch=2**15,
        alternative="greater",
        rng=np.random.default_rng(SIGN_FLIP_SEED),
    )
    return SignFlipTest(float(result.pvalue), None if exact else SIGN_FLIP_DRAWS)


def _differences(baseline: Sequence[float], treatment: Sequence[float], caller: str) -> np.ndarray:
    """``treatment[k] - baseline[k]`` per seed ``k``; ``ValueError`` unless both hold one value per seed."""
    if len(baseline) != len(treatment) or not baseline:
        raise ValueError(f"{caller} needs two equally long, non-empty sequences (one value per seed)")
    return np.asarray(treatment, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)


def _constant(differences: np.ndarray) -> bool:
    """Whether the differences are all the same (up to rounding): a t-test of them is undefined."""
    return bool(np.ptp(differences) <= 1e-12 * np.abs(differences).max(initial=0.0))


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``treatment - baseline`` over paired seeds, its two-sided Student-t interval and the
    two-sided p-values of a paired t-test and of a sign-flip permutation test."""

    mean: float
    low: Optional[float]
    high: Optional[float]
    n: int
    confidence: float
    p_t: Optional[float]
    """Paired t-test (``scipy.stats.ttest_rel``); ``None`` with one pair or identical differences."""
    p_sign_flip: float
    sign_flip_draws: Optional[int]
    """``None``: the sign-flip p-value is exact; else the number of random sign patterns."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def paired_difference(
    baseline: Sequence[float], treatment: Sequence[float], confidence: float = 0.95
) -> PairedDifference:
    """Paired statistics of ``treatment[k] - baseline[k]`` (k: the seed).

    The interval is ``mean ± t_{(1 + confidence) / 2, n - 1} * sd / sqrt(n)``. With a single pair there is
    no interval (``low`` and ``high`` are ``None``) and no t-test; when every difference is the same the
    interval has width 0 and the t-test is undefined (``p_t`` is ``None``).
    """
    differences = _differences(baseline, treatment, "paired_difference")
    mean, std = mean_std(differences)
    n = len(differences)
    flips = sign_flip_test(differences)
    if n == 1:
        return PairedDifference(mean, None, None, n, confidence, None, flips.p_value, flips.draws)
    half_width = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * std / math.sqrt(n)
    p_t = None if _constant(differences) else float(stats.ttest_rel(treatment, baseline).pvalue)
    return PairedDifference(
        mean, mean - half_width, mean + half_width, n, confidence, p_t, flips.p_value, flips.draws
    )


def holm(p_values: Sequence[Optional[float]]) -> list:
    """Holm-Bonferroni adjusted p-values of one family, in the order given: the k-th smallest of m
    p-values is multiplied by ``m - k + 1``, made non-decreasing along that order, and capped at 1. A
    hypothesis is rejected at level ``a`` when its adjusted p-value is below ``a``; the family-wise error
    rate is then at most ``a``. A missing p-value (``None``: no test was possible) counts as 1."""
    values = [1.0 if p is None else float(p) for p in p_values]
    if any(not 0.0 <= p <= 1.0 for p in values):
        raise ValueError(f"p-values must lie in [0, 1], got {p_values}")
    m = len(values)
    adjusted = [1.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=values.__getitem__)):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return adjusted


def non_inferiority_p(
    baseline: Sequence[float], treatment: Sequence[float], margin: float
) -> Optional[float]:
    """One-sided paired t-test of ``mean(treatment - baseline) <= -margin`` against ``> -margin``: a small
    p-value says the treatment is not worse than the baseline by ``margin`` or more. ``None`` with fewer
    than two pairs or identical differences (no test)."""
    differences = _differences(baseline, treatment, "non_inferiority_p")
    if differences.size < 2 or _constant(differences):
        return None
    return float(stats.ttest_1samp(differences, -margin, alternative="greater").pvalue)
