"""The CPU rule set, most specific first: GEMM-like kernels (dense and batched matmuls, attention's
two products, convolutions as implicit im2col: ``cpu_gemm``), TVM's GEMV, sliding-window reductions
(depthwise convolutions, pooling: ``cpu_conv``), row reductions (softmax, RMS/layer norm, means:
``cpu_reduction``), TVM's generic reduction, then parallel + vectorised schedules for whatever is
left (elementwise chains, other reductions).

TVM's default CPU pipeline leaves every kernel it has no rule for as a serial scalar loop nest; here
every PrimFunc gets at least a parallel outer loop and a vectorised inner one.
"""

from __future__ import annotations

import logging
from typing import Any

from qiao.compiler.schedules.cpu_info import CPURule, cpu_info
from qiao.compiler.schedules.tir_util import static_int, try_inline, wrap_free_lanes

log = logging.getLogger("qiao.schedules")

# Below this many output elements (static extents) a kernel stays on one core: waking the thread
# pool costs more than the work.
MIN_PARALLEL_ELEMENTS = 1 << 14


def cpu_rules(target: Any) -> list:
    """The ordered schedule rules for an LLVM CPU target; the first that applies wins."""
    import tvm.s_tir.dlight as dl

    from qiao.compiler.schedules.cpu_conv import CPUWindowReduction
    from qiao.compiler.schedules.cpu_gemm import CPUMatmul
    from qiao.compiler.schedules.cpu_reduction import CPURowReduction

    return [
        CPUMatmul(),
        dl.cpu.GEMV(),
        CPUWindowReduction(),
        CPURowReduction(),
        dl.cpu.Reduction(),
        CPUInjective(),
        CPUFallback(),
    ]


def vector_split(sch, loop, lanes: int, block=None) -> None:
    """Vectorise ``loop``: all of it when its static extent fits the SIMD width, else split by the
    largest power of two ≤ ``lanes`` dividing the extent. Symbolic extents are left to LLVM.
    With ``block`` (whose innermost iterator ``loop`` runs), the width is also kept within the
    period of any ``// c`` / ``% c`` of that iterator (``wrap_free_lanes``)."""
    width = vector_width(sch, loop, lanes, block)
    if width < 2:
        return
    if width == static_int(sch.get(loop).extent):
        sch.vectorize(loop)
        return
    _, inner = sch.split(loop, [None, width])
    sch.vectorize(inner)


def vector_width(sch, loop, lanes: int, block=None) -> int:
    """The vector width ``vector_split`` gives ``loop`` (1: not vectorised)."""
    if block is not None:
        stmt = sch.get(block)
        lanes = wrap_free_lanes(stmt, stmt.iter_vars[-1].var, lanes)
        if lanes < 2:
            return 1
    extent = static_int(sch.get(loop).extent)
    if extent is None or extent < 2:
        return 1
    if extent <= lanes:
        return extent
    width = lanes
    while width > 1 and extent % width:
        width //= 2
    return width


def fuse_for_width(sch, block, lanes: int):
    """The innermost loop of ``block`` after merging its two innermost iterators into one when
    that gives full vectors where the innermost alone would not (an elementwise kernel over a
    28x28 map: 28-element rows take 4-lane vectors, the 784-element plane 8). The merged
    iterator indexes as ``v // 28`` and ``v % 28`` inside the block, where ``wrap_free_lanes``
    sees them: they cancel in a row-major buffer's flattened offset, not in a transposed one."""
    from tvm.tirx.function import IndexMap

    loops = sch.get_loops(block)
    inner = loops[-1]
    narrow = vector_width(sch, inner, lanes, block)
    iters = sch.get(block).iter_vars
    if len(loops) < 2 or len(iters) < 2 or narrow >= lanes:
        return inner
    width = static_int(iters[-1].dom.extent)
    if width is None or static_int(iters[-2].dom.extent) is None:
        return inner
    merged = IndexMap.from_func(lambda *v: [*v[:-2], v[-2] * width + v[-1]], ndim=len(iters))
    trial = sch.copy()
    try:
        trial.transform_block_layout(block, merged)
    except Exception:  # noqa: BLE001 - loops not bound one-to-one to the iterators
        return inner
    if vector_width(trial, trial.get_loops(block)[-1], lanes, block) <= narrow:
        return inner
    sch.transform_block_layout(block, merged)
    return sch.get_loops(block)[-1]


def parallelize_outer(sch, loops: list, lanes: int) -> None:
    """Fuse and parallelise ``loops`` when the work behind them is worth a thread pool wake-up."""
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = static_int(sch.get(fused).extent)
    block_elems = 1
    # Elements below the fused loop (all static, or unknown → assume large).
    inner = sch.get(fused).body
    while hasattr(inner, "body") and hasattr(inner, "extent"):
        e = static_int(inner.extent)
        if e is None:
            block_elems = None
            break
        block_elems *= e
        inner = inner.body
    if extent is not None and block_elems is not None:
        if extent * block_elems < MIN_PARALLEL_ELEMENTS or extent < 2:
            return
    sch.parallel(fused)


class CPUInjective(CPURule):
    """Elementwise / injective functions (all blocks spatial): inline the chain into its last
    block(s), parallelise the outer loops, vectorise the innermost."""

    def apply(self, func, target, tunable: bool):
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not infos or not all(info.is_injective() for info in infos):
            return None
        remaining = try_inline(sch, infos)
        cpu = cpu_info(target)
        for info in remaining:
            block = info.block_rv
            loops = sch.get_loops(block)
            if not loops:
                continue
            dtype = str(sch.get(block).writes[0].source.dtype) if sch.get(block).writes else "f32"
            lanes = cpu.lanes(dtype if dtype != "bool" else "int8")
            vector_split(sch, fuse_for_width(sch, block, lanes), lanes, block)
            loops = sch.get_loops(block)
            # Parallelise every serial loop above the innermost one (vectorised, or left serial
            # for LLVM when its extent is symbolic).
            outer = [lp for lp in loops[:-1] if sch.get(lp).kind == _serial_kind()]
            parallelize_outer(sch, outer, lanes)
        return sch


def _serial_kind():
    from tvm import tirx

    return tirx.ForKind.SERIAL


class CPUFallback(CPURule):
    """Anything else (reductions TVM's rules skip: pooling, reductions over several axes, argmax):
    inline what inlines, then per remaining block parallelise its leading spatial loops."""

    def apply(self, func, target, tunable: bool):
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not infos:
            return None
        remaining = try_inline(sch, infos)
        changed = False
        for info in remaining:
            block = info.block_rv
            loops = sch.get_loops(block)
            kinds = info.dom_kind()
            if len(kinds) != len(loops):
                continue
            leading = []
            for loop, kind in zip(loops, kinds):
                if kind != "S":
                    break
                leading.append(loop)
            if len(leading) == len(loops) and len(leading) > 1:
                leading = leading[:-1]
            if leading:
                try:
                    parallelize_outer(sch, leading, 1)
                    changed = True
                except Exception as err:  # a loop carried dependence, an opaque block
                    log.debug("fallback: cannot parallelise %s: %s", info.name, err)
        return sch if changed else None
