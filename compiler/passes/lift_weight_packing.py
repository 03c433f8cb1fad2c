"""LiftWeightPacking: move the weight packing that qiao's CPU GEMM schedules mark out of ``main``.

TVM's ``SplitLayoutRewritePreproc`` splits every packing stage marked
``meta_schedule.layout_rewrite_preproc`` into its own function, and ``LiftTransformParams`` moves
those weight-only calls into ``main_transform_params``, which the runner calls once at load. TVM's
split builds a block scope for every PrimFunc and fails on kernels without compute blocks (qiao's
MoE kernels, TOPI's scan and scatter kernels); in such modules it runs on the kernels that have
marked stages only, and the others are put back unchanged.

The schedules mark the packing of any static-shaped parameter (a kernel cannot tell a weight from
a model input). Before the split, the stages whose parameter is bound to a model input, or to a
value computed from one, lose their mark: a static-shaped model's activations (``x: [1, 4096]``
against a dense layer's weight) were packed in the same lifted function as the weight, which then
depended on the input, stayed in ``main`` and repacked the weight on every call (AlexNet at batch
1: 13 of 30 ms).
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from qiao.compiler.schedules.tir_util import PACKING_MARK, has_packing_mark, packing_first


def _depends(expr, live: set) -> bool:
    return any(v in live for v in relax.analysis.free_vars(expr))


def _unmarked(body, inputs: list):
    """``body`` without the packing mark on the blocks that read one of ``inputs``."""
    import tvm_ffi
    from tvm import s_tir

    def on_block(block, mutator):
        marks = dict(block.annotations or {})
        if PACKING_MARK not in marks or not any(
            r.source.same_as(b) for r in block.reads for b in inputs
        ):
            return mutator.default_mutate(block)
        del marks[PACKING_MARK]
        return s_tir.SBlock(
            block.iter_vars, block.reads, block.writes, block.name_hint, block.body,
            block.init, block.alloc_buffers, block.match_buffers, marks,
        )  # fmt: skip

    return tvm_ffi.structural_mutate(body, [(s_tir.SBlock, on_block)])


def activation_params(mod: tvm.IRModule) -> set:
    """``(kernel, parameter index)`` pairs that some call in a Relax function with a ``num_input``
    attribute binds to a model input or to a value computed from one."""
    out = set()
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function) or "num_input" not in (func.attrs or {}):
            continue
        live = set(func.params[: int(func.attrs["num_input"])])
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                    args = value.args
                    if value.op.name.startswith("relax.call_tir") and len(args) >= 2:
                        kernel, fields = args[0], args[1]
                        fields = fields.fields if isinstance(fields, relax.Tuple) else [fields]
                        out.update((kernel, i) for i, a in enumerate(fields) if _depends(a, live))
                if _depends(value, live):
                    live.add(binding.var)
    return out


def unmark_activation_packing(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with the packing mark taken off the stages that pack a model input (see the module
    docstring); the remaining marked stages are moved to lead their kernels again."""
    bound = activation_params(mod)
    if not bound:
        return mod
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or not has_packing_mark(func.body):
            continue
        inputs = [p for i, p in enumerate(func.params) if (gvar, i) in bound]  # buffers
        body = _unmarked(func.body, inputs) if inputs else func.body
        if not body.same_as(func.body):
            mod[gvar] = packing_first(func.with_body(body))
    return mod


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
    """Split marked weight-packing stages (of weights, not model inputs) into their own kernels
    and lift the weight-only calls into ``main_transform_params``."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        mod = unmark_activation_packing(mod)
        mod = relax.transform.LiftTransformParams()(split_packing(mod))
        # Packing of a weight small enough to be a constant (under PARAM_MIN_ELEMENTS) is not
        # lifted (it reads no parameter): computed here, once, at compile time.
        return relax.transform.FoldConstant()(mod)
