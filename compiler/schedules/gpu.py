"""The GPU rule set: TVM's dlight GPU rules, most specific first.

CUDA, ROCm and the other GPU kinds share it (``GPUBackend.schedule_rules`` returns it; a backend
may choose another); ``Fallback`` binds whatever no other rule took, so every kernel gets a thread
mapping.
Kernels qiao writes already scheduled (the MoE lowering) carry ``tirx.is_scheduled`` and are skipped
by ``ApplyScheduleRules``.
"""

from __future__ import annotations

import re
from typing import Any

TC_MIN_EXTENT = 64  # dlight's Matmul: a static GEMM dimension <= this stays off tensor cores


def cuda_sm(target: Any) -> int:
    """The ``XY`` of a CUDA target's ``sm_XY`` (0 without one: only CUDA targets name an ``arch``
    ``sm_XY``; ROCm's chip is its ``mcpu``, CPUs have none)."""
    if target is None:
        return 0
    m = re.fullmatch(r"sm_(\d+)a?", str(target.attrs.get("arch", "")))
    return int(m.group(1)) if m else 0


def tensor_core_dtypes(target: Any) -> tuple[str, ...]:
    """The half dtypes whose GEMMs run on ``target``'s tensor cores (float32 accumulation):
    float16 from sm_70 (Volta), bfloat16 from sm_80 (Ampere); none on other GPUs."""
    sm = cuda_sm(target)
    return tuple(d for d, first in (("float16", 70), ("bfloat16", 80)) if sm >= first)


_BF16_INTRINS = {
    "load_a": "qiao_wmma_load_16x16x16_bf16_a_shared_dyn",
    "load_b": "qiao_wmma_load_16x16x16_bf16_b_trans_shared_dyn",
    "compute": "qiao_wmma_sync_16x16x16_bf16bf16f32_trans",
}


def _register_bf16_wmma() -> None:
    """Register the bfloat16 WMMA intrinsics TVM's table lacks (its generators take any dtype;
    CUDA's ``nvcuda::wmma`` has ``__nv_bfloat16`` fragments, m16n16k16, float32 accumulator)."""
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin import cuda as intrin

    if TensorIntrin.get(_BF16_INTRINS["compute"], allow_missing=True) is not None:
        return
    TensorIntrin.register(
        _BF16_INTRINS["load_a"],
        *intrin.get_wmma_load_intrin(16, 16, 16, "bfloat16", "shared.dyn", False, False),
    )
    TensorIntrin.register(
        _BF16_INTRINS["load_b"],
        *intrin.get_wmma_load_intrin(16, 16, 16, "bfloat16", "shared.dyn", True, True),
    )
    TensorIntrin.register(
        _BF16_INTRINS["compute"],
        *intrin.get_wmma_sync_intrin(16, 16, 16, "bfloat16", "float32", True),
    )


def _matmul_dtypes(func: Any, target: Any) -> tuple[str, str, str] | None:
    """``(a, b, out)`` dtypes of ``func``'s GEMM block, normalised as dlight's ``Matmul`` does
    (``C[S, I, J] += A[S, I, K] * B[S, J, K]``), when no static I/J/K extent is <= 64 (dlight's
    threshold for tensor cores); ``None`` for anything else."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_reduction_blocks

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(get_root_block(sch))
    reductions = get_reduction_blocks(sch, blocks)
    if reductions is None:
        return None
    main = reductions[0]
    stmt = sch.get(main)
    if len(stmt.reads) < 2 or not get_index_map(stmt):
        return None
    sch.reindex(main, ("read", 0))
    sch.reindex(main, ("read", 1))
    sch.reindex(main, ("write", 0))
    index_maps = get_index_map(sch.get(main))
    if index_maps is None:
        return None
    sch.transform_block_layout(main, index_maps[0])
    stmt = sch.get(main)
    for iv in stmt.iter_vars[1:]:
        if isinstance(iv.dom.extent, tirx.IntImm) and iv.dom.extent.value <= TC_MIN_EXTENT:
            return None
    a, b = (str(r.source.dtype) for r in stmt.reads[:2])
    return a, b, str(stmt.writes[0].source.dtype)


class BF16MatmulTensorization:
    """bfloat16 GEMMs (both operands bfloat16, float32 accumulator) on tensor cores, sm_80+.

    dlight's ``Matmul`` sends only float16 GEMMs to its ``MatmulTensorization`` (WMMA); this rule
    runs that same schedule (tiles, shared-memory staging, software pipeline, padding of symbolic
    token dimensions) with bfloat16 WMMA intrinsics. It comes before ``Matmul`` in the rule list
    and declines every other kernel."""

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        import tvm

        if not isinstance(func, tvm.tirx.PrimFunc) or "bfloat16" not in tensor_core_dtypes(target):
            return None
        try:
            dtypes = _matmul_dtypes(func, target)
        except Exception:  # noqa: BLE001 - any failure: not a GEMM this rule takes
            return None  # dlight's rules take it
        if dtypes != ("bfloat16", "bfloat16", "float32"):
            return None
        # Imported only now: ``tvm.s_tir.tensor_intrin`` registers every target's intrinsics on
        # import (2 s on a 2-core host with ``fast_frames``, 26 s without), which a model
        # without half-precision GEMMs never needs.
        from tvm.s_tir.dlight.gpu.matmul import MatmulTensorization
        from tvm.s_tir.tensor_intrin import cuda as intrin

        _register_bf16_wmma()
        table = intrin.get_wmma_intrin_group

        def bf16_group(load_scope, store_scope, in_dtype, out_dtype, trans_b):
            group = table(load_scope, store_scope, in_dtype, out_dtype, trans_b)
            if out_dtype == "float32" and trans_b and load_scope == "shared.dyn":
                group.update(_BF16_INTRINS)
            return group

        # MatmulTensorization looks its intrinsics up by this name at call time (float16 only);
        # it is pointed at the bfloat16 ones for this one call.
        intrin.get_wmma_intrin_group = bf16_group
        try:
            return MatmulTensorization().apply(func, target, tunable)
        finally:
            intrin.get_wmma_intrin_group = table


def gpu_rules(target: Any) -> list:
    """The ordered dlight GPU schedule rules for ``target``."""
    import tvm.s_tir.dlight as dl

    from qiao.compiler.tvmscript import fast_frames

    fast_frames()  # the tensor-core rules import every target's intrinsics (TVMScript) once
    return [
        BF16MatmulTensorization(),
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]
