"""Building blocks of a backend's ``schedule`` phase: rule sets, the tuning database, the passes
that follow the rules.

A backend decides what its ``schedule`` phase runs (``CPUBackend.schedule_passes``:
``cpu_schedule_passes``; ``GPUBackend.schedule_passes``: ``gpu_schedule_passes``; a new kind picks
or composes blocks in its own file). Nothing here switches on the target kind; ``rules_for`` and
``schedule_passes``, for callers that hold only a target (tests, benchmarks), go by the device
family TVM declares for every kind (its target keys ``cpu`` / ``gpu``, as dlight's rules do).

Importing this package is cheap: TVM and the rule modules load when a block is first used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _family(target: Any) -> str | None:
    keys = {str(k) for k in target.keys}
    return "cpu" if "cpu" in keys else "gpu" if "gpu" in keys else None


def rules_for(target: Any) -> list:
    """qiao's CPU rules for a CPU target, TVM's dlight GPU rules for a GPU target (by TVM's target
    keys), none otherwise. Backends choose their own (``schedule_rules``)."""
    family = _family(target)
    if family == "cpu":
        from qiao.compiler.schedules.cpu import cpu_rules

        return cpu_rules(target)
    if family == "gpu":
        from qiao.compiler.schedules.gpu import gpu_rules

        return gpu_rules(target)
    return []


def schedule_passes(target: Any, options: Mapping[str, Any] | None = None) -> list:
    """``cpu_schedule_passes`` or ``gpu_schedule_passes`` by TVM's target keys (none for other
    devices): what the CPU / GPU backends run, for callers that hold only a target."""
    family = _family(target)
    if family == "cpu":
        return cpu_schedule_passes(target, options)
    if family == "gpu":
        return gpu_schedule_passes(target, options)
    return []


def cpu_schedule_passes(
    target: Any, options: Mapping[str, Any] | None = None, rules: Sequence[Any] | None = None
) -> list:
    """qiao's CPU schedule phase: ``rules`` (default: qiao's CPU rules) with this device's tuning
    database (``options`` as for ``tuning_database``), then ``cpu_loop_passes``."""
    from qiao.compiler.schedules.cpu import cpu_rules

    database, trials = tuning_database(target, options)
    rules = cpu_rules(target) if rules is None else rules
    return [rule_pass(rules, database, trials), *cpu_loop_passes()]


def gpu_schedule_passes(
    target: Any, options: Mapping[str, Any] | None = None, rules: Sequence[Any] | None = None
) -> list:
    """The GPU schedule phase: ``rules`` (default: TVM's dlight GPU rules), skipping kernels that
    come scheduled already (the MoE lowering's). No tuning database, no CPU rewrites."""
    from qiao.compiler.schedules.gpu import gpu_rules

    return [rule_pass(gpu_rules(target) if rules is None else rules)]


def tuning_database(target: Any, options: Mapping[str, Any] | None = None) -> tuple[Any, int]:
    """``(database, trials)`` of ``target`` for ``rule_pass``.

    Parameters
    ----------
    target : tvm.target.Target
    options : mapping, optional
        Compile options: ``tune`` (bool) tunes the model's GEMM-like kernels not yet in this
        device's database, with ``trials`` trials each (default ``tuning.DEFAULT_TRIALS``);
        ``tune_dims`` (``{"seq": 128}``) sets symbolic dimensions to measure at; ``tuning_db``
        (a directory) replaces the per-device database root; ``use_tuning_db=False`` ignores
        recorded schedules.

    Returns
    -------
    tuple
        ``(TuningDatabase or None, trials)``; ``(None, 0)`` when the database is switched off.
    """
    from qiao.compiler.schedules import tuning

    options = options or {}
    if not options.get("use_tuning_db", True):
        return None, 0
    database = tuning.TuningDatabase.for_target(
        target, options.get("tuning_db"), options.get("tune_dims")
    )
    trials = int(options.get("trials") or tuning.DEFAULT_TRIALS) if options.get("tune") else 0
    return database, trials


def rule_pass(rules: Sequence[Any], database: Any = None, trials: int = 0) -> Any:
    """One ``ApplyScheduleRules`` pass: the first of ``rules`` that applies schedules each kernel,
    after ``database``'s records (tuning ``trials`` trials first when positive)."""
    from qiao.compiler.passes.apply_schedule_rules import ApplyScheduleRules

    return ApplyScheduleRules(list(rules), database=database, tune_trials=trials)


def cpu_loop_passes() -> list:
    """The CPU rewrites that follow the rules: ragged vector loops, NaN-propagating min/max,
    eager selects, vectorisable math, serial small kernels."""
    from qiao.compiler.passes.eager_select import EagerSelect
    from qiao.compiler.passes.propagate_nan import PropagateNaN
    from qiao.compiler.passes.serial_small_kernels import SerialSmallKernels
    from qiao.compiler.passes.vectorizable_math import VectorizableMath
    from qiao.compiler.passes.vectorize_ragged_loops import VectorizeRaggedLoops

    return [
        # A symbolic extent's ragged last vector must not scalarise every vector.
        VectorizeRaggedLoops(),
        # float min/max (Relu, Clip, ReduceMax, pools) keep NaN, as ONNX Runtime and PyTorch do.
        PropagateNaN(),
        # Loads of Where's operands before the select: no urem left in a branch for LLVM's
        # vectoriser to mis-predicate (wrong values / a segfault with symbolic broadcasts).
        EagerSelect(),
        # libm exp/erf/tanh calls do not vectorise; their polynomial forms do.
        VectorizableMath(),
        # Small (often symbolic-shaped) kernels skip the thread pool at run time.
        SerialSmallKernels(),
    ]


__all__ = [
    "cpu_loop_passes",
    "cpu_schedule_passes",
    "gpu_schedule_passes",
    "rule_pass",
    "rules_for",
    "schedule_passes",
    "tuning_database",
]
