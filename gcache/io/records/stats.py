"""Means with confidence intervals, for per-question measures (accuracy, answer log-probability).

Intervals are percentile bootstrap intervals: ``resamples`` resamples of the questions drawn
with replacement from a generator seeded with ``seed`` (the same inputs give the same interval
on every machine), the interval being the ``(1 - level) / 2`` and ``(1 + level) / 2``
quantiles of the resampled means. The bootstrap, not a t-interval, because per-question
log-probabilities are skewed (a few questions the model finds very unlikely) and a 0/1
accuracy is far from normal on small samples; it makes no assumption about the shape.

``paired_diff_ci`` compares two methods on the same questions: it resamples questions (the
same indices for both), so the interval of the mean difference reflects how consistently one
beats the other question by question, not how much the questions differ from each other.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from gcache.core.checks import check_int

RESAMPLES = 10_000


class Interval(NamedTuple):
    """A mean and its confidence interval over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int
    level: float

    def as_dict(self) -> dict[str, float | int]:
        """The JSON form written to summary.json and the benchmarks' results."""
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "level": self.level}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _values(values: Sequence[float], name: str) -> torch.Tensor:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(values).__name__}")
    try:
        out = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a sequence of numbers ({exc})") from None
    if out.numel() == 0:
        raise ValueError(f"{name}: expected at least one value, got none")
    if not bool(torch.isfinite(out).all()):
        bad = [i for i, ok in enumerate(torch.isfinite(out).tolist()) if not ok][:5]
        raise ValueError(f"{name}: expected finite values, got NaN or inf at positions {bad}")
    return out


def _check(level: float, resamples: int) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
    check_int(resamples, "resamples")


def _bootstrap(x: torch.Tensor, level: float, resamples: int, seed: int) -> Interval:
    n = x.numel()
    gen = torch.Generator().manual_seed(int(seed))
    means = torch.empty(resamples, dtype=torch.float64)
    # Chunks keep the index matrix small for large n.
    chunk = max(1, 2_000_000 // n)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = torch.randint(0, n, (stop - start, n), generator=gen)  # [R', n]
        means[start:stop] = x[idx].mean(dim=1)
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    mean = float(x.mean())
    # Round-off can put a quantile of identical means a hair off the mean.
    return Interval(mean, min(low, mean), max(high, mean), n, float(level))


def mean_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The mean of ``values`` with its percentile-bootstrap confidence interval (see the module).

    One value gives the interval [v, v]. Raises ValueError on no values, NaN or inf, a level
    outside (0, 1) or a non-positive resample count; TypeError when values are not numbers.
    """
    _check(level, resamples)
    return _bootstrap(_values(values, "values"), level, resamples, seed)


def paired_diff_ci(
    a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """The mean of ``a[i] - b[i]`` with a paired bootstrap confidence interval (questions
    resampled together). Raises ValueError when the lengths differ, and the errors of
    ``mean_ci``."""
    _check(level, resamples)
    x, y = _values(a, "a"), _values(b, "b")
    if x.numel() != y.numel():
        raise ValueError(f"b: expected one value per value of a ({x.numel()}), got {y.numel()}")
    return _bootstrap(x - y, level, resamples, seed)


def excludes_zero(interval: Interval) -> bool:
    """Whether the interval lies strictly on one side of 0."""
    return interval.low > 0.0 or interval.high < 0.0


def format_interval(interval: dict | None) -> str:
    """"-2.561 [-2.860, -2.280]" for a summary's {"mean", "low", "high"}; "-" for None."""
    if not interval:
        return "-"
    return f"{interval['mean']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


__all__ = ["Interval", "RESAMPLES", "excludes_zero", "format_interval", "mean_ci", "paired_diff_ci"]
