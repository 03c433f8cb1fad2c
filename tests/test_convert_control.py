"""Scan and Loop converters (compiler/frontend/convert_control.py) against ONNX Runtime."""

from __future__ import annotations

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
