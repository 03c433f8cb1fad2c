"""MoE stage 2, alignment (vLLM's ``moe_align_block_size`` idea): count the routed (token, expert)
pairs per expert, prefix-sum the counts padded to ``block_m``, and write the pairs sorted by expert
into those slots. Within an expert, pairs keep token order, so every later stage is deterministic.

Besides the slots it emits what the grouped GEMMs schedule over: the list of experts that received
tokens (CPU tasks run over these only, so work follows k, not E) and each block's expert (GPU thread
blocks run over these)."""

from __future__ import annotations

from qiao.compiler.kernels.moe_common import KERNEL_ATTRS, num_blocks


def moe_align(num_experts: int, top_k: int, block_m: int, *, gpu: bool = False, threads: int = 256):
    """Build the alignment PrimFunc.

    Parameters
    ----------
    num_experts, top_k : int
        ``E`` and ``k``.
    block_m : int
        Each expert's slot run is padded to a multiple of this.
    gpu : bool
        One thread block: thread e counts and places expert e's pairs (no atomics); otherwise one
        CPU
        thread (the work is ``O(T * k + E)``).

    Returns
    -------
    tvm.tirx.PrimFunc
        ``moe_align(topk_ids, counts, offsets, active, num_active, sorted_pairs, block_expert,
        num_used_blocks, pair_slot)`` with, for ``S`` slots and ``B`` blocks
        (``moe_common.num_slots``):

        - ``topk_ids``: (T, k) int32, from gating;
        - ``counts``: (E,) int32, pairs per expert;
        - ``offsets``: (E + 1,) int32, first slot of each expert (padded prefix sum);
        - ``active``: (E,) int32, experts with at least one pair, ascending, first ``num_active``;
        - ``num_active``: (1,) int32;
        - ``sorted_pairs``: (S,) int32, pair ``t * k + j`` per slot, -1 in padding;
        - ``block_expert``: (B,) int32, expert of each used block (first ``num_used_blocks``);
        - ``num_used_blocks``: (1,) int32;
        - ``pair_slot``: (T, k) int32, the slot of each pair (inverse of ``sorted_pairs``).
    """
    from tvm.script import tirx as T

    E, K, BM = int(num_experts), int(top_k), int(block_m)
    if BM <= 0:
        raise ValueError(f"block_m must be positive, got {BM}")

    if gpu:
        return _align_gpu(E, K, BM, threads)

    @T.prim_func(s_tir=True)
    def moe_align(
        ids_h: T.handle,
        cnt_h: T.handle,
        off_h: T.handle,
        act_h: T.handle,
        nact_h: T.handle,
        pairs_h: T.handle,
        bexp_h: T.handle,
        nblk_h: T.handle,
        pslot_h: T.handle,
    ):
        T.func_attr(KERNEL_ATTRS)
        n = T.int64()
        IDS = T.match_buffer(ids_h, (n, K), "int32")
        CNT = T.match_buffer(cnt_h, (E,), "int32")
        OFF = T.match_buffer(off_h, (E + 1,), "int32")
        ACTIVE = T.match_buffer(act_h, (E,), "int32")
        NACT = T.match_buffer(nact_h, (1,), "int32")
        PAIRS = T.match_buffer(pairs_h, (num_blocks(n, K, E, BM) * BM,), "int32")
        BEXP = T.match_buffer(bexp_h, (num_blocks(n, K, E, BM),), "int32")
        NBLK = T.match_buffer(nblk_h, (1,), "int32")
        PSLOT = T.match_buffer(pslot_h, (n, K), "int32")
        with T.sblock("root"):
            cursor = T.alloc_buffer((E,), "int32")
            run = T.alloc_buffer((3,), "int32")  # slots so far, active so far, blocks so far
            for e in range(E):
                CNT[e] = 0
            for p in range(n * K):
                CNT[IDS[p // K, p % K]] = CNT[IDS[p // K, p % K]] + 1
            run[0] = 0
            run[1] = 0
            run[2] = 0
            for e in range(E):
                OFF[e] = run[0]
                cursor[e] = run[0]
                for b in range((CNT[e] + BM - 1) // BM):
                    BEXP[run[2] + b] = e
                run[2] = run[2] + (CNT[e] + BM - 1) // BM
                run[0] = run[0] + (CNT[e] + BM - 1) // BM * BM
                if CNT[e] > 0:
                    ACTIVE[run[1]] = e
                    run[1] = run[1] + 1
            OFF[E] = run[0]
            NACT[0] = run[1]
            NBLK[0] = run[2]
            for e in range(run[1], E):
                ACTIVE[e] = 0
            for s in range(num_blocks(n, K, E, BM) * BM):
                PAIRS[s] = -1
            for p in range(n * K):
                PAIRS[cursor[IDS[p // K, p % K]]] = T.Cast("int32", p)
                PSLOT[p // K, p % K] = cursor[IDS[p // K, p % K]]
                cursor[IDS[p // K, p % K]] = cursor[IDS[p // K, p % K]] + 1

    return moe_align


def _align_gpu(E: int, K: int, BM: int, threads: int):
    from tvm.script import tirx as T

    NT = min(threads, max(32, 1 << (E - 1).bit_length()))
    PER = (E + NT - 1) // NT  # experts per thread

    @T.prim_func(s_tir=True)
    def moe_align(
        ids_h: T.handle,
        cnt_h: T.handle,
        off_h: T.handle,
        act_h: T.handle,
        nact_h: T.handle,
        pairs_h: T.handle,
        bexp_h: T.handle,
        nblk_h: T.handle,
        pslot_h: T.handle,
    ):
        T.func_attr(KERNEL_ATTRS)
        n = T.int64()
        IDS = T.match_buffer(ids_h, (n, K), "int32")
        CNT = T.match_buffer(cnt_h, (E,), "int32")
        OFF = T.match_buffer(off_h, (E + 1,), "int32")
        ACTIVE = T.match_buffer(act_h, (E,), "int32")
        NACT = T.match_buffer(nact_h, (1,), "int32")
        PAIRS = T.match_buffer(pairs_h, (num_blocks(n, K, E, BM) * BM,), "int32")
        BEXP = T.match_buffer(bexp_h, (num_blocks(n, K, E, BM),), "int32")
        NBLK = T.match_buffer(nblk_h, (1,), "int32")
        PSLOT = T.match_buffer(pslot_h, (n, K), "int32")
        with T.sblock("root"):
            for _bx in T.thread_binding(1, thread="blockIdx.x"):
                for tx in T.thread_binding(NT, thread="threadIdx.x"):
                    run = T.alloc_buffer((3,), "int32", scope="local")
                    # 1. each thread counts its experts
                    for q in range(PER):
                        if q * NT + tx < E:
                            run[0] = 0
                            for p in range(n * K):
                                if IDS[p // K, p % K] == q * NT + tx:
                                    run[0] = run[0] + 1
                            CNT[q * NT + tx] = run[0]
                    T.tvm_storage_sync("shared")
                    # 2. thread 0: padded prefix sum, active list, block -> expert map
                    if tx == 0:
                        run[0] = 0
                        run[1] = 0
                        run[2] = 0
                        for e in range(E):
                            OFF[e] = run[0]
                            for b in range((CNT[e] + BM - 1) // BM):
                                BEXP[run[2] + b] = e
                            run[2] = run[2] + (CNT[e] + BM - 1) // BM
                            run[0] = run[0] + (CNT[e] + BM - 1) // BM * BM
                            if CNT[e] > 0:
                                ACTIVE[run[1]] = e
                                run[1] = run[1] + 1
                        OFF[E] = run[0]
                        NACT[0] = run[1]
                        NBLK[0] = run[2]
                        for e in range(run[1], E):
                            ACTIVE[e] = 0
                    T.tvm_storage_sync("shared")
                    # 3. each thread places its experts' pairs in token order, then pads
                    for q in range(PER):
                        if q * NT + tx < E:
                            run[0] = OFF[q * NT + tx]
                            for p in range(n * K):
                                if IDS[p // K, p % K] == q * NT + tx:
                                    PAIRS[run[0]] = T.Cast("int32", p)
                                    PSLOT[p // K, p % K] = run[0]
                                    run[0] = run[0] + 1
                            for s in range(OFF[q * NT + tx + 1] - run[0]):
                                PAIRS[run[0] + s] = -1
                    for s in range((num_blocks(n, K, E, BM) * BM - OFF[E] + NT - 1) // NT):
                        if OFF[E] + s * NT + tx < num_blocks(n, K, E, BM) * BM:
                            PAIRS[OFF[E] + s * NT + tx] = -1

    return moe_align


__all__ = ["moe_align"]
