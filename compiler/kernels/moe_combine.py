"""MoE stage 4, combine: sum each token's k weighted expert outputs back in token order.

The down-projection already scaled every row by its routing weight and wrote it to the row of its
(token, j) pair, so the combine is a plain sum over j in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

from qiao.compiler.kernels.moe_common import KERNEL_ATTRS, divisor_at_most, pow2_divisor


def moe_combine(
    hidden: int, top_k: int, *, gpu: bool = False, vector_lanes: int = 8, threads: int = 256
):
    """Build the combine PrimFunc.

    Parameters
    ----------
    hidden, top_k : int
        ``H`` and ``k``.
    gpu : bool
        One thread per output element instead of CPU tasks over (token, column chunk).
    vector_lanes : int
        CPU: float32 lanes per SIMD register.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``moe_combine(expert_out, y)`` with ``expert_out``: (T, k, H) float32 weighted expert
        outputs from ``group_gemm_down`` and ``y``: (T, H) float32, ``y[t] = sum_j expert_out[t,
        j]``.
    """
    from tvm.script import tirx as T

    H, K = int(hidden), int(top_k)
    if gpu:

        @T.prim_func(s_tir=True)
        def moe_combine(in_h: T.handle, out_h: T.handle):
            T.func_attr(KERNEL_ATTRS)
            n = T.int64()
            X = T.match_buffer(in_h, (n, K, H), "float32")
            Y = T.match_buffer(out_h, (n, H), "float32")
            with T.sblock("root"):
                for bx in T.thread_binding((n * H + threads - 1) // threads, thread="blockIdx.x"):
                    for tx in T.thread_binding(threads, thread="threadIdx.x"):
                        acc = T.alloc_buffer((1,), "float32", scope="local")
                        if bx * threads + tx < n * H:
                            acc[0] = T.float32(0)
                            for j in range(K):
                                acc[0] = (
                                    acc[0] + X[(bx * threads + tx) // H, j, (bx * threads + tx) % H]
                                )
                            Y[(bx * threads + tx) // H, (bx * threads + tx) % H] = acc[0]

        return moe_combine

    VL = pow2_divisor(H, vector_lanes)
    CH = divisor_at_most(H, 512, VL)  # columns per task
    NC = H // CH

    @T.prim_func(s_tir=True)
    def moe_combine(in_h: T.handle, out_h: T.handle):
        T.func_attr(KERNEL_ATTRS)
        n = T.int64()
        X = T.match_buffer(in_h, (n, K, H), "float32")
        Y = T.match_buffer(out_h, (n, H), "float32")
        with T.sblock("root"):
            for task in T.parallel(n * NC):
                for c in range(CH // VL):
                    for lane in T.vectorized(VL):
                        Y[task // NC, task % NC * CH + c * VL + lane] = X[
                            task // NC, 0, task % NC * CH + c * VL + lane
                        ]
                    for j in range(1, K):
                        for lane in T.vectorized(VL):
                            Y[task // NC, task % NC * CH + c * VL + lane] = (
                                Y[task // NC, task % NC * CH + c * VL + lane]
                                + X[task // NC, j, task % NC * CH + c * VL + lane]
                            )

    return moe_combine


__all__ = ["moe_combine"]
