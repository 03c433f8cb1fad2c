"""Convolutions and pooling on the CPU.

Dense 2-D convolutions (any stride, padding, dilation; groups of 1) need no rule of their own: a
convolution block ``C[n, f, y, x] += P[n, c, y·s + ry, x·s + rx] · W[f, c, ry, rx]`` is GEMM-like
(``cpu_gemm.find_gemm_block`` accepts it) with rows ``(n, y, x)``, columns ``f`` and reduction
``(c, ry, rx)``: ``schedule_gemm`` packs the input into im2col panels per task (zero padding folded
in), the weights into ``nr``-wide panels (pre-packed at load time when the pipeline lifts them), and
runs the same register-blocked micro-kernel as dense layers.

What is left are reductions over a small window with no second operand: max/average pooling and
depthwise convolutions (``groups == channels``: the channel is in every operand, so there is no
GEMM column axis). ``CPUWindowReduction`` runs them in parallel over the outer output axes, fusing
their epilogues per task.
"""

from __future__ import annotations

from typing import Any

from qiao.compiler.schedules.cpu_gemm import is_multiply_accumulate
from qiao.compiler.schedules.cpu_info import cpu_info

# Largest window (product of static reduction extents) handled as a window reduction.
MAX_WINDOW = 64


class CPUWindowReduction:
    """Schedule rule for pooling and depthwise convolution (see the module docstring)."""

    def is_target_available(self, target: Any) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func, target, tunable: bool):
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        from qiao.compiler.schedules.cpu import parallelize_outer, vector_split

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
        if position > 0 and not is_multiply_accumulate(sch.get(red.block_rv)):
            # Padded pooling: measured faster left to CPUFallback (outer loops parallel, the rest
            # as written) than with the padding pass split out.
            return None
        dtype = str(sch.get(red.block_rv).writes[0].source.dtype)
        lanes = cpu_info(target).lanes(dtype if dtype != "bool" else "int8")
        # Producers (the zero-padded copy of the input) stay separate, vectorised passes: inlined,
        # their bounds checks would run once per window tap instead of once per element.
        for info in infos[:position]:
            p_loops = sch.get_loops(info.block_rv)
            vector_split(sch, p_loops[-1], lanes)
            p_loops = sch.get_loops(info.block_rv)
            parallelize_outer(
                sch, [lp for lp in p_loops[:-1] if sch.get(lp).kind == tirx.ForKind.SERIAL], lanes
            )

        # Parallel over the outer output axes; the innermost output axis and the window stay as
        # written, a short loop nest LLVM vectorises (measured faster than vectorising the output
        # axis by hand, which turns strided windows into gathers).
        outer = loops[: spatial - 1]
        task = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        parallelize = _static_size(sch, task) is None or _static_size(sch, task) > 1
        # Epilogues (bias, activation) follow each task's rows while they are in cache.
        for info in infos[position + 1 :]:
            sch.reverse_compute_at(info.block_rv, task, preserve_unit_loops=True)
            e_vec = _vector_inner(sch, sch.get_loops(info.block_rv)[-1], lanes)
            if e_vec is not None:
                sch.vectorize(e_vec)
        if parallelize:
            sch.parallel(task)
        return sch


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


def _static_size(sch, loop) -> int | None:
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def _vector_inner(sch, loop, lanes: int):
    """The loop to vectorise for ``loop`` (split by the SIMD width), or ``None``."""
    from tvm import tirx

    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm):
        _, vec = sch.split(loop, [None, lanes])
        return vec
    value = int(extent.value)
    if value < 2:
        return None
    if value <= lanes:
        return loop
    width = lanes
    while width > 1 and value % width:
        width //= 2
    if width < 2:
        return None
    _, vec = sch.split(loop, [None, width])
    return vec
