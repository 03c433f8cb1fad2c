"""The timing loop every benchmark shares (``qiao bench``, ``benchmarks/``): calls per sample,
samples of back-to-back calls with the garbage collector off, idle pauses between engines, and
interleaved rounds."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Mapping
from typing import Any


def choose_number(single_call_s: float, repeat: int, min_time: float, cap: int = 100_000) -> int:
    """Calls per sample so that ``repeat`` samples take at least ``min_time`` seconds in total."""
    if min_time <= 0 or single_call_s <= 0:
        return 1
    return int(min(cap, max(1, math.ceil(min_time / (repeat * single_call_s)))))


def time_callable(fn: Callable[[], Any], repeat: int, number: int) -> list[float]:
    """``repeat`` samples of the mean time of ``number`` calls of ``fn`` (garbage collector off)."""
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - start) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def time_until(
    fn: Callable[[], Any], repeat: int, warmup: int = 1, min_time: float = 0.0
) -> list[float]:
    """Seconds per call, ``repeat`` samples after ``warmup`` untimed calls; each sample calls
    ``fn`` until ``min_time`` seconds have passed (at least once), so no calibration call is
    needed when each sample is taken on its own."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        out.append(elapsed / n)
    return out


# Idle time before an engine's timed block: longer than the worker threads of ONNX Runtime, OpenBLAS
# and TVM spin-wait after a call (measured here: ONNX Runtime's still slow a TVM call 10 ms later,
# not 100 ms later). Without it the engine timed second shares the cores with the first's spinners.
SETTLE_S = 0.2


def settle(seconds: float = SETTLE_S) -> None:
    """Leave the machine idle so that the previous engine's worker threads go to sleep."""
    if seconds > 0:
        time.sleep(seconds)


def calibrate(
    fn: Callable[[], Any], warmup: int, repeat: int, min_time: float, pause: float = 0.0
) -> int:
    """Warm ``fn`` up (caches, thread pools, allocators), leave the machine idle for ``pause``
    seconds, and return the calls per sample that make ``repeat`` samples last ``min_time``."""
    for _ in range(warmup):
        fn()
    settle(pause)
    return choose_number(min(time_callable(fn, 3, 1)), repeat, min_time)


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int,
    min_time: float,
    warmup: int = 3,
    pause: float = SETTLE_S,
    smoke: bool = False,
) -> dict[str, list[float]]:
    """Per-call seconds of several engines doing the same work, ``rounds`` samples each.

    Rounds alternate the engines so that all see the same machine load over the run; each timed
    block (calls enough to last ``min_time``) follows ``pause`` seconds of idle time and one untimed
    call, so each engine is measured as if it ran alone. ``smoke``: every engine runs once, no
    warm-up, no pause (one sample each)."""
    if smoke:
        rounds, min_time, warmup, pause = 1, 0.0, 0, 0.0
    number = {name: calibrate(fn, warmup, 1, min_time, pause) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            settle(pause)
            if pause > 0:
                fn()
            samples[name].append(min(time_callable(fn, 1, number[name])))
    return samples


def round_ratios(
    samples: Mapping[str, list[float]], baseline: str, engine: str = "qiao"
) -> list[float]:
    """Per round of ``interleaved`` samples: the baseline's time over ``engine``'s (above 1
    ``engine`` is faster)."""
    return [b / a for a, b in zip(samples[engine], samples[baseline])]
