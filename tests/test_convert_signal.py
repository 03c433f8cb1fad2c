"""qiao's converters for signal and image operators (``compiler/frontend/convert_signal.py``) and
its fixes of TVM's EyeLike, SpaceToDepth, Mod, BatchNormalization, MaxPool, ConvTranspose and
RoiAlign converters, checked through ``qiao.compiler.compile`` against ONNX Runtime, or against
onnx's NumPy reference implementation where ORT has no kernel. Sizes given as run-time inputs
(window length, STFT frame step, Col2Im image shape, CenterCropPad shape) are fed several values
through one compiled artifact.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper

from tests.test_frontend import check, make_model, randn


@pytest.mark.parametrize("op", ["HannWindow", "HammingWindow", "BlackmanWindow"])
def test_window_run_time_size(tmp_path, op):
    node = helper.make_node(op, ["n"], ["y"], periodic=0, output_datatype=TP.DOUBLE)
    model = make_model([node], [("n", TP.INT64, [])], [("y", TP.DOUBLE, 1)], opset=17)
    feeds = [{"n": np.array(n, np.int64)} for n in (5, 12)]
    # ORT evaluates the window in float32 before the cast to double
    check(model, feeds, tmp_path, rtol=1e-6, atol=1e-7)


def test_mel_weight_matrix(tmp_path):
    names = ["bins", "length", "rate", "low", "high"]
    node = helper.make_node("MelWeightMatrix", names, ["y"])
    infos = [(n, TP.INT64, []) for n in names[:3]] + [(n, TP.FLOAT, []) for n in names[3:]]
    model = make_model([node], infos, [("y", TP.FLOAT, 2)], opset=17)
    feeds = {
        "bins": np.array(6, np.int64),
        "length": np.array(32, np.int64),
        "rate": np.array(16000, np.int64),
        "low": np.array(100.0, np.float32),
        "high": np.array(6000.0, np.float32),
    }
    check(model, [feeds], tmp_path, reference="onnx")


@pytest.mark.parametrize(
    "axis, inverse, onesided, last",
    [(1, 0, 0, 2), (2, 0, 1, 1), (1, 1, 0, 2), (2, 1, 1, 2)],
)
def test_dft(tmp_path, axis, inverse, onesided, last):
    node = helper.make_node("DFT", ["x", "", "axis"], ["y"], inverse=inverse, onesided=onesided)
    shape = [2, 8, 6, last]
    model = make_model(
        [node],
        [("x", TP.FLOAT, shape)],
        [("y", TP.FLOAT, 4)],
        opset=20,
        initializers=[helper.make_tensor("axis", TP.INT64, [], [axis])],
    )
    check(model, [{"x": randn(*shape)}], tmp_path, rtol=1e-4, atol=1e-4)


def test_stft_run_time_step(tmp_path):
    node = helper.make_node("STFT", ["x", "step", "window"], ["y"], onesided=1)
    infos = [("x", TP.FLOAT, [2, 40, 1]), ("step", TP.INT64, []), ("window", TP.FLOAT, [8])]
    model = make_model([node], infos, [("y", TP.FLOAT, 4)], opset=17)
    window = np.hanning(8).astype(np.float32)
    feeds = [
        {"x": randn(2, 40, 1), "step": np.array(s, np.int64), "window": window} for s in (4, 7)
    ]
    check(model, feeds, tmp_path, rtol=1e-4, atol=1e-4)


def test_col2im_run_time_image_shape(tmp_path):
    node = helper.make_node(
        "Col2Im", ["x", "image", "block"], ["y"], strides=[2, 1], pads=[1, 0, 1, 2]
    )
    infos = [("x", TP.FLOAT, [2, 12, 8]), ("image", TP.INT64, [2]), ("block", TP.INT64, [2])]
    model = make_model([node], infos, [("y", TP.FLOAT, 4)], opset=18)
    feeds = {
        "x": randn(2, 12, 8),  # 2 channels x 6 taps, 4 x 2 block positions
        "image": np.array([7, 2], np.int64),
        "block": np.array([2, 3], np.int64),
    }
    check(model, [feeds], tmp_path)


def test_center_crop_pad_run_time_shape(tmp_path):
    node = helper.make_node("CenterCropPad", ["x", "shape"], ["y"], axes=[0, 2])
    model = make_model(
        [node],
        [("x", TP.FLOAT, [7, 3, 6]), ("shape", TP.INT64, [2])],
        [("y", TP.FLOAT, 3)],
        opset=18,
    )
    x = randn(7, 3, 6)
    feeds = [{"x": x, "shape": np.array(s, np.int64)} for s in ([4, 9], [10, 3], [7, 6])]
    check(model, feeds, tmp_path, rtol=0, atol=0)


def test_deform_conv_groups_mask(tmp_path):
    names = ["x", "w", "offset", "b", "mask"]
    node = helper.make_node(
        "DeformConv",
        names,
        ["y"],
        group=2,
        offset_group=2,
        pads=[1, 1, 1, 1],
        strides=[2, 2],
        kernel_shape=[3, 3],
    )
    shapes = {
        "x": [1, 4, 6, 6],
        "w": [2, 2, 3, 3],
        "offset": [1, 36, 3, 3],
        "b": [2],
        "mask": [1, 18, 3, 3],
    }
    model = make_model(
        [node], [(n, TP.FLOAT, shapes[n]) for n in names], [("y", TP.FLOAT, 4)], opset=19
    )
    feeds = {n: randn(*shapes[n]) for n in names}
    check(model, [feeds], tmp_path, rtol=1e-4, atol=1e-5, reference="onnx")


def test_det_batched(tmp_path):
    node = helper.make_node("Det", ["x"], ["y"])
    model = make_model([node], [("x", TP.FLOAT, [2, 3, 4, 4])], [("y", TP.FLOAT, 2)], opset=11)
    x = randn(2, 3, 4, 4)
    x[0, 1, 2] = x[0, 1, 0]  # a singular matrix: two equal rows
    check(model, [{"x": x}], tmp_path, rtol=1e-4, atol=1e-5)


def test_eye_like_dtype_and_diagonal(tmp_path):
    node = helper.make_node("EyeLike", ["x"], ["y"], dtype=TP.DOUBLE, k=-1)
    model = make_model([node], [("x", TP.INT32, [3, 5])], [("y", TP.DOUBLE, [3, 5])], opset=9)
    check(model, [{"x": np.zeros((3, 5), np.int32)}], tmp_path, rtol=0, atol=0)


def test_space_to_depth_crd(tmp_path):
    node = helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2, mode="CRD")
    model = make_model([node], [("x", TP.FLOAT, [2, 3, 4, 6])], [("y", TP.FLOAT, 4)], opset=28)
    check(model, [{"x": randn(2, 3, 4, 6)}], tmp_path, rtol=0, atol=0, reference="onnx")


def test_float_mod_numpy_semantics(tmp_path):
    node = helper.make_node("Mod", ["x", "y"], ["z"])
    model = make_model(
        [node], [("x", TP.FLOAT, [9]), ("y", TP.FLOAT, [9])], [("z", TP.FLOAT, [9])], opset=13
    )
    x = np.array([5.5, -5.5, 0.0, -0.0, 3.0, -3.0, np.inf, 7.0, 1.0], np.float32)
    y = np.array([2.0, 2.0, -3.0, 3.0, np.inf, np.inf, 2.0, 0.0, -np.inf], np.float32)
    check(model, [{"x": x, "y": y}], tmp_path, rtol=0, atol=0, reference="onnx")
    # NumPy itself, the semantics the reference follows (sign of zero included)
    assert np.array_equal(np.signbit(np.mod(x, y)[:4]), [False, False, True, False])


def test_batch_norm_training_mode(tmp_path):
    names = ["x", "s", "b", "mean", "var"]
    node = helper.make_node(
        "BatchNormalization", names, ["y", "run_mean", "run_var"], training_mode=1, momentum=0.7
    )
    shapes = {"x": [4, 3, 5], "s": [3], "b": [3], "mean": [3], "var": [3]}
    model = make_model(
        [node],
        [(n, TP.FLOAT, shapes[n]) for n in names],
        [("y", TP.FLOAT, 3), ("run_mean", TP.FLOAT, 1), ("run_var", TP.FLOAT, 1)],
        opset=15,
    )
    feeds = {n: randn(*shapes[n]) for n in names}
    feeds["var"] = np.abs(feeds["var"])
    check(model, [feeds], tmp_path, reference="onnx")


@pytest.mark.parametrize("storage_order", [0, 1])
def test_max_pool_indices(tmp_path, storage_order):
    node = helper.make_node(
        "MaxPool",
        ["x"],
        ["y", "i"],
        kernel_shape=[3, 2],
        strides=[2, 1],
        pads=[1, 0, 1, 1],
        storage_order=storage_order,
    )
    model = make_model(
        [node], [("x", TP.FLOAT, [2, 3, 5, 4])], [("y", TP.FLOAT, 4), ("i", TP.INT64, 4)], opset=12
    )
    check(model, [{"x": randn(2, 3, 5, 4)}], tmp_path, rtol=0, atol=0)


@pytest.mark.parametrize("auto_pad, out", [("NOTSET", [9, 6]), ("SAME_UPPER", [8, 5])])
def test_conv_transpose_output_shape(tmp_path, auto_pad, out):
    node = helper.make_node(
        "ConvTranspose",
        ["x", "w", "b"],
        ["y"],
        strides=[2, 2],
        output_shape=out,
        auto_pad=auto_pad,
    )
    infos = [("x", TP.FLOAT, [1, 2, 4, 3]), ("w", TP.FLOAT, [2, 3, 3, 3]), ("b", TP.FLOAT, [3])]
    model = make_model([node], infos, [("y", TP.FLOAT, 4)], opset=11)
    feeds = {"x": randn(1, 2, 4, 3), "w": randn(2, 3, 3, 3), "b": randn(3)}
    check(model, [feeds], tmp_path, rtol=1e-5, atol=1e-5)


def test_roi_align_max(tmp_path):
    node = helper.make_node(
        "RoiAlign",
        ["x", "rois", "idx"],
        ["y"],
        mode="max",
        output_height=3,
        output_width=2,
        sampling_ratio=2,
        spatial_scale=0.5,
    )
    infos = [("x", TP.FLOAT, [2, 2, 8, 8]), ("rois", TP.FLOAT, [3, 4]), ("idx", TP.INT64, [3])]
    model = make_model([node], infos, [("y", TP.FLOAT, 4)], opset=16)
    feeds = {
        "x": randn(2, 2, 8, 8),
        "rois": np.array([[0, 0, 9, 9], [2, 4, 14, 10], [5, 1, 7, 15]], np.float32),
        "idx": np.array([0, 1, 1], np.int64),
    }
    check(model, [feeds], tmp_path, rtol=1e-5, atol=1e-5, reference="onnx")


def test_integer_mod_of_symbolic_dim(tmp_path):
    """``Shape -> Gather -> Mod`` (shape arithmetic) still converts through TVM's converter."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
        helper.make_node("Mod", ["n", "three"], ["r"]),
        helper.make_node("Add", ["x", "r"], ["y"]),
    ]
    scalars = [
        helper.make_tensor("one", TP.INT64, [], [1]),
        helper.make_tensor("three", TP.INT64, [], [3]),
    ]
    model = make_model(
        nodes, [("x", TP.INT64, ["b", "t"])], [("y", TP.INT64, 2)], opset=13, initializers=scalars
    )
    feeds = [{"x": np.zeros((2, 5), np.int64)}, {"x": np.ones((1, 7), np.int64)}]
    check(model, feeds, tmp_path, rtol=0, atol=0)


def test_roi_align_max_adaptive_grid_is_refused_with_a_fix():
    from qiao.compiler.errors import CompileError
    from qiao.compiler.frontend import import_onnx

    node = helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], mode="max")
    infos = [("x", TP.FLOAT, [1, 1, 4, 4]), ("rois", TP.FLOAT, [1, 4]), ("idx", TP.INT64, [1])]
    model = make_model([node], infos, [("y", TP.FLOAT, 4)], opset=16)
    with pytest.raises(CompileError, match="fix: set sampling_ratio"):
        import_onnx(model)
