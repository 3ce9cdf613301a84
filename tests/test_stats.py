"""Means with bootstrap confidence intervals (gcache.io.records.stats): exact on degenerate samples,
close to normal theory on a large normal sample, covering the true mean about as often as the
level says, and paired intervals that use the pairing."""

import math
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gcache.io.records.stats import Interval, excludes_zero, mean_ci, paired_diff_ci

FINITE = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(st.lists(FINITE, min_size=1, max_size=30))
def test_the_interval_holds_the_mean_and_lies_within_the_sample(values):
    ci = mean_ci(values, resamples=200)
    assert math.isclose(ci.mean, statistics.fmean(values), rel_tol=1e-9, abs_tol=1e-6)
    assert min(values) - 1e-6 <= ci.low <= ci.mean <= ci.high <= max(values) + 1e-6
    assert ci.n == len(values) and ci.level == 0.95


def test_a_constant_sample_and_a_single_value_give_a_point():
    assert mean_ci([2.5] * 7)[:3] == (2.5, 2.5, 2.5)
    assert mean_ci([-1.0])[:3] == (-1.0, -1.0, -1.0)


def test_same_seed_same_interval_and_the_seed_matters():
    rng = random.Random(1)
    values = [rng.gauss(0, 1) for _ in range(50)]
    assert mean_ci(values, seed=3) == mean_ci(values, seed=3)
    assert mean_ci(values, seed=3) != mean_ci(values, seed=4)


def test_on_a_large_normal_sample_it_agrees_with_normal_theory():
    rng = random.Random(0)
    values = [rng.gauss(1.0, 2.0) for _ in range(800)]
    ci = mean_ci(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    assert math.isclose(ci.high - ci.low, 2 * half, rel_tol=0.1)
    assert math.isclose((ci.low + ci.high) / 2, ci.mean, abs_tol=0.1 * half)


def test_it_covers_the_true_mean_of_a_skewed_distribution_about_95_percent_of_the_time():
    rng = random.Random(0)
    trials, hits = 300, 0
    for t in range(trials):
        sample = [rng.expovariate(1.0) for _ in range(40)]  # true mean 1
        ci = mean_ci(sample, resamples=1000, seed=t)
        hits += ci.low <= 1.0 <= ci.high
    assert 0.89 <= hits / trials <= 0.985, hits / trials


def test_a_wider_level_gives_a_wider_interval():
    rng = random.Random(2)
    values = [rng.gauss(0, 1) for _ in range(60)]
    narrow, wide = mean_ci(values, level=0.8), mean_ci(values, level=0.99)
    assert wide.low < narrow.low and narrow.high < wide.high


def test_a_constant_paired_difference_is_exact():
    rng = random.Random(3)
    b = [rng.gauss(-2, 1) for _ in range(30)]
    a = [x + 0.5 for x in b]
    ci = paired_diff_ci(a, b)
    assert all(math.isclose(v, 0.5, abs_tol=1e-9) for v in ci[:3])
    assert excludes_zero(ci)


def test_pairing_removes_the_spread_between_questions():
    """Two methods whose scores differ by a small consistent margin on questions of very
    different difficulty: the paired interval excludes 0, intervals of the two means overlap."""
    rng = random.Random(4)
    difficulty = [rng.gauss(-3, 2) for _ in range(100)]
    b = [d + rng.gauss(0, 0.05) for d in difficulty]
    a = [d + 0.1 + rng.gauss(0, 0.05) for d in difficulty]
    paired = paired_diff_ci(a, b)
    assert excludes_zero(paired) and paired.low > 0
    assert mean_ci(a).low < mean_ci(b).high  # unpaired, the two intervals overlap
    assert math.isclose(paired.mean, statistics.fmean(a) - statistics.fmean(b), abs_tol=1e-9)


def test_excludes_zero():
    assert excludes_zero(Interval(1.0, 0.1, 2.0, 5, 0.95))
    assert excludes_zero(Interval(-1.0, -2.0, -0.1, 5, 0.95))
    assert not excludes_zero(Interval(0.5, -0.1, 2.0, 5, 0.95))
    assert str(Interval(-2.5612, -2.86, -2.28, 24, 0.95)) == "-2.561 [-2.860, -2.280]"


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: mean_ci([]), ValueError, "values: expected at least one value"),
        (lambda: mean_ci([1.0, float("nan")]), ValueError, r"values: expected finite values.*\[1\]"),
        (lambda: mean_ci([1.0, float("inf")]), ValueError, "values: expected finite values"),
        (lambda: mean_ci("123"), TypeError, "values: expected a sequence of numbers"),
        (lambda: mean_ci([1.0, "x"]), TypeError, "values: expected a sequence of numbers"),
        (lambda: mean_ci([1.0], level=1.0), ValueError, "level: expected a number in"),
        (lambda: mean_ci([1.0], resamples=0), ValueError, "resamples: expected an integer >= 1"),
        (lambda: paired_diff_ci([1.0, 2.0], [1.0]), ValueError, r"b: expected one value per value of a \(2\), got 1"),
    ],
)
def test_bad_inputs_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()
