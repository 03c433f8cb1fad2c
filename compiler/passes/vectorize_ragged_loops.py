"""VectorizeRaggedLoops: keep vectorised loops vector when only their last iteration is ragged.

Splitting a symbolic extent (a dynamic sequence length) by the SIMD width leaves a predicate such
as ``base + lane < seq`` on the block inside the vectorised loop. TVM's vectoriser turns a
lane-dependent predicate into one scalar loop for every iteration, full vectors included. This pass
rewrites each such loop as

    if <every lane passes>:  vectorised loop, without the lane-dependent conditions
    else:                    the original loop, serial (the ragged tail)

The conditions come from tiling, so they are affine in the lane and monotone: every lane passes
when the first and the last lane do.
"""

from __future__ import annotations

from typing import Any


def _conjuncts(expr) -> list:
    from tvm import tirx

    if isinstance(expr, tirx.And):
        return _conjuncts(expr.a) + _conjuncts(expr.b)
    return [expr]


def _substitute(expr, var, value):
    import tvm_ffi
    from tvm.ir.expr import Var

    def on_var(node, _mutator):
        return value if node.same_as(var) else node

    return tvm_ffi.structural_mutate(expr, [(Var, on_var)])


def _all(conds):
    from tvm import tirx

    out = conds[0]
    for c in conds[1:]:
        out = tirx.And(out, c)
    return out


def fresh_block(block, suffix: str):
    """A copy of ``block`` with new iterator variables (a block variable is defined only once)."""
    import tvm_ffi
    from tvm import s_tir, tirx
    from tvm.ir.expr import Var

    mapping = []
    iter_vars = []
    for iv in block.iter_vars:
        var = tirx.Var(iv.var.name + suffix, iv.var.ty)
        mapping.append((iv.var, var))
        iter_vars.append(tirx.IterVar(iv.dom, var, iv.iter_type, iv.thread_tag))

    def on_var(value, _mutator):
        for old, new in mapping:
            if value.same_as(old):
                return new
        return value

    def sub(x):
        return tvm_ffi.structural_mutate(x, [(Var, on_var)])

    return s_tir.SBlock(
        iter_vars,
        [sub(r) for r in block.reads],
        [sub(w) for w in block.writes],
        block.name_hint + suffix,
        sub(block.body),
        None if block.init is None else sub(block.init),
        block.alloc_buffers,
        block.match_buffers,
        block.annotations,
    )


def split_ragged_vector_loops(func):
    """``func`` with every vectorised loop over a lane-predicated block rewritten (module doc)."""
    import tvm
    import tvm_ffi
    from tvm import s_tir, tirx

    from qiao.compiler.schedules.tir_util import uses_var

    changed = []

    def on_for(value, mutator):
        new = mutator.default_mutate(value)
        if new.kind != tirx.ForKind.VECTORIZED or not isinstance(new.body, s_tir.SBlockRealize):
            return new
        realize = new.body
        lane = new.loop_var
        conds = _conjuncts(realize.predicate)
        ragged = [c for c in conds if uses_var(c, lane)]
        if not ragged:
            return new
        steady = [c for c in conds if not uses_var(c, lane)]
        first = new.min
        last = new.min + new.extent - 1
        all_lanes = _all(
            [_substitute(c, lane, first) for c in ragged]
            + [_substitute(c, lane, last) for c in ragged]
        )
        vector = tirx.For(
            new.loop_var,
            new.min,
            new.extent,
            tirx.ForKind.VECTORIZED,
            s_tir.SBlockRealize(
                realize.iter_values,
                _all(steady) if steady else tirx.const(True, "bool"),
                realize.block,
            ),
            new.thread_binding,
            new.annotations,
        )
        tail = tirx.For(
            new.loop_var,
            new.min,
            new.extent,
            tirx.ForKind.SERIAL,
            s_tir.SBlockRealize(
                realize.iter_values, realize.predicate, fresh_block(realize.block, "_tail")
            ),
            new.thread_binding,
            new.annotations,
        )
        changed.append(True)
        return tirx.IfThenElse(all_lanes, vector, tail)

    out = tvm_ffi.structural_mutate(func, [(tirx.For, on_for)])
    if not changed:
        return func
    # The tail re-defines the loop variable of the vector part.
    return tirx.transform.ConvertSSA()(tvm.IRModule({"main": out}))["main"]


def VectorizeRaggedLoops() -> Any:  # noqa: N802 - a pass constructor, named like TVM's
    """Module pass applying ``split_ragged_vector_loops`` to every PrimFunc.

    Returns
    -------
    tvm.transform.Pass
    """
    from qiao.compiler.passes.apply_schedule_rules import primfunc_rewrite_pass

    return primfunc_rewrite_pass("VectorizeRaggedLoops", split_ragged_vector_loops)
