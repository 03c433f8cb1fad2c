"""Single convolutions on the CPU: qiao against ONNX Runtime on the same one-node ONNX file.

Each case is one Conv node (bias, then ReLU), batch 1: the grouped convolutions of ResNeXt,
RegNet, AlexNet, ShuffleNet and wav2vec2's positional embedding, and dense ones whose output
channels do not fill two-vector register tiles (48, 80, 40, 17, 8, 3). The grouped ones run as
one GEMM batched over the groups (``cpu_gemm.split_group_axis``), or, for a few channels a group
under a small window, on the window rule; the dense ones read their input in place with tiles of
one, two or three vectors (``cpu_gemm.direct_vectors``). Each case checks qiao's output against
ONNX Runtime's, then times both interleaved (``qiao.compiler.bench.interleaved``); the figure is
the median of the per-round ORT/qiao latency ratios (above 1 qiao is faster). No floor in the
issue; a case below 1/2 fails under ``QIAO_BENCH_ENFORCE=1``.

    pytest benchmarks/test_conv.py --benchmark-only -s     # full; prints every ratio
    QIAO_BENCH_SMOKE=1 pytest benchmarks/test_conv.py -q   # CI: one small case, one round
"""

from __future__ import annotations

import pytest

full = pytest.mark.full_only
FLOOR = 1 / 2

# id: (in channels, out channels, groups, kernel (a 1-D one: "1d<k>"), map, stride)
SHAPES = {
    "resnext-32x8-28": (256, 256, 32, 3, 28, 1),
    "resnext-32x16-14": (512, 512, 32, 3, 14, 1),
    "resnext-32x32-7": (1024, 1024, 32, 3, 7, 1),
    "resnext-32x8-56-s2": (256, 256, 32, 3, 56, 2),
    "resnext-32x4-56": (128, 128, 32, 3, 56, 1),
    "regnet-54x8-14": (432, 432, 54, 3, 14, 1),
    "regnet-189x8-7": (1512, 1512, 189, 3, 7, 1),
    "groups-3x80-28": (240, 240, 3, 3, 28, 1),
    "groups-16x48-14": (768, 768, 16, 3, 14, 1),
    "alexnet-2x5x5-27": (96, 256, 2, 5, 27, 1),
    "shufflenet-3x1x1-28": (240, 60, 3, 1, 28, 1),
    "shufflenet-8x1x1-28": (384, 96, 8, 1, 28, 1),
    "depthwise-x2-56": (32, 64, 32, 3, 56, 1),
    "wav2vec2-pos-conv": (768, 768, 16, "1d128", 500, 1),
    "dense-48-14": (48, 48, 1, 3, 14, 1),
    "dense-80-28": (80, 80, 1, 3, 28, 1),
    "dense-160to40-28": (160, 40, 1, 3, 28, 1),
    "dense-160to40-56-s2": (160, 40, 1, 3, 56, 2),
    "dense-64to17-28": (64, 17, 1, 3, 28, 1),
    "dense-64to8-56": (64, 8, 1, 3, 56, 1),
    "dense-64to3-56": (64, 3, 1, 3, 56, 1),
}
# the smoke case (CI): one small grouped convolution
SMOKE = "regnet-54x8-14"
CASES = [pytest.param(k, id=k, marks=() if k == SMOKE else full) for k in SHAPES]


def _model(path, cin, cout, groups, kernel, size, stride):
    """One Conv (+ bias) and ReLU as an opset-13 ONNX file at ``path``; seeded weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    one_d = isinstance(kernel, str)
    k = int(kernel[2:]) if one_d else kernel
    window = (k,) if one_d else (k, k)
    fan_in = cin // groups * int(np.prod(window))
    weights = {
        "w": (rng.standard_normal((cout, cin // groups, *window)) / np.sqrt(fan_in)).astype(
            np.float32
        ),
        "b": rng.standard_normal(cout).astype(np.float32),
    }
    dims = 1 if one_d else 2
    out = (size + 2 * (k // 2) - k) // stride + 1
    conv = helper.make_node(
        "Conv",
        ["x", "w", "b"],
        ["c"],
        group=groups,
        pads=[k // 2] * 2 * dims,
        strides=[stride] * dims,
    )
    graph = helper.make_graph(
        [conv, helper.make_node("Relu", ["c"], ["y"])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *[size] * dims])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, *[out] * dims])],
        [numpy_helper.from_array(v, n) for n, v in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return 2 * cout * out**dims * fan_in


@pytest.mark.parametrize("case", CASES)
def test_conv_vs_onnxruntime(versus_onnxruntime, tmp_path, case):
    from qiao.compiler import compile
    from qiao.compiler.bench import OnnxRuntimeEngine, QiaoEngine
    from qiao.compiler.validate import compare, tolerances

    path = tmp_path / f"{case}.onnx"
    flops = _model(path, *SHAPES[case])
    artifact = compile(path, "cpu", tmp_path / "art")
    inputs = artifact.random_inputs(0, {})
    qiao, ort = QiaoEngine(artifact), OnnxRuntimeEngine(str(path), "cpu")
    rtol, atol = tolerances(artifact, None, None)
    got, expected = qiao.outputs(inputs)["y"], ort.outputs(inputs)["y"]
    check = compare("y", "onnxruntime", got, expected, rtol, atol)
    assert check.ok, f"{case}: differs from onnxruntime: {check}"

    versus_onnxruntime(
        qiao.prepare(inputs), ort.prepare(inputs), group=f"conv {case}", floor=FLOOR, flops=flops
    )
