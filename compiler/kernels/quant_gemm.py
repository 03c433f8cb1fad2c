"""Weight-only quantized GEMM/GEMV on the CPU: ``Y = A @ dequant(B)^T (+ bias)`` for
``com.microsoft::MatMulNBits`` (4- and 8-bit codes, any block size, with or without zero points),
reading the packed weight bytes and dequantizing in registers.

Weight layout (made once at compile time by ``pack_nbits``, from ONNX Runtime's
``[N, n_blocks, blob]``): the output columns are cut into tiles of ``TN = nv * lanes`` columns
(``lanes``: the target's float32 SIMD width, ``nv`` vectors). For each tile the codes are stored
k-major, ``TN`` contiguous bytes per step:

- 4-bit: ``Bq[tile, K / 2, TN]``, byte ``j`` of row ``p`` holds column ``tile * TN + j``'s codes at
  ``k = 2p`` (low nibble) and ``2p + 1`` (high nibble) — still half a byte per weight;
- 8-bit: ``Bq[tile, K, TN]``, one code per byte.

Scales and zero points follow as ``[tile, n_blocks, TN]`` (zero points as uint8 codes, or float32
when the model's are fractional; absent: the default ``2^(bits - 1)`` is a constant of the kernel).
``N`` is padded to whole tiles (scale 0) and ``K`` to whole blocks (code 0 against zero
activations): the lowering pads ``A`` and slices ``Y`` only when the shapes need it.

With ``asum[m, b]`` the sum of ``A``'s row ``m`` over block ``b``::

    Y[m, n] = sum_b scale[n, b] * (sum_{k in b} A[m, k] * code[n, k] - zero[n, b] * asum[m, b])

which is exactly ``A @ ((code - zero) * scale)`` in real arithmetic; in float32 it differs from the
dequantize-then-GEMM reference by rounding only (the tests bound it at 1e-5 of the output scale).

Kernels (one ``PrimFunc``, the row count ``M`` symbolic, a run-time switch on ``M``):

- GEMV (``M <= gemv_rows``, decode): one parallel task per column tile; the tile's bytes stream
  once per pass, each ``TN``-byte row of ``Bq`` giving ``nv`` vectors of low codes and ``nv`` of
  high codes, converted to float32 in registers and multiplied by the broadcast activations, the
  block sums scaled per block. One row: two independent accumulator sets (low / high); 2 to
  ``gemv_rows`` rows: ``gemv_group`` rows per pass share each conversion. Bytes read per pass: the
  packed codes once, plus the scales (and zero points).
- Tiled (prefill): per task and per chunk of ``KC`` reduction steps the tile is dequantized into a
  float32 ``[KC, TN]`` scratch panel (L1-sized), then an ``mr x TN`` register tile of ``Y``
  (``mr`` rows x ``nv`` vectors) accumulates ``A[rows, k] * panel[k, :]`` — the CPU GEMM's outer
  product micro-kernel with the dequantized panel as its packed ``B``. ``Y`` itself holds the
  partial sums between chunks.

Code generation follows the target only (``cpu_info``: SIMD width and register count), so an AVX2
target gets 8-lane kernels and an AVX-512 one 16-lane kernels; no ISA is named here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qiao.compiler.kernels.moe_common import KERNEL_ATTRS
from qiao.compiler.schedules.cpu_info import CACHE_LINE_BYTES

# integer kernel: how far ahead of the block being multiplied its codes are prefetched
PREFETCH_BYTES = 4096
WORDS_PER_LINE = CACHE_LINE_BYTES // 4  # int32 words in a cache line


@dataclass(frozen=True)
class NBitsLayout:
    """Shapes of one packed ``MatMulNBits`` weight.

    Parameters
    ----------
    k, n : int
        Reduction and output sizes of the layer.
    bits : int
        4 or 8.
    block_size : int
        Codes per scale along K (a power of 2, >= 16).
    tile : int
        Output columns per tile (``nv * lanes``).
    zero_points : {"default", "uint8", "float32"}
        How the zero points are stored (``"default"``: none in the model, ``2^(bits - 1)``).
    bias : bool
        Whether the layer adds a bias.
    """

    k: int
    n: int
    bits: int
    block_size: int
    tile: int
    zero_points: str = "default"
    bias: bool = False

    @property
    def n_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def k_pad(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def n_tiles(self) -> int:
        return -(-self.n // self.tile)

    @property
    def n_pad(self) -> int:
        return self.n_tiles * self.tile

    @property
    def code_rows(self) -> int:
        """Rows of ``Bq`` per tile: ``K / 2`` (4-bit) or ``K`` (8-bit), padded."""
        return self.k_pad * self.bits // 8


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    from qiao.compiler.frontend.convert_quant import unpack_codes

    return unpack_codes(packed, bits, count)


def pack_nbits(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    layout: NBitsLayout,
) -> dict[str, np.ndarray]:
    """Repack ONNX Runtime's ``MatMulNBits`` weight into the kernel's tiled layout.

    Parameters
    ----------
    b : np.ndarray
        uint8 ``[N, n_blocks, blob]`` (any shape with that many bytes).
    scales : np.ndarray
        ``[N * n_blocks]`` or ``[N, n_blocks]``.
    zero_points : np.ndarray or None
        uint8 packed ``[N, ceil(n_blocks * bits / 8)]`` or float ``[N, n_blocks]``.
    layout : NBitsLayout

    Returns
    -------
    dict
        ``codes`` (uint8 ``[tiles, code_rows, tile]``), ``scales`` (float32 ``[tiles, n_blocks,
        tile]``) and, unless ``layout.zero_points == "default"``, ``zero_points`` (uint8 or
        float32, like ``scales``).
    """
    L = layout
    codes = _unpack(b.reshape(L.n, -1), L.bits, L.k_pad)  # [N, k_pad] uint8
    zero = None
    if L.zero_points == "uint8":
        zero = _unpack(zero_points.reshape(L.n, -1), L.bits, L.n_blocks)
    elif L.zero_points == "float32":
        zero = zero_points.astype(np.float32).reshape(L.n, L.n_blocks)
    return pack_codes(codes, scales.reshape(L.n, L.n_blocks), zero, layout)


def pack_codes(
    codes: np.ndarray, scales: np.ndarray, zero: np.ndarray | None, layout: NBitsLayout
) -> dict[str, np.ndarray]:
    """``pack_nbits`` from unpacked arrays: uint8 ``codes [N, k_pad]`` (one code per byte),
    ``scales [N, n_blocks]`` and ``zero`` ``[N, n_blocks]`` (uint8 codes or float32; None with
    ``layout.zero_points == "default"``). Returns the same dict as ``pack_nbits``."""
    L = layout
    nb, tn, nt = L.n_blocks, L.tile, L.n_tiles
    codes = np.pad(codes, ((0, L.n_pad - L.n), (0, 0)))
    if L.bits == 4:
        packed = codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))  # [n_pad, k_pad / 2]
    else:
        packed = codes
    out = {
        "codes": np.ascontiguousarray(packed.reshape(nt, tn, L.code_rows).transpose(0, 2, 1)),
    }

    def tiled(per_column: np.ndarray, dtype) -> np.ndarray:
        full = np.zeros((L.n_pad, nb), dtype)
        full[: L.n] = per_column
        return np.ascontiguousarray(full.reshape(nt, tn, nb).transpose(0, 2, 1))

    out["scales"] = tiled(scales.astype(np.float32), np.float32)
    if L.zero_points == "uint8":
        out["zero_points"] = tiled(zero, np.uint8)
    elif L.zero_points == "float32":
        out["zero_points"] = tiled(zero.astype(np.float32), np.float32)
    return out


@dataclass(frozen=True)
class QuantGemmSchedule:
    """Register blocking of the quantized kernels for one CPU target.

    Parameters
    ----------
    lanes : int
        float32 SIMD lanes.
    nv : int
        SIMD vectors per column tile (``tile = nv * lanes``).
    mr : int
        Rows of the tiled kernel's register tile.
    gemv_rows : int
        Largest row count taking the GEMV kernel.
    kc : int
        Reduction steps per dequantized panel of the tiled kernel (a multiple of the block size).
    gemv_unroll : int
        Byte rows per unrolled GEMV step (4: measured best on AVX-512, 0.33 ms for 4096 x 4096
        against 0.41 fully unrolled, which spills registers).
    gemv_group : int
        Rows per pass of the few-rows GEMV (2 to ``gemv_rows`` rows): the codes are converted once
        per group (measured on AVX-512, 4096 x 4096, loaded host: 2 rows 0.37 ms, as fast as one;
        groups of 3 and 4 spill).
    """

    lanes: int
    nv: int
    mr: int
    gemv_rows: int
    kc: int
    gemv_unroll: int = 4
    gemv_group: int = 2

    @property
    def tile(self) -> int:
        return self.nv * self.lanes


def cpu_schedule(target, block_size: int) -> QuantGemmSchedule:
    """The schedule for ``target`` (an LLVM target): ``nv`` vectors per tile and an ``mr x nv``
    register tile that fits the target's SIMD registers with the ``nv`` panel vectors and one
    broadcast (AVX-512: 6 x 4 vectors; the accumulators are a ``local`` buffer, which LLVM keeps in
    registers at any size, where a ``global`` one over 1 KB would go to a heap workspace); the
    panel covers about 32 KB (L1) of float32."""
    from qiao.compiler.schedules.cpu_info import cpu_info

    cpu = cpu_info(target)
    lanes = cpu.lanes("float32")
    nv = 4 if cpu.vector_registers >= 32 else 2
    mr = max(1, min((cpu.vector_registers - nv - 1) // nv, 8))
    kc = max(block_size, (32768 // (4 * nv * lanes)) // block_size * block_size)
    return QuantGemmSchedule(lanes=lanes, nv=nv, mr=mr, gemv_rows=8, kc=kc)


class _Epilogue:
    """What both kernels read per output column besides the codes: the zero points (``zero``:
    a stored one, or the default ``2^(bits - 1)``) and the bias, with their buffer shapes
    (``(1,)`` placeholders when absent)."""

    def __init__(self, layout: NBitsLayout):
        L = layout
        self.layout = L
        self.zshape = (L.n_tiles, L.n_blocks, L.tile) if L.zero_points != "default" else (1,)
        self.zdtype = "float32" if L.zero_points == "float32" else "uint8"
        self.bshape = (L.n_pad,) if L.bias else (1,)

    def zero(self, Z, t, b, j):
        from tvm.script import tirx as T

        if self.layout.zero_points == "default":
            return T.float32(1 << (self.layout.bits - 1))
        return T.Cast("float32", Z[t, b, j])

    def bias(self, BIAS, col):
        from tvm.script import tirx as T

        return BIAS[col] if self.layout.bias else T.float32(0)


def float_kernels(layout: NBitsLayout, sched: QuantGemmSchedule, *, a_row, store, load=None):
    """The float32 (exact) kernels over one column tile, as TIR macros shared by
    ``quant_matmul`` and the MoE's quantized grouped GEMM (``qiao.compiler.kernels.quant_moe``).

    Each macro is called as ``kernel(A, ASUM, Bq, SC, Z, BIAS, OUT, E1, E2, IDX, t, base, m)`` for
    the ``m`` logical rows ``base .. base + m - 1`` and tile ``t`` (the first index of ``Bq``,
    ``SC``, ``Z``; ``BIAS`` is indexed ``t * TN + column``).

    Parameters
    ----------
    layout : NBitsLayout
    sched : QuantGemmSchedule
    a_row : callable
        ``a_row(IDX, r)``: the row of ``A`` and ``ASUM`` holding logical row ``r``.
    store : T.macro
        ``store(OUT, E1, E2, IDX, acc, i, r, t)``: write register row ``i`` of ``acc`` (``[rows,
        nv, lanes]`` float32, bias included) as logical row ``r`` of tile ``t``.
    load : callable, optional
        ``load(OUT, IDX, r, t, v, ln)``: a partial result ``store`` wrote for an earlier chunk of
        the reduction. Without it the tiled kernel's panel covers the whole of ``K``.

    Returns
    -------
    tuple
        ``(gemv, gemv_group, tiled)``: one row, 2 to ``gemv_rows`` rows, and more rows.
    """
    from tvm.script import tirx as T

    L, S = layout, sched
    if L.bits not in (4, 8):
        raise ValueError(f"quant_matmul: bits={L.bits} (4 or 8)")
    if L.tile != S.tile:
        raise ValueError(f"quant_matmul: layout tile {L.tile} != schedule tile {S.tile}")
    VL, NV, TN, MR = S.lanes, S.nv, S.tile, S.mr
    BS, NB, KP = L.block_size, L.n_blocks, L.k_pad
    KC = min(S.kc, KP) if load is not None else KP
    CB = KC // BS  # blocks per chunk
    NCH = -(-NB // CB)
    HALF = BS // 2  # GEMV: two reduction steps per iteration (low/high nibble or two rows)
    UNROLL = min(S.gemv_unroll, HALF)
    RG = S.gemv_group
    EPI = _Epilogue(L)
    zero, bias = EPI.zero, EPI.bias
    f32 = "float32"

    def code_lo(Bq, t, k2, j):
        """float32 code at reduction step ``2 * k2`` of column ``j``."""
        if L.bits == 4:
            return T.Cast(f32, T.bitwise_and(T.Cast("int32", Bq[t, k2, j]), 15))
        return T.Cast(f32, Bq[t, 2 * k2, j])

    def code_hi(Bq, t, k2, j):
        """float32 code at reduction step ``2 * k2 + 1`` of column ``j``."""
        if L.bits == 4:
            return T.Cast(f32, T.shift_right(T.Cast("int32", Bq[t, k2, j]), 4))
        return T.Cast(f32, Bq[t, 2 * k2 + 1, j])

    @T.macro
    def gemv(A, ASUM, Bq, SC, Z, BIAS, OUT, E1, E2, IDX, t, base, m):
        acc = T.alloc_buffer((1, NV, VL), f32)
        lo = T.alloc_buffer((NV, VL), f32)
        hi = T.alloc_buffer((NV, VL), f32)
        for r in range(m):
            ar: T.let[T.int64] = T.Cast("int64", a_row(IDX, base + r))
            for v in T.unroll(NV):
                for ln in T.vectorized(VL):
                    acc[0, v, ln] = bias(BIAS, t * TN + v * VL + ln)
            for b in range(NB):
                for v in T.unroll(NV):
                    for ln in T.vectorized(VL):
                        lo[v, ln] = T.float32(0)
                        hi[v, ln] = T.float32(0)
                for po in range(HALF // UNROLL):
                    for pi in T.unroll(UNROLL):
                        for v in T.unroll(NV):
                            for ln in T.vectorized(VL):
                                lo[v, ln] = (
                                    lo[v, ln]
                                    + code_lo(Bq, t, b * HALF + po * UNROLL + pi, v * VL + ln)
                                    * A[ar, b * BS + 2 * (po * UNROLL + pi)]
                                )
                                hi[v, ln] = (
                                    hi[v, ln]
                                    + code_hi(Bq, t, b * HALF + po * UNROLL + pi, v * VL + ln)
                                    * A[ar, b * BS + 2 * (po * UNROLL + pi) + 1]
                                )
                for v in T.unroll(NV):
                    for ln in T.vectorized(VL):
                        acc[0, v, ln] = acc[0, v, ln] + SC[t, b, v * VL + ln] * (
                            lo[v, ln] + hi[v, ln] - zero(Z, t, b, v * VL + ln) * ASUM[ar, b]
                        )
            store(OUT, E1, E2, IDX, acc, 0, base + r, t)

    @T.macro
    def gemv_group(A, ASUM, Bq, SC, Z, BIAS, OUT, E1, E2, IDX, t, base, m):
        # RG rows per pass over the tile: the codes are converted once for all of them
        acc = T.alloc_buffer((RG, NV, VL), f32)
        part = T.alloc_buffer((RG, NV, VL), f32)
        rows = T.alloc_buffer((RG,), "int64")
        for g in range((m + RG - 1) // RG):
            for i in T.unroll(RG):
                # a partial group repeats its last row
                rows[i] = T.Cast("int64", a_row(IDX, base + T.min(g * RG + i, m - 1)))
                for v in T.unroll(NV):
                    for ln in T.vectorized(VL):
                        acc[i, v, ln] = bias(BIAS, t * TN + v * VL + ln)
            for b in range(NB):
                for i in T.unroll(RG):
                    for v in T.unroll(NV):
                        for ln in T.vectorized(VL):
                            part[i, v, ln] = T.float32(0)
                for po in range(HALF // UNROLL):
                    for pi in T.unroll(UNROLL):
                        for i in T.unroll(RG):
                            for v in T.unroll(NV):
                                for ln in T.vectorized(VL):
                                    part[i, v, ln] = (
                                        part[i, v, ln]
                                        + code_lo(Bq, t, b * HALF + po * UNROLL + pi, v * VL + ln)
                                        * A[rows[i], b * BS + 2 * (po * UNROLL + pi)]
                                        + code_hi(Bq, t, b * HALF + po * UNROLL + pi, v * VL + ln)
                                        * A[rows[i], b * BS + 2 * (po * UNROLL + pi) + 1]
                                    )
                for i in T.unroll(RG):
                    for v in T.unroll(NV):
                        for ln in T.vectorized(VL):
                            acc[i, v, ln] = acc[i, v, ln] + SC[t, b, v * VL + ln] * (
                                part[i, v, ln] - zero(Z, t, b, v * VL + ln) * ASUM[rows[i], b]
                            )
            for i in T.unroll(RG):
                if g * RG + i < m:
                    store(OUT, E1, E2, IDX, acc, i, base + g * RG + i, t)

    @T.macro
    def tiled(A, ASUM, Bq, SC, Z, BIAS, OUT, E1, E2, IDX, t, base, m):
        panel = T.alloc_buffer((KC, TN), f32)
        acc = T.alloc_buffer((MR, NV, VL), f32, scope="local")
        rows = T.alloc_buffer((MR,), "int64")
        for c in range(NCH):
            # dequantize the chunk's blocks of the tile (zero point and scale folded in)
            for bb in range(T.min(CB, NB - c * CB)):
                for p in range(HALF):
                    for v in T.unroll(NV):
                        for ln in T.vectorized(VL):
                            panel[bb * BS + 2 * p, v * VL + ln] = (
                                code_lo(Bq, t, (c * CB + bb) * HALF + p, v * VL + ln)
                                - zero(Z, t, c * CB + bb, v * VL + ln)
                            ) * SC[t, c * CB + bb, v * VL + ln]
                            panel[bb * BS + 2 * p + 1, v * VL + ln] = (
                                code_hi(Bq, t, (c * CB + bb) * HALF + p, v * VL + ln)
                                - zero(Z, t, c * CB + bb, v * VL + ln)
                            ) * SC[t, c * CB + bb, v * VL + ln]
            for mb in range((m + MR - 1) // MR):
                for i in T.unroll(MR):
                    # a partial block repeats its last row
                    rows[i] = T.Cast("int64", a_row(IDX, base + T.min(mb * MR + i, m - 1)))
                for i in T.unroll(MR):
                    for v in T.unroll(NV):
                        for ln in T.vectorized(VL):
                            if NCH == 1:
                                acc[i, v, ln] = bias(BIAS, t * TN + v * VL + ln)
                            else:
                                acc[i, v, ln] = T.if_then_else(
                                    c == 0,
                                    bias(BIAS, t * TN + v * VL + ln),
                                    load(OUT, IDX, base + T.min(mb * MR + i, m - 1), t, v, ln),
                                )
                for k in range(T.min(KC, KP - c * KC)):
                    for i in T.unroll(MR):
                        for v in T.unroll(NV):
                            for ln in T.vectorized(VL):
                                acc[i, v, ln] = (
                                    acc[i, v, ln] + A[rows[i], c * KC + k] * panel[k, v * VL + ln]
                                )
                for i in T.unroll(MR):
                    if mb * MR + i < m:
                        store(OUT, E1, E2, IDX, acc, i, base + mb * MR + i, t)

    return gemv, gemv_group, tiled


def quant_matmul(layout: NBitsLayout, sched: QuantGemmSchedule):
    """Build the CPU kernel for ``layout``.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``quant_matmul(a, asum, codes, scales, zero_points, bias, y)`` with ``a`` float32 ``[M,
        k_pad]``, ``asum`` float32 ``[M, n_blocks]`` (row sums per block), the ``pack_nbits``
        arrays (``zero_points``, ``bias`` a ``(1,)`` placeholder when absent; ``bias``
        ``[n_pad]``), ``y`` float32 ``[M, n_pad]``.
    """
    from tvm.script import tirx as T

    L, S = layout, sched
    VL, NV, TN, NT = S.lanes, S.nv, S.tile, L.n_tiles
    NB, KP, NP, CR = L.n_blocks, L.k_pad, L.n_pad, L.code_rows
    EPI = _Epilogue(L)
    f32 = "float32"

    def a_row(_idx, r):
        return r

    @T.macro
    def store(Y, _e1, _e2, _idx, acc, i, r, t):
        for v in T.unroll(NV):
            for ln in T.vectorized(VL):
                Y[r, t * TN + v * VL + ln] = acc[i, v, ln]

    def load(Y, _idx, r, t, v, ln):
        return Y[r, t * TN + v * VL + ln]

    gemv, gemv_group, tiled = float_kernels(L, S, a_row=a_row, store=store, load=load)

    @T.prim_func(s_tir=True)
    def quant_matmul(
        a_h: T.handle,
        asum_h: T.handle,
        b_h: T.handle,
        s_h: T.handle,
        z_h: T.handle,
        bias_h: T.handle,
        y_h: T.handle,
    ):
        T.func_attr(KERNEL_ATTRS)
        m = T.int64()
        A = T.match_buffer(a_h, (m, KP), f32)
        ASUM = T.match_buffer(asum_h, (m, NB), f32)
        Bq = T.match_buffer(b_h, (NT, CR, TN), "uint8")
        SC = T.match_buffer(s_h, (NT, NB, TN), f32)
        Z = T.match_buffer(z_h, EPI.zshape, EPI.zdtype)
        BIAS = T.match_buffer(bias_h, EPI.bshape, f32)
        Y = T.match_buffer(y_h, (m, NP), f32)
        with T.sblock("root"):
            for t in T.parallel(NT):
                if m == 1:
                    gemv(A, ASUM, Bq, SC, Z, BIAS, Y, None, None, None, t, 0, m)
                elif m <= S.gemv_rows:
                    gemv_group(A, ASUM, Bq, SC, Z, BIAS, Y, None, None, None, t, 0, m)
                else:
                    tiled(A, ASUM, Bq, SC, Z, BIAS, Y, None, None, None, t, 0, m)

    return quant_matmul


# ------------------------------------------------------------------------------------------------
# accuracy_level 4: int8 activations, integer dot products
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Dot:
    """How a target multiplies uint8 codes by int8 activations, 4 pairs per 32-bit lane.

    Parameters
    ----------
    lanes : int
        32-bit lanes per vector.
    intrinsics : tuple of str
        ``(vpdpbusd,)`` (one fused instruction: VNNI) or ``(pmaddubsw, pmaddwd)`` (two, then an
        add: what AVX2 and AVX-512BW without VNNI have), as LLVM intrinsic names.
    """

    lanes: int
    intrinsics: tuple[str, ...]


def int8_dot(target, bits: int = 4) -> Int8Dot | None:
    """The integer dot product ``target``'s features allow for ``bits``-bit codes (``None``:
    none; the float32 kernels then serve ``accuracy_level`` 4 too). Read from the target, never
    from this machine. Without VNNI only 4-bit codes qualify: ``pmaddubsw`` saturates its int16
    pair sums, which 4-bit codes (at most ``2 * 15 * 127``) never reach and 8-bit ones do."""
    from tvm.target.codegen import llvm_cpu_has_features

    def has(feature: str) -> bool:
        try:
            return bool(llvm_cpu_has_features(feature, target))
        except Exception:  # an unknown feature name for this triple (not x86)
            return False

    if has("avx512bw") and has("avx512vnni"):
        return Int8Dot(16, ("llvm.x86.avx512.vpdpbusd.512",))
    if bits != 4:
        return None
    if has("avx512bw"):
        return Int8Dot(16, ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"))
    if has("avx2"):
        return Int8Dot(8, ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"))
    return None


def pack_nbits_int8(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    layout: NBitsLayout,
) -> dict[str, np.ndarray]:
    """``pack_nbits`` for the integer kernel: the codes as int32 words ``[tiles, K / 8, tile]``
    (4-bit: byte ``i`` of word ``w`` of a column holds its codes at ``k = 8w + i`` (low nibble)
    and ``8w + 4 + i`` (high nibble)) or ``[tiles, K / 4, tile]`` (8-bit: byte ``i`` holds ``k =
    4w + i``); scales and zero points as ``pack_nbits``."""
    L = layout
    out = pack_nbits(b, scales, zero_points, L)
    out["codes"] = int8_words(_unpack(b.reshape(L.n, -1), L.bits, L.k_pad), L)
    return out


def int8_words(codes: np.ndarray, layout: NBitsLayout) -> np.ndarray:
    """uint8 ``codes [N, k_pad]`` (one per byte) as the integer kernel's int32 words ``[tiles,
    words, tile]`` (the layout ``pack_nbits_int8`` describes)."""
    L = layout
    codes = np.pad(codes, ((0, L.n_pad - L.n), (0, 0)))  # [n_pad, k_pad]
    if L.bits == 4:
        groups = codes.reshape(L.n_pad, L.k_pad // 8, 2, 4)
        words = groups[:, :, 0, :] | (groups[:, :, 1, :] << np.uint8(4))  # [n_pad, K/8, 4]
    else:
        words = codes.reshape(L.n_pad, L.k_pad // 4, 4)
    words = np.ascontiguousarray(words).view(np.int32)[..., 0]  # [n_pad, K/8 or K/4]
    rows = words.shape[1]
    return np.ascontiguousarray(words.reshape(L.n_tiles, L.tile, rows).transpose(0, 2, 1))


def quantize_rows(k_pad: int, block_size: int):
    """Quantize activations per block of K to int8, as ONNX Runtime's ``accuracy_level`` 4 does.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``quantize_rows(a, qa, a_scale, qa_sum)``: ``a`` float32 ``[M, k_pad]`` → ``qa`` the int8
        codes ``round(a / a_scale)`` (``a_scale = max|a| / 127`` per block, ties to even), four
        per int32 word (``k = 4w`` in the low byte): int32 ``[M, k_pad / 4]``; ``a_scale``
        float32 ``[M, n_blocks]``; ``qa_sum`` float32 ``[M, n_blocks]`` (the sum of the block's
        codes, for the zero point).
    """
    from tvm.script import tirx as T

    BS, KP = block_size, k_pad
    NB = KP // BS
    f32 = "float32"

    def code(A, r, k, amax):
        return T.Cast(
            "int32",
            T.if_then_else(
                amax > T.float32(0),
                T.nearbyint(A[r, k] * (T.float32(127) / amax)),
                T.float32(0),
            ),
        )

    @T.prim_func(s_tir=True)
    def quantize_rows(a_h: T.handle, q_h: T.handle, s_h: T.handle, sum_h: T.handle):
        T.func_attr(KERNEL_ATTRS)
        m = T.int64()
        A = T.match_buffer(a_h, (m, KP), f32)
        QA = T.match_buffer(q_h, (m, KP // 4), "int32")
        SA = T.match_buffer(s_h, (m, NB), f32)
        QSUM = T.match_buffer(sum_h, (m, NB), f32)
        with T.sblock("root"):
            for r in T.parallel(m):
                amax = T.alloc_buffer((1,), f32)
                total = T.alloc_buffer((1,), "int32")
                word = T.alloc_buffer((1,), "int32")
                for b in range(NB):
                    amax[0] = T.float32(0)
                    for k in range(BS):
                        amax[0] = T.max(amax[0], T.fabs(A[r, b * BS + k]))
                    SA[r, b] = amax[0] / T.float32(127)
                    total[0] = 0
                    for w in range(BS // 4):
                        word[0] = 0
                        for i in T.unroll(4):
                            word[0] = T.bitwise_or(
                                word[0],
                                T.shift_left(
                                    T.bitwise_and(code(A, r, b * BS + 4 * w + i, amax[0]), 255),
                                    8 * i,
                                ),
                            )
                            total[0] = total[0] + code(A, r, b * BS + 4 * w + i, amax[0])
                        QA[r, b * (BS // 4) + w] = word[0]
                    QSUM[r, b] = T.Cast(f32, total[0])

    return quantize_rows


def int8_kernel(layout: NBitsLayout, dot: Int8Dot, rows_per_pass: int, *, a_row, store):
    """The integer (``accuracy_level`` 4) kernel over one column tile as a TIR macro, shared by
    ``quant_matmul_int8`` and the MoE's quantized grouped GEMM: ``rows_pass(QA, SA, QSUM, Bq, SC,
    Z, BIAS, OUT, E1, E2, IDX, t, base, m, G)`` for the ``m`` logical rows from ``base``, ``G``
    rows per pass (1, or ``rows_per_pass``); ``a_row`` and ``store`` as in ``float_kernels``
    (``store`` gets the float32 results as ``[G, tile / lanes, lanes]``)."""
    from tvm.script import tirx as T

    L = layout
    VL = dot.lanes
    if L.tile % VL:
        raise ValueError(f"quant_matmul_int8: tile {L.tile} is not a multiple of {VL} lanes")
    NV, TN, RG = L.tile // VL, L.tile, rows_per_pass
    BS, NB = L.block_size, L.n_blocks
    WPB = BS // 8 if L.bits == 4 else BS // 4  # code words per block and column
    EPI = _Epilogue(L)
    zero, bias = EPI.zero, EPI.bias
    f32, i32v = "float32", f"int32x{VL}"

    # Without VNNI, 4-bit codes: the int16 pair sums of ``pmaddubsw`` (each at most 2 * 15 * 127 =
    # 3810 in magnitude) are added in int16 over the whole block (at most 2 * WPB = 8 of them:
    # 30480 < 2^15, exact) and widened to int32 once per block with ``pmaddwd`` by ones, instead of
    # after every word: half the multiply-port instructions of the kernel.
    PAIRS = len(dot.intrinsics) == 2 and L.bits == 4
    if PAIRS and 2 * WPB * 2 * 15 * 127 >= 1 << 15:
        PAIRS = False  # blocks over 32 codes would overflow int16: widen per word
    i16v = f"int16x{2 * VL}"

    def madd16(codes, act):
        """``pmaddubsw``: uint8 ``codes`` x int8 ``act``, adjacent products summed (int16 lanes)."""
        return T.call_llvm_pure_intrin(
            i16v,
            T.llvm_lookup_intrinsic_id(dot.intrinsics[0]),
            T.reinterpret(codes, dtype=f"uint8x{4 * VL}"),
            T.reinterpret(act, dtype=f"int8x{4 * VL}"),
        )

    def widen(pairs):
        """``pmaddwd`` by ones: int16 lanes summed in adjacent pairs into int32 lanes."""
        return T.call_llvm_pure_intrin(
            i32v,
            T.llvm_lookup_intrinsic_id(dot.intrinsics[1]),
            pairs,
            T.broadcast(T.int16(1), 2 * VL),
        )

    def dot4(acc, codes, act):
        """``acc + sum over 4 byte pairs`` of uint8 ``codes`` x int8 ``act`` (int32 lanes)."""
        if len(dot.intrinsics) == 1:
            return T.call_llvm_pure_intrin(
                i32v,
                T.llvm_lookup_intrinsic_id(dot.intrinsics[0]),
                acc,
                T.reinterpret(codes, dtype=f"int8x{4 * VL}"),
                T.reinterpret(act, dtype=f"int8x{4 * VL}"),
            )
        return acc + widen(madd16(codes, act))

    def word(Bq, t, w, v):
        return Bq[t, w, T.ramp(v * VL, 1, VL)]

    def low(x):
        if L.bits == 8:
            return x
        return T.bitwise_and(x, T.broadcast(T.int32(0x0F0F0F0F), VL))

    def high(x):
        return T.bitwise_and(
            T.shift_right(x, T.broadcast(T.int32(4), VL)), T.broadcast(T.int32(0x0F0F0F0F), VL)
        )

    def act(QA, r, w):
        return T.broadcast(QA[r, w], VL)

    if PAIRS:

        @T.macro
        def block_step(Bq, QA, t, b, w, v, r, acc, i, part, part_hi):
            # ``acc`` holds int16 pair sums here: [G, 1, 2 * TN]
            acc[i, 0, T.ramp(v * 2 * VL, 1, 2 * VL)] = acc[i, 0, T.ramp(v * 2 * VL, 1, 2 * VL)] + (
                madd16(low(word(Bq, t, b * WPB + w, v)), act(QA, r, 2 * (b * WPB + w)))
                + madd16(high(word(Bq, t, b * WPB + w, v)), act(QA, r, 2 * (b * WPB + w) + 1))
            )

    elif L.bits == 4:

        @T.macro
        def block_step(Bq, QA, t, b, w, v, r, acc, i, part, part_hi):
            # 8 codes per word: low nibbles k .. k+3, high nibbles k+4 .. k+7
            acc[i, part, T.ramp(v * VL, 1, VL)] = dot4(
                acc[i, part, T.ramp(v * VL, 1, VL)],
                low(word(Bq, t, b * WPB + w, v)),
                act(QA, r, 2 * (b * WPB + w)),
            )
            acc[i, part_hi, T.ramp(v * VL, 1, VL)] = dot4(
                acc[i, part_hi, T.ramp(v * VL, 1, VL)],
                high(word(Bq, t, b * WPB + w, v)),
                act(QA, r, 2 * (b * WPB + w) + 1),
            )

    else:

        @T.macro
        def block_step(Bq, QA, t, b, w, v, r, acc, i, part, part_hi):
            acc[i, part, T.ramp(v * VL, 1, VL)] = dot4(
                acc[i, part, T.ramp(v * VL, 1, VL)],
                word(Bq, t, b * WPB + w, v),
                act(QA, r, b * WPB + w),
            )

    # Software prefetch PREFETCH_BYTES ahead in the code stream (and the scales and zero points of
    # that block): a decode GEMV streams each tile once, and the hardware prefetcher alone left
    # it at ~7.7 GB/s where this reaches ~8.5-12 (48 int4 layers 2048 x 2048, 129 MB, AVX2 EPYC).
    PD = max(1, PREFETCH_BYTES // (WPB * TN * 4))  # blocks ahead

    def _prefetch(addr):
        return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", addr, 0, 3, 1))

    @T.macro
    def prefetch(Bq, SC, Z, t, b):
        # past the last tile the addresses leave the buffers: a prefetch never faults
        for line in T.unroll(max(1, WPB * TN // WORDS_PER_LINE)):
            _prefetch(
                T.address_of(
                    Bq[
                        t,
                        (b + PD) * WPB + line * WORDS_PER_LINE // TN,
                        line * WORDS_PER_LINE % TN,
                    ]
                )
            )
        for line in T.unroll(max(1, TN // WORDS_PER_LINE)):
            _prefetch(T.address_of(SC[t, b + PD, line * WORDS_PER_LINE]))
        if L.zero_points != "default":
            _prefetch(T.address_of(Z[t, b + PD, 0]))

    if RG < 2:
        raise ValueError(f"quant_matmul_int8: rows_per_pass={RG} (2 or more)")
    # accumulator sets (low, high nibbles) of a pass of G rows: two for one row, one shared above
    SPLIT = {1: (0, 1 if L.bits == 4 and not PAIRS else 0), RG: (0, 0)}
    SETS = {1: 1 + SPLIT[1][1], RG: 1}
    # the int16 pair sums take twice the lanes of the int32 sums they widen into
    ACC = ("int16", 2 * TN) if PAIRS else ("int32", TN)

    @T.macro
    def widen_block(acc, wide, i, v, G):
        # the block's int32 sums of row i, vector v
        if PAIRS:
            wide[i, T.ramp(v * VL, 1, VL)] = widen(acc[i, 0, T.ramp(v * 2 * VL, 1, 2 * VL)])
        elif SETS[G] == 2:
            for ln in T.vectorized(VL):
                wide[i, v * VL + ln] = acc[i, 0, v * VL + ln] + acc[i, 1, v * VL + ln]
        else:
            for ln in T.vectorized(VL):
                wide[i, v * VL + ln] = acc[i, 0, v * VL + ln]

    @T.macro
    def rows_pass(QA, SA, QSUM, Bq, SC, Z, BIAS, OUT, E1, E2, IDX, t, base, m, G):
        # G rows per pass (G == 1 and int32 sums per word: two accumulator sets, low and high)
        # small "global" scratch inside the parallel loop is a stack array (registers after LLVM's
        # promotion); "local" scope went to a heap workspace, allocated per task and stored to
        acc = T.alloc_buffer((G, SETS[G], ACC[1]), ACC[0])
        wide = T.alloc_buffer((G, TN), "int32")
        out = T.alloc_buffer((G, NV, VL), f32)
        rows = T.alloc_buffer((G,), "int64")
        for g in range((m + G - 1) // G):
            for i in T.unroll(G):
                # a partial group repeats its last row
                rows[i] = T.Cast("int64", a_row(IDX, base + T.min(g * G + i, m - 1)))
                for v in T.unroll(NV):
                    for ln in T.vectorized(VL):
                        out[i, v, ln] = bias(BIAS, t * TN + v * VL + ln)
            for b in range(NB):
                prefetch(Bq, SC, Z, t, b)
                for i in T.unroll(G):
                    for h in T.unroll(SETS[G]):
                        for j in T.vectorized(ACC[1]):
                            acc[i, h, j] = T.Cast(ACC[0], 0)
                for w in T.unroll(WPB):
                    for v in T.unroll(NV):
                        for i in T.unroll(G):
                            block_step(
                                Bq, QA, t, b, w, v, rows[i], acc, i, SPLIT[G][0], SPLIT[G][1]
                            )
                for i in T.unroll(G):
                    for v in T.unroll(NV):
                        widen_block(acc, wide, i, v, G)
                        for ln in T.vectorized(VL):
                            out[i, v, ln] = out[i, v, ln] + SC[t, b, v * VL + ln] * SA[
                                rows[i], b
                            ] * (
                                T.Cast(f32, wide[i, v * VL + ln])
                                - zero(Z, t, b, v * VL + ln) * QSUM[rows[i], b]
                            )
            for i in T.unroll(G):
                if g * G + i < m:
                    store(OUT, E1, E2, IDX, out, i, base + g * G + i, t)

    return rows_pass


def quant_matmul_int8(layout: NBitsLayout, dot: Int8Dot, rows_per_pass: int = 2):
    """The ``accuracy_level`` 4 kernel: int8 activations (``quantize_rows``) times the codes in
    integer dot products, one int32 sum per block, then ``scale * a_scale * (sum - zero *
    qa_sum)`` accumulated in float32. Per task (a column tile) ``rows_per_pass`` rows share each
    load and unpack of the codes (one row: two accumulator sets, low and high nibbles).

    Returns
    -------
    tvm.tirx.PrimFunc
        ``quant_matmul_int8(qa, a_scale, qa_sum, codes, scales, zero_points, bias, y)``: ``qa``
        the int8 activations as int32 words ``[M, k_pad / 4]``, the ``pack_nbits_int8`` arrays,
        ``y`` float32 ``[M, n_pad]``.
    """
    from tvm.script import tirx as T

    L = layout
    VL = dot.lanes
    NV, TN, NT, RG = L.tile // VL, L.tile, L.n_tiles, rows_per_pass
    NB, KP, NP = L.n_blocks, L.k_pad, L.n_pad
    CR = NB * (L.block_size // 8 if L.bits == 4 else L.block_size // 4)
    EPI = _Epilogue(L)
    f32 = "float32"

    def a_row(_idx, r):
        return r

    @T.macro
    def store(Y, _e1, _e2, _idx, out, i, r, t):
        for v in T.unroll(NV):
            for ln in T.vectorized(VL):
                Y[r, t * TN + v * VL + ln] = out[i, v, ln]

    rows_pass = int8_kernel(L, dot, RG, a_row=a_row, store=store)

    @T.prim_func(s_tir=True)
    def quant_matmul_int8(
        q_h: T.handle,
        sa_h: T.handle,
        qs_h: T.handle,
        b_h: T.handle,
        s_h: T.handle,
        z_h: T.handle,
        bias_h: T.handle,
        y_h: T.handle,
    ):
        T.func_attr(KERNEL_ATTRS)
        m = T.int64()
        QA = T.match_buffer(q_h, (m, KP // 4), "int32")
        SA = T.match_buffer(sa_h, (m, NB), f32)
        QSUM = T.match_buffer(qs_h, (m, NB), f32)
        Bq = T.match_buffer(b_h, (NT, CR, TN), "int32")
        SC = T.match_buffer(s_h, (NT, NB, TN), f32)
        Z = T.match_buffer(z_h, EPI.zshape, EPI.zdtype)
        BIAS = T.match_buffer(bias_h, EPI.bshape, f32)
        Y = T.match_buffer(y_h, (m, NP), f32)
        with T.sblock("root"):
            for t in T.parallel(NT):
                if m == 1:
                    rows_pass(QA, SA, QSUM, Bq, SC, Z, BIAS, Y, None, None, None, t, 0, m, 1)
                else:
                    rows_pass(QA, SA, QSUM, Bq, SC, Z, BIAS, Y, None, None, None, t, 0, m, RG)

    return quant_matmul_int8


__all__ = [
    "Int8Dot",
    "NBitsLayout",
    "QuantGemmSchedule",
    "cpu_schedule",
    "int8_dot",
    "pack_nbits",
    "pack_nbits_int8",
    "quant_matmul",
    "quant_matmul_int8",
    "quantize_rows",
]
