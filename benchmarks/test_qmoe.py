"""The Qwen3-30B-A3B MoE block (hidden 2048, 128 experts, top-8, intermediate 768) with int4
experts (``com.microsoft::QMoE``, block 32, zero points: what ``qiao compile --quantize int4``
writes) on the CPU, at T = 1, 16, 128, 512 tokens, measured interleaved in one run:

- ``qiao``: qiao's packed integer grouped GEMMs (``qiao.compiler.kernels.quant_moe``) on the model
  at ``accuracy_level`` 4 (int8 activations per block, integer dot products: what ONNX Runtime
  does at that level);
- ``qiao-exact``: the same at ``accuracy_level`` 0 (codes converted to float32 in registers, the
  exact dequantize-then-float32 result);
- ``qiao-fp32``: qiao on the float32 block (4 bytes per weight);
- ``onnxruntime-qmoe-acc0`` / ``onnxruntime-qmoe-acc4``: ONNX Runtime's ``QMoE`` CPU kernel at
  ``accuracy_level`` 0 and 4 (its two compute paths) on the same quantized model.

The roofline is the routed experts' int4 bytes (codes, scales, zero points) read once at the
machine's measured read bandwidth. Floors (issue 13): at T = 1 qiao >= 4x qiao-fp32 and >= ONNX
Runtime at level 4 (its fastest path); at T = 128 >= ONNX Runtime at level 4; asserted in full
mode with ``QIAO_BENCH_ENFORCE=1`` only (a shared machine's medians and ratios are the result).

    python -m pytest benchmarks/test_qmoe.py --benchmark-only -s      # full (about 3 minutes)
    QIAO_BENCH_SMOKE=1 python -m pytest -q benchmarks/test_qmoe.py    # tiny dims, one round (CI)

Every engine is checked first against an exact dequantize-then-float32 NumPy reference
(``moe_op.reference``): qiao-exact and ONNX Runtime at level 0 within 1e-3 of the output's
magnitude, both engines at level 4 (int8 activations) within 3 %; qiao-fp32 against the float32
reference within 1e-3.
"""

from __future__ import annotations

import os
import statistics
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_baselines import (  # noqa: E402
    QWEN3_30B_A3B_BLOCK,
    SMOKE_BLOCK,
    QiaoMoE,
    make_weights,
    measure_rates,
)

BASELINE = "onnxruntime-qmoe-acc4"
# engine -> largest difference from the exact result, relative to its magnitude
TOLERANCE = {
    "qiao": 3e-2,
    "qiao-exact": 1e-3,
    "qiao-fp32": 1e-3,  # against the float32 weights' reference
    "onnxruntime-qmoe-acc0": 1e-3,
    "onnxruntime-qmoe-acc4": 3e-2,
}
BLOCK = 32


def _dequantized(model, name: str, k: int) -> np.ndarray:
    """The exact float32 experts ``[E, N, K]`` of the QMoE projection ``name`` in ``model``."""
    from onnx import numpy_helper

    from qiao.compiler.frontend.convert_quant import quant_experts

    inits = {t.name: t for t in model.graph.initializer}

    def get(suffix):
        t = inits.get(f"moe_{name}_{suffix}")
        return None if t is None else numpy_helper.to_array(t)

    return quant_experts(get("q4"), get("scales"), get("zp"), 4, BLOCK, k, name).dequantized()


@pytest.fixture(scope="module")
def block(smoke, tmp_path_factory):
    from qiao.compiler import compile, moe_op
    from qiao.compiler.bench.engines import HOST, OnnxRuntimeEngine, QiaoEngine
    from qiao.compiler.quantize import quantize_model, with_accuracy_level
    from qiao.compiler.schedules.cpu_info import usable_cores

    dims = SMOKE_BLOCK if smoke else QWEN3_30B_A3B_BLOCK
    w = make_weights(**dims)
    spec = moe_op.MoESpec(
        k=w.top_k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1
    )
    fp32 = moe_op.make_model(spec, {"fc1": w.fc1, "fc2": w.fc2})
    fp32.graph.node[0].name = "moe"
    int4, _ = quantize_model(fp32, {"bits": 4, "block_size": BLOCK, "symmetric": False})
    del fp32
    exact = {
        "fc1": _dequantized(int4, "fc1", w.hidden),
        "fc2": _dequantized(int4, "fc2", w.inter),
    }
    acc0, acc4 = with_accuracy_level(int4, 0), with_accuracy_level(int4, 4)
    threads = usable_cores()
    root = tmp_path_factory.mktemp("qmoe")
    engines = {
        "qiao": QiaoEngine(compile(acc4, "cpu", root / "int4-acc4")),
        "qiao-exact": QiaoEngine(compile(acc0, "cpu", root / "int4-acc0")),
        "qiao-fp32": QiaoMoE(w),
        "onnxruntime-qmoe-acc0": OnnxRuntimeEngine(acc0.SerializeToString(), HOST, threads=threads),
        "onnxruntime-qmoe-acc4": OnnxRuntimeEngine(acc4.SerializeToString(), HOST, threads=threads),
    }
    # bytes of one expert as the int4 kernels read them: codes, float32 scales, 4-bit zero points
    weights = 3 * w.hidden * w.inter
    expert_bytes = weights // 2 + weights // BLOCK * 4 + weights // BLOCK // 2
    rates = measure_rates(w, repeat=1 if smoke else 5)
    return w, spec, exact, engines, expert_bytes, rates


@pytest.mark.parametrize(
    "tokens",
    [
        1,
        5,
        pytest.param(16, marks=pytest.mark.full_only),
        pytest.param(128, marks=pytest.mark.full_only),
        pytest.param(512, marks=pytest.mark.full_only),
    ],
)
def test_qmoe_int4(benchmark, smoke, block, tokens):
    from qiao.compiler import moe_op
    from qiao.compiler.bench import interleaved, round_ratios

    w, spec, exact, engines, expert_bytes, rates = block
    x, logits = w.inputs(tokens)
    feeds = {"x": x, "logits": logits}
    reference = moe_op.reference(spec, x, logits, exact)
    float_reference = moe_op.reference(spec, x, logits, {"fc1": w.fc1, "fc2": w.fc2})
    scale = float(np.abs(reference).max())
    for name, tol in TOLERANCE.items():
        want = float_reference if name == "qiao-fp32" else reference
        err = float(np.abs(engines[name].outputs(feeds)["y"] - want).max())
        assert err <= tol * scale, f"{name} differs from the exact result by {err} ({scale=})"

    calls = {name: engine.prepare(feeds) for name, engine in engines.items()}
    rounds = 3 if smoke else 9
    times = interleaved(calls, rounds, 0.05 if smoke else 0.2, smoke=smoke)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        name: statistics.median(round_ratios(times, name, "qiao"))
        for name in engines
        if name != "qiao"
    }
    roofline = w.hit_experts(logits) * expert_bytes / rates.read_bytes
    group = (
        f"QMoE int4 bs{BLOCK}, E={w.num_experts} H={w.hidden} I={w.inter} k={w.top_k}, T={tokens}"
    )
    benchmark.group = group
    benchmark.extra_info.update(
        {f"{name}_ms": round(t * 1e3, 4) for name, t in medians.items()},
        **{f"speedup_vs_{name}": round(r, 3) for name, r in ratios.items()},
        roofline_ms=round(roofline * 1e3, 4),
        qiao_over_roofline=round(medians["qiao"] / roofline, 3),
        read_gbs=round(rates.read_bytes / 1e9, 2),
        note="machine shared with other jobs: medians of interleaved rounds",
    )
    benchmark.pedantic(calls["qiao"], rounds=1, iterations=1)
    print(f"\n  {group} (medians; qiao speed-up = median of per-round ratios):")
    for name, t in medians.items():
        extra = "" if name == "qiao" else f"   qiao x{ratios[name]:.2f}"
        print(f"    {name:<24} {t * 1e3:9.3f} ms{extra}")
    print(
        f"    roofline {roofline * 1e3:.3f} ms ({rates.read_bytes / 1e9:.1f} GB/s): "
        f"qiao / roofline {medians['qiao'] / roofline:.2f}"
    )
    if not smoke and os.environ.get("QIAO_BENCH_ENFORCE") == "1":
        if tokens in (1, 128):
            assert ratios[BASELINE] >= 1.0, f"{group}: qiao is x{ratios[BASELINE]:.2f} {BASELINE}"
        if tokens == 1:
            assert ratios["qiao-fp32"] >= 4.0, (
                f"{group}: qiao is only x{ratios['qiao-fp32']:.2f} qiao fp32 (floor 4)"
            )
