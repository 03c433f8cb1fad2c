"""Convolutions and pooling on the CPU.

Dense 2-D convolutions (any stride, padding, dilation; groups of 1) need no rule of their own: a
convolution block ``C[n, f, y, x] += P[n, c, y·s + ry, x·s + rx] · W[f, c, ry, rx]`` is GEMM-like
(``cpu_gemm.find_gemm_block`` accepts it) with rows ``(n, y, x)``, columns ``f`` and reduction
``(c, ry, rx)``: ``schedule_gemm`` packs the input into im2col panels per task (zero padding folded
in), the weights into ``nr``-wide panels (pre-packed at load time when the pipeline lifts them), and
runs the same register-blocked micro-kernel as dense layers.
The image positions are the micro-kernel's vector columns and the weights its broadcast rows
(NCHW output rows are contiguous), except in two cases where the positions are the rows and the
output channels the vector columns: a windowed convolution whose positions divide into register
tiles of 4-6 rows (AVX2) broadcasts its zero-padded input in place, no im2col panel
(``cpu_gemm.direct_rows``: most of ResNet's 3x3 convolutions and its stem); a small map whose
positions pad badly to whole tiles (7x7: 49 of 64, ``cpu_gemm.J_WASTE_SWAP``) packs its im2col
rows once per call. A grouped convolution (1 < ``groups`` < input channels) is one GEMM batched
over its groups (``cpu_gemm.split_group_axis``), unless its window is small enough for the window
rule below.

What is left are reductions over a small window with no second operand: max/average pooling and
depthwise convolutions (``groups == channels``: the channel is in every operand, so there is no
GEMM column axis), with a channel multiplier too, and grouped convolutions of a few channels a
group whose products per output fit ``MAX_WINDOW`` (4 channels under a 3x3 window).
``CPUWindowReduction`` schedules them per task of whole (n, c) planes — several small planes per
task, rows of a plane when the padded plane would not fit in L1:

* the zero-padded input of the task is built inside the task (``compute_at``; a fill pass and an
  in-bounds copy, both vectorised: ``decompose_padding``), so it is read from L1;
* for each block of output rows, the window loops run outside the vectorised output-column loop
  (``acc[y][x:x+v] += w[ry, rx] · pad[y·s + ry, x·s + rx : ... : s]``, taps unrolled, then the
  block's rows, ``chained_rows`` of them: independent accumulators in registers, and one load of
  an input row serves every output row it feeds); the epilogue (bias, ReLU6, residual add)
  follows on the block's sums while they are in registers;
* strided windows read a padded input stored as ``s`` deinterleaved column planes
  (``pad[h, w % s, w // s]``), so that every tap is a contiguous vector load.

Kernels whose static work is small stay serial; ``SerialSmallKernels`` makes the same decision at
run time for symbolic batches.
"""

from __future__ import annotations

import logging
import math

from qiao.compiler.schedules.cpu_info import CPURule, cpu_info
from qiao.compiler.schedules.tir_util import static_int

log = logging.getLogger("qiao.schedules")

# Largest window (product of static reduction extents) handled as a window reduction.
MAX_WINDOW = 64
# Fewer window taps than this (static shapes) stay on one core: waking the pool costs more.
MIN_PARALLEL_WORK = 1 << 16
# Windows of at least this many taps take a short row as one vector group (``_row_vector_width``).
WHOLE_ROW_TAPS = 16
# A plane of at most this many rows whose height no register budget divides (7x7: prime) sums
# all its rows together (``chained_rows``), weights spilled or not.
SMALL_MAP_ROWS = 8
# Largest zero-padded input block one task keeps (about half an L1 data cache).
PLANE_BYTES = 16 * 1024
# Small planes are grouped into tasks of about this many padded input bytes.
CHUNK_BYTES = 4 * 1024


class CPUWindowReduction(CPURule):
    """Schedule rule for pooling and depthwise convolution (see the module docstring)."""

    def apply(self, func, target, tunable: bool):
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        reductions = [i for i in infos if not i.is_injective()]
        if len(reductions) != 1:
            return None
        red = reductions[0]
        kinds = red.dom_kind()
        spatial = len(kinds) - len(kinds.lstrip("S"))
        if spatial < 2 or set(kinds[spatial:]) != {"R"}:
            return None
        loops = sch.get_loops(red.block_rv)
        window = 1
        for lp in loops[spatial:]:
            extent = sch.get(lp).extent
            if not isinstance(extent, tirx.IntImm):
                return None
            window *= int(extent.value)
        if window > MAX_WINDOW:
            return None
        if not _slides(sch.get(red.block_rv)):
            return None  # a row reduction (mean, sum over an axis): CPURowReduction's
        position = infos.index(red)
        if any(not i.is_injective() for i in infos[position + 1 :]):
            return None
        # A strided window over a padded input whose widths divide by the stride deinterleaves
        # after the padding is decomposed (``_deinterleave_copy``); other strided windows here.
        stride = None
        if position > 0:
            stride = _phase_stride(sch, red.block_rv, infos[position - 1].block_rv)
        if position > 0 and stride is None:
            try:
                strided = deinterleaved(sch, red.block_rv, infos[position - 1].block_rv)
            except (s_tir.ScheduleError, RuntimeError) as err:
                log.debug("window reduction: no deinterleaved layout: %s", err)
                strided = None
            if strided is not None:
                sch = s_tir.Schedule(strided)
                infos = normalize_prim_func(sch)
                red = [i for i in infos if not i.is_injective()][0]
                position = infos.index(red)
        dtype = str(sch.get(red.block_rv).writes[0].source.dtype)
        info = cpu_info(target)
        lanes = info.lanes(dtype if dtype != "bool" else "int8")
        try:
            _schedule_planes(
                sch,
                infos,
                position,
                spatial,
                lanes,
                info.vector_registers,
                _work(sch, red.block_rv),
                stride,
            )
        except (s_tir.ScheduleError, RuntimeError) as err:
            log.debug("window reduction: %s", err)
            return None
        return sch


def _schedule_planes(
    sch,
    infos,
    position: int,
    spatial: int,
    lanes: int,
    registers: int,
    work: int | None,
    stride: int | None,
) -> None:
    """Schedule a window reduction per task of whole planes (rows of planes when large);
    ``stride``: the padded input (the producer before the reduction) is stored deinterleaved by
    ``_deinterleave_copy``."""
    from tvm import tirx

    red = infos[position].block_rv
    producers = [i.block_rv for i in infos[:position]]
    consumers = [i.block_rv for i in infos[position + 1 :]]
    # The epilogue chain (bias, activation, residual add) folds into its last block.
    for block in consumers[:-1]:
        sch.compute_inline(block)
    # Sums accumulate in a task-local buffer (a few vector registers), then go through the
    # epilogue (or a plain copy) to the output.
    epilogue = consumers[-1] if consumers else sch.cache_write(red, 0, "global")

    loops = sch.get_loops(red)
    sp, rd = loops[:spatial], loops[spatial:]
    taps = 1
    for lp in rd:
        taps *= static_int(sch.get(lp).extent) or 1
    sums_row = static_int(sch.get(sp[-1]).extent)
    width = _row_vector_width(sums_row, lanes, taps)
    xo, xi = sch.split(sp[-1], [None, width])
    outer = list(sp[:-1])
    if spatial >= 3:
        outer = list(sp[:-2])
        rows = static_int(sch.get(sp[-2]).extent)
        plane = _plane_bytes(sch, producers, spatial - 2)
        if plane is not None and rows is not None and plane > PLANE_BYTES:
            # A large plane: tasks of output rows whose padded input rows fit in L1.
            per_row = max(plane // rows, 1)
            ro, _ = sch.split(sp[-2], [None, rows_per_task(rows, PLANE_BYTES // per_row)])
            outer.append(ro)
        elif plane is not None:
            # Small planes: several per task, so that the padded copy is written well before it
            # is read (no store-to-load forwarding stalls) and the per-task overhead amortises.
            planes = _divisor_at_most(static_int(sch.get(sp[-3]).extent), CHUNK_BYTES // plane)
            if planes > 1:
                co, _ = sch.split(sp[-3], [None, planes])
                outer = [*sp[:-3], co]
    task = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.reorder(xo, *rd, xi)
    # Independent sums: ``chained_rows`` output rows of a plane go through each tap together
    # (one vector load of an input row serves every output row whose window covers it).
    chains = []
    if spatial >= 3:
        row_loop = sch.get_loops(red)[_depth(sch, red, xo) - 2]
        # a cheap epilogue runs on the sums while they are in registers, its operands beside them
        live = registers
        if consumers and not _transcendental(sch.get(epilogue)):
            live -= _epilogue_operands(sch.get(epilogue), sch.get(red).writes[0].source)
        height = static_int(sch.get(row_loop).extent)
        together = chained_rows(height, width, lanes, registers, taps, live)
        if together > 1:
            _, inner = sch.split(row_loop, [None, together])
            sch.reorder(xo, *rd, inner)
            chains = [inner]
    if consumers and _transcendental(sch.get(epilogue)):
        # An epilogue with exp/sigmoid/tanh/erf (SiLU, swish): one long dependent chain per
        # vector, so it runs after the task's sums, over all of them as one contiguous run of
        # full vectors (chains of neighbouring vectors overlap), not per output vector (measured
        # 0.47 -> 0.21 ms for a 480-channel 14x14 depthwise + SiLU on one AVX2 core). The run is
        # one plane (its rows and columns fused), so that per-channel operands (the bias) stay
        # uniform across a vector. A cheap epilogue (bias, ReLU6, residual) stays on the vector
        # it follows, still in registers.
        # The sums of a plane are one contiguous run only when the epilogue's rows are as wide as
        # the reduction's: a slice after a widened depthwise convolution
        # (``passes.widen_depthwise_rows``) leaves a gap after each row, which then is vectorised
        # on its own (one full vector per 7- or 8-wide row, not a gather over the plane).
        sch.reverse_compute_at(epilogue, task)
        run = sch.get_loops(epilogue)[_depth(sch, epilogue, task) :]
        if spatial >= 3 and len(run) >= 2 and static_int(sch.get(run[-1]).extent) == sums_row:
            sch.fuse(*run[-2:])
        _vectorize_rows(sch, epilogue, lanes, group=2)
    else:
        sch.reverse_compute_at(epilogue, xo)
        epilogue_loops = sch.get_loops(epilogue)
        sch.vectorize(epilogue_loops[-1])
        if chains:
            # the chained rows' epilogues one after another: as a loop, LLVM vectorised it across
            # the rows (gathers and scatters over a ragged last vector: 0.17 -> 0.33 ms for an
            # 88-channel 28x28 3x3 + ReLU at batch 8, AVX-512)
            sch.unroll(epilogue_loops[_depth(sch, epilogue, xo)])
    # Producers (the zero-padded input) per task: the block a task reads stays in L1.
    for block in reversed(producers):
        sch.compute_at(block, task)
    tasks = static_int(sch.get(task).extent)
    if tasks is None or (tasks > 1 and (work is None or work >= MIN_PARALLEL_WORK)):
        sch.parallel(task)
    sch.vectorize(xi)
    for lp in [*rd, *chains]:
        sch.unroll(lp)
    init = sch.decompose_reduction(red, rd[0])
    init_loops = sch.get_loops(init)
    if sch.get(init_loops[-1]).kind != tirx.ForKind.VECTORIZED:
        sch.vectorize(init_loops[-1])
    if chains:
        sch.unroll(init_loops[-2])
    depth = _depth(sch, red, task)
    for block in producers:
        first = sch.get_loops(block)[depth]
        if sch.can_decompose_padding(block, first):
            fill = sch.decompose_padding(block, first)
            if stride is not None and block.same_as(producers[-1]):
                _deinterleave_copy(sch, fill, block, stride, lanes)
                continue
            _vectorize_rows(sch, fill, lanes)
        _vectorize_rows(sch, block, lanes)


def _phase_stride(sch, red, producer) -> int | None:
    """The stride of ``red``'s window over the padded input ``producer`` writes, when
    ``_deinterleave_copy`` can store that input as stride phase planes: the padded width and
    the in-bounds width (the copy's columns) both divide by it."""
    stride = _window_stride(sch, red, producer)
    block = sch.get(producer)
    pad = _padding(block)
    if stride is None or stride < 2 or pad is None:
        return None
    padded = static_int(block.writes[0].source.shape[-1])
    source = [r.source for r in block.reads]
    inner = static_int(source[0].shape[-1]) if len(source) == 1 else None
    if padded is None or inner is None or padded % stride or inner % stride:
        return None
    return stride


def _deinterleave_copy(sch, fill, copy, stride: int, lanes: int) -> None:
    """Store a decomposed zero padding (``fill``, then the in-bounds ``copy``) as ``stride``
    planes of every ``stride``-th column (``pad[h, w % s, w // s]``), each written as whole
    contiguous vectors: the column loops split by the stride, phase outside.

    The reduction's taps then read contiguous vectors (``x·s + rx`` lands in plane ``rx % s``),
    and the copy reads every ``s``-th input column, one contiguous store per plane row, which
    ``ShuffleStridedLoads`` turns into whole-vector loads and shuffles. Laid out before the
    padding is decomposed (``deinterleaved``), the copy's bounds test couples the phase and the
    column (``1 <= 2·j + p``), ``decompose_padding`` declines it, and TVM scalarises the whole
    copy (a vector ``if_then_else``): one scalar load and store per element, most of a 96-channel
    112x112 stride-2 depthwise convolution's time."""
    sch.transform_layout(fill, ("write", 0), _phase_planes(stride))
    for block in (fill, copy):
        columns, phase = sch.split(sch.get_loops(block)[-1], [None, stride])
        sch.reorder(phase, columns)
        width = _row_vector_width(static_int(sch.get(columns).extent), lanes)
        if width > 1:
            sch.vectorize(sch.split(columns, [None, width])[1])


def _depth(sch, block, loop) -> int:
    """Number of ``block``'s loops down to and including ``loop``."""
    stmt = sch.get(loop)
    return 1 + [sch.get(lp).same_as(stmt) for lp in sch.get_loops(block)].index(True)


def _transcendental(block) -> bool:
    """Whether ``block`` computes an exp, sigmoid, tanh or erf (``VectorizableMath``'s long
    polynomial chains)."""
    import tvm_ffi
    from tvm.ir.expr import Call

    from qiao.compiler.passes.vectorizable_math import REWRITES

    found = []
    tvm_ffi.structural_walk(
        block.body,
        [(Call, lambda c: found.append(getattr(getattr(c, "op", None), "name", None) in REWRITES))],
    )
    return any(found)


def _vectorize_rows(sch, block, lanes: int, group: int = 1) -> None:
    """Vectorise the innermost loop of ``block``: a row of at most ``group`` vectors as one
    vector group (LLVM splits it into its vectors, 28 = 16 + 8 + 4 lanes), a longer one in
    vectors of ``lanes`` (a ragged last vector is split off later, as scalar code).

    ``group`` 2 is for a transcendental epilogue: rows of 28 on AVX-512 and 14 on AVX2 (a SiLU
    epilogue after a widened depthwise convolution) had a scalar tail of 12 or 6 elements, each
    with its own exponential: 1.23 -> 1.09 ms for a 240-channel 28x28 5x5 + SiLU at batch 8
    (AVX-512), 0.49 -> 0.40 ms for a 480-channel 14x14 3x3 (AVX2); groups of up to four vectors
    measured no faster. The padded copies keep ``group`` 1: with them grouped too,
    MobileNetV3-Small at batch 1 read 1.01-1.05x the time in four interleaved runs (noise or
    not, nothing there to gain)."""
    loop = sch.get_loops(block)[-1]
    extent = static_int(sch.get(loop).extent)
    if extent is not None and extent < 2:
        return
    if extent is not None and extent <= group * lanes:
        sch.vectorize(loop)
        return
    sch.vectorize(sch.split(loop, [None, lanes])[1])


def _row_vector_width(extent: int | None, lanes: int, taps: int = 1) -> int:
    """Vector width for an output row of ``extent`` elements: the fewest vector instructions, a
    width of ``d`` lanes costing one per power of two in ``d``, a ragged tail one per element.

    A row of at most two vectors under a large window (``taps`` >= ``WHOLE_ROW_TAPS``: a 5x5
    depthwise over a 14x14 map) is one vector group (14 = 8 + 4 + 2 lanes, three instructions per
    tap instead of 4-lane vectors and a scalar tail: 0.71 -> 0.51 ms for 672 channels, one AVX2
    core); under a 3x3 window the narrower vectors measured as fast."""
    if extent is None:
        return lanes
    if taps >= WHOLE_ROW_TAPS and lanes < extent <= 2 * lanes:
        return extent
    best, best_cost = 1, extent
    for d in range(2, min(lanes, extent) + 1):
        cost = (extent // d) * bin(d).count("1") + extent % d
        if cost <= best_cost:
            best, best_cost = d, cost
    return best


def deinterleaved(sch, red, producer):
    """The function with the padded input of a strided window (``x·s + rx``) stored as ``s``
    planes of every ``s``-th column, so that a vector of outputs reads contiguous inputs for every
    tap; ``None`` when the window is not strided or the layout does not apply."""
    import tvm
    import tvm_ffi
    from tvm import s_tir, tirx
    from tvm.ir.expr import Call, Var
    from tvm.tirx.function import IndexMap

    stride = _window_stride(sch, red, producer)
    pad = _padding(sch.get(producer))
    if stride is None or stride < 2 or pad is None:
        return None

    index_map = _phase_planes(stride)
    sch.transform_layout(producer, ("write", 0), index_map, pad_value=pad[2])
    stored = sch.get(producer)
    if not isinstance(stored.writes[0].region[-1].min, Var):
        # No layout padding: the producer still iterates columns in order (its last iterator
        # the column; a static batch of 1 has no batch iterator); make it iterate the new
        # layout, so that it stores contiguously instead of scattering every other column.
        sch.transform_block_layout(
            producer, IndexMap.from_func(index_map, ndim=len(stored.iter_vars))
        )
    # The layout's own padding (columns past the end) is out of the input's bounds too: one
    # padding condition is enough, and is what decompose_padding recognises.
    name = sch.get(producer).name_hint

    def on_block(node, mutator):
        node = mutator.default_mutate(node)
        if node.name_hint != name:
            return node
        # if_then_else(layout padding, v, if_then_else(in bounds, x[...], v))
        value = node.body.value if isinstance(node.body, tirx.BufferStore) else None
        args = list(value.args) if isinstance(value, Call) else []
        if len(args) != 3 or getattr(value.op, "name", "") != "prim.if_then_else":
            return node
        outer = (args[0], args[2], args[1])
        inner = _padding_expr(outer[1])
        if inner is None or not tvm_ffi.structural_equal(outer[2], inner[2]):
            return node
        # The layout's condition fixes the split column (``j == last and p == 1``): under it
        # the input's bounds condition must simplify to false.
        fixed = {}
        for eq in _conjuncts(outer[0]):
            if not isinstance(eq, tirx.EQ) or static_int(eq.b) is None:
                return node
            fixed[eq.a] = eq.b
        bounds = tvm_ffi.structural_mutate(
            inner[0], [(Var, lambda v, _m: next((c for k, c in fixed.items() if k.same_as(v)), v))]
        )
        if static_int(tvm.sym.Analyzer().simplify(bounds)) != 0:
            return node
        store = node.body
        body = tirx.BufferStore(store.buffer, inner[3], store.indices)
        return s_tir.SBlock(
            node.iter_vars,
            node.reads,
            node.writes,
            node.name_hint,
            body,
            node.init,
            node.alloc_buffers,
            node.match_buffers,
            node.annotations,
        )

    return tvm_ffi.structural_mutate(sch.mod["main"], [(s_tir.SBlock, on_block)])


def _phase_planes(stride: int):
    """Index map of the stride phase layout: the last index ``w`` becomes ``(w % s, w // s)``."""

    def index_map(*idx):
        return [*idx[:-1], idx[-1] % stride, idx[-1] // stride]

    return index_map


def _window_stride(sch, red, producer) -> int | None:
    """The coefficient of the last output iterator in ``red``'s reads of ``producer``'s buffer
    (the window's stride along rows), when it is one static value."""
    import tvm
    from tvm import tirx

    block = sch.get(red)
    buffer = sch.get(producer).writes[0].source
    reduce = sum(1 for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce)
    out_x = block.iter_vars[len(block.iter_vars) - 1 - reduce].var
    strides = set()
    for region in block.reads:
        if region.source.same_as(buffer):
            coeffs = tvm.sym.detect_linear_equation(region.region[-1].min, [out_x])
            strides.add(static_int(coeffs[0]) if len(coeffs) == 2 else None)
    return strides.pop() if len(strides) == 1 else None


def _conjuncts(expr) -> list:
    from tvm import tirx

    if isinstance(expr, tirx.And):
        return _conjuncts(expr.a) + _conjuncts(expr.b)
    return [expr]


def _padding(block):
    """``(condition, value, pad value, whole expression)`` of a padding block's
    ``if_then_else(condition, value, pad value)``, else ``None``."""
    from tvm import tirx

    body = block.body
    if not isinstance(body, tirx.BufferStore):
        return None
    return _padding_expr(body.value)


def _padding_expr(expr):
    from tvm import tirx
    from tvm.ir.expr import Call

    if not isinstance(expr, Call) or getattr(expr.op, "name", "") != "prim.if_then_else":
        return None
    cond, value, pad = expr.args
    if not isinstance(pad, (tirx.FloatImm, tirx.IntImm)):
        return None
    return cond, value, pad, expr


def _plane_bytes(sch, producers, skip: int) -> int | None:
    """Bytes of one (padded) input plane a task reads, when static: the producer's buffer less
    its ``skip`` outer (batch, channel) dimensions. ``skip`` counts loops, and a static batch of
    1 has no loop (the unit dimensions lead the buffer): those are skipped too, else the plane
    was the whole batch (a static-shaped model's depthwise convolutions ran one output row per
    task)."""
    if not producers:
        return None
    shape = [static_int(d) for d in sch.get(producers[-1]).writes[0].source.shape]
    lead = 0
    while lead < len(shape) - 1 and shape[lead] == 1:
        lead += 1
    if None in shape[lead + skip :]:
        return None
    return 4 * math.prod(shape[lead + skip :])


def rows_per_task(rows: int, cap: int) -> int:
    """Output rows per task of a large plane: at most ``cap`` (its padded input rows fit in L1),
    a divisor of ``rows`` when one is at least half of it. Every task is then whole: no bounds
    test per vector, and a transcendental epilogue runs over one contiguous run of full vectors.
    Measured on an AVX-512 EPYC, depthwise 3x3 + SiLU over 112x112, 17 -> 14 rows per task (56
    output rows, stride 2): 96 channels 387 -> 295 us; 32 channels, stride 1, 35 -> 28 rows of
    112: 374 -> 251 us; with ReLU 3-4 % faster."""
    cap = max(1, min(rows, cap))
    divisor = _divisor_at_most(rows, cap)
    return divisor if 2 * divisor >= cap else cap


def _epilogue_operands(block, sums) -> int:
    """Distinct float constants and buffers other than ``sums`` that the epilogue ``block``
    reads: what it keeps in vector registers beside the sums (ReLU6 with a bias: 3)."""
    import tvm_ffi
    from tvm import tirx
    from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds

    constants, buffers = set(), set()
    tvm_ffi.structural_walk(
        block.body,
        [
            (tirx.FloatImm, lambda c: constants.add(float(c.value))),
            (TensorLoad, lambda load: buffers.add(load.source.name)),
        ],
    )
    buffers.discard(sums.name)
    return len(constants) + len(buffers)


def chained_rows(
    rows: int | None, width: int, lanes: int, registers: int, taps: int, live: int | None = None
) -> int:
    """Output rows of a plane that go through the window's ``taps`` together, each with its own
    sums: a divisor of ``rows`` whose sums (``width`` float32 a row, a vector per power of two of
    ``lanes``) fit the ``live`` registers (``registers`` less the epilogue's operands) that the
    window's weights leave (one per tap, where they fit with two to spare), at most a quarter of
    the ``registers``; a map of at most ``SMALL_MAP_ROWS`` rows that no such divisor splits (7x7)
    takes all of them.

    With one row at a time each output vector was one chain of dependent multiply-adds (25 of
    them, 4 cycles each, under a 5x5 window) and an input row was loaded once per tap reading
    it. Measured on the AVX-512 EPYC VM (2026-12-06, depthwise at batch 8 against one row at a
    time, 9 interleaved rounds): 672 channels 14x14 5x5 + ReLU 0.76 -> 0.65 ms (2 rows; 7 rows,
    spilling weights, 1.1 ms); 576 channels 7x7 5x5 0.21 -> 0.17; 88 channels 28x28 3x3 0.19
    -> 0.16; in EfficientNet-B0 at batch 8 its depthwise kernels took 14.0 -> 12.9 ms (AVX-512
    code) and 22.5 -> 18.8 ms (AVX2 code) under this rule's first form (a quarter of the
    registers, no weights or epilogue counted), 19.5 -> 17.7 ms (AVX-512, a slower hour) with the
    weights counted; with the rule as it is, MobileNetV3-Small's took 3.54 -> 3.32 ms (AVX-512,
    16 rounds, a slow hour). Two rows beside a hard-swish epilogue's
    five operands and 25 weights (32 registers) spilled the weights and LLVM ran the two chains
    one after the other: 240 channels 14x14 5x5 0.25 -> 0.47 ms, hence ``live``."""
    vectors = max(width // lanes + bin(width % lanes).count("1"), 1)
    live = registers if live is None else live
    weights = taps if taps + 2 < registers else 0
    cap = max(1, min(live - 2 - weights, registers // 4) // vectors)
    chosen = _divisor_at_most(rows, cap)
    if chosen == 1 and rows is not None and rows <= SMALL_MAP_ROWS:
        chosen = rows
    return chosen


def _divisor_at_most(extent: int | None, limit: int) -> int:
    """The largest divisor of ``extent`` that is at most ``limit`` (1 for a symbolic extent)."""
    if extent is None or limit < 2:
        return 1
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)


def _work(sch, block) -> int | None:
    """Multiply-adds (window taps) of ``block`` when its extents are static."""
    total = 1
    for lp in sch.get_loops(block):
        extent = static_int(sch.get(lp).extent)
        if extent is None:
            return None
        total *= extent
    return total


def _slides(block) -> bool:
    """Whether some read index mixes an output iterator with a window iterator (``y·s + ry``)."""
    from tvm import tirx

    from qiao.compiler.schedules.tir_util import var_names

    spatial = {iv.var.name for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar}
    reduce = {iv.var.name for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    for region in block.reads:
        for rng in region.region:
            names = var_names(rng.min)
            if spatial.intersection(names) and reduce.intersection(names):
                return True
    return False
