"""Statistics over paired seeds, against hand computations (closed forms, enumerated sign patterns)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from torch_mltp.experiments import stats
from torch_mltp.experiments.stats import mean_std, paired_difference, sign_flip_test


def test_mean_std_uses_n_minus_one():
    assert mean_std([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt((4 + 1 + 9) / 2)))
    mean, std = mean_std([5.0])
    assert mean == 5.0 and math.isnan(std)


def test_paired_interval_and_t_test_by_hand_with_two_degrees_of_freedom():
    standard = [80.0, 82.0, 81.0]
    mltp = [81.0, 82.5, 82.5]
    # differences 1.0, 0.5, 1.5: mean 1.0, sample std 0.5; for 2 degrees of freedom the t quantile is
    # (2p - 1) / sqrt(2p(1 - p)) and the two-sided p-value of t is 1 - |t| / sqrt(2 + t^2)
    quantile = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    half_width = quantile * 0.5 / math.sqrt(3)
    t = 1.0 / (0.5 / math.sqrt(3))
    result = paired_difference(standard, mltp)
    assert result.mean == pytest.approx(1.0)
    assert result.low == pytest.approx(1.0 - half_width, rel=1e-9)
    assert result.high == pytest.approx(1.0 + half_width, rel=1e-9)
    assert result.p_t == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    # signs of (1.0, 0.5, 1.5): |sum| >= 3 only for all + and all -
    assert result.p_sign_flip == pytest.approx(2 / 8) and result.sign_flip_draws is None
    assert result.to_dict()["p_sign_flip"] == result.p_sign_flip


def test_t_test_with_one_degree_of_freedom_is_the_cauchy_tail():
    result = paired_difference([0.0, 0.0], [1.0, 3.0])  # mean 2, sd sqrt(2): t = 2
    assert result.p_t == pytest.approx(1 - 2 / math.pi * math.atan(2.0), rel=1e-9)
    assert result.low == pytest.approx(2 - math.tan(math.pi * 0.475) * math.sqrt(2) / math.sqrt(2), rel=1e-9)


def test_no_interval_or_t_test_without_spread():
    single = paired_difference([80.0], [81.5])
    assert single.mean == pytest.approx(1.5) and single.low is None and single.high is None
    assert single.p_t is None and single.p_sign_flip == 1.0  # +1.5 and -1.5 are equally extreme
    same = paired_difference([80.0, 81.0, 82.0], [80.5, 81.5, 82.5])  # every difference 0.5
    assert same.p_t is None and same.low == pytest.approx(0.5) and same.high == pytest.approx(0.5)
    assert same.p_sign_flip == pytest.approx(2 / 8)
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


@pytest.mark.parametrize(
    ("differences", "p_value"),
    [
        ([1.0, 2.0, 3.0], 2 / 8),  # sums 6, 4, 2, 0, 0, -2, -4, -6: only ±6 reach |6|
        # observed 4.5; flipping a subset S of {0.5, 1, 2, 3} gives 6.5 - 2 sum(S), which reaches
        # |4.5| for sum(S) in {0, 0.5, 1, 5.5, 6, 6.5}: 6 of the 16 subsets
        ([0.5, -1.0, 2.0, 3.0], 6 / 16),
        ([0.0, 0.0, 0.0], 1.0),
        ([0.3, -0.3], 1.0),  # observed 0: every pattern is as extreme
    ],
)
def test_sign_flip_p_value_enumerated_by_hand(differences, p_value):
    result = sign_flip_test(differences)
    assert result.p_value == pytest.approx(p_value) and result.draws is None


def test_sign_flip_agrees_with_scipys_paired_permutation_test():
    generator = np.random.default_rng(3)
    baseline = generator.normal(90, 1, 9)
    treatment = baseline + generator.normal(0.4, 0.8, 9)
    reference = scipy_stats.permutation_test(
        (treatment, baseline),
        lambda x, y: np.mean(x - y),
        permutation_type="samples",
        n_resamples=np.inf,
        alternative="two-sided",
    )
    assert sign_flip_test(treatment - baseline).p_value == pytest.approx(reference.pvalue, rel=1e-12)


def _every_sign_pattern(differences) -> float:
    """P(|sum of s_k d_k| >= |sum of d_k|) by enumerating the sums of all 2**n sign patterns."""
    sums = np.zeros(1)
    for value in differences:
        sums = np.concatenate([sums + value, sums - value])
    return float(np.mean(np.abs(sums) >= abs(np.sum(differences)) - 1e-9))


def test_sign_flip_draws_seeded_patterns_beyond_the_exact_limit():
    differences = np.random.default_rng(5).normal(0.3, 1.0, 21)
    exact = _every_sign_pattern(differences)  # 2**21 patterns
    drawn = sign_flip_test(differences)
    assert drawn.draws == stats.SIGN_FLIP_DRAWS
    assert drawn == sign_flip_test(differences)  # seeded: the same p-value every time
    assert abs(drawn.p_value - exact) < 4 * math.sqrt(exact * (1 - exact) / drawn.draws)
    # every difference positive: no random pattern is as extreme, so p = 1 / (1 + draws)
    assert sign_flip_test([1.0] * 25).p_value == 1 / (1 + stats.SIGN_FLIP_DRAWS)


def test_sign_flip_counts_ties_of_accuracies_on_a_grid_exactly():
    """Accuracies of 1,000 test samples are multiples of 0.1: many sign patterns tie with the observed
    sum up to rounding, and each of them counts."""
    generator = np.random.default_rng(7)
    for size in (5, 12, 20):
        baseline = np.round(generator.normal(90.0, 1.0, size), 1)
        treatment = np.round(generator.normal(90.3, 1.0, size), 1)
        differences = treatment - baseline
        assert sign_flip_test(differences).p_value == _every_sign_pattern(differences)
