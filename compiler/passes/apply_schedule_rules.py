"""ApplyScheduleRules: schedule every PrimFunc of a module with a target's rule set.

Like TVM's ``dlight.ApplyDefaultSchedule`` (the first rule that applies wins, the result is marked
scheduled), plus what qiao needs:

* functions already marked scheduled are left alone under either spelling of the attribute
  (``tirx.is_scheduled``, TVM 0.27's, or ``tir.is_scheduled``, older TVM's) — the MoE lowering
  writes pre-scheduled kernels;
* a tuning database is consulted first: a function whose workload was tuned on this device gets the
  tuned schedule, and with ``tune_trials`` a GEMM-like function not tuned yet is tuned on the spot
  and recorded (see ``qiao.compiler.schedules.tuning``);
* a rule that fails on an unexpected function is logged and the next rule is tried, so one odd
  kernel never fails a whole compile (``strict=True`` re-raises instead; the tests use it);
* each kernel is told which of its parameters ``main`` binds to the model's inputs or values
  computed from them (``tir_util.ACTIVATION_PARAMS``), so that the CPU GEMM rules never take a
  static-shaped activation for a weight.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("qiao.schedules")

SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")


def is_scheduled(func) -> bool:
    """Whether ``func`` carries a truthy ``tirx.is_scheduled`` / ``tir.is_scheduled`` attribute."""
    attrs = getattr(func, "attrs", None)
    if attrs is None:
        return False
    for key in SCHEDULED_ATTRS:
        if key in attrs and bool(attrs[key]):
            return True
    return False


def _has_parallel_loop(func) -> bool:
    """Whether ``func`` already runs a loop in parallel (a kernel written scheduled)."""
    import tvm_ffi
    from tvm import tirx

    kinds = []
    tvm_ffi.structural_walk(func.body, [(tirx.For, lambda f: (kinds.append(f.kind), None)[1])])
    return tirx.ForKind.PARALLEL in kinds


def with_functions(mod, updates):
    """A new module: ``mod`` with the functions in ``updates`` replaced (the input module may be
    shared with the caller, so passes do not mutate it)."""
    import tvm

    if not updates:
        return mod
    functions = dict(mod.functions_items())
    functions.update(updates)
    return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)


def primfunc_rewrite_pass(name: str, rewrite):
    """A module pass named ``name`` that replaces every PrimFunc ``f`` with ``rewrite(f)``
    (functions that ``rewrite`` returns unchanged are kept as they are)."""
    import tvm
    from tvm import tirx

    def transform(mod, _ctx):
        updates = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                new = rewrite(func)
                if not new.same_as(func):
                    updates[gvar] = new
        return with_functions(mod, updates)

    return tvm.ir.transform.module_pass(transform, opt_level=0, name=name)


def _make_pass():
    import tvm
    from tvm import tirx

    @tvm.ir.transform.module_pass(opt_level=0, name="ApplyScheduleRules")
    class _ApplyScheduleRules:
        def __init__(self, rules, database, tune_trials, strict):
            self.rules = list(rules)
            self.database = database
            self.tune_trials = tune_trials
            self.strict = strict

        def transform_module(self, mod, _ctx):
            from qiao.compiler.passes.lift_weight_packing import activation_params
            from qiao.compiler.schedules.tir_util import ACTIVATION_PARAMS

            updates = {}
            bound = activation_params(mod)
            for gvar, func in mod.functions_items():
                if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                    continue
                inputs = [i for i in range(len(func.params)) if (gvar, i) in bound]
                if inputs:
                    func = func.with_attr(ACTIVATION_PARAMS, inputs)
                target = func.attrs.get("target") if func.attrs else None
                target = target or tvm.target.Target.current(allow_none=False)
                scheduled = self._schedule(gvar.name_hint, func, target)
                if scheduled is not None:
                    updates[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
            return with_functions(mod, updates)

        def _schedule(self, name, func, target):
            if self.database is not None:
                tuned = self.database.schedule(func, target, tune_trials=self.tune_trials)
                if tuned is not None:
                    return tuned
            for rule in self.rules:
                if hasattr(rule, "is_target_available") and not rule.is_target_available(target):
                    continue
                try:
                    sch = rule.apply(func, target, False)
                except Exception as err:
                    if self.strict:
                        raise
                    log.warning(
                        "schedule rule %s failed on %s (%s: %s); trying the next rule",
                        type(rule).__name__,
                        name,
                        type(err).__name__,
                        str(err).strip().splitlines()[-1] if str(err).strip() else "",
                    )
                    continue
                if sch is None:
                    continue
                if isinstance(sch, list):
                    sch = sch[0]
                return sch.mod["main"]
            if _has_parallel_loop(func):
                # Written scheduled (TVM's IRBuilder scan/sort kernels): nothing for a rule to do.
                log.debug("no schedule rule applies to %s: kept as written (parallel)", name)
            else:
                # The kernel is compiled as TVM's serial scalar loop nest.
                log.warning(
                    "no schedule rule applies to %s: it stays an unscheduled loop nest", name
                )
            return None

    return _ApplyScheduleRules


_PASS_CLASS = None


def ApplyScheduleRules(  # noqa: N802 - a pass constructor, named like TVM's
    rules: Sequence[Any],
    database: Any = None,
    tune_trials: int = 0,
    strict: bool = False,
):
    """Module pass scheduling each unscheduled PrimFunc with the first rule that applies.

    Parameters
    ----------
    rules : sequence of schedule rules
        Objects with ``apply(func, target, tunable) -> Schedule | list | None`` (TVM dlight's
        protocol) and optionally ``is_target_available(target)``.
    database : qiao.compiler.schedules.tuning.TuningDatabase, optional
        Tuned schedules of this device, tried before the rules.
    tune_trials : int
        When positive, functions the database can tune but has no record for are tuned with this
        many trials first (slow; ``qiao compile --tune``).
    strict : bool
        Re-raise a failing rule's error instead of trying the next rule.

    Returns
    -------
    tvm.transform.Pass
    """
    global _PASS_CLASS
    if _PASS_CLASS is None:
        _PASS_CLASS = _make_pass()
    return _PASS_CLASS(rules, database, tune_trials, strict)
