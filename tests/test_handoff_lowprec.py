"""Hand-off backends (ascend, cambricon) at reduced precision and with quantized weights.

The vendor compilers are absent here: ``compile`` writes the complete hand-off package and stops
with ``ToolchainMissing`` (tests/test_handoff.py covers the runs with faked toolchains). What is
checked is the package: the precision switch in the build command/config, the initializers of
``handoff/model.onnx``, and its outputs under ONNX Runtime against independent references:

- float16: against ONNX Runtime on the float32 model. The weights are rounded once to float16
  (relative error <= 2^-11); tolerance 1e-2 relative, 2e-3 of the output's largest magnitude
  (5e-3 for the Qwen3-MoE decoder); measured figures at ``FP16_RTOL``. This checks the package
  (what the vendor compiler is given), not the NPU's fp16 arithmetic, which adds its own rounding.
- dequantized weights, float32: against ONNX Runtime on the quantized graph (MatMulNBits /
  GatherBlockQuantized / QMoE at accuracy_level 0, and DequantizeLinear, which ONNX Runtime
  computes from the same codes in float32): both use the same exact float32 weights; tolerance
  1e-5 relative, 1e-5 of the largest magnitude (summation order only; measured 0 for the int4
  mlp, 4.3e-7 for qwen3-moe-tiny).
- dequantized weights, float16: the same reference, float16 tolerance as above.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qiao.backends.handoff import PACKAGE_DIR, dequantize_weights
from qiao.compiler import compile
from qiao.compiler.artifact import SOURCE_MODEL
from qiao.compiler.driver import resolve_model
from qiao.compiler.errors import CompileError, ToolchainMissing
from qiao.compiler.moe_op import MoESpec, make_node
from qiao.compiler.quantize import quantize_model
from qiao.compiler.testing import assert_close, qdq_matmul, run_cli

# float16 weights: of max |y|, measured 4.2e-4 (mlp), 3.2e-4 (int4 mlp); the two-layer decoder
# (every weight rounded, attention and MoE) 1.8e-3, hence its own bound.
FP16_RTOL, FP16_ATOL_REL, DECODER_FP16_ATOL_REL = 1e-2, 2e-3, 5e-3
EXACT_RTOL, EXACT_ATOL_REL = 1e-5, 1e-5
MS = "com.microsoft"


@pytest.fixture(autouse=True)
def no_vendor_toolchains(monkeypatch):
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}:/usr/bin:/bin")
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        monkeypatch.delenv(var, raising=False)
    if os.path.isdir("/usr/local/Ascend"):
        pytest.skip("CANN is installed here")
    from qiao.backends.cambricon import magicmind_location

    if magicmind_location() is not None:
        pytest.skip("MagicMind is installed here")


def handoff(model, target, out, **options):
    """Compile for a hand-off target without its toolchain: the manifest, the package's model
    and the package directory."""
    with pytest.raises(ToolchainMissing):
        compile(model, target, out, **options)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    package = os.path.join(out, PACKAGE_DIR)
    return manifest, onnx.load(os.path.join(package, "model.onnx")), package


def ort_run(model: onnx.ModelProto, feeds: dict, optimize: bool = True) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:  # ORT would fuse DequantizeLinear+MatMul into an int8-activation kernel
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, ["CPUExecutionProvider"])
    return session.run(None, feeds)


def close_to(got, want, rtol, atol_rel, name):
    assert_close(got, want, rtol, atol_rel * float(np.abs(want).max()), name)


def standard_only(model: onnx.ModelProto, opset: int = 15) -> None:
    assert {n.domain for n in model.graph.node} <= {""}, "contrib ops left"
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    onnx.checker.check_model(model, full_check=True)


@pytest.fixture(scope="module")
def mlp_fp32():
    return resolve_model("mlp").proto  # built-in "mlp": 64 -> 256 -> 256 -> 10, ReLU and GELU


@pytest.fixture(scope="module")
def mlp(mlp_fp32, tmp_path_factory):
    """The built-in mlp as an ONNX file (exported once, not on every compile)."""
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    onnx.save(mlp_fp32, path)
    return str(path)


def mlp_input(seed=0):
    return np.random.default_rng(seed).standard_normal((5, 64)).astype(np.float32)


# -- float16 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["ascend", "cambricon"])
def test_float16_handoff_sets_the_tool_switch_and_keeps_fp16_weights(
    target, mlp, mlp_fp32, tmp_path
):
    manifest, model, package = handoff(mlp, target, tmp_path / "art", dtype="float16")
    section = manifest["backend"]
    assert section["precision"]["compute"] == "float16" and section["dequantized"] is None
    if target == "ascend":
        assert section["command"][-1] == "--precision_mode=force_fp16"
        assert section["precision"]["flag"] == "--precision_mode=force_fp16"
    else:
        with open(os.path.join(package, "build_config.json")) as f:
            config = json.load(f)["builder_config"]
        assert config["precision_config"] == {"precision_mode": "force_float16"}
    with open(os.path.join(package, "README.md")) as f:
        assert section["precision"]["flag"] in f.read()
    # The three GEMM weights: float16 initializers, each widened by a Cast, holding exactly the
    # float32 weights rounded to float16; biases and I/O stay float32.
    originals = {t.name: numpy_helper.to_array(t) for t in mlp_fp32.graph.initializer}
    halves = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert len(halves) == 3
    casts = {n.input[0]: n for n in model.graph.node if n.op_type == "Cast"}
    for t in halves:
        cast = casts[t.name]
        assert helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT
        original = originals[t.name.removesuffix(".fp16")]
        np.testing.assert_array_equal(numpy_helper.to_array(t), original.astype(np.float16))
    io = [*model.graph.input, *model.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {TensorProto.FLOAT}
    standard_only(model)
    x = mlp_input()
    (want,) = ort_run(mlp_fp32, {"x": x})
    (got,) = ort_run(model, {"x": x})
    close_to(got, want, FP16_RTOL, FP16_ATOL_REL, f"{target} fp16 hand-off vs fp32 model")
    assert np.abs(got - want).max() > 0  # the weights really were rounded


def fp16_model() -> onnx.ModelProto:
    """A float16 ONNX model (inputs, weights, outputs): x @ w + b, ReLU."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((32, 24)) / 6).astype(np.float16)
    b = (0.1 * rng.standard_normal(24)).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["y"]),
        ],
        "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 24])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target, flag", [("ascend", "force_fp16"), ("cambricon", "force_float16")])
def test_float16_model_in_is_handed_off_as_float16(target, flag, tmp_path):
    source = fp16_model()
    manifest, model, package = handoff(source, target, tmp_path / "art")
    section = manifest["backend"]
    assert section["precision"]["compute"] == "float16"
    assert section["precision"]["flag"].endswith(flag)
    assert manifest["inputs"][0]["dtype"] == "float16"
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.FLOAT16}
    x = np.random.default_rng(5).standard_normal((3, 32)).astype(np.float16)
    assert_close(ort_run(model, {"x": x})[0], ort_run(source, {"x": x})[0], 0, 0)


# -- bfloat16 --------------------------------------------------------------------------------------
def test_bfloat16_on_ascend910b_uses_atc_bf16_mode_with_exact_float32_weights(mlp, tmp_path):
    manifest, model, package = handoff(mlp, "ascend", tmp_path / "art", dtype="bfloat16")
    section = manifest["backend"]
    assert section["command"][-1] == "--precision_mode=allow_mix_precision_bf16"
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.FLOAT}
    assert "Cast" not in {n.op_type for n in model.graph.node}
    # The weights are the bfloat16-rounded ones qiao compiled (its source model), widened exactly:
    # the low 16 bits of each float32 are zero, and the outputs equal that model's.
    source = onnx.load(os.path.join(tmp_path / "art", SOURCE_MODEL))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2]
    assert len(weights) == 3
    for w in weights:
        assert not (w.view(np.uint32) & 0xFFFF).any()
    x = mlp_input(1)
    assert_close(ort_run(model, {"x": x})[0], ort_run(source, {"x": x})[0], 1e-6, 1e-6)


@pytest.mark.parametrize(
    "target, arch, message",
    [
        ("ascend", "Ascend310P", "ATC computes in bfloat16 only on Atlas A2"),
        ("cambricon", "mlu590", "MagicMind has no bfloat16 precision mode"),
    ],
)
def test_bfloat16_without_a_tool_mode_is_one_error_and_nothing_written(
    target, arch, message, mlp, tmp_path
):
    out = tmp_path / "art"
    with pytest.raises(CompileError, match=message) as err:
        compile(mlp, target, out, arch=arch, dtype="bfloat16")
    assert "fix: use --dtype float16" in str(err.value)
    assert os.listdir(tmp_path) == []  # no artifact, no staging left over


def test_bfloat16_cli_exits_2_with_one_line(mlp, tmp_path):
    out = tmp_path / "art"
    proc = run_cli("compile", mlp, "--target", "cambricon", "--dtype", "bfloat16", "-o", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "--dtype float16" in proc.stderr
    assert os.listdir(tmp_path) == []


# -- quantized weights -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [None, "float16"])
@pytest.mark.parametrize("target", ["ascend", "cambricon"])
def test_int4_mlp_handoff_is_dequantized_and_matches_ort_on_the_quantized_graph(
    target, dtype, mlp, tmp_path, capfd
):
    options = {"quantize": "int4"} | ({"dtype": dtype} if dtype else {})
    manifest, model, package = handoff(mlp, target, tmp_path / "art", **options)
    section = manifest["backend"]
    want_dtype = dtype or "float32"
    assert section["dequantized"]["ops"] == {"MatMulNBits": 3}
    assert section["dequantized"]["dtype"] == want_dtype
    assert manifest["quantization"]["bits"] == 4
    warning = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "no int4/int8 memory or speed benefit" in warning[0]
    with open(os.path.join(package, "README.md")) as f:
        assert "no int4/int8 memory or speed benefit" in f.read()
    standard_only(model)
    elem = TensorProto.FLOAT16 if dtype else TensorProto.FLOAT
    weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert len(weights) == 3 and {t.data_type for t in weights} == {elem}
    # The reference: ONNX Runtime on the quantized graph qiao compiled (MatMulNBits,
    # accuracy_level 0: float32 dequantize-then-matmul).
    quantized = onnx.load(os.path.join(tmp_path / "art", SOURCE_MODEL))
    assert "MatMulNBits" in {n.op_type for n in quantized.graph.node}
    x = mlp_input(2)
    (want,) = ort_run(quantized, {"x": x})
    (got,) = ort_run(model, {"x": x})
    if dtype:
        close_to(got, want, FP16_RTOL, FP16_ATOL_REL, "fp16 dequantized vs ORT MatMulNBits")
    else:
        close_to(got, want, EXACT_RTOL, EXACT_ATOL_REL, "dequantized vs ORT MatMulNBits")


VOCAB, HIDDEN, INTER, EXPERTS = 40, 64, 32, 4


def moe_lm(opset: int = 17) -> onnx.ModelProto:
    """ids -> embedding (Gather) -> MoE (SwiGLU, fused rows, router MatMul) -> MatMul head: after
    ``quantize_model`` every quantized contrib op (GatherBlockQuantized, QMoE, MatMulNBits)."""
    rng = np.random.default_rng(7)
    spec = MoESpec(k=2, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1)

    def t(name, *shape, s=1.0):
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    inits = [
        t("embed", VOCAB, HIDDEN),
        t("router", HIDDEN, EXPERTS),
        t("fc1", EXPERTS, 2 * INTER, HIDDEN, s=HIDDEN**-0.5),
        t("fc2", EXPERTS, HIDDEN, INTER, s=INTER**-0.5),
        t("head", HIDDEN, 24, s=HIDDEN**-0.5),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["h"]),
        helper.make_node("MatMul", ["h", "router"], ["logits"]),
        make_node(spec, ["h", "logits", "fc1", "", "fc2"], "m", name="moe"),
        helper.make_node("MatMul", ["m", "head"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "moe_lm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["tokens"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", 24])],
        inits,
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_qmoe_gather_and_matmul_nbits_are_dequantized_into_standard_ops(dtype, tmp_path):
    options = {"quantize": "int4"} | ({"dtype": dtype} if dtype else {})
    manifest, model, _ = handoff(moe_lm(), "ascend", tmp_path / "art", **options)
    section = manifest["backend"]
    ops = {"GatherBlockQuantized": 1, "MatMulNBits": 1, "QMoE": 1}
    assert section["dequantized"]["ops"] == ops
    assert section["moe_decomposed"] == 1  # the QMoE became a MoE, decomposed by moe_op
    standard_only(model)
    quantized = onnx.load(os.path.join(tmp_path / "art", SOURCE_MODEL))
    assert ops.keys() <= {n.op_type for n in quantized.graph.node}
    ids = np.random.default_rng(8).integers(-VOCAB, VOCAB, 9).astype(np.int64)  # negative too
    (want,) = ort_run(quantized, {"ids": ids})
    (got,) = ort_run(model, {"ids": ids})
    if dtype:
        close_to(got, want, FP16_RTOL, FP16_ATOL_REL, "fp16 dequantized vs ORT contrib ops")
    else:
        close_to(got, want, EXACT_RTOL, EXACT_ATOL_REL, "dequantized vs ORT contrib ops")


@pytest.mark.parametrize("dtype", [TensorProto.UINT8, TensorProto.INT4])
def test_blocked_dequantize_linear_is_folded(dtype, tmp_path):
    """An opset-21 weight-only QDQ MatMul (blocked DequantizeLinear along K, as ONNX Runtime's
    quantizer writes with quant_format=QDQ): ATC and MagicMind read opset <= 15, which has neither
    block_size nor int4. The hand-off holds the float32 weight, equal to NumPy's
    (code - zero point) * scale, and the same outputs as ONNX Runtime on the QDQ graph."""
    rng = np.random.default_rng(9)
    k, block = 96, 32
    source, codes, scale, zp = qdq_matmul(dtype, rng, k=k, block=block)
    manifest, model, _ = handoff(source, "cambricon", tmp_path / "art")
    assert manifest["backend"]["dequantized"]["ops"] == {"DequantizeLinear": 1}
    standard_only(model)
    (w,) = [numpy_helper.to_array(t) for t in model.graph.initializer]
    exact = (codes - np.repeat(zp, block, 0)) * np.repeat(scale, block, 0)
    np.testing.assert_array_equal(w, exact.astype(np.float32))
    a = rng.standard_normal((5, k)).astype(np.float32)
    want = ort_run(source, {"a": a}, optimize=False)[0]
    close_to(ort_run(model, {"a": a})[0], want, EXACT_RTOL, EXACT_ATOL_REL, "DQ folded vs ORT")


# -- what cannot be mapped -------------------------------------------------------------------------
def nbits_weight_as_input() -> onnx.ModelProto:
    """A MatMulNBits whose packed weight B is a graph input, not an initializer."""
    q, _ = quantize_model(float_linear(), "int4")
    (node,) = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    b = next(t for t in q.graph.initializer if t.name == node.input[1])
    q.graph.input.append(helper.make_tensor_value_info(b.name, b.data_type, list(b.dims)))
    keep = [t for t in q.graph.initializer if t.name != b.name]
    del q.graph.initializer[:]
    q.graph.initializer.extend(keep)
    return q


def float_linear() -> onnx.ModelProto:
    rng = np.random.default_rng(10)
    w = numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_quantized_weights_that_are_not_constants_are_one_error_and_nothing_written(tmp_path):
    model = nbits_weight_as_input()
    with pytest.raises(CompileError, match="is not an initializer") as err:
        compile(model, "ascend", tmp_path / "art")
    assert "fix: store the quantized weights" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_unsupported_qmoe_form_is_named(tmp_path):
    q, _ = quantize_model(moe_lm(), "int4")
    (node,) = [n for n in q.graph.node if n.op_type == "QMoE"]
    keep = [a for a in node.attribute if a.name != "weights_prepacked"]
    del node.attribute[:]
    node.attribute.extend([*keep, helper.make_attribute("weights_prepacked", 1)])
    with pytest.raises(CompileError, match="weights_prepacked=1") as err:
        dequantize_weights(q)
    assert "fix:" in str(err.value)
    with pytest.raises(CompileError, match="weights_prepacked=1"):
        compile(q, "cambricon", tmp_path / "art")
    assert os.listdir(tmp_path) == []


def test_dequantize_weights_leaves_a_float_model_alone():
    model = float_linear()
    assert dequantize_weights(model) == (model, None)
    q, _ = quantize_model(model, "int8")
    out, summary = dequantize_weights(q, "float32")
    assert summary["ops"] == {"MatMulNBits": 1} and out is not q
    assert {n.op_type for n in out.graph.node} == {"MatMul"}
    x = np.random.default_rng(11).standard_normal((4, 64)).astype(np.float32)
    close_to(ort_run(out, {"x": x})[0], ort_run(q, {"x": x})[0], 1e-5, 1e-5, "int8 dequantized")


def test_ort_ops_in_the_default_domain_are_named(tmp_path):
    """ONNX Runtime GenAI's int4 decoders: once MatMulNBits is dequantized, what the vendor parser
    still cannot read (here ORT's default-domain SimplifiedLayerNormalization) is one error."""
    q, _ = quantize_model(float_linear(), "int4")
    q.graph.node.append(
        helper.make_node("SimplifiedLayerNormalization", ["y", "g"], ["z"], axis=-1, epsilon=1e-6)
    )
    q.graph.initializer.append(numpy_helper.from_array(np.ones(16, np.float32), "g"))
    del q.graph.output[:]
    q.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 16]))
    with pytest.raises(CompileError, match="ai.onnx::SimplifiedLayerNormalization") as err:
        compile(q, "ascend", tmp_path / "art")
    assert "MatMulNBits" not in str(err.value) and "fix:" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_qwen3_moe_tiny_int4_float16_handoff_matches_ort(tmp_path):
    """The built-in Qwen3-MoE decoder, int4 and float16: embedding, attention and head
    MatMulNBits, QMoE experts, all dequantized to float16 and the MoE blocks decomposed."""
    manifest, model, _ = handoff(
        "qwen3-moe-tiny", "cambricon", tmp_path / "art", quantize="int4", dtype="float16"
    )
    section = manifest["backend"]
    assert section["precision"]["flag"] == "precision_mode=force_float16"
    assert section["dequantized"]["ops"].keys() == {"GatherBlockQuantized", "MatMulNBits", "QMoE"}
    assert section["moe_decomposed"] == 2
    standard_only(model)
    quantized = onnx.load(os.path.join(tmp_path / "art", SOURCE_MODEL))
    ids = np.random.default_rng(12).integers(0, 100, (1, 7)).astype(np.int64)
    (want,) = ort_run(quantized, {"input_ids": ids})
    (got,) = ort_run(model, {"input_ids": ids})
    close_to(got, want, FP16_RTOL, DECODER_FP16_ATOL_REL, "qwen3-moe-tiny int4 fp16 hand-off")


def test_float16_moe_experts_stay_float16_through_the_decomposition(tmp_path):
    """--dtype float16 on a float MoE model: the expert weights are float16 initializers read
    through a Cast by the decomposed MoE (the router stays float32, as cast_weights keeps it);
    ORT on the package vs ORT on the float32 model (measured 6.3e-4 of max |y|)."""
    source = moe_lm()
    manifest, model, _ = handoff(source, "ascend", tmp_path / "art", dtype="float16")
    assert manifest["backend"]["moe_decomposed"] == 1
    assert manifest["backend"]["precision"]["flag"] == "--precision_mode=force_fp16"
    standard_only(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["fc1.fp16"] == types["fc2.fp16"] == TensorProto.FLOAT16
    assert types["router"] == TensorProto.FLOAT
    ids = np.arange(-5, 9).astype(np.int64)
    (want,) = ort_run(source, {"ids": ids})
    close_to(ort_run(model, {"ids": ids})[0], want, FP16_RTOL, FP16_ATOL_REL, "fp16 MoE")
