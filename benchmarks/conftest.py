"""Conventions shared by qiao's pytest-benchmark suites (``benchmarks/test_*.py``).

Run for real (quiet machine; results saved for later comparison)::

    pytest benchmarks/ --benchmark-only --benchmark-autosave
    pytest benchmarks/ --benchmark-only --benchmark-compare          # against the last saved run
    pytest benchmarks/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%

Smoke mode (CI): every benchmark body runs once, on its smallest case only::

    QIAO_BENCH_SMOKE=1 pytest benchmarks/ --benchmark-disable -q

Smoke mode is on when the environment has ``QIAO_BENCH_SMOKE=1`` or pytest runs with
``--benchmark-disable``. What the suites share, without importing this file (two ``conftest``
modules would clash on ``sys.path``):

- marker ``full_only``: ``pytest.param(128, marks=pytest.mark.full_only)`` drops that case in smoke
  mode;
- fixture ``smoke``: whether smoke mode is on;
- fixture ``compiled_model``: ``compiled_model("mlp", batch=8)`` → an ``Artifact`` compiled for the
  CPU once per session;
- fixture ``bench_run``: ``bench_run(benchmark, fn, group=..., engine=...)`` times ``fn``, a
  zero-argument callable taking inputs already in the engine's format (``prepare(inputs)`` of
  ``qiao.compiler.bench.QiaoEngine``, ``OnnxRuntimeEngine`` or ``TorchEngine``); one round in smoke
  mode. Give qiao and its baselines the same ``group``: pytest-benchmark tables them together, and
  the summary at the end prints qiao's speed-up over each baseline measured in the same run.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest

SMOKE_ENV = "QIAO_BENCH_SMOKE"
_medians: dict[str, dict[str, float]] = defaultdict(dict)  # group → engine → median seconds


def is_smoke(config: pytest.Config) -> bool:
    """Smoke mode: ``QIAO_BENCH_SMOKE=1`` or ``--benchmark-disable``."""
    disabled = bool(config.getoption("benchmark_disable", default=False))
    return os.environ.get(SMOKE_ENV) == "1" or disabled


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "full_only: a benchmark case skipped in smoke mode (QIAO_BENCH_SMOKE=1)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not is_smoke(config):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("full_only") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session", autouse=True)
def default_schedules(tmp_path_factory):
    """Benchmarks measure qiao's default schedules: tuning records in the user's cache
    (``qiao compile --tune``) would make figures depend on what was tuned on this machine before.
    ``QIAO_BENCH_TUNED=1`` keeps the user's cache (to measure tuned compiles):
    ``tuning.shipped_schedules``."""
    from qiao.compiler.schedules.tuning import shipped_schedules

    with shipped_schedules(tmp_path_factory.mktemp("empty-qiao-cache")):
        yield


@pytest.fixture(scope="session")
def smoke(pytestconfig: pytest.Config) -> bool:
    return is_smoke(pytestconfig)


@pytest.fixture(scope="session")
def compiled_model(tmp_path_factory):
    """``compiled_model(name, **model_options)`` → a CPU ``Artifact``, compiled once per session."""
    from qiao.compiler import compile

    cache = {}
    root = tmp_path_factory.mktemp("bench-artifacts")

    def get(name: str, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            out = root / "-".join([name] + [f"{k}{v}" for k, v in key[1]])
            cache[key] = compile(name, "cpu", out, model_options=options or None)
        return cache[key]

    return get


@pytest.fixture
def bench_run(smoke):
    """``bench_run(benchmark, fn, group=, engine=, **extra_info)``: time ``fn`` with
    pytest-benchmark (its calibration; one round in smoke mode); the median feeds the summary."""

    def run(benchmark, fn, *, group: str, engine: str, **extra_info):
        benchmark.group = group
        benchmark.extra_info.update(engine=engine, **extra_info)
        if smoke:
            result = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
        else:
            result = benchmark(fn)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and not smoke:
            _medians[group][engine] = stats.median
        return result

    return run


@pytest.fixture
def versus_onnxruntime(benchmark, smoke):
    """``versus_onnxruntime(run_qiao, run_ort, group=, floor=, flops=None, **extra_info)``:
    time qiao's and ONNX Runtime's prepared calls interleaved (11 rounds, one in smoke mode),
    record the median per-round ORT/qiao ratio in the benchmark's extra info, time qiao with
    pytest-benchmark, print the figures (GFLOP/s given ``flops``), and under
    ``QIAO_BENCH_ENFORCE=1`` fail below ``floor``. Returns the ratio."""
    import os
    import statistics

    from qiao.compiler.bench import interleaved, round_ratios

    def run(run_qiao, run_ort, *, group: str, floor: float, flops=None, **extra_info):
        times = interleaved({"qiao": run_qiao, "onnxruntime": run_ort}, 11, 0.1, smoke=smoke)
        speedup = statistics.median(round_ratios(times, "onnxruntime"))
        t_qiao, t_ort = statistics.median(times["qiao"]), statistics.median(times["onnxruntime"])
        benchmark.group = group
        benchmark.extra_info.update(
            speedup=speedup,
            qiao_median_s=t_qiao,
            onnxruntime_median_s=t_ort,
            floor=floor,
            **extra_info,
        )
        benchmark.pedantic(run_qiao, rounds=1 if smoke else 5, iterations=1)
        rate = f" ({flops / t_qiao / 1e9:.0f} GFLOP/s)" if flops else ""
        print(
            f"\n  {group}: qiao {t_qiao * 1e3:.3f} ms{rate}, onnxruntime {t_ort * 1e3:.3f} ms, "
            f"ORT/qiao {speedup:.2f} (floor {floor:.2f})"
        )
        if os.environ.get("QIAO_BENCH_ENFORCE") == "1" and not smoke:
            assert speedup >= floor, f"{group}: ORT/qiao {speedup:.2f} < floor {floor:.2f}"
        return speedup

    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = []
    for group, engines in sorted(_medians.items()):
        qiao = engines.get("qiao")
        if not qiao:
            continue
        for engine, median in sorted(engines.items()):
            if engine != "qiao":
                rows.append(f"  {group:<36} vs {engine:<18} ×{median / qiao:.2f}")
    if rows:
        terminalreporter.write_sep("-", "qiao speed-up (baseline median / qiao median, this run)")
        for row in rows:
            terminalreporter.write_line(row)
