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

from qiao.compiler.kernels.moe_common import KERNEL_ATTRS, MoEConfig
from qiao.compiler.kernels.quant_gemm import (
    NBitsLayout,
    QuantGemmSchedule,
    cpu_schedule,
    float_kernels,
    pack_codes,
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
    """One projection packed for the kernels: the layout of one expert and the stacked arrays."""

    layout: NBitsLayout
    codes: np.ndarray
    scales: np.ndarray
    zero: np.ndarray
    bias: np.ndarray

    @property
    def n_tiles(self) -> int:
        return self.layout.n_tiles


def pack_projection(
    q: QuantExperts, bias: np.ndarray | None, order: np.ndarray, sched: QuantGemmSchedule
) -> PackedProjection:
    """Pack every expert of ``q`` with its rows taken in ``order`` (and ``bias [E, N]``)."""
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
    parts = [
        pack_codes(
            unpacked[e][order],
            q.scales[e][order],
            None if q.zero is None else q.zero[e][order],
            layout,
        )
        for e in range(q.codes.shape[0])
    ]

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


def _task_loop(cfg: MoEConfig, sched: QuantGemmSchedule, NT: int, kernels):
    """The parallel loop over (active expert, column tile): the row count picks the kernel."""
    from tvm.script import tirx as T

    gemv, gemv_group, tiled = kernels

    @T.macro
    def loop(A, ASUM, Bq, SC, Z, BIAS, OUT, E1, E2, PAIRS, OFF, CNT, ACTIVE, NACT):
        for task in T.parallel(NACT[0] * NT):
            e: T.let[T.int32] = ACTIVE[task // NT]
            t: T.let[T.int32] = e * NT + task % NT
            cnt: T.let[T.int32] = CNT[e]
            off: T.let[T.int32] = OFF[e]
            if cnt == 1:
                gemv(A, ASUM, Bq, SC, Z, BIAS, OUT, E1, E2, PAIRS, t, off, cnt)
            elif cnt <= sched.gemv_rows:
                gemv_group(A, ASUM, Bq, SC, Z, BIAS, OUT, E1, E2, PAIRS, t, off, cnt)
            elif cnt > 0:
                tiled(A, ASUM, Bq, SC, Z, BIAS, OUT, E1, E2, PAIRS, t, off, cnt)

    return loop


def quant_group_gemm_up(cfg: MoEConfig, sched: QuantGemmSchedule, proj: PackedProjection):
    """``group_gemm_up`` over packed fc1 experts.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(x, xsum, codes, scales, zero, bias, sorted_pairs, offsets, counts, active,
        num_active, act)``: ``x`` float32 ``(T, H)``, ``xsum`` ``(T, n_blocks)`` its block sums,
        ``act`` ``(S, I)``.
    """
    from tvm.script import tirx as T

    L, S = proj.layout, sched
    VL, NV, TN, K = S.lanes, S.nv, S.tile, cfg.top_k
    NT, E, H, INTER = L.n_tiles, cfg.num_experts, cfg.hidden, cfg.inter
    half = NV // 2

    def a_row(PAIRS, slot):
        return PAIRS[slot] // K

    @T.macro
    def store(ACT, _e1, _e2, _pairs, acc, i, slot, t):
        if cfg.gated:
            for v in T.unroll(half):
                for ln in T.vectorized(VL):
                    ACT[slot, t % NT * (TN // 2) + v * VL + ln] = cfg.activation_expr(
                        acc[i, v, ln], acc[i, v + half, ln]
                    )
        else:
            for v in T.unroll(NV):
                for ln in T.vectorized(VL):
                    ACT[slot, t % NT * TN + v * VL + ln] = cfg.activation_expr(acc[i, v, ln])

    loop = _task_loop(cfg, S, NT, float_kernels(L, S, a_row=a_row, store=store))
    zshape, bshape = proj.zero.shape, proj.bias.shape
    zdtype = "uint8"

    @T.prim_func(s_tir=True)
    def quant_group_gemm_up(
        x_h: T.handle,
        xsum_h: T.handle,
        b_h: T.handle,
        s_h: T.handle,
        z_h: T.handle,
        bias_h: T.handle,
        pairs_h: T.handle,
        off_h: T.handle,
        cnt_h: T.handle,
        active_h: T.handle,
        nact_h: T.handle,
        act_h: T.handle,
    ):
        T.func_attr(KERNEL_ATTRS)
        n = T.int64()
        s = T.int64()
        X = T.match_buffer(x_h, (n, H), "float32")
        XSUM = T.match_buffer(xsum_h, (n, L.n_blocks), "float32")
        Bq = T.match_buffer(b_h, (E * NT, L.code_rows, TN), "uint8")
        SC = T.match_buffer(s_h, (E * NT, L.n_blocks, TN), "float32")
        Z = T.match_buffer(z_h, zshape, zdtype)
        BIAS = T.match_buffer(bias_h, bshape, "float32")
        PAIRS = T.match_buffer(pairs_h, (s,), "int32")
        OFF = T.match_buffer(off_h, (E + 1,), "int32")
        CNT = T.match_buffer(cnt_h, (E,), "int32")
        ACTIVE = T.match_buffer(active_h, (E,), "int32")
        NACT = T.match_buffer(nact_h, (1,), "int32")
        ACT = T.match_buffer(act_h, (s, INTER), "float32")
        with T.sblock("root"):
            loop(X, XSUM, Bq, SC, Z, BIAS, ACT, None, None, PAIRS, OFF, CNT, ACTIVE, NACT)

    return quant_group_gemm_up


def quant_group_gemm_down(cfg: MoEConfig, sched: QuantGemmSchedule, proj: PackedProjection):
    """``group_gemm_down`` over packed fc2 experts.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(act, asum, codes, scales, zero, bias, topk_weights, sorted_pairs, offsets, counts,
        active, num_active, out)``: ``act`` float32 ``(S, I)``, ``asum`` ``(S, n_blocks)``,
        ``out`` ``(T, k, H)`` = routing weight x expert output.
    """
    from tvm.script import tirx as T

    L, S = proj.layout, sched
    VL, NV, TN, K = S.lanes, S.nv, S.tile, cfg.top_k
    NT, E, H, INTER = L.n_tiles, cfg.num_experts, cfg.hidden, cfg.inter

    def a_row(_pairs, slot):
        return slot

    @T.macro
    def store(OUT, TW, _e2, PAIRS, acc, i, slot, t):
        for v in T.unroll(NV):
            for ln in T.vectorized(VL):
                OUT[PAIRS[slot] // K, PAIRS[slot] % K, t % NT * TN + v * VL + ln] = (
                    TW[PAIRS[slot] // K, PAIRS[slot] % K] * acc[i, v, ln]
                )

    loop = _task_loop(cfg, S, NT, float_kernels(L, S, a_row=a_row, store=store))
    zshape, bshape = proj.zero.shape, proj.bias.shape

    @T.prim_func(s_tir=True)
    def quant_group_gemm_down(
        a_h: T.handle,
        asum_h: T.handle,
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
        n = T.int64()
        s = T.int64()
        A = T.match_buffer(a_h, (s, INTER), "float32")
        ASUM = T.match_buffer(asum_h, (s, L.n_blocks), "float32")
        Bq = T.match_buffer(b_h, (E * NT, L.code_rows, TN), "uint8")
        SC = T.match_buffer(s_h, (E * NT, L.n_blocks, TN), "float32")
        Z = T.match_buffer(z_h, zshape, "uint8")
        BIAS = T.match_buffer(bias_h, bshape, "float32")
        TW = T.match_buffer(tw_h, (n, K), "float32")
        PAIRS = T.match_buffer(pairs_h, (s,), "int32")
        OFF = T.match_buffer(off_h, (E + 1,), "int32")
        CNT = T.match_buffer(cnt_h, (E,), "int32")
        ACTIVE = T.match_buffer(active_h, (E,), "int32")
        NACT = T.match_buffer(nact_h, (1,), "int32")
        OUT = T.match_buffer(out_h, (n, K, H), "float32")
        with T.sblock("root"):
            loop(A, ASUM, Bq, SC, Z, BIAS, OUT, TW, None, PAIRS, OFF, CNT, ACTIVE, NACT)

    return quant_group_gemm_down


@dataclass
class QuantMoE:
    """A QMoE's experts packed for one CPU target, and how to emit its two grouped GEMMs."""

    cfg: MoEConfig
    sched: QuantGemmSchedule
    fc1: PackedProjection
    fc2: PackedProjection

    @classmethod
    def pack(cls, cfg, target, fc1: QuantExperts, b1, fc2: QuantExperts, b2):
        """Pack for ``target``, or return ``(None, reason)`` when the shapes do not fit."""
        sched = cpu_schedule(target, max(fc1.block_size, fc2.block_size))
        reason = packable(cfg, sched, fc1, fc2)
        if reason:
            return None, reason
        p1 = pack_projection(fc1, b1, _fc1_order(cfg, sched.tile // 2), sched)
        p2 = pack_projection(fc2, b2, np.arange(cfg.hidden), sched)
        return cls(cfg, sched, p1, p2), None

    def _block_sums(self, bb, a, layout: NBitsLayout):
        from tvm import relax

        rows = a.ty.shape[0]
        blocks = relax.ShapeExpr([rows, layout.n_blocks, layout.block_size])
        return bb.emit(relax.op.sum(relax.op.reshape(a, blocks), axis=[2]))

    def _weights(self, proj: PackedProjection):
        from tvm import relax

        return [relax.const(a) for a in (proj.codes, proj.scales, proj.zero, proj.bias)]

    def emit_up(self, bb, x, tables, slots):
        """``act (S, I)`` from ``x (T, H)`` and ``moe_align``'s tables."""
        from tvm import relax

        _counts, offsets, active, num_active, pairs = tables[:5]
        func = quant_group_gemm_up(self.cfg, self.sched, self.fc1)
        gv = bb.add_func(func.without_attr("global_symbol"), "quant_group_gemm_up")
        args = [x, self._block_sums(bb, x, self.fc1.layout), *self._weights(self.fc1)]
        args += [pairs, offsets, tables[0], active, num_active]
        return bb.emit(
            relax.call_tir(gv, args, relax.TensorType((slots, self.cfg.inter), "float32"))
        )

    def emit_down(self, bb, act, weights, tables, tokens):
        """``out (T, k, H)`` from ``act`` and the routing weights."""
        from tvm import relax

        _counts, offsets, active, num_active, pairs = tables[:5]
        func = quant_group_gemm_down(self.cfg, self.sched, self.fc2)
        gv = bb.add_func(func.without_attr("global_symbol"), "quant_group_gemm_down")
        args = [act, self._block_sums(bb, act, self.fc2.layout), *self._weights(self.fc2)]
        args += [weights, pairs, offsets, tables[0], active, num_active]
        out = relax.TensorType((tokens, self.cfg.top_k, self.cfg.hidden), "float32")
        return bb.emit(relax.call_tir(gv, args, out))


def float_config(cfg: MoEConfig) -> MoEConfig:
    """``cfg`` for the same MoE with dequantized (float32) experts."""
    return replace(cfg, weight_bits=0)
