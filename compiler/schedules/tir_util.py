"""Small TIR helpers shared by the CPU rules and passes."""

from __future__ import annotations

# Block annotation of a weight-packing stage: the pipeline lifts such leading stages to load time
# (TVM's SplitLayoutRewritePreproc, then LiftTransformParams).
PACKING_MARK = "meta_schedule.layout_rewrite_preproc"
# PrimFunc attribute: indices of the parameters some call binds to a model input or to a value
# computed from one (``ApplyScheduleRules`` sets it from ``main``). A static-shaped activation
# (every tensor of a model exported with a fixed batch) looks like a weight to a kernel otherwise.
ACTIVATION_PARAMS = "qiao.activation_params"


def static_int(expr) -> int | None:
    """The value of an integer constant, ``None`` for a symbolic expression."""
    from tvm import tirx

    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def var_names(expr) -> set[str]:
    """Names of the variables ``expr`` mentions."""
    import tvm_ffi
    from tvm.ir.expr import Var

    names: set[str] = set()
    tvm_ffi.structural_walk(expr, [(Var, lambda v: (names.add(v.name), None)[1])])
    return names


def uses_var(expr, var) -> bool:
    """Whether ``expr`` mentions the variable ``var`` (by identity, not name)."""
    import tvm_ffi
    from tvm.ir.expr import Var

    hits = []
    tvm_ffi.structural_walk(expr, [(Var, lambda v: (hits.append(v.same_as(var)), None)[1])])
    return any(hits)


def wrap_free_lanes(block, var, lanes: int) -> int:
    """The widest vector (a power of two, at most ``lanes``) over ``var`` that no ``// c`` or
    ``% c`` of ``block`` wraps inside: every such ``c`` must be a multiple of the width.

    TVM's vectoriser simplifies ``ramp(b, 1, n) % c`` as if the ramp never wrapped, so an index
    such as ``v % 8`` (a rotary embedding's half-head) vectorised 16 wide reads the wrong
    elements. Returns 1 when no width of two or more is safe.

    Buffer indices are judged flattened, as the vectoriser sees them: ``x[c, v // 28, v % 28]``
    of a row-major ``[C, 28, 28]`` buffer is ``c·784 + v``, contiguous in ``v`` (an elementwise
    kernel over a 28x28 map, its plane loops fused), so it does not limit the width; an index
    that stays wrapped once flattened (``cos[v % 8]``) does."""
    import math

    import tvm_ffi
    from tvm import tirx

    divisors: list[int] = []

    def on_div(node):
        if isinstance(node.b, tirx.IntImm) and uses_var(node.a, var):
            divisors.append(abs(int(node.b.value)))

    kinds = (tirx.FloorMod, tirx.FloorDiv, tirx.Mod, tirx.Div)
    tvm_ffi.structural_walk(flat_indices(block.body), [(k, on_div) for k in kinds])
    width = lanes
    if divisors:
        period = math.gcd(*divisors)
        while width > 1 and period % width:
            width //= 2
    return width


def flat_indices(stmt):
    """``stmt`` with every buffer access's indices replaced by its simplified row-major offset
    (one index into a stand-in 1-D buffer): only for inspecting index arithmetic."""
    import tvm
    import tvm_ffi
    from tvm import tirx
    from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds

    analyzer = tvm.sym.Analyzer()
    flat: dict = {}

    def offset(buffer, indices):
        total = None
        for extent, index in zip(buffer.shape, indices):
            total = index if total is None else total * extent + index
        return analyzer.simplify(total) if total is not None else total

    def stand_in(buffer):
        key = buffer.name
        if key not in flat:
            flat[key] = tirx.decl_buffer((1,), buffer.dtype, key + "_flat")
        return flat[key]

    def on_load(node, mutator):
        node = mutator.default_mutate(node)
        if len(node.indices) < 2:
            return node
        return tirx.BufferLoad(stand_in(node.source), [offset(node.source, node.indices)])

    def on_store(node, mutator):
        node = mutator.default_mutate(node)
        if len(node.indices) < 2:
            return node
        index = offset(node.buffer, node.indices)
        return tirx.BufferStore(stand_in(node.buffer), node.value, [index])

    try:
        return tvm_ffi.structural_mutate(
            stmt, [(TensorLoad, on_load), (tirx.BufferStore, on_store)]
        )
    except Exception:  # an access that cannot be flattened: judge the indices as written
        return stmt


def has_packing_mark(stmt) -> bool:
    """Whether a block under ``stmt`` is marked as a weight-packing stage."""
    import tvm_ffi
    from tvm import s_tir

    found = []

    def on_block(block):
        if PACKING_MARK in (block.annotations or {}):
            found.append(block)

    tvm_ffi.structural_walk(stmt, [(s_tir.SBlock, on_block)])
    return bool(found)


def root_statements(func):
    """``(root block, leading weight-packing statements, the other statements)`` of a PrimFunc."""
    from tvm import tirx

    root = func.body.block
    stmts = list(root.body.seq) if isinstance(root.body, tirx.SeqStmt) else [root.body]
    lead = 0
    while lead < len(stmts) and has_packing_mark(stmts[lead]):
        lead += 1
    return root, stmts[:lead], stmts[lead:]


def packing_first(func):
    """``func`` with its weight-packing root statements moved ahead of the others.

    A packing stage reads only a parameter, so it may run before any other statement; TVM's
    ``SplitLayoutRewritePreproc`` lifts it only as a leading statement. A GEMM whose activation
    rows are padded up front (a symbolic batch against a weight: a classifier head) gets that
    padding stage first; without this reordering its weight was repacked on every call."""
    root, lead, rest = root_statements(func)
    late = [s for s in rest if has_packing_mark(s)]
    if not late:
        return func
    others = [s for s in rest if not has_packing_mark(s)]
    return with_root_body(func, seq([*lead, *late, *others]), list(root.alloc_buffers))


def written_buffers(stmts) -> list:
    """The buffers the blocks under ``stmts`` write."""
    import tvm_ffi
    from tvm import s_tir

    out = []
    for stmt in stmts:
        tvm_ffi.structural_walk(
            stmt, [(s_tir.SBlock, lambda b: out.extend(w.source for w in b.writes))]
        )
    return out


def replace_vars(stmt, pairs):
    """``stmt`` with each ``old`` variable of ``pairs`` (``(old, new)``; buffers are variables in
    TVM 0.27) replaced by ``new``."""
    import tvm_ffi
    from tvm.ir.expr import Var

    def on_var(var, _mutator):
        for old, new in pairs:
            if var.same_as(old):
                return new
        return var

    return tvm_ffi.structural_mutate(stmt, [(Var, on_var)])


def seq(stmts):
    """One statement for ``stmts`` (TVM refuses a one-element SeqStmt)."""
    from tvm import tirx

    return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(list(stmts))


def with_root_body(func, body, alloc_buffers):
    """``func`` with its root block's body and allocations replaced, variables made SSA again
    (for bodies that hold two copies of the same loops, one per branch)."""
    import tvm
    from tvm import s_tir, tirx

    realize, root = func.body, func.body.block
    new_root = s_tir.SBlock(
        root.iter_vars,
        root.reads,
        root.writes,
        root.name_hint,
        body,
        root.init,
        list(alloc_buffers),
        root.match_buffers,
        root.annotations,
    )
    new_func = func.with_body(s_tir.SBlockRealize(realize.iter_values, realize.predicate, new_root))
    return tirx.transform.ConvertSSA()(tvm.IRModule({"main": new_func}))["main"]


def try_inline(sch, infos: list) -> list:
    """dlight's ``try_inline`` (inline what inlines, return the blocks left) without a TVM 0.27
    bug: ``reverse_compute_inline`` of a consumer into a producer that keeps a ``T.init`` (a
    reduction whose reduction loops all have extent 1 looks all-spatial after normalisation)
    applies the consumer to the init *and* to the update, so a bias add runs twice. Such a
    consumer is left as its own block. ``tests/test_fuzz_regressions.py`` keeps the case
    (a depthwise Conv with a 1-wide kernel and a bias)."""
    from tvm import s_tir

    def has_init_producer(block) -> bool:
        return any(sch.get(p).init is not None for p in sch.get_producers(block))

    def trial(inline, skip) -> int | None:
        for i, info in enumerate(infos):
            if skip(info.block_rv):
                continue
            try:
                inline(info.block_rv)
            except (s_tir.ScheduleError, RuntimeError):
                continue
            return i
        return None

    while True:
        i = trial(sch.compute_inline, lambda _: False)
        if i is None:
            i = trial(sch.reverse_compute_inline, has_init_producer)
        if i is None:
            return infos
        infos.pop(i)
