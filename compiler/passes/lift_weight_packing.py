"""LiftWeightPacking: move the weight packing that qiao's CPU GEMM schedules mark out of ``main``.

TVM's ``SplitLayoutRewritePreproc`` splits every packing stage marked
``meta_schedule.layout_rewrite_preproc`` into its own function, and ``LiftTransformParams`` moves
those weight-only calls into ``main_transform_params``, which the runner calls once at load. TVM's
split builds a block scope for every PrimFunc and fails on kernels without compute blocks (qiao's
MoE kernels, TOPI's scan and scatter kernels); in such modules it runs on the kernels that have
marked stages only, and the others are put back unchanged.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from qiao.compiler.schedules.tir_util import has_packing_mark


def split_packing(mod: tvm.IRModule) -> tvm.IRModule:
    """``SplitLayoutRewritePreproc`` over the kernels with packing stages; the rest untouched."""
    try:
        return relax.transform.SplitLayoutRewritePreproc()(mod)
    except tvm.error.InternalError:
        pass
    others = {
        gvar: func
        for gvar, func in mod.functions_items()
        if isinstance(func, tirx.PrimFunc) and not has_packing_mark(func.body)
    }
    if len(others) == sum(isinstance(f, tirx.PrimFunc) for _, f in mod.functions_items()):
        return mod
    part = tvm.IRModule(
        {gvar: func for gvar, func in mod.functions_items() if gvar not in others},
        attrs=mod.attrs,
    )
    part = relax.transform.SplitLayoutRewritePreproc()(part)
    for gvar, func in others.items():
        part[gvar] = func
    return part


@tvm.transform.module_pass(opt_level=0, name="LiftWeightPacking")
class LiftWeightPacking:
    """Split marked weight-packing stages into their own kernels and lift the weight-only calls
    into ``main_transform_params``."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return relax.transform.LiftTransformParams()(split_packing(mod))
