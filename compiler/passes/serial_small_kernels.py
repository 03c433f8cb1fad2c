"""SerialSmallKernels: run a parallel CPU kernel on one core when its work is small.

Waking TVM's thread pool costs about a microsecond on an idle machine and ten or more on a busy one,
more than a small layer's whole kernel (a batch-1 MLP layer, an RMSNorm of one token). Shapes are
often symbolic, so the decision is made at run time: a function with parallel loops becomes

    if work < threshold:  <the same loops, all serial>
    else:                 <the parallel schedule>

where ``work`` counts block executions, a vectorised loop counting once (roughly instructions; a
symbolic expression of the shape variables), and a block with a long body (an exp or sigmoid
polynomial) counting its operations. A kernel written directly in TIR (qiao's quantized
GEMMs, the MoE dispatch) has no blocks inside its root: there each store outside a block counts
one plus the loads of its value, so such a kernel's work is not taken for zero (it was, and the
int4 GEMMs ran on one core). Functions whose work is static are decided at compile time, without
a branch.
"""

from __future__ import annotations

from typing import Any

# Work (block executions, a vectorised loop counting once) below which a kernel stays serial: about
# 20 µs of one core's time, the break-even of waking the pool on a busy machine.
DEFAULT_THRESHOLD = 1 << 16
# A block body of more arithmetic operations than this counts each of them as work.
LONG_BODY_OPS = 16


def _work(stmt, in_block: bool = False):
    """Block executions under ``stmt`` (and stores outside any block) as a PrimExpr, or ``None``
    when it is not a closed product of loop extents (an extent depending on an outer loop)."""
    from tvm import s_tir, tirx

    if stmt is None:
        return tirx.const(0, "int64")
    if isinstance(stmt, tirx.BufferStore):
        # a block's own stores are its one execution; a hand-written kernel's are its work, one
        # unit per value loaded and stored (as a block's reads are)
        return tirx.const(0 if in_block else 1 + _loads(stmt.value), "int64")
    if isinstance(stmt, tirx.For):
        inner = _work(stmt.body, in_block)
        if inner is None:
            return None
        if stmt.kind == tirx.ForKind.VECTORIZED:
            return inner  # one SIMD instruction per lane group
        return tirx.Cast("int64", stmt.extent) * inner
    if isinstance(stmt, tirx.SeqStmt):
        total = tirx.const(0, "int64")
        for s in stmt.seq:
            w = _work(s, in_block)
            if w is None:
                return None
            total = total + w
        return total
    if isinstance(stmt, s_tir.SBlockRealize):
        inner = _work(stmt.block.body, True)
        if inner is None:
            return None
        init = (
            _work(stmt.block.init, True) if stmt.block.init is not None else tirx.const(0, "int64")
        )
        return tirx.const(_block_cost(stmt.block.body), "int64") + inner + (init or 0)
    if isinstance(stmt, tirx.IfThenElse):
        a = _work(stmt.then_case, in_block)
        b = (
            _work(stmt.else_case, in_block)
            if stmt.else_case is not None
            else tirx.const(0, "int64")
        )
        if a is None or b is None:
            return None
        return tirx.Max(a, b)
    body = getattr(stmt, "body", None)
    if body is not None and isinstance(body, tirx.Stmt):
        return _work(body, in_block)
    return tirx.const(0, "int64")


def _block_cost(body) -> int:
    """Work of one execution of a block whose body is ``body``: 1, or its arithmetic operations
    when they are more than ``LONG_BODY_OPS`` (an exp/sigmoid/tanh/erf polynomial from
    ``VectorizableMath``: about 35 operations, a division among them, per SiLU vector). Counted
    as 1, a 96x56x56 SiLU (19 K vectors) stayed on one core: 70 µs against ONNX Runtime's 33."""
    import tvm_ffi
    from tvm import tirx
    from tvm.ir.expr import Call, TensorLoad

    arithmetic = (
        tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.FloorDiv, tirx.FloorMod, tirx.Min, tirx.Max,
        tirx.Select, tirx.Cast, tirx.LT, tirx.LE, tirx.GT, tirx.GE, tirx.EQ, tirx.NE, tirx.And,
        tirx.Or, tirx.Not, Call,
    )  # fmt: skip
    values = []
    while isinstance(body, tirx.LetStmt):  # EagerSelect's loads bound ahead of the store
        values.append(body.value)
        body = body.body
    if not isinstance(body, tirx.BufferStore):
        return 1  # a block of blocks or loops: its inner blocks count themselves
    ops = 0
    for value in [*values, body.value]:
        counted, loads = [], []
        tvm_ffi.structural_walk(value, [(arithmetic, counted.append), (TensorLoad, loads.append)])
        in_indices = []
        for load in loads:
            for index in load.indices:
                tvm_ffi.structural_walk(index, [(arithmetic, in_indices.append)])
        ops += len(counted) - len(in_indices)
    return ops if ops > LONG_BODY_OPS else 1


def _loads(expr) -> int:
    import tvm_ffi
    from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds

    found = []
    tvm_ffi.structural_walk(expr, [(TensorLoad, lambda node: (found.append(1), None)[1])])
    return len(found)


def _has_parallel(stmt) -> bool:
    import tvm_ffi
    from tvm import tirx

    found = []

    def on_for(node):
        if node.kind == tirx.ForKind.PARALLEL:
            found.append(node)

    tvm_ffi.structural_walk(stmt, [(tirx.For, on_for)])
    return bool(found)


def _fresh_buffers(stmt, buffers):
    """``stmt`` with each of ``buffers`` replaced by a new buffer of the same type; and those."""
    from tvm.ir.expr import Var

    from qiao.compiler.schedules.tir_util import replace_vars

    pairs = [(b, Var(b.name + "_serial", b.ty)) for b in buffers]
    return replace_vars(stmt, pairs), [new for _, new in pairs]


def _serial_copy(stmt):
    import tvm_ffi
    from tvm import tirx

    def on_for(value, mutator):
        new = mutator.default_mutate(value)
        if new.kind != tirx.ForKind.PARALLEL:
            return new
        return tirx.For(
            new.loop_var,
            new.min,
            new.extent,
            tirx.ForKind.SERIAL,
            new.body,
            new.thread_binding,
            new.annotations,
        )

    return tvm_ffi.structural_mutate(stmt, [(tirx.For, on_for)])


def _at_least(expr, threshold: int) -> bool:
    """Whether ``expr`` is at least ``threshold`` with every variable at its smallest size, 1."""
    import tvm
    import tvm_ffi
    from tvm.ir.expr import Var

    def on_var(v, _mutator):
        return tvm.tirx.const(1, v.ty.dtype if hasattr(v.ty, "dtype") else "int64")

    low = tvm.sym.Analyzer().simplify(tvm_ffi.structural_mutate(expr, [(Var, on_var)]))
    return isinstance(low, tvm.tirx.IntImm) and int(low.value) >= threshold


def _free_vars_are_params(expr, func) -> bool:
    import tvm_ffi
    from tvm.ir.expr import Var

    allowed = set()
    for p in func.params:
        allowed.add(p.name)
        shape = getattr(p.ty, "shape", None) or []
        for d in shape:
            tvm_ffi.structural_walk(d, [(Var, lambda v: (allowed.add(v.name), None)[1])])
    names = []
    tvm_ffi.structural_walk(expr, [(Var, lambda v: (names.append(v.name), None)[1])])
    return all(n in allowed for n in names)


def serial_when_small(func, threshold: int = DEFAULT_THRESHOLD):
    """``func`` with its parallel loops made serial when its work is below ``threshold`` (a run-time
    branch for symbolic shapes); unchanged when it has no parallel loop."""
    import tvm
    from tvm import s_tir, tirx

    from qiao.compiler.schedules.tir_util import (
        root_statements,
        seq,
        with_root_body,
        written_buffers,
    )

    realize = func.body
    if not isinstance(realize, s_tir.SBlockRealize) or not _has_parallel(realize.block.body):
        return func
    # Weight-packing steps stay first and untouched: the pipeline lifts them out of the function
    # (SplitLayoutRewritePreproc needs them as leading statements of the root block).
    root, lead, rest = root_statements(func)
    if not rest:
        return func
    compute = seq(rest)
    if not _has_parallel(compute):
        return func
    allocs = list(root.alloc_buffers)
    work = _work(compute)
    if work is None or not _free_vars_are_params(work, func):
        return func
    work = tvm.sym.Analyzer().simplify(work)
    if isinstance(work, tirx.IntImm):
        if int(work.value) >= threshold:
            return func
        compute = _serial_copy(compute)
    elif _at_least(work, threshold):
        # Large even when every symbolic dimension is 1: no serial case exists (and a branch that
        # can only be taken at size 0 makes TVM's simplifier fold divisions by zero in it).
        return func
    else:
        # The serial copy gets buffers of its own: shared by both branches, a task's scratch
        # buffer would be allocated once for the whole function, at full size (on the heap for
        # a symbolic size) rather than per task. Buffers the leading packing steps write are
        # inputs to both branches and stay shared.
        packed = written_buffers(lead)
        scratch = [b for b in root.alloc_buffers if not any(b.same_as(p) for p in packed)]
        serial, fresh = _fresh_buffers(_serial_copy(compute), scratch)
        allocs = [*allocs, *fresh]
        compute = tirx.IfThenElse(work < tirx.const(threshold, "int64"), serial, compute)
    # The serial copy re-defines the loop and block variables of the parallel one.
    return with_root_body(func, seq([*lead, compute]), allocs)


def _make_pass():
    import tvm
    from tvm import tirx

    from qiao.compiler.passes.apply_schedule_rules import with_functions

    @tvm.ir.transform.module_pass(opt_level=0, name="SerialSmallKernels")
    class _SerialSmallKernels:
        def __init__(self, threshold):
            self.threshold = threshold

        def transform_module(self, mod, _ctx):
            updates = {}
            for gvar, func in mod.functions_items():
                if isinstance(func, tirx.PrimFunc):
                    new = serial_when_small(func, self.threshold)
                    if not new.same_as(func):
                        updates[gvar] = new
            return with_functions(mod, updates)

    return _SerialSmallKernels


_PASS = None


def SerialSmallKernels(threshold: int = DEFAULT_THRESHOLD) -> Any:  # noqa: N802 - like TVM's
    """Module pass applying ``serial_when_small`` to every PrimFunc.

    Parameters
    ----------
    threshold : int
        Block executions below which a kernel runs serially.

    Returns
    -------
    tvm.transform.Pass
    """
    global _PASS
    if _PASS is None:
        _PASS = _make_pass()
    return _PASS(threshold)
