"""MoE stage 3 with integer experts (``com.microsoft::QMoE``): the grouped GEMMs of
``group_gemm`` reading 4- or 8-bit expert weights in place and dequantizing in registers.

Each expert's projection is packed like one ``MatMulNBits`` weight (``quant_gemm.pack_codes``:
column tiles of ``TN = nv * lanes`` output columns, codes k-major, scales and zero points per
block and column), and the experts' tiles are stacked: ``codes [E * NT, code_rows, TN]``,
``scales [E * NT, n_blocks, TN]``, so tile ``e * NT + t`` is tile ``t`` of expert ``e``. A
projection quantized per column (QMoE without ``block_size``) is one block of all of ``K``.

fc1 of a gated (SwiGLU) MoE is permuted at packing so that each tile holds ``TN / 2`` units'
gate rows in its first ``nv / 2`` vectors and the same units' up rows in the others: the
activation is applied in registers, as in the float kernels, and ``act`` is written directly.

The kernels are ``quant_gemm.float_kernels`` (the exact path: codes converted to float32 in
registers, ``scale * (sum code * a - zero * sum a)`` per block) run over the dispatch of
``moe_align``: one parallel task per (expert that received tokens, column tile); a lone token
(decode) takes the GEMV, up to ``gemv_rows`` tokens the few-rows GEMV, more the tiled kernel
with the tile's dequantized panel (the whole of ``K``) in scratch memory. Each routed expert's
weight bytes are read once per step. ``accuracy_level`` does not change the result: qiao computes
the exact dequantize-then-float32 MoE at every level.

Shapes the packed path takes (else ``LowerMoE`` dequantizes the experts to float32 at compile
time, which is exact): 4- or 8-bit codes, ``K`` (hidden for fc1, intermediate for fc2) a multiple
of the block size and of 2, ``H`` a multiple of ``TN`` and ``I`` a multiple of ``TN / 2``
(gated) or ``TN``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qiao.compiler.kernels.moe_common import KERNEL_ATTRS, MoEConfig, add_kernel
from qiao.compiler.kernels.quant_gemm import (
    Int8Dot,
    NBitsLayout,
    QuantGemmSchedule,
    cpu_schedule,
    float_kernels,
    int8_dot,
    int8_words,
    pack_codes,
    quantize_rows,
)


@dataclass
class QuantExperts:
    """One projection's integer experts as the QMoE converter normalises them.

    Parameters
    ----------
    codes : np.ndarray
        uint8 ``[E, N, K * bits / 8]``: row ``n`` of expert ``e``, codes along K, low bits first.
    scales : np.ndarray
        float32 ``[E, N, n_blocks]`` (``n_blocks`` 1 when quantized per column).
    zero : np.ndarray or None
        uint8 ``[E, N, n_blocks]`` zero-point codes; None: ``2^(bits - 1)``.
    bits : int
    k : int
        Codes per row.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero: np.ndarray | None
    bits: int
    k: int

    @property
    def block_size(self) -> int:
        return self.k // self.scales.shape[2]

    def unpacked(self) -> np.ndarray:
        """uint8 ``[E, N, K]`` codes."""
        from qiao.compiler.frontend.convert_quant import unpack_codes

        return unpack_codes(self.codes, self.bits, self.k)

    def dequantized(self) -> np.ndarray:
        """float32 ``[E, N, K]``: ``(code - zero) * scale``, the exact weight."""
        e, n, k = self.codes.shape[0], self.codes.shape[1], self.k
        nb = self.scales.shape[2]
        codes = self.unpacked().astype(np.float32).reshape(e, n, nb, k // nb)
        zero = (
            np.float32(1 << (self.bits - 1))
            if self.zero is None
            else self.zero.astype(np.float32)[..., None]
        )
        out = (codes - zero) * self.scales.astype(np.float32)[..., None]
        return np.ascontiguousarray(out.reshape(e, n, k), np.float32)


def _fc1_order(cfg: MoEConfig, half: int) -> np.ndarray:
    """fc1 row of each packed column (gated: per tile, ``half`` units' gate rows then their up
    rows; else the rows in order)."""
    if not cfg.gated:
        return np.arange(cfg.inter)
    units = np.arange(cfg.inter).reshape(-1, half)  # [tiles, half]
    gate = np.array([[cfg.fc1_row(int(u), 0) for u in tile] for tile in units])
    up = np.array([[cfg.fc1_row(int(u), 1) for u in tile] for tile in units])
    return np.concatenate([gate, up], axis=1).reshape(-1)


def packable(cfg: MoEConfig, sched: QuantGemmSchedule, fc1: QuantExperts, fc2: QuantExperts):
    """Whether the packed kernels take this MoE on a target with schedule ``sched`` (the module
    docstring lists the shapes); the reason when they do not."""
    TN = sched.tile
    for name, q in (("fc1", fc1), ("fc2", fc2)):
        if q.bits not in (4, 8):
            return f"{name} has {q.bits}-bit codes"
        if q.k % q.block_size or q.block_size % 2:
            return f"{name}'s K={q.k} is not whole blocks of an even size"
    if cfg.hidden % TN:
        return f"hidden size {cfg.hidden} is not a multiple of the {TN}-column tile"
    unit = TN // 2 if cfg.gated else TN
    if cfg.inter % unit or (cfg.gated and sched.nv % 2):
        return f"intermediate size {cfg.inter} is not a multiple of {unit}"
    return None


@dataclass
class PackedProjection:
    """One projection packed for the kernels: the layout of one expert and the stacked arrays
    (``codes`` uint8 for the float kernels, int32 words for the integer one)."""

    layout: NBitsLayout
    codes: np.ndarray
    scales: np.ndarray
    zero: np.ndarray
    bias: np.ndarray

    @property
    def kernel_shapes(self) -> tuple:
        """What the grouped GEMM's code reads of the arrays: the code rows per tile and the zero
        points' and bias's shapes."""
        return self.codes.shape[1], self.zero.shape, self.bias.shape


def pack_projection(
    q: QuantExperts,
    bias: np.ndarray | None,
    order: np.ndarray,
    sched: QuantGemmSchedule,
    int8: bool = False,
) -> PackedProjection:
    """Pack every expert of ``q`` with its rows taken in ``order`` (and ``bias [E, N]``);
    ``int8``: the codes as the integer kernel's words (``quant_gemm.int8_words``)."""
    n = len(order)
    layout = NBitsLayout(
        q.k,
        n,
        q.bits,
        q.block_size,
        sched.tile,
        "default" if q.zero is None else "uint8",
        bias=bias is not None,
    )
    unpacked = q.unpacked()
    parts = []
    for e in range(q.codes.shape[0]):
        zero = None if q.zero is None else q.zero[e][order]
        part = pack_codes(unpacked[e][order], q.scales[e][order], zero, layout)
        if int8:
            part["codes"] = int8_words(unpacked[e][order], layout)
        parts.append(part)

    def stacked(key):
        return np.ascontiguousarray(np.concatenate([p[key] for p in parts], axis=0))

    zero = stacked("zero_points") if q.zero is not None else np.zeros((1,), np.uint8)
    if bias is None:
        flat_bias = np.zeros((1,), np.float32)
    else:
        flat_bias = np.zeros((q.codes.shape[0], layout.n_pad), np.float32)
        flat_bias[:, :n] = bias[:, order]
        flat_bias = flat_bias.reshape(-1)
    return PackedProjection(layout, stacked("codes"), stacked("scales"), zero, flat_bias)


def _grouped_gemm(cfg: MoEConfig, sched: QuantGemmSchedule, layout, shapes, dot, down: bool):
    """The grouped GEMM of one projection (``layout``, ``PackedProjection.kernel_shapes``):
    ``down`` False for fc1 (gate/up and the activation, writing ``act``), True for fc2 (times the
    routing weight, writing ``out``); ``dot`` an ``Int8Dot`` for the integer kernel
    (``accuracy_level`` 4), None for the float one.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(a0, a1, a2, codes, scales, zero, bias, topk_weights, sorted_pairs, offsets, counts,
        active, num_active, out)``. The activations ``a0, a1, a2`` are ``A (rows, K)`` float32,
        its block sums ``(rows, n_blocks)`` and an unread ``(1,)`` (float kernels), or the
        ``quant_gemm.quantize_rows`` outputs (integer kernel); rows are the tokens for fc1, the
        slots for fc2. ``topk_weights`` ``(T, k)`` is unread (``(1,)``) for fc1; ``out`` is
        ``act (S, I)`` for fc1 and ``(T, k, H)`` for fc2.
    """
    from tvm.script import tirx as T

    from qiao.compiler.kernels.quant_gemm import int8_kernel

    L, S = layout, sched
    VL, NV, TN, K = S.lanes, S.nv, S.tile, cfg.top_k
    NT, E, H, INTER = L.n_tiles, cfg.num_experts, cfg.hidden, cfg.inter
    NB, KP = L.n_blocks, L.k_pad
    half = NV // 2
    f32 = "float32"

    def a_row(PAIRS, slot):
        return slot if down else PAIRS[slot] // K

    @T.macro
    def store(OUT, TW, _e2, PAIRS, acc, i, slot, t):
        if down:
            for v in T.unroll(NV):
                for ln in T.vectorized(VL):
                    OUT[PAIRS[slot] // K, PAIRS[slot] % K, t % NT * TN + v * VL + ln] = (
                        TW[PAIRS[slot] // K, PAIRS[slot] % K] * acc[i, v, ln]
                    )
        elif cfg.gated:
            for v in T.unroll(half):
                for ln in T.vectorized(VL):
                    OUT[slot, t % NT * (TN // 2) + v * VL + ln] = cfg.activation_expr(
                        acc[i, v, ln], acc[i, v + half, ln]
                    )
        else:
            for v in T.unroll(NV):
                for ln in T.vectorized(VL):
                    OUT[slot, t % NT * TN + v * VL + ln] = cfg.activation_expr(acc[i, v, ln])

    gemv = gemv_group = tiled = rows_pass = None
    if dot is None:
        gemv, gemv_group, tiled = float_kernels(L, S, a_row=a_row, store=store)
        a_cols = [(KP, f32), (NB, f32), None]
        code_type = "uint8"
    else:
        rows_pass = int8_kernel(L, dot, 2, a_row=a_row, store=store)
        a_cols = [(KP // 4, "int32"), (NB, f32), (NB, f32)]
        code_type = "int32"
    code_rows, zshape, bshape = shapes

    def a_shape(i, r):
        return (r, a_cols[i][0]) if a_cols[i] else (1,)

    def a_dtype(i):
        return a_cols[i][1] if a_cols[i] else f32

    def tw_shape(n):
        return (n, K) if down else (1,)

    def out_shape(n, s):
        return (n, K, H) if down else (s, INTER)

    @T.macro
    def tile_task(A0, A1, A2, Bq, SC, Z, BIAS, OUT, TW, PAIRS, t, off, cnt):
        if dot is None:
            if cnt == 1:
                gemv(A0, A1, Bq, SC, Z, BIAS, OUT, TW, None, PAIRS, t, off, cnt)
            elif cnt <= S.gemv_rows:
                gemv_group(A0, A1, Bq, SC, Z, BIAS, OUT, TW, None, PAIRS, t, off, cnt)
            else:
                tiled(A0, A1, Bq, SC, Z, BIAS, OUT, TW, None, PAIRS, t, off, cnt)
        elif cnt == 1:
            rows_pass(A0, A1, A2, Bq, SC, Z, BIAS, OUT, TW, None, PAIRS, t, off, cnt, 1)
        else:
            rows_pass(A0, A1, A2, Bq, SC, Z, BIAS, OUT, TW, None, PAIRS, t, off, cnt, 2)

    @T.prim_func(s_tir=True)
    def quant_group_gemm(
        a0_h: T.handle,
        a1_h: T.handle,
        a2_h: T.handle,
        b_h: T.handle,
        s_h: T.handle,
        z_h: T.handle,
        bias_h: T.handle,
        tw_h: T.handle,
        pairs_h: T.handle,
        off_h: T.handle,
        cnt_h: T.handle,
        active_h: T.handle,
        nact_h: T.handle,
        out_h: T.handle,
    ):
        T.func_attr(KERNEL_ATTRS)
        n = T.int64()  # tokens
        s = T.int64()  # slots
        r = T.int64()  # rows of the activations: tokens (fc1) or slots (fc2)
        A0 = T.match_buffer(a0_h, a_shape(0, r), a_dtype(0))
        A1 = T.match_buffer(a1_h, a_shape(1, r), a_dtype(1))
        A2 = T.match_buffer(a2_h, a_shape(2, r), a_dtype(2))
        Bq = T.match_buffer(b_h, (E * NT, code_rows, TN), code_type)
        SC = T.match_buffer(s_h, (E * NT, NB, TN), f32)
        Z = T.match_buffer(z_h, zshape, "uint8")
        BIAS = T.match_buffer(bias_h, bshape, f32)
        TW = T.match_buffer(tw_h, tw_shape(n), f32)
        PAIRS = T.match_buffer(pairs_h, (s,), "int32")
        OFF = T.match_buffer(off_h, (E + 1,), "int32")
        CNT = T.match_buffer(cnt_h, (E,), "int32")
        ACTIVE = T.match_buffer(active_h, (E,), "int32")
        NACT = T.match_buffer(nact_h, (1,), "int32")
        OUT = T.match_buffer(out_h, out_shape(n, s), f32)
        with T.sblock("root"):
            for task in T.parallel(NACT[0] * NT):
                e: T.let[T.int32] = ACTIVE[task // NT]
                tile_task(
                    A0, A1, A2, Bq, SC, Z, BIAS, OUT, TW, PAIRS,
                    e * NT + task % NT, OFF[e], CNT[e],
                )  # fmt: skip

    return quant_group_gemm


@dataclass
class QuantMoE:
    """A QMoE's experts packed for one CPU target, and how to emit its two grouped GEMMs."""

    cfg: MoEConfig
    sched: QuantGemmSchedule
    fc1: PackedProjection
    fc2: PackedProjection
    dot: Int8Dot | None = None

    @classmethod
    def pack(cls, cfg, target, fc1: QuantExperts, b1, fc2: QuantExperts, b2):
        """Pack for ``target``, or return ``(None, reason)`` when the shapes do not fit. At
        ``accuracy_level`` 4, where the target has integer dot products for the codes, the
        integer kernel (int8 activations per block, as ONNX Runtime) is packed for."""
        sched = cpu_schedule(target, max(fc1.block_size, fc2.block_size))
        reason = packable(cfg, sched, fc1, fc2)
        if reason:
            return None, reason
        dot = int8_dot(target, cfg.weight_bits) if cfg.accuracy_level == 4 else None
        words = 8 if cfg.weight_bits == 4 else 4
        if dot is not None and (
            sched.tile % dot.lanes or fc1.block_size % words or fc2.block_size % words
        ):
            dot = None
        int8 = dot is not None
        p1 = pack_projection(fc1, b1, _fc1_order(cfg, sched.tile // 2), sched, int8)
        p2 = pack_projection(fc2, b2, np.arange(cfg.hidden), sched, int8)
        return cls(cfg, sched, p1, p2, dot), None

    def _activations(self, bb, a, layout: NBitsLayout, kernels=None) -> list:
        """The kernel's activation operands for ``a``: ``[a, block sums, (1,)]`` or the int8
        codes, scales and code sums of ``quantize_rows``."""
        from tvm import relax

        rows = a.ty.shape[0]
        if self.dot is None:
            blocks = relax.ShapeExpr([rows, layout.n_blocks, layout.block_size])
            sums = bb.emit(relax.op.sum(relax.op.reshape(a, blocks), axis=[2]))
            return [a, sums, relax.const(np.zeros((1,), np.float32))]
        gv = add_kernel(
            bb, kernels, "quantize_rows", quantize_rows, layout.k_pad, layout.block_size
        )
        per_block = relax.TensorType((rows, layout.n_blocks), "float32")
        words = relax.TensorType((rows, layout.k_pad // 4), "int32")
        qa = bb.emit(relax.call_tir(gv, [a], [words, per_block, per_block]))
        return [bb.emit(relax.TupleGetItem(qa, i)) for i in range(3)]

    def _emit(self, bb, proj, a, weights, tables, out, down: bool, kernels=None):
        from tvm import relax

        counts, offsets, active, num_active, pairs = tables[:5]
        name = "quant_group_gemm_down" if down else "quant_group_gemm_up"
        build = (self.cfg, self.sched, proj.layout, proj.kernel_shapes, self.dot, down)
        gv = add_kernel(bb, kernels, name, _grouped_gemm, *build)
        consts = [relax.const(x) for x in (proj.codes, proj.scales, proj.zero, proj.bias)]
        args = [*self._activations(bb, a, proj.layout, kernels), *consts, weights]
        args += [pairs, offsets, counts, active, num_active]
        return bb.emit(relax.call_tir(gv, args, out))

    def emit_up(self, bb, x, tables, slots, kernels=None):
        """``act (S, I)`` from ``x (T, H)`` and ``moe_align``'s tables (``kernels``: the memo
        of ``moe_common.add_kernel``)."""
        from tvm import relax

        unread = relax.const(np.zeros((1,), np.float32))
        out = relax.TensorType((slots, self.cfg.inter), "float32")
        return self._emit(bb, self.fc1, x, unread, tables, out, False, kernels)

    def emit_down(self, bb, act, weights, tables, tokens, kernels=None):
        """``out (T, k, H)`` from ``act`` and the routing weights."""
        from tvm import relax

        out = relax.TensorType((tokens, self.cfg.top_k, self.cfg.hidden), "float32")
        return self._emit(bb, self.fc2, act, weights, tables, out, True, kernels)


def float_config(cfg: MoEConfig) -> MoEConfig:
    """``cfg`` for the same MoE with dequantized (float32) experts."""
    return replace(cfg, weight_bits=0)
