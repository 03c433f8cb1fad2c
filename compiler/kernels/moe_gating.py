"""MoE stage 1, gating: softmax over all experts, top-k and renormalisation, fused, one pass per
token.

The top-k order is ONNX Runtime's (``std::partial_sort`` of ``(probability, expert)`` pairs with
``std::greater``): larger probability first, and among equal probabilities the *higher* expert index
first. Selection is k passes of an argmax that excludes what earlier passes took (``O(k * E)`` per
token, no scratch besides the ``E`` probabilities).
"""

from __future__ import annotations

from qiao.compiler.kernels.moe_common import KERNEL_ATTRS


def moe_gating(
    num_experts: int, top_k: int, normalize: bool, *, gpu: bool = False, threads: int = 128
):
    """Build the gating PrimFunc.

    Parameters
    ----------
    num_experts, top_k : int
        ``E`` and ``k``.
    normalize : bool
        Divide the k probabilities by their sum.
    gpu : bool
        Thread-per-token kernel bound to ``blockIdx.x`` / ``threadIdx.x`` instead of a CPU parallel
        loop.
    threads : int
        GPU threads per block.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``moe_gating(logits, topk_ids, topk_weights)`` with

        - ``logits``: (T, E) float32, router logits (T symbolic);
        - ``topk_ids``: (T, k) int32, output, chosen experts in ORT order;
        - ``topk_weights``: (T, k) float32, output, their (renormalised) probabilities.
    """
    from tvm.script import tirx as T

    E, K = int(num_experts), int(top_k)
    if not 1 <= K <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {K}")
    scope = "local" if gpu else "global"

    @T.macro
    def gate_token(L, IDS, W, t, prob, best, scal):
        # scal: [0] max logit, [1] sum of exp, [2] sum of chosen probabilities,
        #       [3] probability of the previous choice, [4] probability of the current best
        # best: [0] expert of the previous choice, [1] current best expert
        scal[0] = L[t, 0]
        for e in range(1, E):
            scal[0] = T.max(scal[0], L[t, e])
        scal[1] = T.float32(0)
        for e in range(E):
            prob[e] = T.exp(L[t, e] - scal[0])
            scal[1] = scal[1] + prob[e]
        for e in range(E):
            prob[e] = prob[e] / scal[1]
        scal[2] = T.float32(0)
        scal[3] = T.float32(2)  # above every probability: nothing chosen yet
        best[0] = E
        for j in range(K):
            scal[4] = T.float32(-1)  # below every probability
            best[1] = 0
            for e in range(E):
                # eligible: ranks after the previous choice; better: beats the current best
                if prob[e] < scal[3] or (prob[e] == scal[3] and e < best[0]):
                    if prob[e] > scal[4] or (prob[e] == scal[4] and e > best[1]):
                        scal[4] = prob[e]
                        best[1] = e
            IDS[t, j] = best[1]
            W[t, j] = scal[4]
            scal[2] = scal[2] + scal[4]
            scal[3] = scal[4]
            best[0] = best[1]
        if normalize:
            for j in range(K):
                W[t, j] = W[t, j] / scal[2]

    if gpu:

        @T.prim_func(s_tir=True)
        def moe_gating(logits_h: T.handle, ids_h: T.handle, w_h: T.handle):
            T.func_attr(KERNEL_ATTRS)
            n = T.int64()
            L = T.match_buffer(logits_h, (n, E), "float32")
            IDS = T.match_buffer(ids_h, (n, K), "int32")
            W = T.match_buffer(w_h, (n, K), "float32")
            with T.sblock("root"):
                for bx in T.thread_binding((n + threads - 1) // threads, thread="blockIdx.x"):
                    for tx in T.thread_binding(threads, thread="threadIdx.x"):
                        prob = T.alloc_buffer((E,), "float32", scope=scope)
                        best = T.alloc_buffer((2,), "int32", scope=scope)
                        scal = T.alloc_buffer((5,), "float32", scope=scope)
                        if bx * threads + tx < n:
                            gate_token(L, IDS, W, bx * threads + tx, prob, best, scal)

        return moe_gating

    @T.prim_func(s_tir=True)
    def moe_gating(logits_h: T.handle, ids_h: T.handle, w_h: T.handle):
        T.func_attr(KERNEL_ATTRS)
        n = T.int64()
        L = T.match_buffer(logits_h, (n, E), "float32")
        IDS = T.match_buffer(ids_h, (n, K), "int32")
        W = T.match_buffer(w_h, (n, K), "float32")
        with T.sblock("root"):
            for t in T.parallel(n):
                # "global" scope: small constant-size scratch becomes a stack array on the CPU
                prob = T.alloc_buffer((E,), "float32", scope=scope)
                best = T.alloc_buffer((2,), "int32", scope=scope)
                scal = T.alloc_buffer((5,), "float32", scope=scope)
                gate_token(L, IDS, W, t, prob, best, scal)

    return moe_gating


__all__ = ["moe_gating"]
