"""qiao's CPU GEMM kernels against NumPy's sgemm (OpenBLAS), measured interleaved in one run.

Shapes: fp32 1024³ and every matmul of the built-in transformer layer (hidden 256, intermediate
688, 8 query / 2 KV heads of 32) at batch 1 × 128 and batch 16 × 128 tokens. Each kernel is built
the way a model compile builds it: a Relax ``matmul`` legalised and fused, the row dimension
symbolic (one kernel for every token count), scheduled by the CPU schedule phase (default schedule,
no tuning records). The figure per case is the median over interleaved rounds of qiao's GFLOP/s
divided by NumPy's (``ratio`` in the extra info); the issue's floor is 0.6.

    pytest benchmarks/test_gemm.py --benchmark-only -s          # full; prints each ratio
    QIAO_BENCH_SMOKE=1 pytest benchmarks/test_gemm.py -q        # CI: small shapes, one round
    QIAO_BENCH_ENFORCE=1 ...                                    # fail a case below the floor
"""

from __future__ import annotations

import os
import statistics

import numpy as np
import pytest

FLOOR = 0.6
full = pytest.mark.full_only
HIDDEN, INTER, HEADS, KV, D = 256, 688, 8, 2, 32  # the built-in transformer layer

# (id, batch (None = 2-D), M, K, N); the row count M is symbolic in the kernel.
CASES = [
    pytest.param(None, 64, 64, 64, id="smoke-64"),
    pytest.param(None, 1024, 1024, 1024, id="1024^3", marks=full),
]
for tokens, label in ((128, "b1x128"), (16 * 128, "b16x128")):
    CASES += [
        pytest.param(None, tokens, HIDDEN, HIDDEN, id=f"{label}-q_o_proj", marks=full),
        pytest.param(None, tokens, HIDDEN, KV * D, id=f"{label}-k_v_proj", marks=full),
        pytest.param(None, tokens, HIDDEN, INTER, id=f"{label}-gate_up", marks=full),
        pytest.param(None, tokens, INTER, HIDDEN, id=f"{label}-down", marks=full),
    ]
    seqs = tokens // 128
    CASES += [
        pytest.param(seqs * HEADS, 128, D, 128, id=f"{label}-scores", marks=full),
        pytest.param(seqs * HEADS, 128, 128, D, id=f"{label}-probs_v", marks=full),
    ]


def _kernel(batch, k, n):
    """The scheduled, compiled kernel ``x[batch?, m, k] @ w[batch?, k, n]`` (``m`` symbolic)."""
    import tvm
    from tvm import relax

    from qiao.backends.cpu import CPUBackend
    from qiao.compiler.schedules import schedule_passes

    target = CPUBackend().target()
    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64")
    lead = (batch,) if batch else ()
    x = relax.Var("x", relax.TensorType(lead + (m, k), "float32"))
    w = relax.Var("w", relax.TensorType(lead + (k, n), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(out)
    mod = bb.get()
    passes = [relax.transform.LegalizeOps(), *schedule_passes(target, {"use_tuning_db": False})]
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    return lib.jit()["main"]


@pytest.mark.parametrize("batch, m, k, n", CASES)
def test_gemm_vs_numpy(benchmark, smoke, batch, m, k, n):
    import tvm

    from qiao.compiler.bench import interleaved, round_ratios
    from qiao.compiler.schedules.cpu_info import cpu_device

    fn = _kernel(batch, k, n)
    rng = np.random.default_rng(0)
    lead = (batch,) if batch else ()
    a = rng.standard_normal(lead + (m, k)).astype("float32")
    b = rng.standard_normal(lead + (k, n)).astype("float32")
    dev = cpu_device()
    ta, tb = tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev)
    tc = tvm.runtime.tensor(np.zeros(lead + (m, n), "float32"), dev)
    fn(ta, tb, tc)
    np.testing.assert_allclose(tc.numpy(), np.matmul(a, b), rtol=1e-4, atol=1e-3)

    def ours():
        fn(ta, tb, tc)

    def numpy_sgemm():
        np.matmul(a, b)

    flops = 2.0 * (batch or 1) * m * n * k
    times = interleaved({"qiao": ours, "numpy": numpy_sgemm}, 15, 0.05, smoke=smoke)
    ours_s, ref_s = times["qiao"], times["numpy"]
    ratio = statistics.median(round_ratios(times, "numpy"))
    benchmark.group = f"gemm {'x'.join(map(str, [batch or 1, m, k, n]))}"
    benchmark.extra_info.update(
        ratio=ratio,
        qiao_gflops=flops / statistics.median(ours_s) / 1e9,
        numpy_gflops=flops / statistics.median(ref_s) / 1e9,
        floor=FLOOR,
    )
    benchmark.pedantic(ours, rounds=1 if smoke else 5, iterations=1)
    print(
        f"\n  gemm {benchmark.group}: qiao {benchmark.extra_info['qiao_gflops']:.1f} GFLOP/s, "
        f"numpy {benchmark.extra_info['numpy_gflops']:.1f} GFLOP/s, ratio {ratio:.2f}"
    )
    if os.environ.get("QIAO_BENCH_ENFORCE") == "1" and not smoke:
        assert ratio >= FLOOR, f"{benchmark.group}: {ratio:.2f} of numpy's GFLOP/s < {FLOOR}"
