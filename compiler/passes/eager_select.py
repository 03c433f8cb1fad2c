"""EagerSelect: the loads in a ``Select``'s operands are made before the select, in blocks indexed
through a division by a symbolic extent, so that no integer division is left conditional.

TVM's ``RewriteUnsafeSelect`` turns a ``Select`` whose operands load from buffers into a lazy
``if_then_else``: ``Where(c, x, y)`` with ``y`` broadcast over a fused loop of symbolic extent
``M`` reads ``y[fused % M * M + i]`` only where ``c`` is false, and the ``urem`` by ``M`` (which
may trap: not speculated) goes into that branch. LLVM's loop vectoriser (the LLVM of TVM 0.27's
wheel, on AVX2 targets) then computes the ``urem`` only when the *first* SIMD lane's condition
holds and uses it for every lane (a ``poison`` address otherwise): where the first lane takes
``x`` and another lane takes ``y``, the masked load of ``y`` reads from nowhere: wrong values,
or a segfault. Found by ``qiao.compiler.fuzzing`` as ``Where(x >= 0, x, y)``, ``x`` of shape
``[1, M, M, M, 1]`` and ``y`` of ``[M, M, 1]`` (an int64 case gave wrong values at ``M = 4``;
TVM's own ``tvm.compile`` of the same kernel with ``mcpu=x86-64-v3`` does too, with the
baseline x86-64 it does not).

TIR's ``Select`` evaluates both operands (the lazy form is ``if_then_else``), so binding the
operands' loads to variables at the top of the block body keeps its meaning; LLVM then emits a
branchless ``select`` over two plain vector loads. Only blocks whose iterator bindings divide by
a non-constant are rewritten (a division by a constant is speculated and hoisted by LLVM), only
loads whose indices load nothing, only operands without a nested ``if_then_else`` or ``Let``,
and not inside loops TVM vectorises itself.
"""

from __future__ import annotations

from typing import Any


def _divides_by_symbol(expr) -> bool:
    import tvm_ffi
    from tvm import tirx

    found = []

    def on_div(node):
        if not isinstance(node.b, tirx.IntImm):
            found.append(node)

    tvm_ffi.structural_walk(expr, [((tirx.FloorDiv, tirx.FloorMod, tirx.Div, tirx.Mod), on_div)])
    return bool(found)


def _load_free(expr) -> bool:
    import tvm_ffi
    from tvm import ir

    loads = []
    tvm_ffi.structural_walk(expr, [(ir.TensorLoad, loads.append)])
    return not loads


def _eager_select(store, suffix: str):
    """``(binds, store)``: the loads in the operands of ``store``'s outermost ``Select``s bound to
    variables first (``binds``), or ``None`` when there is nothing to hoist or an operand holds
    something that must stay lazy (an ``if_then_else``, a ``Let``, a load through a load)."""
    import tvm_ffi
    from tvm import ir, tirx

    binds = []
    unsafe = []

    def on_load(load, _mutator):
        if not all(_load_free(i) for i in load.indices):
            unsafe.append(load)
            return load
        var = tirx.Var(f"{load.source.name}_{suffix}{len(binds)}", load.ty)
        binds.append(tirx.Bind(var, load))
        return var

    def on_lazy(node, _mutator):
        unsafe.append(node)
        return node

    def operand(expr):
        return tvm_ffi.structural_mutate(
            expr,
            [
                (ir.TensorLoad, on_load),
                (tirx.Let, on_lazy),
                (ir.expr.Call, on_call_in_operand),
            ],
        )

    if_then_else = ir.Op.get("prim.if_then_else")

    def on_call_in_operand(call, mutator):
        if call.op.same_as(if_then_else):
            unsafe.append(call)
            return call
        return mutator.default_mutate(call)

    def on_select(select, _mutator):  # the condition is evaluated anyway: left as it is
        return tirx.Select(
            select.condition, operand(select.true_value), operand(select.false_value)
        )

    value = tvm_ffi.structural_mutate(store.value, [(tirx.Select, on_select)])
    if unsafe or not binds:
        return None
    return binds, tirx.BufferStore(store.buffer, value, store.indices)


def eager_select(func):
    """``func`` with the loads of ``Select`` operands evaluated before the select in every block
    indexed through a division by a symbolic extent (see the module docstring)."""
    import tvm_ffi
    from tvm import s_tir, tirx

    def on_for(loop, mutator):
        if loop.kind == tirx.ForKind.VECTORIZED:
            return loop  # TVM's vectoriser scalarises some bodies: no new bindings there
        return mutator.default_mutate(loop)

    def on_realize(realize, mutator):
        new = mutator.default_mutate(realize)
        block = new.block
        if block.init is not None or not isinstance(block.body, tirx.BufferStore):
            return new
        if not any(_divides_by_symbol(value) for value in new.iter_values):
            return new
        eager = _eager_select(block.body, "v")
        if eager is None:
            return new
        binds, store = eager
        return s_tir.SBlockRealize(
            new.iter_values,
            new.predicate,
            s_tir.SBlock(
                block.iter_vars,
                block.reads,
                block.writes,
                block.name_hint,
                tirx.SeqStmt([*binds, store]),
                block.init,
                block.alloc_buffers,
                block.match_buffers,
                block.annotations,
            ),
        )

    return tvm_ffi.structural_mutate(func, [(tirx.For, on_for), (s_tir.SBlockRealize, on_realize)])


def EagerSelect() -> Any:  # noqa: N802 - a pass constructor, named like TVM's
    """Module pass applying ``eager_select`` to every PrimFunc.

    Returns
    -------
    tvm.transform.Pass
    """
    from qiao.compiler.passes.apply_schedule_rules import primfunc_rewrite_pass

    return primfunc_rewrite_pass("EagerSelect", eager_select)
