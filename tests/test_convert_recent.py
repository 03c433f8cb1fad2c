"""qiao's converters for recent ONNX operators and quantised integer kernels
(``compiler/frontend/convert_recent.py``), checked through ``qiao.compiler.compile`` against ONNX
Runtime, or against onnx's NumPy reference implementation where ORT has no kernel for the opset.
Shapes and attributes differ from the ONNX node suite's cases.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper

from tests.test_frontend import check, make_model, randn

RNG = np.random.default_rng(1)


def test_swiglu_alpha(tmp_path):
    node = helper.make_node("SwiGLU", ["a", "b"], ["y"], alpha=1.702)
    model = make_model(
        [node],
        [("a", TP.FLOAT, [3, 5]), ("b", TP.FLOAT, [3, 5])],
        [("y", TP.FLOAT, [3, 5])],
        opset=28,
    )
    check(model, [{"a": randn(3, 5), "b": randn(3, 5)}], tmp_path, reference="onnx")


@pytest.mark.parametrize(
    "src, to",
    [(np.float32, TP.INT32), (np.int64, TP.DOUBLE), (np.float16, TP.UINT16), (np.bool_, TP.UINT8)],
)
def test_bitcast(tmp_path, src, to):
    x = (RNG.standard_normal((2, 3)) * 100).astype(src)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(src))
    node = helper.make_node("BitCast", ["x"], ["y"], to=to)
    model = make_model([node], [("x", elem, [2, 3])], [("y", to, [2, 3])], opset=26)
    check(model, [{"x": x}], tmp_path, rtol=0, atol=0, reference="onnx")


@pytest.mark.parametrize("mode", ["linear", "circular"])
def test_tensor_scatter(tmp_path, mode):
    node = helper.make_node("TensorScatter", ["cache", "update", "idx"], ["y"], mode=mode, axis=2)
    model = make_model(
        [node],
        [
            ("cache", TP.FLOAT, [3, 2, 6, 4]),
            ("update", TP.FLOAT, [3, 2, 3, 4]),
            ("idx", TP.INT64, [3]),
        ],
        [("y", TP.FLOAT, [3, 2, 6, 4])],
        opset=24,
    )
    idx = np.array([0, 2, 3] if mode == "linear" else [4, 5, 1], np.int64)
    feeds = {"cache": randn(3, 2, 6, 4), "update": randn(3, 2, 3, 4), "idx": idx}
    check(model, [feeds], tmp_path, rtol=0, atol=0)


@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv_with_state(tmp_path, with_state):
    inputs = ["x", "w", "b"] + (["state"] if with_state else [])
    node = helper.make_node("CausalConvWithState", inputs, ["y", "present"], activation="silu")
    infos = [("x", TP.FLOAT, [2, 3, 7]), ("w", TP.FLOAT, [3, 1, 3]), ("b", TP.FLOAT, [3])]
    infos += [("state", TP.FLOAT, [2, 3, 2])] if with_state else []
    model = make_model([node], infos, [("y", TP.FLOAT, 3), ("present", TP.FLOAT, 3)], opset=27)
    feeds = {"x": randn(2, 3, 7), "w": randn(3, 1, 3), "b": randn(3)}
    if with_state:
        feeds["state"] = randn(2, 3, 2)
    check(model, [feeds], tmp_path, reference="onnx")


def test_causal_conv_with_state_float16_silu(tmp_path):
    """float16: the convolution accumulates in float32 and rounds once, as NumPy does."""
    node = helper.make_node("CausalConvWithState", ["x", "w"], ["y", "present"], activation="silu")
    infos = [("x", TP.FLOAT16, [2, 8, 33]), ("w", TP.FLOAT16, [8, 1, 4])]
    model = make_model([node], infos, [("y", TP.FLOAT16, 3), ("present", TP.FLOAT16, 3)], opset=27)
    feeds = {"x": randn(2, 8, 33, dtype=np.float16), "w": randn(8, 1, 4, dtype=np.float16)}
    check(model, [feeds], tmp_path, rtol=1e-3, atol=1e-3, reference="onnx")


@pytest.mark.parametrize(
    "rule, extra",
    [("linear", []), ("gated", ["decay"]), ("delta", ["beta"]), ("gated_delta", ["decay", "beta"])],
)
def test_linear_attention(tmp_path, rule, extra):
    b, t, hq, hkv, dk, dv = 2, 3, 4, 2, 4, 3
    names = ["q", "k", "v", "state"] + extra
    positional = names[:4] + [n if n in extra else "" for n in ("decay", "beta")]
    node = helper.make_node(
        "LinearAttention",
        positional,
        ["y", "present"],
        update_rule=rule,
        q_num_heads=hq,
        kv_num_heads=hkv,
    )
    shapes = {
        "q": [b, t, hq * dk],
        "k": [b, t, hkv * dk],
        "v": [b, t, hkv * dv],
        "state": [b, hkv, dk, dv],
        "decay": [b, t, hkv],
        "beta": [b, t, hkv],
    }
    model = make_model(
        [node],
        [(n, TP.FLOAT, shapes[n]) for n in names],
        [("y", TP.FLOAT, 3), ("present", TP.FLOAT, 4)],
        opset=27,
    )
    feeds = {n: randn(*shapes[n]) for n in names}
    if "decay" in feeds:
        feeds["decay"] = -np.abs(feeds["decay"])  # log-decay <= 0, as in gated models
    if "beta" in feeds:
        feeds["beta"] = 1 / (1 + np.exp(-feeds["beta"]))
    check(model, [feeds], tmp_path, rtol=1e-4, atol=1e-5, reference="onnx")


def test_flex_attention_gqa_with_score_mod(tmp_path):
    """Grouped-query FlexAttention whose score_mod is a subgraph (soft cap) converted inline."""
    cap = helper.make_tensor("cap", TP.FLOAT, [], [5.0])
    body = helper.make_graph(
        [
            helper.make_node("Div", ["s", "cap"], ["d"]),
            helper.make_node("Tanh", ["d"], ["t"]),
            helper.make_node("Mul", ["t", "cap"], ["out"]),
        ],
        "soft_cap",
        [helper.make_tensor_value_info("s", TP.FLOAT, None)],
        [helper.make_tensor_value_info("out", TP.FLOAT, None)],
        initializer=[cap],
    )
    node = helper.make_node(
        "FlexAttention", ["q", "k", "v"], ["y"], domain="ai.onnx.preview", score_mod=body, scale=0.3
    )
    shapes = {"q": [1, 4, 5, 8], "k": [1, 2, 6, 8], "v": [1, 2, 6, 3]}
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TP.FLOAT, s) for n, s in shapes.items()],
        [helper.make_tensor_value_info("y", TP.FLOAT, [1, 4, 5, 3])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 26), helper.make_opsetid("ai.onnx.preview", 1)],
    )
    feeds = {n: randn(*s) for n, s in shapes.items()}
    check(model, [feeds], tmp_path, reference="onnx")


@pytest.mark.parametrize("dtype", [TP.UINT8, TP.INT8])
def test_qlinear_matmul(tmp_path, dtype):
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype).type
    info = np.iinfo(np_dtype)
    names = ["a", "a_s", "a_zp", "b", "b_s", "b_zp", "y_s", "y_zp"]
    node = helper.make_node("QLinearMatMul", names, ["y"])
    infos = [
        ("a", dtype, [3, 6]),
        ("a_s", TP.FLOAT, []),
        ("a_zp", dtype, []),
        ("b", dtype, [6, 4]),
        ("b_s", TP.FLOAT, []),
        ("b_zp", dtype, []),
        ("y_s", TP.FLOAT, []),
        ("y_zp", dtype, []),
    ]
    model = make_model([node], infos, [("y", dtype, [3, 4])], opset=21)
    feeds = {
        "a": RNG.integers(info.min, info.max, (3, 6)).astype(np_dtype),
        "b": RNG.integers(info.min, info.max, (6, 4)).astype(np_dtype),
        "a_s": np.array(0.02, np.float32),
        "b_s": np.array(0.03, np.float32),
        "y_s": np.array(0.5, np.float32),
        "a_zp": np.array(3, np_dtype),
        "b_zp": np.array(-2 if info.min < 0 else 7, np_dtype),
        "y_zp": np.array(5, np_dtype),
    }
    check(model, [feeds], tmp_path, rtol=0, atol=1)  # ORT may round a tie the other way


def test_qlinear_conv_per_channel(tmp_path):
    names = ["x", "x_s", "x_zp", "w", "w_s", "w_zp", "y_s", "y_zp", "bias"]
    node = helper.make_node("QLinearConv", names, ["y"], pads=[1, 1, 1, 1], strides=[2, 1])
    infos = [
        ("x", TP.UINT8, [1, 2, 5, 5]),
        ("x_s", TP.FLOAT, []),
        ("x_zp", TP.UINT8, []),
        ("w", TP.INT8, [3, 2, 3, 3]),
        ("w_s", TP.FLOAT, [3]),
        ("w_zp", TP.INT8, [3]),
        ("y_s", TP.FLOAT, []),
        ("y_zp", TP.UINT8, []),
        ("bias", TP.INT32, [3]),
    ]
    model = make_model([node], infos, [("y", TP.UINT8, 4)], opset=10)
    feeds = {
        "x": RNG.integers(0, 255, (1, 2, 5, 5)).astype(np.uint8),
        "w": RNG.integers(-100, 100, (3, 2, 3, 3)).astype(np.int8),
        "x_s": np.array(0.05, np.float32),
        "x_zp": np.array(10, np.uint8),
        "w_s": np.array([0.01, 0.02, 0.015], np.float32),
        "w_zp": np.zeros(3, np.int8),
        "y_s": np.array(0.8, np.float32),
        "y_zp": np.array(100, np.uint8),
        "bias": RNG.integers(-500, 500, 3).astype(np.int32),
    }
    # onnx's reference: ORT's u8s8 kernel on AVX2 saturates int16 pair sums (off by several units)
    check(model, [feeds], tmp_path, rtol=0, atol=0, reference="onnx")


def test_conv_integer_per_channel_zero_point(tmp_path):
    node = helper.make_node("ConvInteger", ["x", "w", "x_zp", "w_zp"], ["y"], group=2)
    infos = [
        ("x", TP.UINT8, [1, 4, 4, 4]),
        ("w", TP.UINT8, [2, 2, 2, 2]),
        ("x_zp", TP.UINT8, []),
        ("w_zp", TP.UINT8, [2]),
    ]
    model = make_model([node], infos, [("y", TP.INT32, 4)], opset=10)
    feeds = {
        "x": RNG.integers(0, 255, (1, 4, 4, 4)).astype(np.uint8),
        "w": RNG.integers(0, 255, (2, 2, 2, 2)).astype(np.uint8),
        "x_zp": np.array(128, np.uint8),
        "w_zp": np.array([3, 200], np.uint8),
    }
    check(model, [feeds], tmp_path, rtol=0, atol=0, reference="onnx")


def test_attention_float16_accumulates_like_numpy(tmp_path):
    """qiao's Attention converter: float16 matmuls and the softmax sum accumulate in float32 and
    round once, as the NumPy reference does (TVM's float16 kernels accumulate in float16)."""
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1)
    shapes = {"q": [2, 4, 16, 64], "k": [2, 4, 24, 64], "v": [2, 4, 24, 64]}
    model = make_model(
        [node],
        [(n, TP.FLOAT16, s) for n, s in shapes.items()],
        [("y", TP.FLOAT16, 4)],
        opset=23,
    )
    feeds = {n: randn(*s, dtype=np.float16) for n, s in shapes.items()}
    check(model, [feeds], tmp_path, rtol=1e-3, atol=1e-4, reference="onnx")
