"""Grouped-query attention over a KV cache, and the in-place cache append, as TIR kernels.

``com.microsoft::GroupQueryAttention`` (see ``qiao.compiler.frontend.convert_genai``): per batch
entry ``b``, ``T_b`` tokens are in the cache after the step and ``P_b`` were cached before it;
query row ``s`` sits at absolute position ``P_b + s`` and sees keys ``[lo, hi)`` with
``hi = min(P_b + s + 1, T_b)`` (causal; ``T_b`` otherwise) and ``lo = max(0, P_b + s - W + 1)``
for a local window ``W`` (0 otherwise).

- ``gqa_attention`` reads the cache buffers ``(B, Hkv, L, D)`` directly and only rows ``[lo, hi)``
  of entry ``b``: its loop bounds depend on ``T_b``/``P_b`` and never on the buffer length ``L``,
  so a decode step costs attention's own work whatever the buffer's size. Online softmax (one pass
  over the keys, a running maximum and sum), in float32; ``softcap``, ``scale``, a per-head sink
  logit (``head_sink``, or 0 for ``smooth_softmax``) and the GQA grouping (the ``G`` query heads of
  one KV head share each key/value row read).
- ``kv_append`` writes the ``Q_b = T_b - P_b`` new rows of entry ``b`` into the cache buffers at
  ``[P_b, T_b)``, in place (the caller lowers it with ``call_tir_inplace``). A buffer shorter than
  ``T_b`` fails a run-time assert (CPU) instead of being written out of bounds.

CPU: one parallel task per (entry, KV head, query row), the head dim vectorised; GPU: one thread
per (entry, query row, query head), a plain form that builds and is correct, not tuned.
"""

from __future__ import annotations

from dataclasses import dataclass

from qiao.compiler.errors import CompileError
from qiao.compiler.kernels.moe_common import KERNEL_ATTRS, pow2_divisor

_NEG = -3.0e38  # the running maximum's start: below any score, finite (exp(-inf - -inf) is NaN)


@dataclass(frozen=True)
class AttentionConfig:
    """Static description of one GroupQueryAttention node.

    Parameters
    ----------
    q_heads, kv_heads, head_size : int
        ``Hq``, ``Hkv`` (a divisor of ``Hq``) and ``D``.
    scale : float
        Multiplies ``q . k`` (ONNX Runtime's default ``1/sqrt(D)`` is resolved by the converter).
    softcap : float
        ``> 0``: scores become ``softcap * tanh(score / softcap)`` (after ``scale``).
    window : int
        ``local_window_size``: ``> 0`` limits a row to its last ``window`` keys (its own
        included); ``-1``: no limit.
    causal : bool
        Row ``s`` sees keys up to its own position; ``False``: all ``T_b`` keys.
    sink : bool
        A per-query-head logit (the ``sink`` buffer: ``head_sink``, or zeros for
        ``smooth_softmax``) joins the softmax denominator.
    dtype : str
        Of the query, the cache and the output; arithmetic is float32.
    """

    q_heads: int
    kv_heads: int
    head_size: int
    scale: float
    softcap: float = 0.0
    window: int = -1
    causal: bool = True
    sink: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.q_heads <= 0 or self.kv_heads <= 0 or self.q_heads % self.kv_heads:
            raise CompileError(
                f"attention: {self.q_heads} query heads are not a multiple of {self.kv_heads} KV "
                "heads. fix: export num_heads as a multiple of kv_num_heads"
            )
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise CompileError(
                f"attention kernel: dtype {self.dtype} is not supported. fix: use float32, "
                "float16 or bfloat16"
            )

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.q_heads // self.kv_heads


_OVERFLOW = (
    "GroupQueryAttention: the KV cache buffer is shorter than the tokens in the cache after this "
    "step (some sum(attention_mask[b]) > the past_key_values length). fix: pass past buffers of "
    "the context length (GenAI's shared buffer), or compile with kv_cache='copy' for a past that "
    "grows"
)
_BAD_LENGTHS = (
    "GroupQueryAttention: more new rows than tokens in the cache (query_seqlens > seqlens_k + 1). "
    "fix: pass seqlens_k = total tokens - 1 per entry"
)


def gqa_attention(
    cfg: AttentionConfig,
    *,
    gpu: bool = False,
    vector_lanes: int = 8,
    block_keys: int = 16,
    query_rows: int = 4,
    threads: int = 64,
):
    """Build the attention PrimFunc for ``cfg``.

    Parameters
    ----------
    cfg : AttentionConfig
    gpu : bool
        One thread per (entry, query row, query head) instead of CPU parallel tasks.
    vector_lanes : int
        CPU: float32 lanes of the head-dim vectors.
    block_keys : int
        CPU: keys scored per online-softmax update.
    query_rows : int
        CPU: query rows per task when ``S >= query_rows`` (prefill), sharing each K/V row read.
    threads : int
        GPU: threads per block.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``gqa_attention(q, k_cache, v_cache, total, past, sink, out)``: ``q`` (B, S, Hq, D)
        (rotary applied), ``k_cache``/``v_cache`` (B, Hkv, L, D) holding the new rows already,
        ``total`` and ``past`` (B,) int64 (``T_b``, ``P_b``), ``sink`` (Hq,) float32 (read when
        ``cfg.sink``), ``out`` (B, S, Hq, D). ``B``, ``S`` and ``L`` are symbolic.
    """
    from tvm.script import tirx as T

    HQ, HKV, D, G = cfg.q_heads, cfg.kv_heads, cfg.head_size, cfg.group
    dt, f32 = cfg.dtype, "float32"
    scale = float(cfg.scale)
    cap = float(cfg.softcap)
    window = int(cfg.window) if cfg.causal else -1
    use_sink = bool(cfg.sink)
    causal = bool(cfg.causal)

    def lo_of(TOT, PAST, b, s):
        """The first key query row ``s`` of entry ``b`` sees (a TIR expression)."""
        if window > 0:
            return T.max(PAST[b] + s - (window - 1), T.int64(0))
        return T.int64(0)

    def hi_of(TOT, PAST, b, s):
        """One past the last key query row ``s`` of entry ``b`` sees."""
        return T.min(PAST[b] + s + 1, TOT[b]) if causal else TOT[b]

    def bounds(TOT, PAST, b, s):
        return lo_of(TOT, PAST, b, s), hi_of(TOT, PAST, b, s)

    def capped(x):
        if cap > 0:
            return T.tanh(x / T.float32(cap)) * T.float32(cap)
        return x

    if gpu:

        @T.prim_func(s_tir=True)
        def gqa_attention(
            q_h: T.handle,
            k_h: T.handle,
            v_h: T.handle,
            tot_h: T.handle,
            past_h: T.handle,
            sink_h: T.handle,
            out_h: T.handle,
        ):
            T.func_attr(KERNEL_ATTRS)
            B, S, L = T.int64(), T.int64(), T.int64()
            Q = T.match_buffer(q_h, (B, S, HQ, D), dt)
            K = T.match_buffer(k_h, (B, HKV, L, D), dt)
            V = T.match_buffer(v_h, (B, HKV, L, D), dt)
            TOT = T.match_buffer(tot_h, (B,), "int64")
            PAST = T.match_buffer(past_h, (B,), "int64")
            SINK = T.match_buffer(sink_h, (HQ,), f32)
            OUT = T.match_buffer(out_h, (B, S, HQ, D), dt)
            with T.sblock("root"):
                for bx in T.thread_binding(
                    (B * S * HQ + threads - 1) // threads, thread="blockIdx.x"
                ):
                    for tx in T.thread_binding(threads, thread="threadIdx.x"):
                        acc = T.alloc_buffer((D,), f32, scope="local")
                        st = T.alloc_buffer((4,), f32, scope="local")  # max, sum, score, p
                        if bx * threads + tx < B * S * HQ:
                            b = (bx * threads + tx) // (S * HQ)
                            s = (bx * threads + tx) // HQ % S
                            hq = (bx * threads + tx) % HQ
                            h = hq // G
                            lo, hi = bounds(TOT, PAST, b, s)
                            st[0] = T.float32(_NEG)
                            st[1] = T.float32(0)
                            for d in range(D):
                                acc[d] = T.float32(0)
                            # rows clamped to the buffer (not the loop: its bounds depend on the
                            # lengths only) so that inconsistent lengths never read out of bounds
                            for j in range(T.max(hi - lo, T.int64(0))):
                                st[2] = T.float32(0)
                                for d in range(D):
                                    st[2] = st[2] + T.Cast(f32, Q[b, s, hq, d]) * T.Cast(
                                        f32, K[b, h, T.min(lo + j, L - 1), d]
                                    )
                                st[2] = capped(st[2] * T.float32(scale))
                                st[3] = T.max(st[0], st[2])
                                st[1] = st[1] * T.exp(st[0] - st[3]) + T.exp(st[2] - st[3])
                                for d in range(D):
                                    acc[d] = acc[d] * T.exp(st[0] - st[3]) + T.exp(
                                        st[2] - st[3]
                                    ) * T.Cast(f32, V[b, h, T.min(lo + j, L - 1), d])
                                st[0] = st[3]
                            if use_sink:
                                st[3] = T.max(st[0], SINK[hq])
                                st[1] = st[1] * T.exp(st[0] - st[3]) + T.exp(SINK[hq] - st[3])
                                for d in range(D):
                                    acc[d] = acc[d] * T.exp(st[0] - st[3])
                            for d in range(D):
                                OUT[b, s, hq, d] = T.Cast(
                                    dt,
                                    T.if_then_else(
                                        st[1] > T.float32(0), acc[d] / st[1], T.float32(0)
                                    ),
                                )

        return gqa_attention

    VL = pow2_divisor(D, vector_lanes)
    NV = D // VL
    KB = int(block_keys)
    QB = int(query_rows)

    def rows_block(qr: int):
        """A macro computing query rows ``s0 .. s0+qr-1`` (those below S) of entry ``b`` for
        the G heads of KV head ``h``: ``R = qr * G`` query vectors share every K/V row load."""
        R = qr * G
        KR = max(1, 8 // R)  # keys per scoring pass: R * KR vector accumulators
        KBR = max(KB // KR, 1) * KR

        @T.macro
        def block(Q, K, V, TOT, PAST, SINK, OUT, b, h, s0, S):
            qs = T.alloc_buffer((R, D), f32)  # the query vectors, scaled
            acc = T.alloc_buffer((R, D), f32)
            sc = T.alloc_buffer((R, KBR), f32)  # scores, then probabilities
            part = T.alloc_buffer((R, KR, VL), f32)
            pv = T.alloc_buffer((R, VL), f32)
            mx = T.alloc_buffer((R,), f32)  # running maximum
            sm = T.alloc_buffer((R,), f32)  # running sum
            cr = T.alloc_buffer((R,), f32)  # this block's correction exp(old max - new max)
            nm = T.alloc_buffer((1,), f32)
            lims = T.alloc_buffer((qr, 2), "int64")  # [lo, hi) per query row
            for qi in range(qr):
                lims[qi, 0] = lo_of(TOT, PAST, b, T.min(s0 + qi, S - 1))
                lims[qi, 1] = hi_of(TOT, PAST, b, T.min(s0 + qi, S - 1))
                for g in range(G):
                    mx[qi * G + g] = T.float32(_NEG)
                    sm[qi * G + g] = T.float32(0)
                    for dc in range(NV):
                        for lane in T.vectorized(VL):
                            qs[qi * G + g, dc * VL + lane] = T.Cast(
                                f32, Q[b, T.min(s0 + qi, S - 1), h * G + g, dc * VL + lane]
                            ) * T.float32(scale)
                            acc[qi * G + g, dc * VL + lane] = T.float32(0)
            # lo and hi grow with the row: the block's keys are [lims[0, 0], lims[qr-1, 1])
            for blk in range((T.max(lims[qr - 1, 1] - lims[0, 0], T.int64(0)) + KBR - 1) // KBR):
                # R * KR independent vector accumulators (one would serialise on the FMA
                # latency); rows past the block's keys are clamped (read, then masked)
                for jr in range(KBR // KR):
                    for r in T.unroll(R):
                        for j4 in T.unroll(KR):
                            for lane in T.vectorized(VL):
                                part[r, j4, lane] = T.float32(0)
                    for dc in range(NV):
                        for j4 in T.unroll(KR):
                            for r in T.unroll(R):
                                for lane in T.vectorized(VL):
                                    part[r, j4, lane] = part[r, j4, lane] + qs[
                                        r, dc * VL + lane
                                    ] * T.Cast(
                                        f32,
                                        K[
                                            b,
                                            h,
                                            T.min(
                                                lims[0, 0] + blk * KBR + jr * KR + j4,
                                                lims[qr - 1, 1] - 1,
                                            ),
                                            dc * VL + lane,
                                        ],
                                    )
                    for r in T.unroll(R):
                        for j4 in T.unroll(KR):
                            sc[r, jr * KR + j4] = part[r, j4, 0]
                            for lane in T.unroll(1, VL):
                                sc[r, jr * KR + j4] = sc[r, jr * KR + j4] + part[r, j4, lane]
                            sc[r, jr * KR + j4] = capped(sc[r, jr * KR + j4])
                for r in range(R):
                    nm[0] = mx[r]
                    for jj in range(KBR):
                        if (
                            lims[r // G, 0] <= lims[0, 0] + blk * KBR + jj
                            and lims[0, 0] + blk * KBR + jj < lims[r // G, 1]
                        ):
                            nm[0] = T.max(nm[0], sc[r, jj])
                    # vectorised: the pipeline's VectorizableMath makes exp a polynomial
                    for jj in T.vectorized(KBR):
                        sc[r, jj] = T.if_then_else(
                            lims[r // G, 0] <= lims[0, 0] + blk * KBR + jj
                            and lims[0, 0] + blk * KBR + jj < lims[r // G, 1],
                            T.exp(sc[r, jj] - nm[0]),
                            T.float32(0),
                        )
                    cr[r] = T.exp(mx[r] - nm[0])
                    sm[r] = sm[r] * cr[r]
                    for jj in range(KBR):
                        sm[r] = sm[r] + sc[r, jj]
                    mx[r] = nm[0]
                # acc = acc * correction + p @ V, one head-dim vector at a time, R accumulators
                for dc in range(NV):
                    for r in T.unroll(R):
                        for lane in T.vectorized(VL):
                            pv[r, lane] = acc[r, dc * VL + lane] * cr[r]
                    for jj in T.unroll(KBR):
                        for r in T.unroll(R):
                            for lane in T.vectorized(VL):
                                pv[r, lane] = pv[r, lane] + sc[r, jj] * T.Cast(
                                    f32,
                                    V[
                                        b,
                                        h,
                                        T.min(lims[0, 0] + blk * KBR + jj, lims[qr - 1, 1] - 1),
                                        dc * VL + lane,
                                    ],
                                )
                    for r in T.unroll(R):
                        for lane in T.vectorized(VL):
                            acc[r, dc * VL + lane] = pv[r, lane]
            for r in range(R):
                if s0 + r // G < S:
                    if use_sink:
                        nm[0] = T.max(mx[r], SINK[h * G + r % G])
                        sm[r] = sm[r] * T.exp(mx[r] - nm[0]) + T.exp(SINK[h * G + r % G] - nm[0])
                        cr[r] = T.exp(mx[r] - nm[0])
                    else:
                        cr[r] = T.float32(1)
                    # an empty key range (a padding row past a window): zeros, not 0/0
                    nm[0] = T.if_then_else(sm[r] > T.float32(0), cr[r] / sm[r], T.float32(0))
                    for dc in range(NV):
                        for lane in T.vectorized(VL):
                            OUT[b, s0 + r // G, h * G + r % G, dc * VL + lane] = T.Cast(
                                dt, acc[r, dc * VL + lane] * nm[0]
                            )

        return block

    one_row, row_block = rows_block(1), rows_block(QB)

    @T.prim_func(s_tir=True)
    def gqa_attention(
        q_h: T.handle,
        k_h: T.handle,
        v_h: T.handle,
        tot_h: T.handle,
        past_h: T.handle,
        sink_h: T.handle,
        out_h: T.handle,
    ):
        T.func_attr(KERNEL_ATTRS)
        B, S, L = T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q_h, (B, S, HQ, D), dt)
        K = T.match_buffer(k_h, (B, HKV, L, D), dt)
        V = T.match_buffer(v_h, (B, HKV, L, D), dt)
        TOT = T.match_buffer(tot_h, (B,), "int64")
        PAST = T.match_buffer(past_h, (B,), "int64")
        SINK = T.match_buffer(sink_h, (HQ,), f32)
        OUT = T.match_buffer(out_h, (B, S, HQ, D), dt)
        with T.sblock("root"):
            for b in range(B):
                assert TOT[b] <= L, _OVERFLOW
            if S < QB:  # decode: a task per (entry, KV head, row)
                for task in T.parallel(B * HKV * S):
                    one_row(
                        Q,
                        K,
                        V,
                        TOT,
                        PAST,
                        SINK,
                        OUT,
                        task // (HKV * S),
                        task // S % HKV,
                        task % S,
                        S,
                    )
            else:  # prefill: QB rows per task share the K/V rows they read
                for task in T.parallel(B * HKV * ((S + QB - 1) // QB)):
                    row_block(
                        Q,
                        K,
                        V,
                        TOT,
                        PAST,
                        SINK,
                        OUT,
                        task // (HKV * ((S + QB - 1) // QB)),
                        task // ((S + QB - 1) // QB) % HKV,
                        task % ((S + QB - 1) // QB) * QB,
                        S,
                    )

    return gqa_attention


def kv_append(
    cfg: AttentionConfig, *, gpu: bool = False, vector_lanes: int = 8, threads: int = 256
):
    """Build the in-place cache append PrimFunc for ``cfg``.

    Parameters
    ----------
    cfg : AttentionConfig
    gpu : bool
        One thread per written element instead of CPU tasks over (entry, KV head).
    vector_lanes : int
        CPU: lanes of the copied head-dim vectors.
    threads : int
        GPU: threads per block.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``kv_append(k_new, v_new, total, past, k_cache, v_cache)``: ``k_new``/``v_new``
        (B, S, Hkv, D), ``total``/``past`` (B,) int64; ``k_cache``/``v_cache`` (B, Hkv, L, D) are
        written in place: row ``P_b + s`` of entry ``b`` takes new row ``s`` for
        ``s < min(T_b - P_b, S)``, every other row is left as it was. CPU: asserts
        ``0 <= P_b <= T_b <= L``; GPU: rows at or past ``L`` are skipped (no in-kernel assert).
    """
    from tvm.script import tirx as T

    HKV, D, dt = cfg.kv_heads, cfg.head_size, cfg.dtype

    if gpu:

        @T.prim_func(s_tir=True)
        def kv_append(
            kn_h: T.handle,
            vn_h: T.handle,
            tot_h: T.handle,
            past_h: T.handle,
            kc_h: T.handle,
            vc_h: T.handle,
        ):
            T.func_attr(KERNEL_ATTRS)
            B, S, L = T.int64(), T.int64(), T.int64()
            KN = T.match_buffer(kn_h, (B, S, HKV, D), dt)
            VN = T.match_buffer(vn_h, (B, S, HKV, D), dt)
            TOT = T.match_buffer(tot_h, (B,), "int64")
            PAST = T.match_buffer(past_h, (B,), "int64")
            KC = T.match_buffer(kc_h, (B, HKV, L, D), dt)
            VC = T.match_buffer(vc_h, (B, HKV, L, D), dt)
            with T.sblock("root"):
                for bx in T.thread_binding(
                    (B * S * HKV * D + threads - 1) // threads, thread="blockIdx.x"
                ):
                    for tx in T.thread_binding(threads, thread="threadIdx.x"):
                        if bx * threads + tx < B * S * HKV * D:
                            b = (bx * threads + tx) // (S * HKV * D)
                            s = (bx * threads + tx) // (HKV * D) % S
                            h = (bx * threads + tx) // D % HKV
                            d = (bx * threads + tx) % D
                            if s < TOT[b] - PAST[b] and PAST[b] >= T.int64(0) and PAST[b] + s < L:
                                KC[b, h, PAST[b] + s, d] = KN[b, s, h, d]
                                VC[b, h, PAST[b] + s, d] = VN[b, s, h, d]

        return kv_append

    VL = pow2_divisor(D, vector_lanes)
    NV = D // VL

    @T.prim_func(s_tir=True)
    def kv_append(
        kn_h: T.handle,
        vn_h: T.handle,
        tot_h: T.handle,
        past_h: T.handle,
        kc_h: T.handle,
        vc_h: T.handle,
    ):
        T.func_attr(KERNEL_ATTRS)
        B, S, L = T.int64(), T.int64(), T.int64()
        KN = T.match_buffer(kn_h, (B, S, HKV, D), dt)
        VN = T.match_buffer(vn_h, (B, S, HKV, D), dt)
        TOT = T.match_buffer(tot_h, (B,), "int64")
        PAST = T.match_buffer(past_h, (B,), "int64")
        KC = T.match_buffer(kc_h, (B, HKV, L, D), dt)
        VC = T.match_buffer(vc_h, (B, HKV, L, D), dt)
        with T.sblock("root"):
            for b in range(B):
                assert TOT[b] <= L, _OVERFLOW
                assert PAST[b] >= T.int64(0), _BAD_LENGTHS
            for task in T.parallel(B * HKV):
                for s in range(T.min(TOT[task // HKV] - PAST[task // HKV], S)):
                    for dc in range(NV):
                        for lane in T.vectorized(VL):
                            KC[task // HKV, task % HKV, PAST[task // HKV] + s, dc * VL + lane] = KN[
                                task // HKV, s, task % HKV, dc * VL + lane
                            ]
                            VC[task // HKV, task % HKV, PAST[task // HKV] + s, dc * VL + lane] = VN[
                                task // HKV, s, task % HKV, dc * VL + lane
                            ]

    return kv_append


__all__ = ["AttentionConfig", "gqa_attention", "kv_append"]
