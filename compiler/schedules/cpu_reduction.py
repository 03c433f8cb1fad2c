"""Row-wise reductions on the CPU: softmax, RMSNorm, LayerNorm, mean/sum/max over the last axes.

The pattern is a chain of blocks over the same rows (leading spatial axes): reductions over the
trailing axes (``max``, ``sum``) and elementwise blocks between and after them. Per row, on one
core, everything runs back to back while the row is in L1:

    for row in parallel(rows):
        acc[lanes] = identity; for chunk: acc[:] = op(acc[:], x[row, chunk*lanes : +lanes])   # SIMD
        r = op-reduce(acc)                                                                   # lanes
        ... elementwise blocks over the row, vectorised ...

TVM's CPU ``Reduction`` rule keeps each reduction a serial chain of scalar adds (LLVM may not
reassociate floating point); here a static reduction axis is split by the SIMD width and
``rfactor``-ed, so the partial results are one vector per row. A symbolic row length (softmax over a
dynamic sequence) keeps the scalar chain for the reductions (its elementwise blocks are still
vectorised): a ragged split needs a predicate that TVM's ``compute_at`` drops from ``rfactor``
blocks.
"""

from __future__ import annotations

import logging

from qiao.compiler.schedules.cpu_info import CPURule, cpu_info

log = logging.getLogger("qiao.schedules")


def _leading_spatial(kinds: str) -> int:
    return len(kinds) - len(kinds.lstrip("S"))


class CPURowReduction(CPURule):
    """Schedule rule for row-wise reduction chains (see the module docstring)."""

    def apply(self, func, target, tunable: bool):
        from tvm import s_tir

        try:
            return self._apply(func, target, keep_compound_rows=False)
        except (s_tir.ScheduleError, ValueError) as err:
            # Row loops whose extent divides or subtracts (a softmax over ``samples // 10 - 1``
            # frames): fused into one, their bindings get a bounds predicate the analyzer cannot
            # drop (it cannot tell the extent is positive), and ``parallel`` refuses the blocks.
            # Again with those rows kept inside the fused leading ones.
            log.debug("row reduction: fused rows failed (%s); keeping compound rows", err)
            return self._apply(func, target, keep_compound_rows=True)

    def _apply(self, func, target, keep_compound_rows: bool):
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if not infos or len(infos) < 2 and infos[0].is_injective():
            return None
        if all(info.is_injective() for info in infos):
            return None
        _unit_rows_back(sch, infos)
        rows = None
        for info in infos:
            kinds = info.dom_kind()
            lead = _leading_spatial(kinds)
            if lead == 0 or (not info.is_injective() and set(kinds[lead:]) != {"R"}):
                return None
            rows = lead if rows is None else min(rows, lead)
        for info in infos:
            if not info.is_injective() and _leading_spatial(info.dom_kind()) != rows:
                return None
            if not info.is_injective() and _operands_over_reduction(sch.get(info.block_rv)) > 1:
                return None  # a product (GEMV-like), not a reduction of one row
        if not infos[-1].is_injective() and len(infos) > 1:
            return None
        cpu = cpu_info(target)
        last = infos[-1]
        dtype = str(sch.get(last.block_rv).writes[0].source.dtype)
        if not dtype.startswith("float"):
            return None
        lanes = cpu.lanes(dtype)
        # Reductions first, while each block still sits under its own loop nest (rfactor needs it).
        reductions, partials, guards = [], [], []
        for info in infos:
            if info.is_injective():
                continue
            blocks, guard = _vector_rfactor(sch, info.block_rv, rows, lanes)
            reductions.append(blocks)
            partials.extend(blocks[:-1])
            if guard is not None:
                guards.append(guard)
        loops = sch.get_loops(last.block_rv)
        # The row loops fuse into one parallel loop (with ``keep_compound_rows``, only those
        # before the first whose extent divides or subtracts, at least one; see ``apply``).
        fused = rows
        if keep_compound_rows:
            compound = [i for i in range(rows) if _divides(sch.get(loops[i]).extent)]
            fused = max(compound[0], 1) if compound else rows
        if fused < rows and len(loops) <= rows:
            # The last block has no loop of its own (a mean over run-time axes): its innermost
            # row loop would be the vector loop as well as where the reductions go. Declined.
            return None
        parallel = sch.fuse(*loops[:fused]) if fused > 1 else loops[0]
        depth = 1 + rows - fused  # loops down to the innermost row loop
        row = sch.get_loops(last.block_rv)[depth - 1]
        if last.is_injective():
            _vectorize_inner(sch, last.block_rv, lanes, first=1)
        for info in reversed(infos[:-1]):
            blocks = reductions.pop() if not info.is_injective() else [info.block_rv]
            for block in reversed(blocks):
                sch.compute_at(block, row, preserve_unit_loops=True)
        sch.parallel(parallel)
        for info in infos[:-1]:
            if info.is_injective():
                _vectorize_inner(sch, info.block_rv, lanes, first=1)
        for partial in partials:
            # Under the row loop the partial block iterates (lanes, ..., outer): put the SIMD lanes
            # innermost, so that each step of the reduction is one vector operation.
            p_loops = sch.get_loops(partial)[depth:]
            lane = next(
                lp
                for lp in p_loops
                if isinstance(sch.get(lp).extent, tirx.IntImm)
                and int(sch.get(lp).extent.value) == lanes
            )
            if sch.get(p_loops[-1]).same_as(sch.get(lane)):
                outer = p_loops[-2]  # the lanes are innermost already (the block kept its nest)
            else:
                outer = p_loops[-1]
                sch.reorder(outer, lane)
            sch.vectorize(lane)
            init = sch.decompose_reduction(partial, outer)
            sch.vectorize(sch.get_loops(init)[-1])
        if guards:
            return s_tir.Schedule(_restore_tail_guards(sch.mod["main"], guards))
        return sch


def _unit_rows_back(sch, infos) -> None:
    """Give the elementwise blocks back the unit row loops their normalisation dropped.

    Over a single row (a softmax over ``[1, 1000]``: a classifier's head at batch 1) the
    reductions keep their unit row loop and the elementwise blocks lose it, so the row loop of
    the last block would be its 1000 positions: each would run the whole row's reductions again
    (a 1000-class softmax took 180 us; 1.3 us with the row). One unit loop is added above each
    elementwise block per row loop it lacks."""
    from tvm import tirx

    reduction = next(i for i in infos if not i.is_injective())
    lead = _leading_spatial(reduction.dom_kind())
    red_loops = sch.get_loops(reduction.block_rv)
    unit = [
        isinstance(sch.get(lp).extent, tirx.IntImm) and int(sch.get(lp).extent.value) == 1
        for lp in red_loops[:lead]
    ]
    if not lead or not all(unit):
        return
    for info in infos:
        if not info.is_injective():
            continue
        missing = len(red_loops) - len(sch.get_loops(info.block_rv))
        for _ in range(max(0, min(missing, lead))):
            sch.add_unit_loop(info.block_rv)  # innermost: moved outermost
            loops = sch.get_loops(info.block_rv)
            sch.reorder(loops[-1], *loops[:-1])


def _divides(extent) -> bool:
    """Whether ``extent`` holds a division, modulo or subtraction."""
    import tvm_ffi
    from tvm import tirx

    found = []
    kinds = (tirx.FloorDiv, tirx.FloorMod, tirx.Div, tirx.Mod, tirx.Sub)
    tvm_ffi.structural_walk(extent, [(kind, found.append) for kind in kinds])
    return bool(found)


def _operands_over_reduction(block) -> int:
    """How many read regions of ``block`` are indexed by a reduction iterator."""
    from tvm import tirx

    reduce = {iv.var.name for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    from qiao.compiler.schedules.tir_util import var_names

    count = 0
    for region in block.reads:
        names = set().union(*(var_names(rng.min) for rng in region.region))
        count += bool(reduce.intersection(names))
    return count


def _vector_rfactor(sch, block, rows: int, lanes: int) -> list:
    """Split the reduction of ``block`` by ``lanes`` and rfactor it into a SIMD partial block.
    Returns ``[partial, final]`` (or ``[block]`` when the reduction is too short to split)."""
    from tvm import tirx

    loops = sch.get_loops(block)
    red = loops[rows:]
    fused = sch.fuse(*red) if len(red) > 1 else red[0]
    extent = sch.get(fused).extent
    if isinstance(extent, tirx.IntImm) and int(extent.value) < 2 * lanes:
        return [block], None
    outer, inner = sch.split(fused, [None, lanes])
    try:
        partial = sch.rfactor(inner, factor_axis=rows)
    except Exception as err:  # a reduction rfactor cannot express (non-commutative init)
        log.debug("row reduction: rfactor failed: %s", err)
        return [block], None
    ragged = not isinstance(extent, tirx.IntImm) or int(extent.value) % lanes
    guard = (sch.get(partial).name_hint, extent, lanes) if ragged else None
    return [partial, block], guard


def _restore_tail_guards(func, guards):
    """Give ragged ``rfactor`` blocks back their tail guard, as a peeled last step.

    ``compute_at`` regenerates a partial block's loops from its iteration domain and drops the
    predicate ``outer * lanes + lane < extent`` that the ragged split gave it (TVM 0.27); without it
    the last vector of a row would read past the row, and with it inside the vector loop nothing
    vectorises. So the loop over ``outer`` is split in two: the full vectors, unguarded and
    vectorised, then at most one guarded scalar step. ``guards`` holds ``(partial block name,
    reduction extent, lanes)``.
    """
    import tvm
    import tvm_ffi
    from tvm import s_tir, tirx

    from qiao.compiler.passes.vectorize_ragged_loops import fresh_block
    from qiao.compiler.schedules.tir_util import uses_var

    wanted = {f"{name}_update": (extent, lanes) for name, extent, lanes in guards}

    def chain(loop):
        """The For chain under ``loop`` down to a wanted block realize, or None."""
        loops, node = [loop], loop.body
        while isinstance(node, tirx.For):
            loops.append(node)
            node = node.body
        if isinstance(node, s_tir.SBlockRealize) and node.block.name_hint in wanted:
            return loops, node
        return None

    def rebuild(loops, realize, predicate, vectorized: bool):
        block = realize.block if vectorized else fresh_block(realize.block, "_tail")
        node = s_tir.SBlockRealize(realize.iter_values, predicate, block)
        for lp in reversed(loops[1:]):
            kind = lp.kind
            if kind == tirx.ForKind.VECTORIZED and not vectorized:
                kind = tirx.ForKind.SERIAL
            node = tirx.For(
                lp.loop_var, lp.min, lp.extent, kind, node, lp.thread_binding, lp.annotations
            )
        return node

    def on_for(value, mutator):
        new = mutator.default_mutate(value)
        found = chain(new)
        if found is None:
            return new
        loops, realize = found
        extent, lanes = wanted[realize.block.name_hint]
        lane = outer = None
        for iv, binding in zip(realize.block.iter_vars, realize.iter_values):
            if iv.iter_type == tirx.IterVar.CommReduce:
                outer = binding
            elif lane is None:
                lane = binding  # rfactor puts the factored (lane) iterator first
        if outer is None or lane is None or not uses_var(outer, new.loop_var):
            return new
        full = tirx.FloorDiv(extent, tirx.const(lanes, extent.ty.dtype))
        guard = outer * lanes + lane < extent
        main = tirx.For(
            new.loop_var,
            new.min,
            full,
            new.kind,
            rebuild(loops, realize, tirx.const(True, "bool"), vectorized=True),
            new.thread_binding,
            new.annotations,
        )
        tail = tirx.For(
            new.loop_var,
            full,
            new.min + new.extent - full,
            new.kind,
            rebuild(loops, realize, guard, vectorized=False),
            new.thread_binding,
            new.annotations,
        )
        return tirx.SeqStmt([main, tail])

    out = tvm_ffi.structural_mutate(func, [(tirx.For, on_for)])
    # The tail re-defines the loop variables of the full-vector part.
    return tirx.transform.ConvertSSA()(tvm.IRModule({"main": out}))["main"]


def _is_true(expr) -> bool:
    from tvm import tirx

    return (
        isinstance(expr, (bool, int))
        and bool(expr)
        or (isinstance(expr, tirx.IntImm) and int(expr.value) == 1)
    )


def _vectorize_inner(sch, block, lanes: int, first: int) -> None:
    """Vectorise the innermost loop of an elementwise block (static or symbolic extent)."""
    from tvm import tirx

    from qiao.compiler.schedules.cpu import vector_split

    loops = sch.get_loops(block)
    if len(loops) <= first:
        return
    inner = loops[-1]
    if isinstance(sch.get(inner).extent, tirx.IntImm):
        vector_split(sch, inner, lanes)
    else:
        _, vec = sch.split(inner, [None, lanes])
        sch.vectorize(vec)
