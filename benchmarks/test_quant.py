"""One int4 linear layer (K = N = 4096, block 32, zero points; issue 13's first speed case) on the
CPU: qiao vs ONNX Runtime's ``MatMulNBits`` at ``accuracy_level`` 0 (float32 compute) and 4 (int8
activations, its fastest CPU path) vs ONNX Runtime's float32 ``MatMul``, at 1 and 128 rows.

    pytest benchmarks/test_quant.py --benchmark-only              # full (4096 x 4096)
    QIAO_BENCH_SMOKE=1 pytest -q benchmarks/test_quant.py         # 256 x 256, one round (CI)

Where qiao stands: it imports ``MatMulNBits`` by dequantizing the weights (``--quantize`` and
quantized models alike), so its artifact runs a float32 GEMM/GEMV reading 4 bytes per weight where
ONNX Runtime reads half a byte; the issue's floors (>= ONNX Runtime at 1 row, >= 0.8x at 128)
need the int4 kernels of issue 13 item 4, not built yet, and are not checked here. Every engine's
output is checked first: qiao and ONNX Runtime at level 0 against each other (1e-4 relative to the
output's magnitude), level 4 within 2 % (int8 activations).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from qiao.compiler.quantize import quantize_model

ENGINES = ("qiao", "onnxruntime-int4-acc0", "onnxruntime-int4-acc4", "onnxruntime-fp32")


def _float_layer(k: int, n: int) -> onnx.ModelProto:
    w = (np.random.default_rng(13).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("a", TP.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["m", n])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _with_accuracy_level(model: onnx.ModelProto, level: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = level
    return out


@pytest.fixture(scope="module")
def layer(smoke, tmp_path_factory):
    from qiao.compiler import compile
    from qiao.compiler.bench.engines import HOST, OnnxRuntimeEngine, QiaoEngine

    size = 256 if smoke else 4096
    fp32 = _float_layer(size, size)
    int4, _ = quantize_model(fp32, {"bits": 4, "block_size": 32, "symmetric": False})
    artifact = compile(int4, "cpu", tmp_path_factory.mktemp("quant") / "linear-int4")
    engines = {
        "qiao": QiaoEngine(artifact),
        "onnxruntime-int4-acc0": OnnxRuntimeEngine(int4.SerializeToString(), HOST),
        "onnxruntime-int4-acc4": OnnxRuntimeEngine(
            _with_accuracy_level(int4, 4).SerializeToString(), HOST
        ),
        "onnxruntime-fp32": OnnxRuntimeEngine(fp32.SerializeToString(), HOST),
    }
    return size, engines


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rows", [1, pytest.param(128, marks=pytest.mark.full_only)])
def test_linear_int4(benchmark, bench_run, layer, rows, engine):
    size, engines = layer
    a = np.random.default_rng(rows).standard_normal((rows, size)).astype(np.float32)
    feeds = {"a": a}
    reference = engines["onnxruntime-int4-acc0"].outputs(feeds)["y"]
    got = engines[engine].outputs(feeds)["y"]
    scale = float(np.abs(reference).max())
    if engine == "onnxruntime-int4-acc4":
        assert np.abs(got - reference).max() <= 2e-2 * scale
    elif engine != "onnxruntime-fp32":  # the float model differs by the quantization error
        assert np.abs(got - reference).max() <= 1e-4 * scale, f"{engine} differs from ORT"
    run = engines[engine].prepare(feeds)
    group = f"linear {size}x{size} int4 bs32, {rows} rows"
    bench_run(benchmark, run, group=group, engine=engine, rows=rows, size=size)
