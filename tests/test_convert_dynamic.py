"""Converters for run-time-valued shapes (compiler/frontend/convert_dynamic.py) against ONNX
Runtime: one compiled artifact runs with several values of ``k`` / ``scales`` / ``sizes`` / ``roi``,
so each run has a different output shape."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper

from tests.test_frontend import check, make_model, randn


@pytest.mark.parametrize(
    ("dtype", "largest"), [(TP.FLOAT, 1), (TP.FLOAT, 0), (TP.UINT64, 1), (TP.INT32, 0)]
)
def test_top_k_with_run_time_k(dtype, largest, tmp_path):
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, largest=largest)
    model = make_model(
        [node],
        [("x", dtype, [3, 7]), ("k", TP.INT64, [1])],
        [("v", dtype, 2), ("i", TP.INT64, 2)],
        opset=11,
    )
    rng = np.random.default_rng(1)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    if dtype == TP.FLOAT:
        x = randn(3, 7)
    else:  # ties included; uint64 values above 2**63 check the unsigned order
        x = rng.integers(0, 5, (3, 7)).astype(np_dtype)
        if dtype == TP.UINT64:
            x[0, :3] = np.array([2**63 + 5, 2**64 - 1, 7], np.uint64)
    feeds = [{"x": x, "k": np.array([k], np.int64)} for k in (1, 4, 7)]
    # ORT has no uint64 TopK kernel; onnx's NumPy reference does.
    check(model, feeds, tmp_path, reference="onnx" if dtype == TP.UINT64 else "ort")


def _resize_model(opset=19, inputs=("roi", "scales", "sizes"), **attrs):
    names = ["x", "roi", "scales", "sizes"]
    used = [n if n == "x" or n in inputs else "" for n in names]
    while used[-1] == "":
        used.pop()
    node = helper.make_node("Resize", used, ["y"], **attrs)
    types = {"x": TP.FLOAT, "roi": TP.FLOAT, "scales": TP.FLOAT, "sizes": TP.INT64}
    n_axes = len(attrs.get("axes", [])) or 4
    shapes = {"x": [1, 2, 4, 5], "roi": [2 * n_axes], "scales": [n_axes], "sizes": [n_axes]}
    graph_inputs = [(n, types[n], shapes[n]) for n in used if n]
    return make_model([node], graph_inputs, [("y", TP.FLOAT, 4)], opset=opset)


@pytest.mark.parametrize(
    "attrs",
    [
        {"mode": "linear", "antialias": 1},
        {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5},
        {"mode": "nearest", "nearest_mode": "ceil", "coordinate_transformation_mode": "asymmetric"},
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
    ],
)
def test_resize_with_run_time_scales(attrs, tmp_path):
    model = _resize_model(inputs=("scales",), **attrs)
    x = randn(1, 2, 4, 5)
    feeds = [
        {"x": x, "scales": np.array(s, np.float32)} for s in ([1, 1, 0.6, 0.5], [1, 1, 1.7, 2.3])
    ]
    # align_corners with a scale whose output length is fractional: onnx's reference divides by
    # (scale * length - 1), ORT by (output length - 1); qiao follows onnx's reference.
    ref = "onnx" if attrs.get("coordinate_transformation_mode") == "align_corners" else "ort"
    check(model, feeds, tmp_path, rtol=1e-4, atol=1e-5, reference=ref)


def test_resize_with_run_time_sizes_keep_aspect_ratio(tmp_path):
    model = _resize_model(
        inputs=("sizes",), mode="linear", axes=[2, 3], keep_aspect_ratio_policy="not_larger"
    )
    x = randn(1, 2, 4, 5)
    feeds = [{"x": x, "sizes": np.array(s, np.int64)} for s in ([7, 9], [2, 3], [8, 20])]
    check(model, feeds, tmp_path, rtol=1e-4, atol=1e-5)


def test_resize_tf_crop_and_resize_with_run_time_roi(tmp_path):
    model = _resize_model(
        inputs=("roi", "sizes"),
        mode="linear",
        coordinate_transformation_mode="tf_crop_and_resize",
        extrapolation_value=-3.0,
    )
    x = randn(1, 2, 4, 5)
    feeds = [
        {
            "x": x,
            "roi": np.array([0, 0, 0.1, -0.2, 1, 1, 0.9, 1.3], np.float32),
            "sizes": np.array([1, 2, 3, 6], np.int64),
        },
        {
            "x": x,
            "roi": np.array([0, 0, 0.4, 0.0, 1, 1, 0.6, 1.0], np.float32),
            "sizes": np.array([1, 2, 5, 2], np.int64),
        },
    ]
    check(model, feeds, tmp_path, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("align_corners", [0, 1])
def test_affine_grid_with_run_time_size(align_corners, tmp_path):
    node = helper.make_node("AffineGrid", ["theta", "size"], ["grid"], align_corners=align_corners)
    model = make_model(
        [node],
        [("theta", TP.FLOAT, [2, 2, 3]), ("size", TP.INT64, [4])],
        [("grid", TP.FLOAT, 4)],
        opset=20,
    )
    theta = randn(2, 2, 3)
    # Not a length-1 axis with align_corners: onnx's reference, ORT and PyTorch disagree there.
    feeds = [{"theta": theta, "size": np.array(s, np.int64)} for s in ([2, 3, 4, 5], [2, 1, 2, 7])]
    check(model, feeds, tmp_path, rtol=1e-5, atol=1e-6)


def test_max_unpool_with_run_time_output_shape(tmp_path):
    pool = helper.make_node("MaxPool", ["x"], ["p", "i"], kernel_shape=[2, 2], strides=[2, 2])
    unpool = helper.make_node(
        "MaxUnpool", ["p", "i", "shape"], ["y"], kernel_shape=[2, 2], strides=[2, 2]
    )
    model = make_model(
        [pool, unpool],
        [("x", TP.FLOAT, [1, 2, 4, 6]), ("shape", TP.INT64, [4])],
        [("y", TP.FLOAT, 4)],
        opset=11,
    )
    x = randn(1, 2, 4, 6)
    feeds = [{"x": x, "shape": np.array(s, np.int64)} for s in ([1, 2, 4, 6], [1, 2, 5, 7])]
    # ORT writes each value at its flat index of the requested shape; onnx's reference (and the
    # node cases) keep its (n, c, h, w) position, as qiao does.
    check(model, feeds, tmp_path, reference="onnx")


def test_resize_to_the_symbolic_shape_of_another_input(tmp_path):
    """Sizes from ``Shape`` of a tensor with symbolic dims: a ShapeExpr, which TVM's converter
    takes (output dims tied to the other input's)."""
    nodes = [
        helper.make_node("Shape", ["like"], ["sizes"]),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest"),
    ]
    model = make_model(
        nodes,
        [("x", TP.FLOAT, [1, 2, 4, 5]), ("like", TP.FLOAT, [1, 2, "h", "w"])],
        [("y", TP.FLOAT, [1, 2, "h", "w"])],
        opset=19,
    )
    x = randn(1, 2, 4, 5)
    check(model, [{"x": x, "like": randn(1, 2, h, w)} for h, w in ((8, 10), (3, 7))], tmp_path)
