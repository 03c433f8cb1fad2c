"""Scan and Loop converters (compiler/frontend/convert_control.py) against ONNX Runtime."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as TP
from onnx import helper

from tests.test_frontend import check, make_model, randn


def _sum_body():
    """state, x -> state + x * w (w from the enclosing graph), and the new state as scan output."""
    return helper.make_graph(
        [
            helper.make_node("Mul", ["x_in", "w"], ["xw"]),
            helper.make_node("Add", ["s_in", "xw"], ["s_out"]),
            helper.make_node("Identity", ["s_out"], ["scan_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("s_in", TP.FLOAT, [2]),
            helper.make_tensor_value_info("x_in", TP.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("s_out", TP.FLOAT, [2]),
            helper.make_tensor_value_info("scan_out", TP.FLOAT, [2]),
        ],
    )


def test_scan_axes_and_directions_with_outer_value(tmp_path):
    node = helper.make_node(
        "Scan",
        ["s0", "x"],
        ["s", "ys"],
        body=_sum_body(),
        num_scan_inputs=1,
        scan_input_axes=[1],
        scan_input_directions=[1],
        scan_output_axes=[1],
        scan_output_directions=[1],
    )
    model = make_model(
        [node],
        [("s0", TP.FLOAT, [2]), ("x", TP.FLOAT, [2, 5]), ("w", TP.FLOAT, [2])],
        [("s", TP.FLOAT, [2]), ("ys", TP.FLOAT, [2, 5])],
        opset=16,
    )
    check(model, [{"s0": randn(2), "x": randn(2, 5), "w": randn(2)}], tmp_path)


def test_scan8_batched(tmp_path):
    node = helper.make_node(
        "Scan", ["", "s0", "x"], ["s", "ys"], body=_sum_body(), num_scan_inputs=1, directions=[1]
    )
    model = make_model(
        [node],
        [("s0", TP.FLOAT, [3, 2]), ("x", TP.FLOAT, [3, 4, 2]), ("w", TP.FLOAT, [2])],
        [("s", TP.FLOAT, [3, 2]), ("ys", TP.FLOAT, [3, 4, 2])],
        opset=8,
    )
    check(model, [{"s0": randn(3, 2), "x": randn(3, 4, 2), "w": randn(2)}], tmp_path)


def _loop_body(stop_early: bool):
    """(i, cond, s) -> (cond', s + w * i, s): w from the enclosing graph; with ``stop_early`` the
    condition turns false once the sum of s exceeds 2 (a run-time condition)."""
    nodes = [
        helper.make_node("Cast", ["i"], ["fi"], to=TP.FLOAT),
        helper.make_node("Mul", ["w", "fi"], ["wi"]),
        helper.make_node("Add", ["s_in", "wi"], ["s_out"]),
        helper.make_node("Identity", ["s_in"], ["scan_out"]),
    ]
    if stop_early:
        nodes += [
            helper.make_node("ReduceSum", ["s_out"], ["total"], keepdims=0),
            helper.make_node("Constant", [], ["two"], value_float=2.0),
            helper.make_node("Less", ["total", "two"], ["cond_out"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    return helper.make_graph(
        nodes,
        "body",
        [
            helper.make_tensor_value_info("i", TP.INT64, []),
            helper.make_tensor_value_info("cond_in", TP.BOOL, []),
            helper.make_tensor_value_info("s_in", TP.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TP.BOOL, []),
            helper.make_tensor_value_info("s_out", TP.FLOAT, [3]),
            helper.make_tensor_value_info("scan_out", TP.FLOAT, [3]),
        ],
    )


def test_loop_with_run_time_trip_count_and_condition(tmp_path):
    """The recursive form: trip count and condition are inputs, the body changes the condition,
    and each run has a different number of iterations (so a different scan output length)."""
    node = helper.make_node("Loop", ["trip", "cond", "s0"], ["s", "ys"], body=_loop_body(True))
    model = make_model(
        [node],
        [
            ("trip", TP.INT64, []),
            ("cond", TP.BOOL, []),
            ("s0", TP.FLOAT, [3]),
            ("w", TP.FLOAT, [3]),
        ],
        [("s", TP.FLOAT, [3]), ("ys", TP.FLOAT, [None, 3])],
        opset=16,
    )
    s0 = np.array([0.1, -0.2, 0.3], np.float32)
    w = np.array([0.2, 0.1, 0.05], np.float32)
    feeds = [
        {"trip": np.array(t, np.int64), "cond": np.array(True), "s0": s0, "w": w}
        for t in (1, 3, 10)  # 10 stops early on the condition
    ]
    check(model, feeds, tmp_path)


def test_loop_with_constant_trip_count_is_unrolled(tmp_path):
    node = helper.make_node("Loop", ["trip", "", "s0"], ["s", "ys"], body=_loop_body(False))
    model = make_model(
        [node],
        [("s0", TP.FLOAT, [3]), ("w", TP.FLOAT, [3])],
        [("s", TP.FLOAT, [3]), ("ys", TP.FLOAT, [4, 3])],
        opset=16,
        initializers=[helper.make_tensor("trip", TP.INT64, [], [4])],
    )
    check(model, [{"s0": randn(3), "w": randn(3)}], tmp_path)
