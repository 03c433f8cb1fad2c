"""``qiao bench``: time compiled artifacts against ONNX Runtime and PyTorch eager, on the same
inputs.

One artifact per target serves every size: ``--tokens`` / ``--batch`` bind the model's symbolic
token or batch dimension, so nothing is recompiled between sizes. The artifact is timed with TVM's
evaluator (device-synchronised, host conversion excluded; on a remote device through
``qiao.compiler.rpc``), the baselines with ``time.perf_counter`` around calls that take inputs
already in the engine's format. Each case also checks the outputs against every baseline, so a
figure is never the speed of a wrong answer.

A result is a JSON document (``SCHEMA``, ``SCHEMA_VERSION``) carrying the machine fingerprint, the
software versions, the settings and one entry per (target, size); ``qiao report`` merges many of
them.

One concern per module: ``engines`` (what runs a model: qiao's artifact, ONNX Runtime, PyTorch;
shared with ``qiao validate`` and ``benchmarks/``), ``timing`` (the timing loop), ``stats``,
``sizes`` (which symbolic dim a size binds), ``cost`` (FLOPs and bytes), ``memory`` (peak RSS),
``roofs`` (the CPU's ceilings), ``targets``, ``schema`` (the result document), ``formatting`` (the
table) and ``run`` (``bench`` itself). Every name is importable from ``qiao.compiler.bench``.
"""

from __future__ import annotations

from qiao.compiler.bench.cost import estimate_cost, load_source, shape_only
from qiao.compiler.bench.engines import (
    BASELINES,
    Engine,
    OnnxRuntimeEngine,
    QiaoEngine,
    RunnerEngine,
    TorchEngine,
    baseline_engines,
    ort_providers,
)
from qiao.compiler.bench.formatting import format_rate, format_result, format_seconds, mismatches
from qiao.compiler.bench.memory import PeakRSS
from qiao.compiler.bench.roofs import measure_cpu_roofs
from qiao.compiler.bench.run import bench
from qiao.compiler.bench.schema import (
    DEFINITIONS,
    REQUIRED,
    SCHEMA,
    SCHEMA_VERSION,
    check_result,
    write_result,
)
from qiao.compiler.bench.sizes import (
    BATCH_DIMS,
    TOKEN_DIMS,
    SizePlan,
    parse_sizes,
    plan_sizes,
    symbolic_dims,
)
from qiao.compiler.bench.stats import latency_stats, percentile
from qiao.compiler.bench.targets import parse_targets, runs_on_host_cpu
from qiao.compiler.bench.timing import (
    SETTLE_S,
    calibrate,
    choose_number,
    interleaved,
    round_ratios,
    settle,
    time_callable,
    time_until,
)

__all__ = [
    "BASELINES",
    "BATCH_DIMS",
    "DEFINITIONS",
    "REQUIRED",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SETTLE_S",
    "TOKEN_DIMS",
    "Engine",
    "OnnxRuntimeEngine",
    "PeakRSS",
    "QiaoEngine",
    "RunnerEngine",
    "SizePlan",
    "TorchEngine",
    "baseline_engines",
    "bench",
    "calibrate",
    "check_result",
    "choose_number",
    "estimate_cost",
    "format_rate",
    "format_result",
    "format_seconds",
    "interleaved",
    "latency_stats",
    "load_source",
    "measure_cpu_roofs",
    "mismatches",
    "ort_providers",
    "parse_sizes",
    "parse_targets",
    "percentile",
    "plan_sizes",
    "round_ratios",
    "runs_on_host_cpu",
    "settle",
    "shape_only",
    "symbolic_dims",
    "time_callable",
    "time_until",
    "write_result",
]
