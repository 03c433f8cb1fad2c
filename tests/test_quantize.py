"""``--quantize int4|int8`` (``compiler/quantize.py``): round-to-nearest weight-only quantization
written as ONNX Runtime's MatMulNBits / QMoE / GatherBlockQuantized.

What is checked, and against what:

- ``quantize_rows``: every weight is within half a step (asymmetric) or one step (symmetric: the
  one code past the largest magnitude clips) of its value, recomputed here from the codes;
  ``pack_codes`` is undone by the importer's ``unpack_codes``.
- The rewritten graph: ONNX Runtime on the quantized graph against ONNX Runtime on the float graph
  whose weights are replaced by their dequantized values (fake quantization, computed here from
  ``quantize_rows``' codes; its MoE node decomposed by ``moe_op.decompose_model``, as ONNX
  Runtime's CPU MoE takes interleaved SwiGLU only): same numbers up to float32 summation order
  (1e-4 / 1e-4; measured <= 5e-7). That checks the packing, layouts, the SwiGLU row
  interleaving, Gemm's bias and the router kept float.
- qiao on the quantized graph against ONNX Runtime on it (1e-4 / 1e-4; measured <= 2e-6); the
  error against the float model is reported by ``validate`` (not a verdict).
- Built-in models end to end (slow): ``transformer``, ``qwen3-moe-tiny`` and the decoder
  ``qwen3-small`` compile with ``quantize="int4"`` and validate against ONNX Runtime on the
  quantized graph at the models' own tolerances.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from qiao.compiler import compile, load, moe_op
from qiao.compiler.errors import QiaoError
from qiao.compiler.frontend.convert_quant import unpack_codes
from qiao.compiler.quantize import QuantScheme, pack_codes, quantize_model, quantize_rows
from qiao.compiler.testing import assert_close, run_cli

RTOL = ATOL = 1e-4
V, H, E, I_ = 40, 64, 4, 32  # vocabulary, hidden, experts, expert intermediate size


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_to_nearest_bound(bits, symmetric):
    rng = np.random.default_rng(bits + symmetric)
    w = rng.standard_normal((5, 80)).astype(np.float32)  # 80 = 2.5 blocks of 32: padded
    w[0, :32] = 0.0  # an all-zero block
    codes, scales, zp = quantize_rows(w, bits, 32, symmetric)
    assert codes.shape == (5, 96) and scales.shape == (5, 3) and codes.max() < (1 << bits)
    assert (zp is None) == symmetric
    zero = np.full(scales.shape, 1 << (bits - 1)) if symmetric else zp
    deq = (codes.reshape(5, 3, 32) - zero[..., None].astype(np.float64)) * scales[..., None]
    deq = deq.reshape(5, 96)[:, :80]
    step = np.repeat(np.abs(scales), 32, axis=1)[:, :80].astype(np.float64)
    err = np.abs(deq - w)
    assert (err <= step * (1.0 if symmetric else 0.5) + 1e-6).all()
    assert (deq[0, :32] == 0).all()
    if symmetric:  # the block's largest magnitude is exactly representable
        blocks = np.pad(w, ((0, 0), (0, 16))).reshape(5, 3, 32)
        at = np.abs(blocks).argmax(-1)
        picked = np.take_along_axis(blocks, at[..., None], -1)[..., 0]
        padded = np.pad(deq, ((0, 0), (0, 16))).reshape(5, 3, 32)
        got = np.take_along_axis(padded, at[..., None], -1)[..., 0].astype(np.float32)
        assert_close(got, picked, rtol=1e-6, atol=0, name="extremes")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_is_undone_by_the_importer(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (3, 2, 37)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 2, -(-37 * bits // 8))
    np.testing.assert_array_equal(unpack_codes(packed, bits, 37), codes)


def test_scheme_option():
    from qiao.compiler.options import CompileOptions

    assert QuantScheme.parse("int4") == QuantScheme(4, 32, False)
    assert QuantScheme.parse({"bits": 8, "block_size": 64, "symmetric": True}).block_size == 64
    for bad in ("int3", {"bits": 4, "block_size": 24}, {"bits": 5}, {"group": 32}, 4):
        with pytest.raises(QiaoError, match=r"compile option quantize=.*fix:"):
            CompileOptions.from_kwargs(quantize=bad)


def _model(layout: str, seed: int = 0) -> onnx.ModelProto:
    """ids -> embedding Gather -> MatMul -> Gemm (transB, bias) -> MoE (SwiGLU, ``layout``, biases,
    router a Gemm) -> output. Float32, seeded."""
    rng = np.random.default_rng(seed)
    fusion = {"separate": 0, "interleaved": 1, "concat": 2}[layout]
    spec = moe_op.MoESpec(
        k=2, activation_type="swiglu", normalize_routing_weights=1, swiglu_fusion=fusion
    )
    weights = moe_op.random_weights(spec, E, H, I_, seed=seed, bias=True)
    inits = {
        "table": rng.standard_normal((V, H)),
        "w1": rng.standard_normal((H, H)) / 8,
        "w2": rng.standard_normal((H, H)) / 8,  # Gemm B, transB=1: [N, K]
        "c2": rng.standard_normal(H) / 8,
        "router": rng.standard_normal((E, H)) / 8,
        **weights,
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["x0"], axis=0),
        helper.make_node("MatMul", ["x0", "w1"], ["x1"]),
        helper.make_node("Gemm", ["x1", "w2", "c2"], ["x2"], transB=1, beta=0.5),
        helper.make_node("Gemm", ["x2", "router"], ["logits"], transB=1),
        moe_op.make_node(spec.with_inputs(weights), ("x2", "logits", *moe_op.WEIGHT_KEYS), "y"),
    ]
    graph = helper.make_graph(
        nodes,
        "quantize_me",
        [helper.make_tensor_value_info("ids", TP.INT64, ["t"])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["t", H])],
        initializer=[
            numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()
        ],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _fake_quant(w_nk: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """``w_nk`` [..., N, K] replaced by its dequantized value (from the codes, here)."""
    k = w_nk.shape[-1]
    codes, scales, zp = quantize_rows(w_nk, bits, block, symmetric)
    zero = (1 << (bits - 1)) if zp is None else zp[..., None].astype(np.float64)
    blocks = codes.reshape(*scales.shape, -1).astype(np.float64)
    return ((blocks - zero) * scales[..., None]).reshape(*w_nk.shape[:-1], -1)[..., :k]


def _fake_quant_model(model: onnx.ModelProto, scheme: QuantScheme, expert_block: int):
    s = scheme
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    fq = {
        "table": _fake_quant(inits["table"], s.bits, s.block_size, s.symmetric),
        "w1": _fake_quant(inits["w1"].T, s.bits, s.block_size, s.symmetric).T,
        "w2": _fake_quant(inits["w2"], s.bits, s.block_size, s.symmetric),
    }
    for fc in ("fc1", "fc2", "fc3"):  # per-row quantization: the SwiGLU row order is irrelevant
        if fc in inits:
            fq[fc] = _fake_quant(inits[fc], s.bits, expert_block, s.symmetric)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in fq:
            t.CopyFrom(numpy_helper.from_array(fq[t.name].astype(np.float32), t.name))
    return out


def _ort(model: onnx.ModelProto, feeds) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


FEEDS = {"ids": np.array([0, 7, 39, 3, 12, 7, 25], np.int64)}


@pytest.mark.parametrize(
    "layout,scheme",
    [
        ("separate", {"bits": 4, "block_size": 32, "symmetric": False}),
        ("concat", {"bits": 4, "block_size": 16, "symmetric": True}),
        ("interleaved", {"bits": 8, "block_size": 32, "symmetric": False}),
        ("concat", {"bits": 8, "block_size": 64, "symmetric": True}),
    ],
)
def test_quantized_graph_is_the_fake_quantized_model(layout, scheme):
    model = _model(layout)
    quantized, summary = quantize_model(model, scheme)
    ops = {n.op_type for n in quantized.graph.node}
    assert {"MatMulNBits", "QMoE", "GatherBlockQuantized"} <= ops and "MoE" not in ops
    assert summary["ops"] == {"GatherBlockQuantized": 1, "MatMulNBits": 2, "QMoE": 1}
    assert summary["kept_float"] == ["router (MoE router)"]
    names = {t.name for t in quantized.graph.initializer}
    assert not names & {"table", "w1", "w2", "fc1", "fc2", "fc3"}  # float copies dropped
    qmoe = next(n for n in quantized.graph.node if n.op_type == "QMoE")
    fusion = next(a for a in qmoe.attribute if a.name == "swiglu_fusion")
    assert helper.get_attribute_value(fusion) == 1  # the layout ONNX Runtime's CPU kernel runs
    expert_block = summary["experts"]["block_size"] or 0
    assert expert_block == (scheme["block_size"] if scheme["bits"] == 4 else 0)
    # ONNX Runtime's CPU MoE runs interleaved SwiGLU only: the float graphs run decomposed.
    fake = _fake_quant_model(model, QuantScheme.parse(scheme), expert_block)
    want = _ort(moe_op.decompose_model(fake), FEEDS)
    got = _ort(quantized, FEEDS)
    assert_close(got, want, RTOL, ATOL, "quantized graph vs fake-quantized float graph")
    float_out = _ort(moe_op.decompose_model(model), FEEDS)
    assert np.abs(got - float_out).max() > 1e-5  # quantization did change the numbers


def test_nothing_to_quantize():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [2])],
    )
    with pytest.raises(QiaoError, match="no weight to quantize.*fix:"):
        quantize_model(helper.make_model(graph), "int8")


def test_cli_validate_quantized(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model("interleaved", seed=2), path)
    result = run_cli(
        "validate", str(path), "--quantize", "int8", "--symmetric", "-o", str(tmp_path / "a"),
        "--inputs", str(_save_inputs(tmp_path)),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
    assert "quantized weights vs the float model, float onnxruntime" in result.stdout
    # The artifact on its own: the scheme in the manifest, qiao vs ONNX Runtime on the quantized
    # graph it keeps.
    artifact = load(tmp_path / "a")
    q = artifact.manifest["quantization"]
    assert (q["bits"], q["block_size"], q["symmetric"]) == (8, 32, True)
    assert q["ops"] == {"GatherBlockQuantized": 1, "MatMulNBits": 2, "QMoE": 1}
    assert q["experts"] == {"bits": 8, "block_size": None}
    source = onnx.load(str(tmp_path / "a" / "model.onnx"))
    assert {"QMoE", "MatMulNBits"} <= {n.op_type for n in source.graph.node}
    got = artifact.run(FEEDS)["y"]
    assert_close(got, _ort(source, FEEDS), RTOL, ATOL, "qiao vs ONNX Runtime, quantized graph")


def _save_inputs(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, **FEEDS)  # token ids in range (random int inputs would be too)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,float_reference",
    [
        ("transformer", "float torch"),
        ("qwen3-moe-tiny", "float torch"),
        ("qwen3-small", "float onnxruntime"),  # a GenAI-layout decoder (KV cache outputs)
    ],
)
def test_builtin_models_end_to_end(tmp_path, name, float_reference):
    from qiao.compiler.validate import validate

    report = validate(name, "cpu", output_dir=str(tmp_path / "a"), quantize="int4")
    assert report.ok, report.format()
    assert {c.reference for c in report.comparisons} == {"onnxruntime"}
    assert report.vs_float and {c.reference for c in report.vs_float} == {float_reference}


def test_float16_model(tmp_path):
    """A float16 model quantizes with float16 scales (ONNX Runtime's contract: scales of A's type)
    and compiles to the same numbers as ONNX Runtime on the quantized graph, within a few float16
    steps (1e-2 relative and absolute; measured 4.9e-3 on outputs up to 2.7)."""
    rng = np.random.default_rng(16)
    w = (rng.standard_normal((64, 48)) / 8).astype(np.float16)
    table = rng.standard_normal((20, 64)).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["x"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "fp16",
        [helper.make_tensor_value_info("ids", TP.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TP.FLOAT16, ["n", 48])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    quantized, summary = quantize_model(model, "int4")
    assert summary["ops"] == {"GatherBlockQuantized": 1, "MatMulNBits": 1}
    scales = [t for t in quantized.graph.initializer if t.name.endswith("_scales")]
    assert scales and all(t.data_type == TP.FLOAT16 for t in scales)
    feeds = {"ids": np.array([1, 5, 19, 0], np.int64)}
    got = compile(quantized, "cpu", tmp_path / "a").run(feeds)["y"]
    assert got.dtype == np.float16
    assert_close(got, _ort(quantized, feeds), 1e-2, 1e-2, "float16, qiao vs ONNX Runtime")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matmul_weights_equal_onnxruntime_quantizer(bits, symmetric):
    """A MatMul weight quantized here is bit for bit what ONNX Runtime's own MatMulNBitsQuantizer
    (round to nearest, MLAS) writes: codes, scales and zero points, K padded to whole blocks."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    w = np.random.default_rng(bits).standard_normal((80, 40)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("a", TP.FLOAT, ["m", 80])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["m", 40])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    mine, _ = quantize_model(model, {"bits": bits, "block_size": 32, "symmetric": symmetric})
    theirs = onnx.ModelProto()
    theirs.CopyFrom(model)  # the quantizer rewrites the model it is given
    config = DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=symmetric, accuracy_level=0, bits=bits
    )
    quantizer = MatMulNBitsQuantizer(theirs, algo_config=config)
    quantizer.process()
    nodes = [m.graph.node[0] for m in (mine, quantizer.model.model)]
    assert [n.op_type for n in nodes] == ["MatMulNBits", "MatMulNBits"]
    arrays = []
    for m, node in zip((mine, quantizer.model.model), nodes):
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        arrays.append([inits[name].reshape(-1) for name in node.input[1:] if name])
    assert len(arrays[0]) == len(arrays[1]) == (3 if not symmetric else 2)
    for ours, ort_own in zip(*arrays):
        np.testing.assert_array_equal(ours, ort_own)


def test_accuracy_level_4(tmp_path):
    """``--quantize int4 --accuracy-level 4`` writes ``MatMulNBits`` at level 4 (int8 activations,
    the form ONNX Runtime GenAI's int4 builder writes) and compiles to qiao's integer-dot kernel:
    qiao and ONNX Runtime on that graph, and each against the exact level-0 result, agree within
    2 % of max|y| (level 4 quantizes the activations per block; about 1 % measured for both)."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((256, 64)) / 16).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["n", 256])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["n", 64])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((5, 256)).astype(np.float32)}
    exact = compile(model, "cpu", tmp_path / "l0", quantize="int4").run(feeds)["y"]
    artifact = compile(model, "cpu", tmp_path / "l4", quantize={"bits": 4, "accuracy_level": 4})
    assert artifact.manifest["quantization"]["accuracy_level"] == 4
    source = onnx.load(str(tmp_path / "l4" / "model.onnx"))
    (node,) = [n for n in source.graph.node if n.op_type == "MatMulNBits"]
    assert (
        helper.get_attribute_value(next(a for a in node.attribute if a.name == "accuracy_level"))
        == 4
    )
    got, ref = artifact.run(feeds)["y"], _ort(source, feeds)
    scale = float(np.abs(exact).max())
    for name, value in (("qiao level 4", got), ("ONNX Runtime level 4", ref)):
        err = float(np.abs(value - exact).max())
        assert 0 < err < 0.02 * scale, f"{name} vs exact: {err} (max|y| {scale})"
    assert float(np.abs(got - ref).max()) < 0.02 * scale
    with pytest.raises(QiaoError, match="accuracy_level=7"):
        QuantScheme.parse({"bits": 4, "accuracy_level": 7})
    # the CLI flag reaches the scheme
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = run_cli(
        "compile", str(path), "--quantize", "int4", "--accuracy-level", "4",
        "-o", str(tmp_path / "cli"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accuracy_level 4" in result.stdout
