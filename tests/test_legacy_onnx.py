"""ONNX files as older exporters wrote them: IR version 3, every initializer also listed in
``graph.input`` (Caffe2-converted zoo files), names that are not identifiers (``gpu_0/data_0``).

Checked against ONNX Runtime on the same file, through the real compile path.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qiao.compiler import compile, load
from qiao.compiler.frontend import import_onnx
from qiao.compiler.testing import assert_close, kernels_packing_per_call, run_cli

RNG = np.random.default_rng(3)


def caffe2_style_model(opset: int = 8, pad: bool = False) -> onnx.ModelProto:
    """Conv → Relu → Gemm at IR version 3, weights listed as inputs, Caffe2-style names; ``pad``:
    the input first goes through a Pad-2 (pads as an attribute, as AlexNet's LRN is exported)."""
    w1 = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b1 = RNG.standard_normal((8,)).astype(np.float32)
    w2 = RNG.standard_normal((10, 8 * 4 * 4)).astype(np.float32) * 0.1
    b2 = RNG.standard_normal((10,)).astype(np.float32)
    shape = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "flat_shape")
    nodes = [
        helper.make_node(
            "Conv",
            ["padded_0" if pad else "gpu_0/data_0", "conv1_w_0", "conv1_b_0"],
            ["conv1_1"],
            pads=[1, 1, 1, 1],
            kernel_shape=[3, 3],
            strides=[2, 2],
        ),
        helper.make_node("Relu", ["conv1_1"], ["conv1_2"]),
        helper.make_node("Reshape", ["conv1_2", "flat_shape"], ["flat_1"]),
        helper.make_node("Gemm", ["flat_1", "fc_w_0", "fc_b_0"], ["fc_1"], transB=1),
        helper.make_node("Softmax", ["fc_1"], ["gpu_0/softmax_1"]),
    ]
    if pad:  # 8x8 -> 7x7 then 9x9 keeps the conv's output at 4x4
        nodes.insert(
            0,
            helper.make_node(
                "Pad", ["gpu_0/data_0"], ["padded_0"], pads=[0, 0, 1, 1, 0, 0, 0, 0], value=0.25
            ),
        )
        (pads,) = [a for a in nodes[1].attribute if a.name == "pads"]
        pads.ints[:] = [0, 0, 0, 0]
    inits = [
        numpy_helper.from_array(w1, "conv1_w_0"),
        numpy_helper.from_array(b1, "conv1_b_0"),
        numpy_helper.from_array(w2, "fc_w_0"),
        numpy_helper.from_array(b2, "fc_b_0"),
        shape,
    ]
    inputs = [helper.make_tensor_value_info("gpu_0/data_0", TensorProto.FLOAT, [1, 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    out = helper.make_tensor_value_info("gpu_0/softmax_1", TensorProto.FLOAT, [1, 10])
    graph = helper.make_graph(nodes, "caffe2_net", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def test_initializers_listed_as_inputs_are_constants_by_default(tmp_path):
    model = caffe2_style_model()
    path = tmp_path / "caffe2.onnx"
    onnx.save(model, path)
    imported = import_onnx(str(path))
    assert [s.name for s in imported.inputs] == ["gpu_0/data_0"]
    assert imported.initializer_inputs == [
        "conv1_w_0",
        "conv1_b_0",
        "fc_w_0",
        "fc_b_0",
        "flat_shape",
    ]
    # The weights are parameters (packed once at load), not run-time inputs.
    assert {"conv1_w_0", "fc_w_0"} <= set(imported.params)

    artifact = compile(str(path), "cpu", tmp_path / "art")
    taken = artifact.manifest["initializer_inputs"]
    assert taken == {"taken_as": "constants", "names": imported.initializer_inputs}
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = sess.run(None, {"gpu_0/data_0": x})
    got = artifact.run({"gpu_0/data_0": x})["gpu_0/softmax_1"]
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert load(artifact.directory).run({"gpu_0/data_0": x})["gpu_0/softmax_1"].shape == (1, 10)


@pytest.mark.parametrize("mode", ["constants", "inputs"])
def test_initializers_listed_as_inputs_in_an_old_opset(tmp_path, mode):
    """Dropping the listed initializers from ``graph.input`` (either mode) left an IR-3 file that
    onnx's version converter rejects ("Input conv1_w_0 is undefined"), so the import stayed at
    opset 9 and TVM's Pad-2 converter failed as "dynamic pads" (the zoo's AlexNet and ZFNet).
    Now the file is upgraded to opset 11 and matches ONNX Runtime; a Caffe2 file's weights are
    packed at load, not on every call."""
    model = caffe2_style_model(opset=9, pad=True)
    path = tmp_path / "caffe2.onnx"
    onnx.save(model, path)
    assert import_onnx(str(path), initializer_inputs=mode).imported_opset == 11
    artifact = compile(str(path), "cpu", tmp_path / "art", initializer_inputs=mode)
    if mode == "constants":
        assert not kernels_packing_per_call(artifact.runner)
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    feeds = {s["name"]: weights.get(s["name"], x) for s in artifact.inputs}  # the file's weights
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = sess.run(None, {"gpu_0/data_0": x})
    assert_close(artifact.run(feeds)["gpu_0/softmax_1"], expected, rtol=1e-4, atol=1e-5)


def test_initializers_listed_as_inputs_can_be_fed(tmp_path):
    model = caffe2_style_model()
    artifact = compile(model, "cpu", tmp_path / "art", initializer_inputs="inputs")
    names = [s["name"] for s in artifact.inputs]
    # Float weights become inputs; the integer shape tensor stays a constant.
    assert names == ["gpu_0/data_0", "conv1_w_0", "conv1_b_0", "fc_w_0", "fc_b_0"]
    assert artifact.manifest["initializer_inputs"]["taken_as"] == "inputs"
    feeds = artifact.random_inputs(seed=5)
    # ONNX Runtime on the model with the initializers removed: the caller's values are the weights.
    as_inputs = onnx.ModelProto()
    as_inputs.CopyFrom(model)
    kept = [t for t in as_inputs.graph.initializer if t.name == "flat_shape"]
    del as_inputs.graph.initializer[:]
    as_inputs.graph.initializer.extend(kept)
    sess = ort.InferenceSession(as_inputs.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = sess.run(None, feeds)
    assert_close(artifact.run(feeds)["gpu_0/softmax_1"], expected, rtol=1e-4, atol=1e-5)


def test_cli_reports_initializer_inputs_and_validates(tmp_path):
    path = tmp_path / "caffe2.onnx"
    onnx.save(caffe2_style_model(opset=9), path)
    out = tmp_path / "art"
    res = run_cli("compile", str(path), "--target", "cpu", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "5 initializers listed as graph inputs taken as constants" in res.stdout
    res = run_cli("validate", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["initializer_inputs"]["taken_as"] == "constants"


def test_unknown_initializer_mode_is_an_error(tmp_path):
    res = run_cli(
        "compile",
        "mlp",
        "--target",
        "cpu",
        "-o",
        str(tmp_path / "a"),
        "--initializer-inputs",
        "weights",
    )
    assert res.returncode == 2 and "invalid choice" in res.stderr
    with pytest.raises(Exception, match="not a mode"):
        import_onnx(caffe2_style_model(), initializer_inputs="weights")


def oddly_named_model() -> onnx.ModelProto:
    """Every name a C compiler would choke on: slashes, colons, a leading digit, non-ASCII."""
    w = numpy_helper.from_array(RNG.standard_normal((16, 8)).astype(np.float32), "0:fc/w.权重")
    nodes = [
        helper.make_node("MatMul", ["gpu_0/data_0", "0:fc/w.权重"], ["fc:out"]),
        helper.make_node("Relu", ["fc:out"], ["输出/y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "names",
        [helper.make_tensor_value_info("gpu_0/data_0", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("输出/y", TensorProto.FLOAT, ["n", 8])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_arbitrary_names_compile_and_keep_their_onnx_names(tmp_path):
    model = oddly_named_model()
    artifact = compile(model, "cpu", tmp_path / "cpu")
    assert [s["name"] for s in artifact.inputs] == ["gpu_0/data_0"]
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = sess.run(None, {"gpu_0/data_0": x})
    assert_close(artifact.run({"gpu_0/data_0": x})["输出/y"], expected)


@pytest.mark.parametrize("target,arch", [("cuda", "sm_80"), ("rocm", "gfx942")])
def test_arbitrary_names_make_valid_gpu_code(tmp_path, target, arch):
    from qiao.backends import get_backend

    avail = get_backend(target).availability()
    if not avail.can_compile:
        pytest.skip(f"{target} code generation unavailable here: {avail.status}")
    artifact = compile(caffe2_style_model(), target, tmp_path / target, arch=arch)
    assert artifact.manifest["backend"]["kernels"], "device kernels listed"
    artifact = compile(oddly_named_model(), target, tmp_path / "odd", arch=arch)
    assert artifact.manifest["backend"]["kernels"]


def external_data_model(tmp_path, rows: int = 64):
    """Two Gather tables kept in an external data file beside the model."""
    tables = [np.full((rows, 32), i + 1, np.float32) for i in range(2)]
    nodes = [helper.make_node("Gather", [f"w{i}", "idx"], [f"g{i}"], axis=0) for i in range(2)]
    nodes.append(helper.make_node("Add", ["g0", "g1"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "tables",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k", 32])],
        [numpy_helper.from_array(t, f"w{i}") for i, t in enumerate(tables)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "tables.onnx"
    onnx.save(model, path, save_as_external_data=True, location="tables.data", size_threshold=0)
    return path


def test_sizes_past_protobufs_limit_are_counted_without_serialising():
    from qiao.compiler.frontend import fits_protobuf, proto_size

    class Huge:  # a ModelProto past 2 GB, as protobuf treats it: ByteSize raises
        def __init__(self, tensor_bytes: int):
            self.graph = onnx.GraphProto()
            if tensor_bytes:
                self.graph.initializer.add().raw_data = b"\0" * tensor_bytes

        def ByteSize(self):
            from google.protobuf.message import EncodeError

            raise EncodeError("Failed to serialize proto")

    huge = Huge(1024)
    assert proto_size(huge) == 1024 and fits_protobuf(huge)
    assert not fits_protobuf(Huge(0))  # no tensors to count: assume too large, never serialise


def test_external_data_is_checked_small_then_loaded_and_hashed_by_path(tmp_path, monkeypatch):
    from qiao.compiler import driver
    from qiao.compiler import frontend as fe

    path = external_data_model(tmp_path)
    # The checker reads the file by path (external data beside it): serialising a loaded model
    # over 2 GB is what failed ("Failed to serialize proto").
    checked = []
    real_check = onnx.checker.check_model
    monkeypatch.setattr(
        onnx.checker, "check_model", lambda m, *a, **k: (checked.append(m), real_check(m))[1]
    )
    proto = fe.load_onnx(str(path))
    assert checked == [str(path)]
    assert numpy_helper.to_array(proto.graph.initializer[1])[0, 0] == 2.0  # data loaded
    monkeypatch.setattr(onnx.checker, "check_model", real_check)

    artifact = compile(str(path), "cpu", tmp_path / "art")
    import hashlib

    whole = hashlib.sha256(path.read_bytes() + (tmp_path / "tables.data").read_bytes())
    assert artifact.manifest["source"]["sha256"] == whole.hexdigest()
    assert driver.model_files_sha256(str(path)) == whole.hexdigest()
    idx = np.array([3, 0, 63], dtype=np.int64)
    assert_close(artifact.run({"idx": idx})["y"], np.full((3, 32), 3.0, np.float32), 0, 0)


def test_missing_external_data_is_a_clear_error(tmp_path):
    path = external_data_model(tmp_path)
    (tmp_path / "tables.data").unlink()
    res = run_cli("compile", str(path), "--target", "cpu", "-o", str(tmp_path / "art"))
    assert res.returncode == 2 and "fix:" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "art").exists()


def _single_op_model(opset, node, inputs, inits=(), ir_version=4):
    """One node at ``opset``; output types from onnx's shape inference (old IR needs them)."""
    graph = helper.make_graph(
        [node],
        "old",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    inferred = onnx.shape_inference.infer_shapes(model)
    for out, typed in zip(model.graph.output, inferred.graph.output):
        out.CopyFrom(typed)
        if not out.type.tensor_type.HasField("shape"):  # experimental ops: no inference
            out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.FLOAT, inputs[0][1]))
    onnx.checker.check_model(model)
    return model


X4 = ("x", [2, 3, 6, 6])
SCALES = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
# Downscales keep in * scale integral: TVM's Resize maps coordinates by the size ratio, not by the
# given scale, which differs when the output size was rounded (e.g. 6 * 0.75) at any opset.
OLD_FORMS = {
    # Operators whose old form TVM's importer lacks (it picks a newer converter): upgraded by
    # onnx's version converter before the import.
    "upsample_v7": (7, helper.make_node("Upsample", ["x"], ["y"], scales=[1.0, 1.0, 2.0, 3.0]), ()),
    "upsample_v9": (9, helper.make_node("Upsample", ["x", "scales"], ["y"]), (SCALES,)),
    "upsample_v9_bilinear": (
        9,
        helper.make_node("Upsample", ["x", "scales"], ["y"], mode="linear"),
        (SCALES,),
    ),
    "resize_v10": (10, helper.make_node("Resize", ["x", "scales"], ["y"]), (SCALES,)),
    "resize_v10_linear_down": (
        10,
        helper.make_node("Resize", ["x", "down"], ["y"], mode="linear"),
        (numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "down"),),
    ),
    "resize_v10_nearest_down": (
        10,
        helper.make_node("Resize", ["x", "down"], ["y"]),
        (numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "down"),),
    ),
    "upsample_v9_fractional": (
        9,
        helper.make_node("Upsample", ["x", "frac"], ["y"]),
        (numpy_helper.from_array(np.array([1, 1, 1.5, 2.5], np.float32), "frac"),),
    ),
    "slice_v9": (
        9,
        helper.make_node("Slice", ["x"], ["y"], starts=[1, -4], ends=[3, 100], axes=[2, 3]),
        (),
    ),
    "pad_v9": (9, helper.make_node("Pad", ["x"], ["y"], pads=[0, 0, 1, 2, 0, 0, 2, 1]), ()),
    "topk_v9": (9, helper.make_node("TopK", ["x"], ["y", "i"], k=2), ()),
    "softmax_v8": (8, helper.make_node("Softmax", ["x"], ["y"], axis=2), ()),
    "clip_v6": (6, helper.make_node("Clip", ["x"], ["y"], min=-0.3, max=0.4), ()),
    "batchnorm_v7_spatial": (
        7,
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], spatial=1),
        tuple(numpy_helper.from_array(RNG.random(3).astype(np.float32) + 0.5, n) for n in "sbmv"),
    ),
}


@pytest.mark.parametrize("case", sorted(OLD_FORMS))
def test_old_opset_semantics_match_onnxruntime(case, tmp_path):
    opset, node, inits = OLD_FORMS[case]
    model = _single_op_model(opset, node, [X4], inits)
    x = RNG.standard_normal(X4[1]).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"x": x})
    artifact = compile(model, "cpu", tmp_path / case)
    got = artifact.run({"x": x})
    for out, ref in zip(model.graph.output, expected):
        assert_close(got[out.name], ref, rtol=1e-5, atol=1e-6, name=out.name)


def _softplus(z):
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


EXPERIMENTAL = {
    # Opset 1-9 experimental operators (Caffe2-converted models), against NumPy.
    "ImageScaler": (
        {"scale": 0.5, "bias": [1.0, -2.0, 3.0]},
        lambda x: 0.5 * x + np.array([1.0, -2.0, 3.0], np.float32).reshape(1, 3, 1, 1),
    ),
    "ScaledTanh": ({"alpha": 2.0, "beta": 0.5}, lambda x: 2.0 * np.tanh(0.5 * x)),
    "Affine": ({"alpha": 3.0, "beta": -1.0}, lambda x: 3.0 * x - 1.0),
    "ParametricSoftplus": (
        {"alpha": 1.5, "beta": 20.0},
        lambda x: 1.5 * _softplus(20.0 * x.astype(np.float64)),
    ),
}


@pytest.mark.parametrize("op", sorted(EXPERIMENTAL))
def test_experimental_operators_of_old_opsets(op, tmp_path):
    attrs, reference = EXPERIMENTAL[op]
    model = _single_op_model(8, helper.make_node(op, ["x"], ["y"], **attrs), [X4])
    x = RNG.standard_normal(X4[1]).astype(np.float32) * 4  # beta*x up to ~±300: no overflow
    got = compile(model, "cpu", tmp_path / op).run({"x": x})["y"]
    assert_close(got, reference(x).astype(np.float32), rtol=1e-5, atol=1e-5)


def test_wrong_value_info_and_output_shapes_do_not_mislead(tmp_path):
    w = numpy_helper.from_array(RNG.standard_normal((8, 4)).astype(np.float32), "W")
    unused = numpy_helper.from_array(np.zeros(100, np.float32), "never_used")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "stale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 5])],  # wrong
        [w, unused],
        value_info=[helper.make_tensor_value_info("t", TensorProto.FLOAT, [7])],  # wrong rank
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    artifact = compile(model, "cpu", tmp_path / "art")
    assert artifact.outputs[0]["shape"] == ["n", 4]  # what the model computes, not [5, 5]
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    assert_close(artifact.run({"x": x})["y"], np.maximum(x @ numpy_helper.to_array(w), 0), 1e-5)
