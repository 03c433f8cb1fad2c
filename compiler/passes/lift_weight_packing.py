"""LiftWeightPacking: move the weight packing that qiao's CPU GEMM schedules mark out of ``main``.

TVM's ``SplitLayoutRewritePreproc`` splits every packing stage marked
``meta_schedule.layout_rewrite_preproc`` into its own function, and ``LiftTransformParams`` moves
those weight-only calls into ``main_transform_params``, which the runner calls once at load. TVM's
split builds a block scope for every PrimFunc and fails on kernels without compute blocks (qiao's
pre-scheduled MoE kernels, marked ``tirx.is_scheduled``; TOPI's scan and scatter kernels); such
modules keep their packing inside the kernels (correct, only repeated per call).
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

_SCHEDULED = ("tirx.is_scheduled", "tir.is_scheduled")


def _has_prescheduled_kernels(mod: tvm.IRModule) -> bool:
    for func in mod.functions.values():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None:
            if any(key in func.attrs and bool(func.attrs[key]) for key in _SCHEDULED):
                return True
    return False


@tvm.transform.module_pass(opt_level=0, name="LiftWeightPacking")
class LiftWeightPacking:
    """Split marked weight-packing stages and lift weight-only work into
    ``main_transform_params`` (see the module docstring for when the split is skipped)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not _has_prescheduled_kernels(mod):
            try:
                mod = relax.transform.SplitLayoutRewritePreproc()(mod)
            except tvm.error.InternalError:
                pass  # a kernel without compute blocks (scan, scatter): keep packing in place
        return relax.transform.LiftTransformParams()(mod)
