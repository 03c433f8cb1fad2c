"""MoE stage 3, grouped GEMM over the routed (token, expert) pairs only.

``group_gemm_up``: for every slot s of expert e (from ``moe_align``),
``act[s, i] = act_fn(gate_i, up_i)`` with ``gate_i, up_i = fc1[e, rows(i)] . x[token(s)]`` — gate
and up computed together, the activation applied in registers (SiLU·mul for SwiGLU).

``group_gemm_down``: ``out[t, j, :] = w[t, j] * fc2[e] @ act[s]`` for the slot s of pair (t, j), the
routing weight applied in the epilogue; ``moe_combine`` then sums the k rows of each token.

Weights stay in ONNX's linear layout (``fc1 [E, rows, H]``, ``fc2 [E, H, I]``: the reduction axis is
contiguous), so kernels read them in place and never copy them.

CPU schedule: parallel tasks over (expert that received tokens) x (output tile); inside a task each
group of ``micro_n`` weight rows meets every token of the expert (``token_panel_rows`` of them per
pass) while it is in L1, ``micro_m`` tokens at a time through a register-blocked micro-kernel
(``micro_m`` tokens x ``micro_n`` weight rows, each accumulator one SIMD vector along the reduction
axis, horizontal sums at the end, four accumulators at a time; a partial block takes the kernel
of its own row count, a last lone token the one-row one). So each weight row is read from memory
once, and with ``prefetch``
the next group streams in while the current one is multiplied by all the tokens. A lone token
(decode) takes the GEMV kernel: ``gemv_n`` weight rows per step, weights streamed once. Tasks
exist only for experts with tokens, so the work follows k, not the number of experts.

GPU schedule: one thread block per (aligned block of ``block_m`` slots, output tile); operand tiles
staged in shared memory, each thread accumulates ``gpu_thread_m x gpu_thread_n`` outputs. Up to
``gpu_gemv_max_tokens`` tokens take GEMV kernels instead: one thread block per routed pair and row
group, a warp of 32 lanes splitting each dot product and reducing with shuffles.

GPU, float16/bfloat16 experts (``cfg.weight_dtype``, on a CUDA target whose tensor cores take
it): the tiled GEMMs run on tensor cores (``_tc_gemm``: ``nvcuda::wmma`` m16n16k16 fragments,
activations cast to the experts' dtype as they are staged, float32 accumulators, the epilogue
read back from shared memory); the GEMV kernels stay on float32 FMAs over the narrow weights
(a few tokens: bound by reading the weights, which tensor cores do not speed up). Where no
tensor-core tile fits (``block_m`` not a multiple of 16), the FMA kernels widen the narrow
weights in registers. Other GPUs get float32 experts (``FoldWeightCasts`` keeps the cast).
"""

from __future__ import annotations

import functools
import math

from qiao.compiler.kernels.moe_common import (
    KERNEL_ATTRS,
    MoEConfig,
    divisor_at_most,
    num_blocks,
    pow2_divisor,
)

# CPU ``MoESchedule.prefetch`` 3 (split): the token blocks share out the prefetch of the rows
# ``SPLIT_AHEAD`` groups ahead, in passes of at most ``SPLIT_BLOCKS`` token blocks.
SPLIT = 3
SPLIT_AHEAD = 2
SPLIT_BLOCKS = 4
GEMV_LANES = 32  # GPU GEMV: threads splitting one dot product (a power of two: a shuffle tree)
# CPU: bytes of the rows of A (an expert's tokens) that one pass over a weight row group reuses;
# they stay in L2 (half a 512 KB-1 MB Zen/Skylake-SP L2) while each group of weight rows, in L1,
# meets all of them. Measured on the 30B-A3B block (AVX-512, 2026-12-02): one pass over all of an
# expert's tokens (up to 32 here) beat passes of 4, 8 or 16 tokens at T = 16, 128 and 512.
TOKEN_PANEL_BYTES = 256 * 1024


# CPU, with reduction chunks (``MoESchedule.k_chunk``): bytes of the pass's rows of A, one chunk
# long, that stay in L1 while every weight row group of a task meets them (a 32-48 KB L1d).
CHUNK_PANEL_BYTES = 32 * 1024
MAX_SWEEP = 4  # CPU token-lanes order: the most passes of one sweep (``lanes_sweep_kb``)


def token_panel_rows(red_len: int, micro_m: int, budget: int | None = None) -> int:
    """Tokens whose rows of A (``red_len`` float32 each) one pass over a weight row group takes: a
    multiple of ``micro_m`` that fits ``budget`` bytes (``TOKEN_PANEL_BYTES``), at least
    ``micro_m``."""
    budget = TOKEN_PANEL_BYTES if budget is None else budget
    return max(micro_m, budget // (4 * red_len) // micro_m * micro_m)


def reduction_chunk(k_chunk: int, red_len: int, lanes: int) -> int:
    """The reduction chunk (``MoESchedule.k_chunk``) the CPU grouped GEMM takes for a reduction of
    ``red_len`` at ``lanes`` float32 per vector: ``k_chunk`` where it splits the reduction into
    whole vectors, else 0 (the whole reduction at once)."""
    fits = 0 < k_chunk < red_len and red_len % k_chunk == 0 and k_chunk % lanes == 0
    return k_chunk if fits else 0


def expert_task(task, NACT, ACTIVE, tiles: int, chunks: int):
    """(expert, tile) of CPU task ``task`` of ``NACT[0] * tiles``, an expert's ``tiles`` output
    tiles dealt out in ``chunks`` chunks (a divisor of ``tiles``; ``MoESchedule.task_chunks``):
    tasks run chunk by chunk, each chunk expert by expert, so TVM's static split of the parallel
    loop over ``chunks`` threads gives each thread one chunk of every expert. TIR expressions."""
    if chunks == 1:
        return ACTIVE[task // tiles], task % tiles
    per_chunk = tiles // chunks
    tasks_per_chunk = NACT[0] * per_chunk
    return (
        ACTIVE[task % tasks_per_chunk // per_chunk],
        task // tasks_per_chunk * per_chunk + task % per_chunk,
    )


def up_row_floats(cfg: MoEConfig, sched, *, gpu: bool = False) -> int:
    """Float32 per token row of the gate/up GEMM's input: ``cfg.hidden``, plus
    ``sched.x_pad`` (``MoESchedule.x_pad``) on the CPU where a row of ``x`` is a multiple of
    4 KB; the lowering then gives the GEMM ``pad_rows(x)`` rather than ``x``."""
    pad = 0 if gpu else sched.x_pad
    return cfg.hidden + (pad if (cfg.hidden * 4) % 4096 == 0 else 0)


def pad_rows(cols: int, padded: int, lanes: int):
    """``xp[t, :cols] = x[t, :]``, ``xp[t, cols:padded] = 0``: the tokens' rows copied ``padded``
    float32 apart (``MoESchedule.x_pad``), rows in parallel, ``lanes`` float32 per vector."""
    from tvm.script import tirx as T

    VL = pow2_divisor(math.gcd(cols, padded), lanes)

    @T.prim_func(s_tir=True)
    def moe_pad_rows(x_h: T.handle, xp_h: T.handle):
        T.func_attr(KERNEL_ATTRS)
        n = T.int64()
        X = T.match_buffer(x_h, (n, cols), "float32")
        XP = T.match_buffer(xp_h, (n, padded), "float32")
        with T.sblock("root"):
            for t in T.parallel(n):
                for k0 in range(cols // VL):
                    for k1 in T.vectorized(VL):
                        XP[t, k0 * VL + k1] = X[t, k0 * VL + k1]
                for k0 in range((padded - cols) // VL):
                    for k1 in T.vectorized(VL):
                        XP[t, cols + k0 * VL + k1] = T.float32(0)

    return moe_pad_rows


def _cpu_up_params(cfg: MoEConfig, sched):
    U = cfg.units_per_row_group
    PU = divisor_at_most(cfg.inter, max(1, sched.micro_n // U))
    TILE = divisor_at_most(cfg.inter, sched.tile_up, PU)
    PG = divisor_at_most(TILE, max(1, sched.gemv_n // U))
    VL = pow2_divisor(cfg.hidden, sched.vector_lanes)
    return U, PU, TILE, PG, VL


def _cpu_down_params(cfg: MoEConfig, sched):
    NR = divisor_at_most(cfg.hidden, sched.down_micro_n)
    TILE = divisor_at_most(cfg.hidden, sched.tile_down, NR)
    NG = divisor_at_most(TILE, sched.gemv_n)
    VL = pow2_divisor(cfg.inter, sched.vector_lanes)
    return NR, TILE, NG, VL


def group_gemm_up(cfg: MoEConfig, sched, *, gpu: bool = False):
    """Build the gate/up grouped GEMM with the activation fused.

    Parameters
    ----------
    cfg : MoEConfig
    sched : qiao.compiler.schedules.moe_table.MoESchedule
    gpu : bool
        Thread-bound GPU kernels instead of the CPU schedule.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``group_gemm_up(x, fc1, fc1_bias, topk_ids, sorted_pairs, offsets, counts, active,
        num_active,
        block_expert, num_used_blocks, pair_slot, act)`` with

        - ``x``: (T, H) float32 tokens;
        - ``fc1``: (E, R, H) ``cfg.weight_dtype`` (float32; float16/bfloat16 on the CPU),
          R = 2I (gate/up rows in ``cfg.gate_up_layout``) or I;
        - ``fc1_bias``: (E, R) float32 when ``cfg.fc1_bias``, else a (1,) placeholder (unread);
        - ``topk_ids``: (T, k) int32 and the ``moe_align`` outputs (see there);
        - ``act``: (S, I) float32 output, one row per slot (padding rows untouched).
    """
    if gpu:
        return _up_gpu(cfg, sched)
    return _up_cpu(cfg, sched)


def group_gemm_down(cfg: MoEConfig, sched, *, gpu: bool = False):
    """Build the down-projection grouped GEMM with the routing weight fused.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``group_gemm_down(act, fc2, fc2_bias, topk_ids, topk_weights, sorted_pairs, offsets, counts,
        active, num_active, block_expert, num_used_blocks, pair_slot, out)`` with

        - ``act``: (S, I) float32 from ``group_gemm_up``;
        - ``fc2``: (E, H, I) ``cfg.weight_dtype``; ``fc2_bias``: (E, H) when ``cfg.fc2_bias``,
          else (1,) unread;
        - ``topk_weights``: (T, k) float32 routing weights;
        - ``out``: (T, k, H) float32 output, ``out[t, j] = w[t, j] * expert_j(x[t])``.
    """
    if gpu:
        return _down_gpu(cfg, sched)
    return _down_cpu(cfg, sched)


def _epilogue_up(cfg: MoEConfig, red, m, p, B1, e, unit):
    """act(gate, up) of unit ``p`` of row ``m`` of the register tile ``red``."""
    U = cfg.units_per_row_group
    g = red[m, p * U]
    if cfg.fc1_bias:
        g = g + B1[e, cfg.fc1_row(unit, 0)]
    if not cfg.gated:
        return cfg.activation_expr(g)
    u = red[m, p * U + 1]
    if cfg.fc1_bias:
        u = u + B1[e, cfg.fc1_row(unit, 1)]
    return cfg.activation_expr(g, u)


# ------------------------------------------------------------------------------------------------
# CPU: one register-blocked dot-product grouped GEMM, specialised by row mapping and epilogue
# ------------------------------------------------------------------------------------------------
def stream_prefetch(families: tuple[str, ...]):
    """The prefetch mask (``cpu_gemm.PREFETCH_ALL`` or 0) of a weight stream that runs without
    software prefetch on the CPU ``families`` (``cpu_info.cpu_family_code``'s names), as a TIR
    expression read when the kernel runs: the family qiao's runners publish in
    ``cpu_info.CPU_FAMILY_ENV`` (libc's getenv and atoi; unset or unknown: prefetch). No
    families: ``PREFETCH_ALL``."""
    from tvm.script import tirx as T

    from qiao.compiler.schedules.cpu_gemm import PREFETCH_ALL
    from qiao.compiler.schedules.cpu_info import CPU_FAMILY_ENV, cpu_family_code

    if not families:
        return T.int32(PREFETCH_ALL)
    env = T.call_extern("handle", "getenv", CPU_FAMILY_ENV)
    running = T.if_then_else(T.isnullptr(env), 0, T.call_extern("int32", "atoi", env))
    listed = functools.reduce(T.Or, [running == cpu_family_code(f) for f in families])
    return T.if_then_else(listed, T.int32(0), T.int32(PREFETCH_ALL))


def _cpu_grouped_gemm(
    *,
    red_len: int,
    VL: int,
    MR: int,
    NR: int,
    NG: int,
    TILE: int,
    NT: int,
    a_row,
    w_row,
    epilogue,
    prefetch: int,
    prefetch_level: int = 1,
    prefetch_lines: int = 1,
    widen: bool = False,
    unit: int = 1,
    lanes_min: int = 0,
    lanes: int = 1,
    k_chunk: int = 0,
    few_tokens: int = 0,
    few_prefetch_lines: int = 1,
    few_lead: bool = False,
    few_prefetch_off: tuple[str, ...] = (),
    task_chunks: int = 1,
    lone_merge: bool = False,
    lanes_sweep_kb: int = 0,
    lanes_group_kb: int = 192,
):
    """Generic CPU body over (active expert, output tile of ``TILE`` rows) tasks.

    ``a_row(PAIRS, K, slot)`` gives the row of A for a slot; ``w_row(r)`` the expert-weight row of
    tile row ``r``; ``epilogue(OUT, E1, E2, PAIRS, red, m, slot, e, r0, n)`` stores ``n`` results
    of ``red[m, :]`` for tile rows ``r0 ..``. The register blocks (``MR x NR`` for token blocks,
    ``1 x NG`` for a lone token) are the CPU GEMM's weight-in-place micro-kernel,
    ``qiao.compiler.schedules.cpu_gemm.dot_microkernel``; ``prefetch`` (``MoESchedule.prefetch``)
    streams the next row group in while one is multiplied: 1 during every token block, 2 during the
    first token block of each pass only, 0 never, 3 (``SPLIT``) the group ``SPLIT_AHEAD`` ahead,
    its rows shared out among the pass's token blocks (passes of up to ``SPLIT_BLOCKS`` blocks;
    longer ones as 1); ``prefetch_level``
    (``MoESchedule.prefetch_level``) the cache it fills, 1 = L1, 2 = L2; ``prefetch_lines``
    (``MoESchedule.prefetch_lines``) the steps of each row asked for per step; ``widen``: the
    weights are float16/bfloat16, widened to float32 in registers.

    Experts with at least ``lanes_min`` tokens (``MoESchedule.lanes_min``; 0: none) take the
    token-lanes order instead (``cpu_gemm.lanes_microkernel``, ``lanes`` float32 per vector), in
    tasks of ``_lanes_params`` rows: each pass transposes up to three vectors of the expert's
    tokens into a panel ``AT[K, t]`` and every group of weight rows (a multiple of ``unit``)
    meets it once, the weights broadcast from memory, the tokens in lanes; with ``lanes_sweep_kb``
    (``MoESchedule.lanes_sweep_kb``; 0: none) the panels of as many passes as fit in that many KB
    are transposed first and each group of ``lanes_group_kb`` KB of weight rows meets them in
    turn (``_lanes_body``).

    ``k_chunk`` (``MoESchedule.k_chunk``; 0 or one that does not divide ``red_len`` into whole
    vectors: none) splits the reduction of experts with 2 .. ``lanes_min`` - 1 tokens: passes of
    ``token_panel_rows(k_chunk, MR, CHUNK_PANEL_BYTES)`` tokens, the chunk loop outside the row
    groups, so the chunk of the tokens' rows is read from L1 by every row group of the task
    rather than from L2 by each (on AVX2 a register block of 3 x 4 loads 7 vectors per 12 FMAs);
    the partial sums of each chunk are added in memory.

    Experts with 2 .. ``few_tokens`` tokens (``MoESchedule.few_tokens``, at most ``MR``: one
    register block, so each weight line is met once and the memory stream bounds them) take one
    token block per row group, prefetching ``few_prefetch_lines`` steps of the next rows per step
    instead (0: none); with ``few_tokens`` >= 1 so does the lone-token GEMV (decode). With
    ``few_lead`` (``MoESchedule.few_lead``) the first of those tokens streams the task's weight
    rows in through the GEMV instead, and the others then meet them in L2 as one block (a
    second GEMV where only one is left), without prefetching. On the CPU families of
    ``few_prefetch_off`` (``MoESchedule.few_prefetch_off``) those streams run without prefetch
    instead, as with ``few_prefetch_lines`` 0: the family is read when the kernel runs
    (``stream_prefetch``).

    ``lone_merge`` (``MoESchedule.lone_merge``): a pass that would end in a lone token after
    full blocks runs its last ``MR + 1`` tokens as two blocks of about half instead.

    Tasks are ordered by ``expert_task`` with ``task_chunks`` chunks of each expert's tiles
    (``MoESchedule.task_chunks``), the token-lanes tasks too.
    """
    from tvm.script import tirx as T

    from qiao.compiler.schedules.cpu_gemm import PREFETCH_ALL, dot_accumulators, dot_microkernel

    KO = red_len // VL
    level = prefetch_level if prefetch > 0 else 0
    common = dict(lanes=VL, k_vectors=KO, w_row=w_row, prefetch=level, widen=widen)
    common.update(prefetch_lines=prefetch_lines, row_masks=prefetch == SPLIT, per_line=True)
    FEW = min(few_tokens, MR)
    # the few-token blocks and decode's GEMV ask for all of the next rows (no masks), a step at a
    # time (bound by the memory stream: ``dot_microkernel``'s ``per_line``)
    streaming = dict(common, row_masks=False, per_line=False)
    if FEW:
        # (0 lines: none, the hardware prefetcher alone)
        streaming.update(
            prefetch_lines=max(few_prefetch_lines, 1), prefetch=level if few_prefetch_lines else 0
        )
    micro_few = _token_blocks(max(FEW, 2), NR, streaming)
    # the few-token streams' prefetch mask (the running CPU's family may turn it off)
    stream_pf = stream_prefetch(few_prefetch_off if FEW and few_prefetch_lines else ())
    KC = reduction_chunk(k_chunk, red_len, VL)
    chunked = dict(common, k_vectors=max(KC, VL) // VL)
    NKC = red_len // KC if KC else 1
    SBC = token_panel_rows(max(KC, 1), MR, CHUNK_PANEL_BYTES)
    gemv = dot_microkernel(rows=1, cols=NG, **streaming)
    SB = token_panel_rows(red_len, MR)

    # (a split pass and a longer one call the kernels apart: the two masks in one select put
    # the split's divisions back into the kernel's loop: about 4x the time)

    @T.macro
    def plan(bt, nb, nbl):
        # The blocks of a pass of nb tokens: full blocks of MR, the last 2 .. MR - 1 tokens as one,
        # or, with ``lone_merge`` where that would leave a lone token (nb = q MR + 1, MR >= 3), the
        # last MR + 1 as two of about half. Block mi starts at token mi MR + bt[0, k] and has
        # bt[1, k] rows, k = ``kind(mi, nbl)``: 0 for all but the last two, 1 and 2 for those. A
        # table, not conditions on mi in the block loop: those multiplied the compile time by
        # 2-10, and lets relating the last blocks to each other by 20-70 (TVM's arithmetic
        # analysis).
        merge = nb % MR == 1 and nb > MR if lone_merge and MR >= 3 else False
        bt[0, 0] = 0
        bt[1, 0] = MR
        bt[0, 1] = 0
        bt[1, 1] = T.if_then_else(merge, (MR + 2) // 2, MR)
        bt[0, 2] = T.if_then_else(merge, (MR + 2) // 2 - MR, 0)
        bt[1, 2] = T.if_then_else(merge, (MR + 1) // 2, nb - (nbl - 1) * MR)

    def kind(mi, nbl):
        return T.max(mi - nbl + 3, 0)

    def share(mi, blocks, lone=False, split=True):
        # the rows of the group ahead that token block ``mi`` of ``blocks`` prefetches (a mask)
        if prefetch == SPLIT and split:
            # round robin over the blocks, the first left out where there are three or more
            skip = T.if_then_else(blocks >= 3, 1, 0)
            return sum(
                T.if_then_else(r % (blocks - skip) == mi - skip, 1 << r, 0) for r in range(NR)
            )
        if prefetch == SPLIT:
            # a longer pass: every block asks for the next group (dropped requests retried)
            return PREFETCH_ALL
        if prefetch != 1 and not lone:  # only the first (a last lone token asks for all)
            return T.if_then_else(mi == 0, PREFETCH_ALL, 0)
        return PREFETCH_ALL

    def prefetching(kernel, lone=False):
        # ``kernel`` (a ``_token_blocks`` block) asking for the rows ahead: ``SPLIT_AHEAD`` groups
        # ahead shared out among a pass's blocks where it has at most ``SPLIT_BLOCKS``, else the
        # next group (``share``)
        @T.macro
        def call(rows, A, W, arow, e, r0, acc0, acc1, red, mi, nbl, k0):
            if prefetch == SPLIT and nbl <= SPLIT_BLOCKS:
                # the mask bound once (a let): passed as an expression, it was copied into every
                # row test of every step, and TVM's LowerIntrin and Simplify took 5x the time on
                # its divisions (AVX2 gate/up GEMM of E 8, H 1024, I 64: 6.4 s to compile, 1.3
                # s with the let; the loops LLVM emits are the same but for one reload)
                mask = share(mi, nbl, lone)
                kernel(
                    rows, A, W, arow, e, r0, r0 + SPLIT_AHEAD * NR, acc0, acc1, red, mask, k0,
                )  # fmt: skip
            else:
                kernel(
                    rows, A, W, arow, e, r0, r0 + NR, acc0, acc1, red,
                    share(mi, nbl, lone, split=False), k0,
                )  # fmt: skip

        return call

    def one_row(kernel):
        # a one-row ``dot_microkernel`` with the ``_token_blocks`` signature (``rows`` = 1)
        @T.macro
        def call(rows, A, W, arow, e, r0, r_next, acc0, acc1, red, pf, k0):
            kernel(A, W, arow, e, r0, r_next, acc0, acc1, red, pf, k0)

        return call

    # the pass loops' kernels: ``kernel(rows, A, W, arow, e, r0, acc0, acc1, red, mi, nbl, k0)``
    micro = prefetching(_token_blocks(MR, NR, common))
    gemv_nr = prefetching(one_row(dot_microkernel(rows=1, cols=NR, **common)), lone=True)
    micro_c = prefetching(_token_blocks(MR, NR, chunked))
    gemv_c = prefetching(one_row(dot_microkernel(rows=1, cols=NR, **chunked)), lone=True)

    ACC0, ACC1 = dot_accumulators(MR, NR, VL)
    GACC0, GACC1 = dot_accumulators(1, NG, VL)
    LMIN = lanes_min if lanes_min > 0 else 1 << 30  # tokens from which the lanes order applies

    @T.macro
    def add_partial(part, red, t, m, g, kc):
        # the chunk's sums of block row m into the pass's token t (the first chunk sets them)
        for r in T.vectorized(NR):
            part[t, g * NR + r] = (
                T.if_then_else(kc == 0, T.float32(0), part[t, g * NR + r]) + red[m, r]
            )

    lanes_body = _lanes_body(
        red_len=red_len,
        lanes=lanes,
        lanes_min=LMIN,
        out_rows=TILE * NT,
        unit=unit,
        a_row=a_row,
        w_row=w_row,
        epilogue=epilogue,
        widen=widen,
        task_chunks=task_chunks,
        sweep_bytes=lanes_sweep_kb * 1024,
        group_bytes=lanes_group_kb * 1024,
    )
    CH = divisor_at_most(NT, task_chunks)

    @T.macro
    def gemv_tile(A, W, PAIRS, OUT, E1, E2, arow, e, r_tile, slot, pf, gacc0, gacc1, red):
        # the GEMV of the token in ``slot`` over the task's rows, NG weight rows per step
        arow[0] = a_row(PAIRS, slot)
        for g in T.serial(TILE // NG):  # (T used in the body: annotations alone do not bind it)
            r0: T.let[T.int32] = r_tile + g * NG
            gemv(A, W, arow, e, r0, r0 + NG, gacc0, gacc1, red, pf, 0)
            epilogue(OUT, E1, E2, PAIRS, red, 0, slot, e, r0, NG)

    @T.macro
    def few_block(A, W, PAIRS, OUT, E1, E2, arow, e, r_tile, slot, n, pf, acc0, acc1, red):
        # the ``n`` tokens from ``slot`` (2 .. FEW) as one register block over the task's rows
        for m in T.unroll(FEW):
            arow[m] = a_row(PAIRS, slot + T.min(m, n - 1))
        for g in range(TILE // NR):
            r0: T.let[T.int32] = r_tile + g * NR
            micro_few(n, A, W, arow, e, r0, r0 + NR, acc0, acc1, red, pf, 0)
            for m in T.unroll(FEW):
                if m < n:
                    epilogue(OUT, E1, E2, PAIRS, red, m, slot + m, e, r0, NR)

    @T.macro
    def body(A, W, PAIRS, OFF, CNT, ACTIVE, NACT, OUT, E1, E2):
        if lanes_min > 0:
            lanes_body(A, W, PAIRS, OFF, CNT, ACTIVE, NACT, OUT, E1, E2)
        spf: T.let[T.int32] = stream_pf  # (read once per call, before the tasks)
        for task in T.parallel(NACT[0] * NT):
            # "global" scope: constant-size scratch under 1 KB becomes a stack array (registers)
            acc0 = T.alloc_buffer(ACC0, "float32")
            acc1 = T.alloc_buffer(ACC1, "float32")
            gacc0 = T.alloc_buffer(GACC0, "float32")
            gacc1 = T.alloc_buffer(GACC1, "float32")
            red = T.alloc_buffer((MR, max(NR, NG)), "float32")
            arow = T.alloc_buffer((MR,), "int64")
            bt = T.alloc_buffer((2, 3), "int32")
            expert, tile = expert_task(task, NACT, ACTIVE, NT, CH)
            e: T.let[T.int64] = T.Cast("int64", expert)
            r_tile: T.let[T.int32] = tile * TILE
            cnt: T.let[T.int32] = CNT[e]
            off: T.let[T.int32] = OFF[e]
            if cnt >= LMIN:
                T.evaluate(0)  # done in the lanes order
            elif few_lead and cnt <= FEW and cnt >= 2:
                # the first token streams the tile's weight rows in (its GEMV); the others
                # meet them in L2: one block, or a second GEMV where one is left
                gemv_tile(A, W, PAIRS, OUT, E1, E2, arow, e, r_tile, off, spf, gacc0, gacc1, red)
                if cnt == 2:
                    gemv_tile(
                        A, W, PAIRS, OUT, E1, E2, arow, e, r_tile, off + 1, 0, gacc0, gacc1, red
                    )
                else:
                    few_block(
                        A, W, PAIRS, OUT, E1, E2, arow, e, r_tile, off + 1, cnt - 1, 0, acc0,
                        acc1, red,
                    )  # fmt: skip
            elif cnt <= FEW and cnt >= 2:
                # one register block of tokens (a stream of weights): every group of NR weight
                # rows meets them once, prefetching the next with ``few_prefetch_lines``
                few_block(
                    A, W, PAIRS, OUT, E1, E2, arow, e, r_tile, off, cnt, spf, acc0, acc1, red,
                )  # fmt: skip
            elif KC > 0 and cnt >= 2:
                # passes over SBC tokens, each walking the reduction in chunks of KC: a chunk of
                # the pass's rows of A stays in L1 while every weight row group of the task meets
                # it; the partial sums of the pass's tokens wait in ``part``
                part = T.alloc_buffer((SBC, TILE), "float32")
                for sb in range((cnt + SBC - 1) // SBC):
                    nb: T.let[T.int32] = T.min(SBC, cnt - sb * SBC)
                    s0: T.let[T.int32] = off + sb * SBC  # the pass's first slot
                    nbl: T.let[T.int32] = (nb + MR - 1) // MR  # its token blocks
                    plan(bt, nb, nbl)
                    for kc in range(NKC):
                        for g in range(TILE // NR):
                            r0: T.let[T.int32] = r_tile + g * NR
                            for mi in range(nbl):
                                t0: T.let[T.int32] = mi * MR + bt[0, kind(mi, nbl)]
                                rows: T.let[T.int32] = bt[1, kind(mi, nbl)]
                                if rows >= 2:
                                    for m in T.unroll(MR):
                                        arow[m] = a_row(PAIRS, s0 + t0 + T.min(m, rows - 1))
                                    micro_c(
                                        rows, A, W, arow, e, r0, acc0, acc1, red, mi, nbl,
                                        kc * (KC // VL),
                                    )  # fmt: skip
                                    for m in T.unroll(MR):
                                        if m < rows:
                                            add_partial(part, red, t0 + m, m, g, kc)
                                else:
                                    arow[0] = a_row(PAIRS, s0 + t0)
                                    gemv_c(
                                        1, A, W, arow, e, r0, acc0, acc1, red, mi, nbl,
                                        kc * (KC // VL),
                                    )  # fmt: skip
                                    add_partial(part, red, t0, 0, g, kc)
                    for t in range(nb):
                        epilogue(OUT, E1, E2, PAIRS, part, t, s0 + t, e, r_tile, TILE)
            elif cnt >= 2:
                # passes over SB tokens: each group of NR weight rows meets all the pass's token
                # blocks while it is in L1 (the prefetch of the next group overlaps them); the
                # pass's rows of A stay in L2
                for sb in range((cnt + SB - 1) // SB):
                    nb: T.let[T.int32] = T.min(SB, cnt - sb * SB)
                    nbl: T.let[T.int32] = (nb + MR - 1) // MR
                    plan(bt, nb, nbl)
                    for g in range(TILE // NR):
                        r0: T.let[T.int32] = r_tile + g * NR
                        for mi in range(nbl):
                            # the block's first token and its rows
                            t0: T.let[T.int32] = sb * SB + mi * MR + bt[0, kind(mi, nbl)]
                            rows: T.let[T.int32] = bt[1, kind(mi, nbl)]
                            if rows >= 2:
                                # a block of MR tokens, or of fewer through its own kernel
                                for m in T.unroll(MR):
                                    arow[m] = a_row(PAIRS, off + t0 + T.min(m, rows - 1))
                                micro(rows, A, W, arow, e, r0, acc0, acc1, red, mi, nbl, 0)
                                for m in T.unroll(MR):
                                    if m < rows:
                                        epilogue(
                                            OUT, E1, E2, PAIRS, red, m, off + t0 + m, e, r0, NR
                                        )
                            else:
                                # a last lone token
                                arow[0] = a_row(PAIRS, off + t0)
                                gemv_nr(1, A, W, arow, e, r0, acc0, acc1, red, mi, nbl, 0)
                                epilogue(OUT, E1, E2, PAIRS, red, 0, off + t0, e, r0, NR)
            else:
                # GEMV (a lone token: decode): NG weight rows per step, weights streamed once
                gemv_tile(A, W, PAIRS, OUT, E1, E2, arow, e, r_tile, off, spf, gacc0, gacc1, red)

    return body


def _lanes_params(out_rows: int, lanes: int, unit: int) -> tuple[int, int, int]:
    """(weight rows of the one- and two-vector lanes micro-kernels, of the three-vector one, rows
    per lanes task) for ``out_rows`` output rows: as many weight rows as the registers hold (32
    vector registers where a vector has 16 lanes, else 16; one per token vector and one for the
    broadcast besides the accumulators), multiples of ``unit`` dividing ``out_rows``. A task
    takes about half of the rows, so each transposed token panel meets many weight rows while
    two tasks per expert spread over the cores (on the 30B-A3B block at T = 512 the gate/up GEMM
    took 109 / 115 / 130 ms at 1 / 2 / 4 tasks per expert: the transposes)."""
    regs = 32 if lanes >= 16 else 16
    cols2 = divisor_at_most(out_rows, (regs - 3) // 2, unit)
    cols3 = divisor_at_most(out_rows, (regs - 4) // 3, unit)
    both = math.lcm(cols2, cols3)
    return cols2, cols3, divisor_at_most(out_rows, max(both, out_rows // 2), both)


def _lanes_body(*, red_len: int, lanes: int, lanes_min: int, out_rows: int, unit: int, a_row,
                w_row, epilogue, widen: bool, task_chunks: int = 1, sweep_bytes: int = 0,
                group_bytes: int = 0):  # fmt: skip
    """The token-lanes tasks of ``_cpu_grouped_gemm`` (experts with ``>= lanes_min`` tokens):
    passes of up to three token vectors, each through the micro-kernel of as many vectors (an
    expert of 33-48 tokens on AVX-512 streams its weights once, not twice). An expert's vectors
    are shared out evenly among the fewest passes: 4 run as 2 + 2 and 7 as 3 + 2 + 2, not 3 + 1
    and 3 + 3 + 1 (a one-vector block has half the accumulators: in the gate/up GEMM at T = 512,
    AVX2 code, it ran at 0.63x the FMA rate of the two- and three-vector ones). Each pass
    transposes its tokens in blocks of ``TB`` reduction steps, so the lines it reads and writes
    stay in L1 (the row-by-row transpose took 5 % of the gate/up GEMM at T = 512 on AVX2 code,
    the blocked one 2 %). On the AVX-512 EPYC VM (2026-12-05, Qwen3-30B-A3B block, T = 512, 5
    interleaved rounds) the gate/up GEMM took 0.92x the time on AVX2 code (170 -> 156 ms; the
    split 0.95x, the blocked transpose 0.96x alone) and 0.97x on AVX-512 code (one pass per
    expert there).

    Passes come in sweeps: the panels of as many passes as ``sweep_bytes`` holds (counted at the
    expert's widest pass; at most ``MAX_SWEEP``, at least one) are transposed side by side, then
    each group of weight rows (about ``group_bytes``, a multiple of both kernels' rows) meets
    every pass of the sweep before the next group: read from memory once, again from L2. A sweep
    of one pass walks the task's rows in order all the same, so with ``sweep_bytes`` 0 each pass
    streams them all (``MoESchedule.lanes_sweep_kb``)."""
    from tvm.script import tirx as T

    from qiao.compiler.schedules.cpu_gemm import lanes_microkernel

    LV = lanes
    NR2, NR3, TILE_L = _lanes_params(out_rows, LV, unit)
    NTL = out_rows // TILE_L
    CH = divisor_at_most(NTL, task_chunks)
    SBL = 3 * LV
    PANEL = red_len * LV * 4  # bytes of one token vector's transposed panel
    NP = max(1, min(sweep_bytes // PANEL, MAX_SWEEP))  # the most passes one sweep holds
    # weight rows a group meets the sweep's passes in turn (``group_bytes`` of them, at least one
    # block of each kernel: they stay in L2 from one pass to the next); one pass: the task's rows
    group = max(group_bytes // ((2 if widen else 4) * red_len), 1)
    GS = divisor_at_most(TILE_L, group, math.lcm(NR2, NR3)) if NP > 1 else TILE_L
    TB = pow2_divisor(red_len, 16)  # reduction steps per transposed block
    common = dict(lanes=LV, k_len=red_len, w_row=w_row, widen=widen)
    one = lanes_microkernel(vectors=1, cols=NR2, **common)
    two = lanes_microkernel(vectors=2, cols=NR2, **common)
    three = lanes_microkernel(vectors=3, cols=NR3, **common)

    def pass_vectors(sb, nv, npass):
        # token vectors of pass ``sb`` of ``npass`` (the ``nv`` vectors shared out evenly)
        return nv // npass + T.if_then_else(sb < nv % npass, 1, 0)

    def pass_first(sb, nv, npass):
        # the first token of pass ``sb``
        return (sb * (nv // npass) + T.min(sb, nv % npass)) * LV

    @T.macro
    def body(A, W, PAIRS, OFF, CNT, ACTIVE, NACT, OUT, E1, E2):
        for task in T.parallel(NACT[0] * NTL):
            at = T.alloc_buffer((NP * red_len, SBL), "float32")
            rows = T.alloc_buffer((SBL,), "int64")
            acc0 = T.alloc_buffer((NR2, LV), "float32")
            acc1 = T.alloc_buffer((NR2, LV), "float32")
            acc2 = T.alloc_buffer((NR3, LV), "float32")
            red = T.alloc_buffer((SBL, NR2), "float32")
            expert, tile = expert_task(task, NACT, ACTIVE, NTL, CH)
            e: T.let[T.int64] = T.Cast("int64", expert)
            r_tile: T.let[T.int32] = tile * TILE_L
            cnt: T.let[T.int32] = CNT[e]
            off: T.let[T.int32] = OFF[e]
            if cnt >= lanes_min:
                # the expert's token vectors shared out evenly among the fewest passes of up
                # to three (so 4 vectors run as 2 + 2, not 3 + 1)
                nv: T.let[T.int32] = (cnt + LV - 1) // LV
                npass: T.let[T.int32] = (nv + 2) // 3
                # passes per sweep: as many as fit in ``sweep_bytes`` (at the widest pass's panel)
                per: T.let[T.int32] = T.max(
                    T.min(sweep_bytes // (PANEL * ((nv + npass - 1) // npass)), NP), 1
                )
                for sw in range((npass + per - 1) // per):
                    nps: T.let[T.int32] = T.min(per, npass - sw * per)
                    for p in range(nps):
                        v: T.let[T.int32] = pass_vectors(sw * per + p, nv, npass)
                        t0: T.let[T.int32] = pass_first(sw * per + p, nv, npass)
                        c: T.let[T.int32] = T.min(v * LV, cnt - t0)
                        for t in range(c):
                            rows[t] = a_row(PAIRS, off + t0 + t)
                        # transposed in blocks of TB along the reduction: the TB lines of
                        # ``at`` they write and the lines of A they read stay in L1
                        for kb in range(red_len // TB):
                            for t in range(c):
                                for kk in T.unroll(TB):
                                    at[p * red_len + kb * TB + kk, t] = A[rows[t], kb * TB + kk]
                            for t in range(v * LV - c):  # the last vector's unused lanes
                                for kk in T.unroll(TB):
                                    at[p * red_len + kb * TB + kk, c + t] = T.float32(0)
                    for gs in range(TILE_L // GS):
                        for p in range(nps):
                            v: T.let[T.int32] = pass_vectors(sw * per + p, nv, npass)
                            t0: T.let[T.int32] = pass_first(sw * per + p, nv, npass)
                            c: T.let[T.int32] = T.min(v * LV, cnt - t0)
                            a0: T.let[T.int32] = p * red_len
                            if v == 3:
                                for g in range(GS // NR3):
                                    r0: T.let[T.int32] = r_tile + gs * GS + g * NR3
                                    three(at, W, e, r0, acc0, acc1, acc2, red, a0)
                                    for t in range(c):
                                        epilogue(
                                            OUT, E1, E2, PAIRS, red, t, off + t0 + t, e, r0, NR3
                                        )
                            else:
                                for g in range(GS // NR2):
                                    r0: T.let[T.int32] = r_tile + gs * GS + g * NR2
                                    if v == 2:
                                        two(at, W, e, r0, acc0, acc1, acc2, red, a0)
                                    else:
                                        one(at, W, e, r0, acc0, acc1, acc2, red, a0)
                                    for t in range(c):
                                        epilogue(
                                            OUT, E1, E2, PAIRS, red, t, off + t0 + t, e, r0, NR2
                                        )

    return body


def _token_blocks(MR: int, NR: int, common: dict):
    """``block(rows, ...)``: ``dot_microkernel`` over ``rows`` tokens (``2 <= rows <= MR``, a TIR
    expression), one specialised kernel per row count, so a partial token block computes no
    repeated rows (at T = 128 an expert averages 8 tokens: a 6-row block and a 2-row one, not
    two 6-row ones)."""
    from tvm.script import tirx as T

    from qiao.compiler.schedules.cpu_gemm import dot_microkernel

    kernel = dot_microkernel(rows=MR, cols=NR, **common)
    if MR <= 2:

        @T.macro
        def whole(rows, A, W, arow, e, r0, r_next, acc0, acc1, red, pf, k0):
            kernel(A, W, arow, e, r0, r_next, acc0, acc1, red, pf, k0)

        return whole
    fewer = _token_blocks(MR - 1, NR, common)

    @T.macro
    def block(rows, A, W, arow, e, r0, r_next, acc0, acc1, red, pf, k0):
        if rows >= MR:
            kernel(A, W, arow, e, r0, r_next, acc0, acc1, red, pf, k0)
        else:
            fewer(rows, A, W, arow, e, r0, r_next, acc0, acc1, red, pf, k0)

    return block


def _up_cpu_body(cfg: MoEConfig, sched):
    """fc1 rows are walked in (unit, gate/up) order: tile row r is unit r // U, part r % U."""
    from tvm.script import tirx as T

    K = cfg.top_k
    U, PU, TILE, PG, VL = _cpu_up_params(cfg, sched)

    def a_row(PAIRS, slot):
        return T.Cast("int64", PAIRS[slot] // K)

    def w_row(r):
        return cfg.fc1_row(r // U, r % U)

    @T.macro
    def epilogue(ACT, B1, _unused, PAIRS, red, m, slot, e, r0, n):
        for p in T.unroll(n // U):
            ACT[slot, r0 // U + p] = _epilogue_up(cfg, red, m, p, B1, e, r0 // U + p)

    generic = _cpu_grouped_gemm(
        red_len=cfg.hidden,
        VL=VL,
        MR=sched.micro_m,
        NR=PU * U,
        NG=PG * U,
        TILE=TILE * U,
        NT=cfg.inter // TILE,
        a_row=a_row,
        w_row=w_row,
        epilogue=epilogue,
        prefetch=sched.prefetch,
        prefetch_level=sched.prefetch_level,
        prefetch_lines=sched.prefetch_lines,
        widen=cfg.weight_dtype != "float32",
        unit=U,
        lanes_min=sched.lanes_min,
        lanes=sched.vector_lanes,
        k_chunk=sched.k_chunk,
        few_tokens=sched.few_tokens,
        few_prefetch_lines=sched.few_prefetch_lines,
        few_lead=bool(sched.few_lead),
        few_prefetch_off=sched.few_prefetch_off,
        task_chunks=max(1, sched.task_chunks),
        lone_merge=bool(sched.lone_merge),
        lanes_sweep_kb=sched.lanes_sweep_kb,
        lanes_group_kb=sched.lanes_group_kb,
    )

    @T.macro
    def body(X, W1, B1, IDS, PAIRS, OFF, CNT, ACTIVE, NACT, BEXP, NBLK, PSLOT, ACT):
        generic(X, W1, PAIRS, OFF, CNT, ACTIVE, NACT, ACT, B1, None)

    return body


def _down_cpu_body(cfg: MoEConfig, sched):
    """fc2 rows are the output columns; the routing weight (and bias) scale each result."""
    from tvm.script import tirx as T

    K = cfg.top_k
    NR, TILE, NG, VL = _cpu_down_params(cfg, sched)

    def a_row(PAIRS, slot):
        return T.Cast("int64", slot)

    def w_row(r):
        return r

    def bias(B2, e, col):
        return B2[e, col] if cfg.fc2_bias else T.float32(0)

    @T.macro
    def epilogue(OUT, B2, TW, PAIRS, red, m, slot, e, r0, n):
        for r in T.unroll(n):
            OUT[PAIRS[slot] // K, PAIRS[slot] % K, r0 + r] = TW[
                PAIRS[slot] // K, PAIRS[slot] % K
            ] * (red[m, r] + bias(B2, e, r0 + r))

    generic = _cpu_grouped_gemm(
        red_len=cfg.inter,
        VL=VL,
        MR=sched.down_micro_m,
        NR=NR,
        NG=NG,
        TILE=TILE,
        NT=cfg.hidden // TILE,
        a_row=a_row,
        w_row=w_row,
        epilogue=epilogue,
        prefetch=sched.prefetch,
        prefetch_level=sched.prefetch_level,
        prefetch_lines=sched.prefetch_lines,
        widen=cfg.weight_dtype != "float32",
        few_tokens=sched.few_tokens,
        few_prefetch_lines=sched.few_prefetch_lines,
        few_lead=bool(sched.few_lead),
        few_prefetch_off=sched.few_prefetch_off,
        task_chunks=max(1, sched.task_chunks),
        lone_merge=bool(sched.lone_merge),
    )

    @T.macro
    def body(A, W2, B2, IDS, TW, PAIRS, OFF, CNT, ACTIVE, NACT, BEXP, NBLK, PSLOT, OUT):
        generic(A, W2, PAIRS, OFF, CNT, ACTIVE, NACT, OUT, B2, TW)

    return body


# ------------------------------------------------------------------------------------------------
# GPU bodies
# ------------------------------------------------------------------------------------------------
def _gpu_tile(cfg: MoEConfig, sched, out_cols: int, rows_per_unit: int):
    """(units per block, units per thread, threads x, threads y) of a GPU GEMM tile."""
    BM, TM = sched.block_m, sched.gpu_thread_m
    if BM % TM:
        raise ValueError(f"block_m {BM} must be a multiple of gpu_thread_m {TM}")
    BNU = divisor_at_most(out_cols, max(1, sched.gpu_tile_n // rows_per_unit))
    TNU = divisor_at_most(BNU, max(1, sched.gpu_thread_n // rows_per_unit))
    TX, TY = BNU // TNU, BM // TM
    if TX * TY > 1024:
        raise ValueError(f"GPU MoE tile needs {TX * TY} threads per block (> 1024)")
    return BNU, TNU, TX, TY


# ------------------------------------------------------------------------------------------------
# GPU tensor cores: float16/bfloat16 experts (WMMA m16n16k16, float32 accumulators)
# ------------------------------------------------------------------------------------------------
TC_TILE = 16  # WMMA fragment: 16 x 16 x 16
TC_BK = 32  # reduction depth staged in shared memory per step
TC_PAD_HALF, TC_PAD_F32 = 8, 4  # row padding (elements): fewer bank conflicts, 32-byte rows


def _tensor_cores(cfg: MoEConfig) -> bool:
    """Whether the current target multiplies ``cfg.weight_dtype`` on tensor cores."""
    if cfg.weight_dtype == "float32":
        return False
    import tvm

    from qiao.compiler.schedules.gpu import tensor_core_dtypes

    return cfg.weight_dtype in tensor_core_dtypes(tvm.target.Target.current(allow_none=True))


def _tc_warps(sched, out_rows: int, unit: int) -> int | None:
    """Warps of a tensor-core tile (each one 16 output columns, ``4, 2, 1`` tried): the tile's
    ``16 * warps`` weight rows must hold whole units and divide ``out_rows``; ``None`` when no
    count fits or ``block_m`` is not a multiple of 16 (the FMA kernel runs then)."""
    if sched.block_m % TC_TILE:
        return None
    for warps in (4, 2, 1):
        rows = TC_TILE * warps
        if rows % unit == 0 and out_rows % rows == 0:
            return warps
    return None


def _wide(cfg: MoEConfig, value):
    """A weight element as float32 (the FMA kernels widen narrow experts in registers)."""
    if cfg.weight_dtype == "float32":
        return value
    from tvm import tirx

    return tirx.Cast("float32", value)


def _tc_gemm(cfg: MoEConfig, sched, *, rows: int, depth: int, warps: int, a_elem, b_elem, epilogue):
    """A grouped GEMM on tensor cores: one thread block per (aligned block of ``block_m`` slots,
    ``16 * warps`` weight rows), ``warps`` warps of 32 threads.

    Each step stages ``block_m x 32`` activations (cast to the weights' dtype) and ``16 * warps
    x 32`` weights in shared memory; every warp multiplies its 16 weight rows with all
    ``block_m / 16`` row fragments (``nvcuda::wmma`` m16n16k16, float32 accumulators); the
    accumulators go through shared memory to ``epilogue``. ``a_elem(A, PAIRS, bx, m, k)`` and
    ``b_elem(W, BEXP, bx, by, r, k)`` read one element (``k < depth``), ``epilogue(c_s, m, c,
    bx, by, ...)`` writes the output of slot row ``m``; ``rows`` is the weight rows (grid y).
    """
    from tvm.script import tirx as T

    DT, K, BM = cfg.weight_dtype, cfg.top_k, sched.block_m
    BN, BK, NTH = TC_TILE * warps, TC_BK, 32 * warps
    BKP, BNP = BK + TC_PAD_HALF, BN + TC_PAD_F32
    MF, KT = BM // TC_TILE, (depth + BK - 1) // BK

    @T.macro
    def gemm(A, W, PAIRS, BEXP, NBLK, n, B, OUT, EXTRA):
        for bx in T.thread_binding(num_blocks(n, K, cfg.num_experts, BM), thread="blockIdx.x"):
            for by in T.thread_binding(rows // BN, thread="blockIdx.y"):
                for ty in T.thread_binding(warps, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        a_s = T.alloc_buffer((BM, BKP), DT, scope="shared.dyn")
                        b_s = T.alloc_buffer((BN, BKP), DT, scope="shared.dyn")
                        c_s = T.alloc_buffer((BM, BNP), "float32", scope="shared.dyn")
                        a_f = T.alloc_buffer((TC_TILE, TC_TILE), DT, scope="wmma.matrix_a")
                        b_f = T.alloc_buffer((TC_TILE, TC_TILE), DT, scope="wmma.matrix_b")
                        acc = T.alloc_buffer(
                            (MF * TC_TILE, TC_TILE), "float32", scope="wmma.accumulator"
                        )
                        if bx < T.Cast("int64", NBLK[0]):
                            with T.sblock("tc_init"):  # opaque fragment calls: regions stated
                                T.reads()
                                T.writes(acc[0 : MF * TC_TILE, 0:TC_TILE])
                                for mf in T.unroll(MF):
                                    T.tvm_fill_fragment(
                                        acc.data, 16, 16, 16, mf, T.float32(0), dtype="void"
                                    )
                            for k0 in range(KT):
                                for it in range((BM * BK + NTH - 1) // NTH):
                                    if it * NTH + ty * 32 + tx < BM * BK:
                                        a_s[
                                            (it * NTH + ty * 32 + tx) // BK,
                                            (it * NTH + ty * 32 + tx) % BK,
                                        ] = T.Cast(
                                            DT,
                                            T.if_then_else(
                                                k0 * BK + (it * NTH + ty * 32 + tx) % BK < depth,
                                                a_elem(
                                                    A,
                                                    PAIRS,
                                                    bx,
                                                    (it * NTH + ty * 32 + tx) // BK,
                                                    T.min(
                                                        k0 * BK + (it * NTH + ty * 32 + tx) % BK,
                                                        depth - 1,
                                                    ),
                                                ),
                                                T.float32(0),
                                            ),
                                        )
                                for it in range((BN * BK + NTH - 1) // NTH):
                                    if it * NTH + ty * 32 + tx < BN * BK:
                                        b_s[
                                            (it * NTH + ty * 32 + tx) // BK,
                                            (it * NTH + ty * 32 + tx) % BK,
                                        ] = T.if_then_else(
                                            k0 * BK + (it * NTH + ty * 32 + tx) % BK < depth,
                                            b_elem(
                                                W,
                                                BEXP,
                                                bx,
                                                by * BN + (it * NTH + ty * 32 + tx) // BK,
                                                T.min(
                                                    k0 * BK + (it * NTH + ty * 32 + tx) % BK,
                                                    depth - 1,
                                                ),
                                            ),
                                            T.Cast(DT, 0),
                                        )
                                T.tvm_storage_sync("shared")
                                with T.sblock("tc_mma"):
                                    T.reads(
                                        a_s[0:BM, 0:BKP],
                                        b_s[0:BN, 0:BKP],
                                        acc[0 : MF * TC_TILE, 0:TC_TILE],
                                    )
                                    T.writes(
                                        acc[0 : MF * TC_TILE, 0:TC_TILE],
                                        a_f[0:TC_TILE, 0:TC_TILE],
                                        b_f[0:TC_TILE, 0:TC_TILE],
                                    )
                                    for kk in T.unroll(BK // TC_TILE):
                                        # b_s is [rows, k]: a column-major k x rows fragment
                                        T.tvm_load_matrix_sync(
                                            b_f.data,
                                            16,
                                            16,
                                            16,
                                            0,
                                            b_s.access_ptr(
                                                "r", offset=ty * TC_TILE * BKP + kk * TC_TILE
                                            ),
                                            BKP,
                                            "col_major",
                                            dtype="void",
                                        )
                                        for mf in T.unroll(MF):
                                            T.tvm_load_matrix_sync(
                                                a_f.data,
                                                16,
                                                16,
                                                16,
                                                0,
                                                a_s.access_ptr(
                                                    "r", offset=mf * TC_TILE * BKP + kk * TC_TILE
                                                ),
                                                BKP,
                                                "row_major",
                                                dtype="void",
                                            )
                                            T.tvm_mma_sync(
                                                acc.data,
                                                mf,
                                                a_f.data,
                                                0,
                                                b_f.data,
                                                0,
                                                acc.data,
                                                mf,
                                                dtype="void",
                                            )
                                T.tvm_storage_sync("shared")
                            with T.sblock("tc_store"):
                                T.reads(acc[0 : MF * TC_TILE, 0:TC_TILE])
                                T.writes(c_s[0:BM, 0:BNP])
                                for mf in T.unroll(MF):
                                    T.tvm_store_matrix_sync(
                                        acc.data,
                                        16,
                                        16,
                                        16,
                                        mf,
                                        c_s.access_ptr(
                                            "w", offset=mf * TC_TILE * BNP + ty * TC_TILE
                                        ),
                                        BNP,
                                        "row_major",
                                        dtype="void",
                                    )
                            T.tvm_storage_sync("shared")
                            epilogue(c_s, PAIRS, BEXP, bx, by, ty * 32 + tx, B, OUT, EXTRA)

    return gemm


def _up_gpu_body(cfg: MoEConfig, sched):
    from tvm.script import tirx as T

    H, INTER, K = cfg.hidden, cfg.inter, cfg.top_k
    U = cfg.units_per_row_group
    BM, TM, BK = sched.block_m, sched.gpu_thread_m, sched.gpu_tile_k
    BNU, TNU, TX, TY = _gpu_tile(cfg, sched, INTER, U)
    BN, TNR, NTH = BNU * U, TNU * U, TX * TY
    KT = (H + BK - 1) // BK
    GU = divisor_at_most(INTER, max(1, 128 // GEMV_LANES))  # GEMV: units per block (threadIdx.y)
    LANES = GEMV_LANES
    STEPS, HALF = LANES.bit_length() - 1, LANES // 2  # shuffle tree: LANES/2, ..., 2, 1
    GEMV_MAX = sched.gpu_gemv_max_tokens

    @T.macro
    def gemm(X, W1, B1, PAIRS, BEXP, NBLK, ACT, n):
        for bx in T.thread_binding(num_blocks(n, K, cfg.num_experts, BM), thread="blockIdx.x"):
            for by in T.thread_binding(INTER // BNU, thread="blockIdx.y"):
                for ty in T.thread_binding(TY, thread="threadIdx.y"):
                    for tx in T.thread_binding(TX, thread="threadIdx.x"):
                        a_s = T.alloc_buffer((BM, BK), "float32", scope="shared")
                        b_s = T.alloc_buffer((BN, BK + 1), "float32", scope="shared")
                        acc = T.alloc_buffer((TM, TNR), "float32", scope="local")
                        if bx < T.Cast("int64", NBLK[0]):
                            for tm in T.unroll(TM):
                                for tn in T.unroll(TNR):
                                    acc[tm, tn] = T.float32(0)
                            for k0 in range(KT):
                                for it in range((BM * BK + NTH - 1) // NTH):
                                    if it * NTH + ty * TX + tx < BM * BK:
                                        a_s[
                                            (it * NTH + ty * TX + tx) // BK,
                                            (it * NTH + ty * TX + tx) % BK,
                                        ] = T.if_then_else(
                                            k0 * BK + (it * NTH + ty * TX + tx) % BK < H,
                                            X[
                                                T.max(
                                                    PAIRS[
                                                        bx * BM + (it * NTH + ty * TX + tx) // BK
                                                    ],
                                                    0,
                                                )
                                                // K,
                                                T.min(
                                                    k0 * BK + (it * NTH + ty * TX + tx) % BK, H - 1
                                                ),
                                            ],
                                            T.float32(0),
                                        )
                                for it in range((BN * BK + NTH - 1) // NTH):
                                    if it * NTH + ty * TX + tx < BN * BK:
                                        b_s[
                                            (it * NTH + ty * TX + tx) // BK,
                                            (it * NTH + ty * TX + tx) % BK,
                                        ] = T.if_then_else(
                                            k0 * BK + (it * NTH + ty * TX + tx) % BK < H,
                                            _wide(
                                                cfg,
                                                W1[
                                                    T.Cast("int64", BEXP[bx]),
                                                    cfg.fc1_row(
                                                        by * BNU
                                                        + (it * NTH + ty * TX + tx) // BK // U,
                                                        (it * NTH + ty * TX + tx) // BK % U,
                                                    ),
                                                    T.min(
                                                        k0 * BK + (it * NTH + ty * TX + tx) % BK,
                                                        H - 1,
                                                    ),
                                                ],
                                            ),
                                            T.float32(0),
                                        )
                                T.tvm_storage_sync("shared")
                                for kk in range(BK):
                                    for tm in T.unroll(TM):
                                        for tn in T.unroll(TNR):
                                            acc[tm, tn] = (
                                                acc[tm, tn]
                                                + a_s[ty * TM + tm, kk] * b_s[tx * TNR + tn, kk]
                                            )
                                T.tvm_storage_sync("shared")
                            for tm in T.unroll(TM):
                                if PAIRS[bx * BM + ty * TM + tm] >= 0:
                                    for p in T.unroll(TNU):
                                        ACT[bx * BM + ty * TM + tm, by * BNU + tx * TNU + p] = (
                                            _epilogue_up(
                                                cfg,
                                                acc,
                                                tm,
                                                p,
                                                B1,
                                                T.Cast("int64", BEXP[bx]),
                                                by * BNU + tx * TNU + p,
                                            )
                                        )

    @T.macro
    def gemv(X, W1, B1, IDS, PSLOT, ACT, n):
        for bx in T.thread_binding(n * K, thread="blockIdx.x"):
            for by in T.thread_binding(INTER // GU, thread="blockIdx.y"):
                for ty in T.thread_binding(GU, thread="threadIdx.y"):
                    for tx in T.thread_binding(LANES, thread="threadIdx.x"):
                        red = T.alloc_buffer((1, U), "float32", scope="local")
                        for w in T.unroll(U):
                            red[0, w] = T.float32(0)
                            for kk in range((H + LANES - 1) // LANES):
                                if kk * LANES + tx < H:
                                    red[0, w] = red[0, w] + X[bx // K, kk * LANES + tx] * _wide(
                                        cfg,
                                        W1[
                                            T.Cast("int64", IDS[bx // K, bx % K]),
                                            cfg.fc1_row(by * GU + ty, w),
                                            kk * LANES + tx,
                                        ],
                                    )
                            # warp tree: no shared memory, no barriers
                            for s in T.unroll(STEPS):
                                red[0, w] = red[0, w] + T.tvm_warp_shuffle_down(
                                    T.tvm_warp_activemask(),
                                    red[0, w],
                                    T.shift_right(HALF, s),
                                    LANES,
                                    LANES,
                                )
                        if tx == 0:
                            ACT[PSLOT[bx // K, bx % K], by * GU + ty] = _epilogue_up(
                                cfg,
                                red,
                                0,
                                0,
                                B1,
                                T.Cast("int64", IDS[bx // K, bx % K]),
                                by * GU + ty,
                            )

    WARPS = _tc_warps(sched, cfg.fc1_rows, U) if _tensor_cores(cfg) else None
    if WARPS is not None:
        BNT = TC_TILE * WARPS // U  # units per tensor-core tile
        NTT = 32 * WARPS

        def a_elem(X, PAIRS, bx, m, k):
            return X[T.max(PAIRS[bx * BM + m], 0) // K, k]

        def b_elem(W1, BEXP, bx, r, k):
            return W1[T.Cast("int64", BEXP[bx]), cfg.fc1_row(r // U, r % U), k]

        @T.macro
        def epilogue(c_s, PAIRS, BEXP, bx, by, tid, B1, ACT, _unused):
            for it in range((BM * BNT + NTT - 1) // NTT):
                if it * NTT + tid < BM * BNT:
                    if PAIRS[bx * BM + (it * NTT + tid) // BNT] >= 0:
                        ACT[
                            bx * BM + (it * NTT + tid) // BNT, by * BNT + (it * NTT + tid) % BNT
                        ] = _epilogue_up(
                            cfg,
                            c_s,
                            (it * NTT + tid) // BNT,
                            (it * NTT + tid) % BNT,
                            B1,
                            T.Cast("int64", BEXP[bx]),
                            by * BNT + (it * NTT + tid) % BNT,
                        )

        gemm_tc = _tc_gemm(
            cfg,
            sched,
            rows=cfg.fc1_rows,
            depth=H,
            warps=WARPS,
            a_elem=a_elem,
            b_elem=b_elem,
            epilogue=epilogue,
        )

        @T.macro
        def body(X, W1, B1, IDS, PAIRS, OFF, CNT, ACTIVE, NACT, BEXP, NBLK, PSLOT, ACT):
            if X.shape[0] <= GEMV_MAX:
                gemv(X, W1, B1, IDS, PSLOT, ACT, X.shape[0])
            else:
                gemm_tc(X, W1, PAIRS, BEXP, NBLK, X.shape[0], B1, ACT, PAIRS)

        return body

    @T.macro
    def body(X, W1, B1, IDS, PAIRS, OFF, CNT, ACTIVE, NACT, BEXP, NBLK, PSLOT, ACT):
        if X.shape[0] <= GEMV_MAX:
            gemv(X, W1, B1, IDS, PSLOT, ACT, X.shape[0])
        else:
            gemm(X, W1, B1, PAIRS, BEXP, NBLK, ACT, X.shape[0])

    return body


def _down_gpu_body(cfg: MoEConfig, sched):
    from tvm.script import tirx as T

    H, INTER, K = cfg.hidden, cfg.inter, cfg.top_k
    BM, TM, BK = sched.block_m, sched.gpu_thread_m, sched.gpu_tile_k
    BNU, TNU, TX, TY = _gpu_tile(cfg, sched, H, 1)
    NTH = TX * TY
    KT = (INTER + BK - 1) // BK
    GU = divisor_at_most(H, max(1, 128 // GEMV_LANES))
    LANES = GEMV_LANES
    STEPS, HALF = LANES.bit_length() - 1, LANES // 2
    GEMV_MAX = sched.gpu_gemv_max_tokens

    def bias(B2, e, col):
        return B2[e, col] if cfg.fc2_bias else T.float32(0)

    @T.macro
    def gemm(A, W2, B2, TW, PAIRS, BEXP, NBLK, OUT, n):
        for bx in T.thread_binding(num_blocks(n, K, cfg.num_experts, BM), thread="blockIdx.x"):
            for by in T.thread_binding(H // BNU, thread="blockIdx.y"):
                for ty in T.thread_binding(TY, thread="threadIdx.y"):
                    for tx in T.thread_binding(TX, thread="threadIdx.x"):
                        a_s = T.alloc_buffer((BM, BK), "float32", scope="shared")
                        b_s = T.alloc_buffer((BNU, BK + 1), "float32", scope="shared")
                        acc = T.alloc_buffer((TM, TNU), "float32", scope="local")
                        if bx < T.Cast("int64", NBLK[0]):
                            for tm in T.unroll(TM):
                                for tn in T.unroll(TNU):
                                    acc[tm, tn] = T.float32(0)
                            for k0 in range(KT):
                                for it in range((BM * BK + NTH - 1) // NTH):
                                    if it * NTH + ty * TX + tx < BM * BK:
                                        a_s[
                                            (it * NTH + ty * TX + tx) // BK,
                                            (it * NTH + ty * TX + tx) % BK,
                                        ] = T.if_then_else(
                                            k0 * BK + (it * NTH + ty * TX + tx) % BK < INTER,
                                            A[
                                                bx * BM + (it * NTH + ty * TX + tx) // BK,
                                                T.min(
                                                    k0 * BK + (it * NTH + ty * TX + tx) % BK,
                                                    INTER - 1,
                                                ),
                                            ],
                                            T.float32(0),
                                        )
                                for it in range((BNU * BK + NTH - 1) // NTH):
                                    if it * NTH + ty * TX + tx < BNU * BK:
                                        b_s[
                                            (it * NTH + ty * TX + tx) // BK,
                                            (it * NTH + ty * TX + tx) % BK,
                                        ] = T.if_then_else(
                                            k0 * BK + (it * NTH + ty * TX + tx) % BK < INTER,
                                            _wide(
                                                cfg,
                                                W2[
                                                    T.Cast("int64", BEXP[bx]),
                                                    by * BNU + (it * NTH + ty * TX + tx) // BK,
                                                    T.min(
                                                        k0 * BK + (it * NTH + ty * TX + tx) % BK,
                                                        INTER - 1,
                                                    ),
                                                ],
                                            ),
                                            T.float32(0),
                                        )
                                T.tvm_storage_sync("shared")
                                for kk in range(BK):
                                    for tm in T.unroll(TM):
                                        for tn in T.unroll(TNU):
                                            acc[tm, tn] = (
                                                acc[tm, tn]
                                                + a_s[ty * TM + tm, kk] * b_s[tx * TNU + tn, kk]
                                            )
                                T.tvm_storage_sync("shared")
                            for tm in T.unroll(TM):
                                if PAIRS[bx * BM + ty * TM + tm] >= 0:
                                    for tn in T.unroll(TNU):
                                        OUT[
                                            PAIRS[bx * BM + ty * TM + tm] // K,
                                            PAIRS[bx * BM + ty * TM + tm] % K,
                                            by * BNU + tx * TNU + tn,
                                        ] = TW[
                                            PAIRS[bx * BM + ty * TM + tm] // K,
                                            PAIRS[bx * BM + ty * TM + tm] % K,
                                        ] * (
                                            acc[tm, tn]
                                            + bias(
                                                B2,
                                                T.Cast("int64", BEXP[bx]),
                                                by * BNU + tx * TNU + tn,
                                            )
                                        )

    @T.macro
    def gemv(A, W2, B2, IDS, TW, PSLOT, OUT, n):
        for bx in T.thread_binding(n * K, thread="blockIdx.x"):
            for by in T.thread_binding(H // GU, thread="blockIdx.y"):
                for ty in T.thread_binding(GU, thread="threadIdx.y"):
                    for tx in T.thread_binding(LANES, thread="threadIdx.x"):
                        red = T.alloc_buffer((1,), "float32", scope="local")
                        red[0] = T.float32(0)
                        for kk in range((INTER + LANES - 1) // LANES):
                            if kk * LANES + tx < INTER:
                                red[0] = red[0] + A[
                                    PSLOT[bx // K, bx % K], kk * LANES + tx
                                ] * _wide(
                                    cfg,
                                    W2[
                                        T.Cast("int64", IDS[bx // K, bx % K]),
                                        by * GU + ty,
                                        kk * LANES + tx,
                                    ],
                                )
                        for s in T.unroll(STEPS):
                            red[0] = red[0] + T.tvm_warp_shuffle_down(
                                T.tvm_warp_activemask(),
                                red[0],
                                T.shift_right(HALF, s),
                                LANES,
                                LANES,
                            )
                        if tx == 0:
                            OUT[bx // K, bx % K, by * GU + ty] = TW[bx // K, bx % K] * (
                                red[0]
                                + bias(B2, T.Cast("int64", IDS[bx // K, bx % K]), by * GU + ty)
                            )

    WARPS = _tc_warps(sched, H, 1) if _tensor_cores(cfg) else None
    if WARPS is not None:
        BNT, NTT = TC_TILE * WARPS, 32 * WARPS

        def a_elem(A, PAIRS, bx, m, k):
            return A[bx * BM + m, k]

        def b_elem(W2, BEXP, bx, r, k):
            return W2[T.Cast("int64", BEXP[bx]), r, k]

        @T.macro
        def epilogue(c_s, PAIRS, BEXP, bx, by, tid, B2, OUT, TW):
            for it in range((BM * BNT + NTT - 1) // NTT):
                if it * NTT + tid < BM * BNT:
                    if PAIRS[bx * BM + (it * NTT + tid) // BNT] >= 0:
                        OUT[
                            PAIRS[bx * BM + (it * NTT + tid) // BNT] // K,
                            PAIRS[bx * BM + (it * NTT + tid) // BNT] % K,
                            by * BNT + (it * NTT + tid) % BNT,
                        ] = TW[
                            PAIRS[bx * BM + (it * NTT + tid) // BNT] // K,
                            PAIRS[bx * BM + (it * NTT + tid) // BNT] % K,
                        ] * (
                            c_s[(it * NTT + tid) // BNT, (it * NTT + tid) % BNT]
                            + bias(B2, T.Cast("int64", BEXP[bx]), by * BNT + (it * NTT + tid) % BNT)
                        )

        gemm_tc = _tc_gemm(
            cfg,
            sched,
            rows=H,
            depth=INTER,
            warps=WARPS,
            a_elem=a_elem,
            b_elem=b_elem,
            epilogue=epilogue,
        )

        @T.macro
        def body(A, W2, B2, IDS, TW, PAIRS, OFF, CNT, ACTIVE, NACT, BEXP, NBLK, PSLOT, OUT):
            if OUT.shape[0] <= GEMV_MAX:
                gemv(A, W2, B2, IDS, TW, PSLOT, OUT, OUT.shape[0])
            else:
                gemm_tc(A, W2, PAIRS, BEXP, NBLK, OUT.shape[0], B2, OUT, TW)

        return body

    @T.macro
    def body(A, W2, B2, IDS, TW, PAIRS, OFF, CNT, ACTIVE, NACT, BEXP, NBLK, PSLOT, OUT):
        if OUT.shape[0] <= GEMV_MAX:
            gemv(A, W2, B2, IDS, TW, PSLOT, OUT, OUT.shape[0])
        else:
            gemm(A, W2, B2, TW, PAIRS, BEXP, NBLK, OUT, OUT.shape[0])

    return body


# ------------------------------------------------------------------------------------------------
# Signatures (shared by the CPU and GPU bodies)
# ------------------------------------------------------------------------------------------------
def _up_func(cfg: MoEConfig, sched, body, x_cols: int):
    from tvm.script import tirx as T

    E, H, INTER, K, R, BM = (
        cfg.num_experts,
        cfg.hidden,
        cfg.inter,
        cfg.top_k,
        cfg.fc1_rows,
        sched.block_m,
    )
    BSHAPE = (E, R) if cfg.fc1_bias else (1,)

    @T.prim_func(s_tir=True)
    def group_gemm_up(
        x_h: T.handle,
        w_h: T.handle,
        b_h: T.handle,
        ids_h: T.handle,
        pairs_h: T.handle,
        off_h: T.handle,
        cnt_h: T.handle,
        act_h: T.handle,
        nact_h: T.handle,
        bexp_h: T.handle,
        nblk_h: T.handle,
        pslot_h: T.handle,
        out_h: T.handle,
    ):
        T.func_attr(KERNEL_ATTRS)
        n = T.int64()
        X = T.match_buffer(x_h, (n, x_cols), "float32")
        W1 = T.match_buffer(w_h, (T.int64(E), T.int64(R), T.int64(H)), cfg.weight_dtype)
        B1 = T.match_buffer(b_h, BSHAPE, "float32")
        IDS = T.match_buffer(ids_h, (n, K), "int32")
        PAIRS = T.match_buffer(pairs_h, (num_blocks(n, K, E, BM) * BM,), "int32")
        OFF = T.match_buffer(off_h, (E + 1,), "int32")
        CNT = T.match_buffer(cnt_h, (E,), "int32")
        ACTIVE = T.match_buffer(act_h, (E,), "int32")
        NACT = T.match_buffer(nact_h, (1,), "int32")
        BEXP = T.match_buffer(bexp_h, (num_blocks(n, K, E, BM),), "int32")
        NBLK = T.match_buffer(nblk_h, (1,), "int32")
        PSLOT = T.match_buffer(pslot_h, (n, K), "int32")
        ACT = T.match_buffer(out_h, (num_blocks(n, K, E, BM) * BM, INTER), "float32")
        with T.sblock("root"):
            body(X, W1, B1, IDS, PAIRS, OFF, CNT, ACTIVE, NACT, BEXP, NBLK, PSLOT, ACT)

    return group_gemm_up


def _down_func(cfg: MoEConfig, sched, body):
    from tvm.script import tirx as T

    E, H, INTER, K, BM = cfg.num_experts, cfg.hidden, cfg.inter, cfg.top_k, sched.block_m
    BSHAPE = (E, H) if cfg.fc2_bias else (1,)

    @T.prim_func(s_tir=True)
    def group_gemm_down(
        a_h: T.handle,
        w_h: T.handle,
        b_h: T.handle,
        ids_h: T.handle,
        tw_h: T.handle,
        pairs_h: T.handle,
        off_h: T.handle,
        cnt_h: T.handle,
        act_h: T.handle,
        nact_h: T.handle,
        bexp_h: T.handle,
        nblk_h: T.handle,
        pslot_h: T.handle,
        out_h: T.handle,
    ):
        T.func_attr(KERNEL_ATTRS)
        n = T.int64()
        A = T.match_buffer(a_h, (num_blocks(n, K, E, BM) * BM, INTER), "float32")
        W2 = T.match_buffer(w_h, (T.int64(E), T.int64(H), T.int64(INTER)), cfg.weight_dtype)
        B2 = T.match_buffer(b_h, BSHAPE, "float32")
        IDS = T.match_buffer(ids_h, (n, K), "int32")
        TW = T.match_buffer(tw_h, (n, K), "float32")
        PAIRS = T.match_buffer(pairs_h, (num_blocks(n, K, E, BM) * BM,), "int32")
        OFF = T.match_buffer(off_h, (E + 1,), "int32")
        CNT = T.match_buffer(cnt_h, (E,), "int32")
        ACTIVE = T.match_buffer(act_h, (E,), "int32")
        NACT = T.match_buffer(nact_h, (1,), "int32")
        BEXP = T.match_buffer(bexp_h, (num_blocks(n, K, E, BM),), "int32")
        NBLK = T.match_buffer(nblk_h, (1,), "int32")
        PSLOT = T.match_buffer(pslot_h, (n, K), "int32")
        OUT = T.match_buffer(out_h, (n, K, H), "float32")
        with T.sblock("root"):
            body(A, W2, B2, IDS, TW, PAIRS, OFF, CNT, ACTIVE, NACT, BEXP, NBLK, PSLOT, OUT)

    return group_gemm_down


def _up_cpu(cfg, sched):
    return _up_func(cfg, sched, _up_cpu_body(cfg, sched), up_row_floats(cfg, sched))


def _down_cpu(cfg, sched):
    return _down_func(cfg, sched, _down_cpu_body(cfg, sched))


def _up_gpu(cfg, sched):
    return _up_func(cfg, sched, _up_gpu_body(cfg, sched), cfg.hidden)


def _down_gpu(cfg, sched):
    return _down_func(cfg, sched, _down_gpu_body(cfg, sched))


__all__ = ["GEMV_LANES", "group_gemm_down", "group_gemm_up", "pad_rows", "up_row_floats"]
