"""Latency statistics: percentiles and the summary recorded per engine and case."""

from __future__ import annotations

import math
from collections.abc import Sequence

from qiao.compiler.errors import QiaoError


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already-sorted samples, interpolating linearly between
    the two nearest ranks (numpy's default ``method="linear"``)."""
    if not sorted_samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(sorted_samples) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


def latency_stats(samples: Sequence[float]) -> dict[str, float | int]:
    """Summary of latency samples (seconds): ``mean median p90 p99 min max std n``.

    ``std`` is the population standard deviation (``ddof=0``, as TVM's ``BenchmarkResult``)."""
    values = sorted(float(s) for s in samples)
    if not values:
        raise QiaoError("no latency samples were taken. fix: pass --repeat 1 or more")
    n = len(values)
    mean = math.fsum(values) / n
    return {
        "mean": mean,
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "min": values[0],
        "max": values[-1],
        "std": math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n),
        "n": n,
    }
