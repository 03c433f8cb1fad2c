"""Schedule rules per target family, selected by the target's kind, and the tuning database.

``schedule_passes(target)`` is what a backend's ``schedule`` phase runs: one ``ApplyScheduleRules``
pass with the rule set registered for ``target.kind.name`` (qiao's CPU rules for ``llvm``, TVM's
dlight GPU rules for ``cuda``/``rocm``/...), consulting the per-device tuning database first. A new
target family registers its rule set with ``register_rule_set``; nothing here switches on the kind.

Importing this package is cheap: TVM and the rule modules load when a rule set is first asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

# target kind → "module:function" returning the ordered rule list for a target.
_RULE_SETS: dict[str, str | Callable[[Any], list]] = {
    "llvm": "qiao.compiler.schedules.cpu:cpu_rules",
    "cuda": "qiao.compiler.schedules.gpu:gpu_rules",
    "rocm": "qiao.compiler.schedules.gpu:gpu_rules",
    "vulkan": "qiao.compiler.schedules.gpu:gpu_rules",
    "metal": "qiao.compiler.schedules.gpu:gpu_rules",
    "opencl": "qiao.compiler.schedules.gpu:gpu_rules",
}
RULE_SETS: Mapping[str, str | Callable[[Any], list]] = MappingProxyType(_RULE_SETS)


def register_rule_set(kind: str, factory: str | Callable[[Any], list]) -> None:
    """Use ``factory(target) -> [rules]`` (or a ``"module:function"`` path) for targets of ``kind``.

    Raises ``ValueError`` when ``kind`` already has a rule set: replacing another family's rules
    silently would change every backend of that kind.
    """
    if kind in _RULE_SETS:
        raise ValueError(f"target kind {kind!r} already has a rule set ({_RULE_SETS[kind]!r})")
    _RULE_SETS[kind] = factory


def rules_for(target: Any) -> list:
    """The ordered schedule rules for ``target`` (empty for a kind without a rule set)."""
    factory = _RULE_SETS.get(target.kind.name)
    if factory is None:
        return []
    if isinstance(factory, str):
        module, _, name = factory.partition(":")
        factory = getattr(importlib.import_module(module), name)
    return list(factory(target))


def schedule_passes(target: Any, options: Mapping[str, Any] | None = None) -> list:
    """The passes of the ``schedule`` phase for ``target``.

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
    list of tvm.transform.Pass
    """
    from qiao.compiler.passes.apply_schedule_rules import ApplyScheduleRules

    options = dict(options or {})
    rules = rules_for(target)
    if not rules:
        return []
    database = None
    trials = 0
    if options.get("use_tuning_db", True) and target.kind.name == "llvm":
        from qiao.compiler.schedules import tuning

        database = tuning.TuningDatabase.for_target(
            target, options.get("tuning_db"), options.get("tune_dims")
        )
        if options.get("tune"):
            trials = int(options.get("trials") or tuning.DEFAULT_TRIALS)
    passes = [ApplyScheduleRules(rules, database=database, tune_trials=trials)]
    if target.kind.name == "llvm":
        from qiao.compiler.passes.serial_small_kernels import SerialSmallKernels
        from qiao.compiler.passes.vectorizable_math import VectorizableMath
        from qiao.compiler.passes.vectorize_ragged_loops import VectorizeRaggedLoops

        # A symbolic extent's ragged last vector must not scalarise every vector.
        passes.append(VectorizeRaggedLoops())
        # libm exp/erf/tanh calls do not vectorise; their polynomial forms do.
        passes.append(VectorizableMath())
        # Small (often symbolic-shaped) kernels skip the thread pool at run time.
        passes.append(SerialSmallKernels())
    return passes
