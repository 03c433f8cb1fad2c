"""``--dtype bfloat16|float16``: half-precision weights, float32 compute (issue 13, item 3).

References use the same rounded weights as the artifact (the float32 weights cast to bf16/fp16 and
back: ``cast_dtype.narrow``), so the only difference left is the order of float32 sums:

- the ONNX rewrite (``cast_weights``): ONNX Runtime on the rewritten graph equals NumPy on the
  rounded weights (1e-5), the rounding is NumPy/ml_dtypes' round-to-nearest-even, bit for bit;
- compiled models: PyTorch eager with its parameters rounded (the dense built-in ``mlp``), ONNX
  Runtime on the artifact's rewritten graph (the MoE built-in and the decoders, where the router
  stays float32), at each model's own tolerances (1e-4 abs / 1e-4 to 1e-3 rel);
- generated code: the GEMM and MoE kernels read the narrow weights and widen them in registers
  (bf16: ``vpmovzxwd`` + ``vpslld``; fp16: F16C ``vcvtph2ps``), checked in the assembly for an
  AVX2 and an AVX-512 target without running it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qiao.compiler.frontend.cast_dtype import cast_weights, narrow
from qiao.compiler.testing import assert_close, run_cli

DTYPES = ("bfloat16", "float16")
# compiled, never run: code for an AVX2-only host (CI) and an AVX-512 one (this host)
AVX2 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "num-cores": 2}
AVX512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512", "num-cores": 2}


def _layers_model(seed: int = 0):
    """MatMul (weight as B, and as A), Gemm (transB), Gather (embedding), a MoE router MatMul
    feeding com.microsoft::MoE's router input, and a small weight: what is narrowed and what
    stays float32."""
    rng = np.random.default_rng(seed)
    w = {
        "emb": rng.standard_normal((50, 32)),
        "w1": rng.standard_normal((32, 48)),
        "w2": rng.standard_normal((40, 48)),  # Gemm transB
        "wa": rng.standard_normal((16, 40)),  # MatMul A operand
        "small": rng.standard_normal((4, 4)),
    }
    w = {k: (v / np.sqrt(v.shape[-1])).astype(np.float32) for k, v in w.items()}  # O(1) outputs
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w1"], ["h"]),
        helper.make_node("Gemm", ["h", "w2"], ["g"], transB=1),
        helper.make_node("MatMul", ["wa", "g"], ["y"]),  # (16, 40) @ (40, 40)
        helper.make_node("MatMul", ["s", "small"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "layers",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [40]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 40]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4]),
        ],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model, w


def _layers_numpy(w: dict, ids, s, dtype: str | None):
    r = {
        k: (v if dtype is None or k == "small" else narrow(v, dtype).astype(np.float32))
        for k, v in w.items()
    }
    g = (r["emb"][ids] @ r["w1"]) @ r["w2"].T
    return {"y": r["wa"] @ g, "z": s @ r["small"]}


@pytest.mark.parametrize("dtype", DTYPES)
def test_cast_weights_rewrite_matches_numpy(dtype):
    import ml_dtypes
    import onnxruntime as ort

    model, w = _layers_model()
    before = model.SerializeToString()
    out, section = cast_weights(model, dtype)
    assert model.SerializeToString() == before, "cast_weights changed its input"
    onnx.checker.check_model(out)
    inits = {t.name: t for t in out.graph.initializer}
    onnx_type = {"bfloat16": TensorProto.BFLOAT16, "float16": TensorProto.FLOAT16}[dtype]
    short = {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    for name in ("emb", "w1", "w2", "wa"):
        t = inits[f"{name}.{short}"]
        assert t.data_type == onnx_type
        stored = np.frombuffer(t.raw_data, np.uint16)
        # round to nearest even, bit for bit (ml_dtypes / NumPy)
        want = w[name].astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
        np.testing.assert_array_equal(stored, want.view(np.uint16).ravel())
    assert inits["small"].data_type == TensorProto.FLOAT  # 16 elements: kept
    assert section["ops"] == {"Gather": 1, "Gemm": 1, "MatMul": 2}
    assert section["weights"] == dtype and section["compute"] == "float32"
    assert section["weight_bytes"][dtype] * 2 == section["weight_bytes"]["float32"]
    ids = np.random.default_rng(1).integers(0, 50, 40)
    s = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip(["y", "z"], sess.run(None, {"ids": ids, "s": s})))
    assert_close(got, _layers_numpy(w, ids, s, dtype), rtol=1e-4, atol=1e-5)
    # and the rounding matters: the float32 weights give a different result
    assert np.abs(got["y"] - _layers_numpy(w, ids, s, None)["y"]).max() > 1e-4


def _moe_model(h: int = 64, inter: int = 32, e: int = 8):
    """One ``com.microsoft::MoE`` (SwiGLU, interleaved, top-2) whose router is a MatMul of ``x``
    (reshaped on its way)."""
    from qiao.compiler import moe_op

    spec = moe_op.MoESpec(k=2, activation_type="swiglu", swiglu_fusion=1)
    weights = moe_op.random_weights(spec, e, h, inter, seed=3)
    model = moe_op.make_model(spec, weights)
    router = (np.random.default_rng(4).standard_normal((h, e)) / np.sqrt(h)).astype(np.float32)
    graph = model.graph
    kept = [i for i in graph.input if i.name != "logits"]
    del graph.input[:]
    graph.input.extend(kept)
    # router -> Reshape -> router_probs, as ONNX Runtime GenAI writes it: still the router
    graph.node.insert(0, helper.make_node("Reshape", ["router_out", "probs_shape"], ["logits"]))
    graph.node.insert(0, helper.make_node("MatMul", ["x", "router"], ["router_out"]))
    graph.initializer.append(numpy_helper.from_array(router, "router"))
    graph.initializer.append(numpy_helper.from_array(np.array([-1, e], np.int64), "probs_shape"))
    return model, spec, weights, router


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_experts_match_numpy(tmp_path, dtype):
    """The MoE experts stored and read in ``dtype`` (the router float32): qiao's grouped GEMM
    against the NumPy MoE reference (float64) on the rounded experts, at 1 token (GEMV), 9 and
    200 (about 50 an expert: the gate/up GEMM's token-lanes order in two or more passes, met by
    every group of 1 KB of weight rows in turn: ``lanes_sweep_kb``)."""
    from qiao.compiler import compile, moe_op

    model, spec, weights, router = _moe_model()
    sweeps = {"lanes_sweep_kb": 16, "lanes_group_kb": 1}
    artifact = compile(model, "cpu", tmp_path / "moe", dtype=dtype, moe_schedule=sweeps)
    section = artifact.manifest["dtype"]
    assert section["ops"] == {"MoE": 2} and section["kept_float32"] == ["router"]
    stored = {str(p.dtype) for p in _params(artifact) if p.ndim == 3}
    assert stored == {dtype}
    rounded = {k: narrow(v, dtype).astype(np.float32) for k, v in weights.items()}
    for tokens in (1, 9, 200):
        x = np.random.default_rng(tokens).standard_normal((tokens, 64)).astype(np.float32)
        want = moe_op.reference(spec, x, x @ router, rounded)
        assert_close(artifact.run({"x": x})["y"], want, rtol=1e-4, atol=1e-5)


def test_dtype_option_is_checked():
    from qiao.compiler.errors import QiaoError
    from qiao.compiler.options import CompileOptions

    assert CompileOptions.from_kwargs(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(QiaoError, match="dtype='int8'.*'bfloat16' or 'float16'"):
        CompileOptions.from_kwargs(dtype="int8")


# -- compiled models ------------------------------------------------------------------------------


def _params(artifact) -> list:
    from qiao.compiler.artifact import iter_params

    return list(iter_params(artifact.directory, artifact.manifest))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_builtin_matches_rounded_torch(tmp_path, dtype):
    import torch

    from qiao.compiler import compile
    from qiao.models import get_model

    artifact = compile("mlp", "cpu", tmp_path / "mlp", dtype=dtype)
    section = artifact.manifest["dtype"]
    assert section["ops"] == {"Gemm": 3} and section["note"].startswith(f"weights {dtype}")
    stored = sorted(str(p.dtype) for p in _params(artifact) if p.ndim == 2)
    assert stored == [dtype] * 3
    spec = get_model("mlp")
    module = spec.module.eval()
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 2:  # the Gemm weights; biases stay float32
                p.copy_(p.to(torch_dtype).float())
        expected = module(*spec.example_inputs).numpy()
    x = spec.example_inputs[0].numpy()
    got = artifact.run({spec.input_names[0]: x})[spec.output_names[0]]
    assert got.dtype == np.float32  # outputs keep their declared dtype
    assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("qwen3-moe-tiny", "bfloat16"),
        pytest.param(
            "qwen3-moe-tiny",
            "float16",
            marks=pytest.mark.full_tier("the bfloat16 case; fp16 experts: test_moe_experts_*"),
        ),
        pytest.param("qwen3-small", "bfloat16", marks=pytest.mark.slow),
        pytest.param(
            "qwen3-moe-small",
            "float16",
            marks=pytest.mark.full_tier("qwen3-moe-tiny bfloat16 and qwen3-small bfloat16"),
        ),
    ],
)
def test_builtin_validates_against_onnxruntime(tmp_path, name, dtype):
    """MoE experts and decoders: ONNX Runtime runs the artifact's rewritten graph (the same
    rounded weights, router float32) at the model's tolerances; the experts reach the grouped
    GEMM in ``dtype`` (MoE models), the artifact stores half the bytes."""
    from qiao.compiler.validate import validate

    report = validate(name, "cpu", output_dir=str(tmp_path / name), dtype=dtype)
    assert report.ok, report.format()
    assert [c.reference for c in report.comparisons][:1] == ["onnxruntime"]
    manifest = json.load(open(os.path.join(report.artifact, "manifest.json")))
    section = manifest["dtype"]
    assert section["weights"] == dtype
    assert section["ops"].get("MatMul", 0) >= 1
    if "moe" in name:
        assert section["ops"]["MoE"] >= 2
        routers = [n for n in section["kept_float32"] if "gate" in n]
        assert len(routers) == section["ops"]["MoE"] // 2  # one router per MoE layer
    sizes = section["weight_bytes"]
    assert sizes[dtype] * 2 == sizes["float32"]


def test_cli_dtype(tmp_path):
    out = tmp_path / "mlp-bf16"
    result = run_cli("compile", "mlp", "-o", str(out), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert "weights bfloat16, compute float32 with float32 accumulation: 3 Gemm" in result.stdout
    assert json.load(open(out / "manifest.json"))["dtype"]["weights"] == "bfloat16"
    # the bundle runtime (NumPy + tvm_ffi only) loads the bfloat16 weights too
    packed = run_cli("pack", str(out), "-o", str(tmp_path / "bundle"), "--with-reference")
    assert packed.returncode == 0, packed.stderr
    ran = subprocess.run(
        [sys.executable, str(tmp_path / "bundle" / "run.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0 and "PASS" in ran.stdout, ran.stdout + ran.stderr
    checked = run_cli("validate", "mlp", "-o", str(tmp_path / "v"), "--dtype", "float16")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "onnxruntime" in checked.stdout and "PASS" in checked.stdout
    bad = run_cli("compile", "mlp", "-o", str(tmp_path / "bad"), "--dtype", "int3")
    assert bad.returncode == 2 and "invalid choice: 'int3'" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()


# -- generated code -------------------------------------------------------------------------------


def _linear_kernel_asm(dtype: str, target: dict, k: int = 256, n: int = 512) -> str:
    """Assembly of the scheduled GEMM ``x[m, k] @ astype(w[k, n], float32)``, ``m`` symbolic,
    lowered by the pipeline's own prepare / legalize / schedule phases."""
    import tvm
    from tvm import relax

    from qiao.compiler.passes.fold_weight_casts import FoldWeightCasts
    from qiao.compiler.pipeline import legalize_passes
    from qiao.compiler.schedules import schedule_passes

    tgt = tvm.target.Target(target)
    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            wide = bb.emit(relax.op.astype(w, "float32"))
            out = bb.emit_output(relax.op.matmul(x, wide))
        bb.emit_func_output(out)
    passes = [
        FoldWeightCasts(gpu=False),
        *legalize_passes(tgt),
        *schedule_passes(tgt, {"use_tuning_db": False}),
    ]
    with tgt:
        mod = tvm.transform.Sequential(passes)(bb.get())
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1, "the cast was not folded into the GEMM kernel"
    func = funcs[0]
    assert f'"{dtype}"' in func.script(), "the kernel does not read the weight narrow"
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    return lib.mod.inspect_source("asm")


@pytest.mark.parametrize("target", [AVX2, AVX512], ids=["avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_widens_in_registers(dtype, target):
    asm = _linear_kernel_asm(dtype, target)
    assert "vfmadd231ps" in asm  # float32 FMAs: float32 accumulation
    if dtype == "float16":
        assert "vcvtph2ps" in asm  # F16C: fp16 -> fp32 per vector
    else:
        assert "vpmovzxwd" in asm and "vpslld" in asm  # bf16 -> fp32: zero-extend, shift 16
    if target == AVX2:
        assert "zmm" not in asm  # code for the target's features only


def test_moe_group_gemm_reads_bf16_experts():
    """The MoE grouped GEMM with bf16 experts: its weight buffer is bf16 and the CPU code widens
    it (shift) before float32 FMAs, on an AVX2 target."""
    import tvm

    from qiao.compiler.kernels.group_gemm import group_gemm_up
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules.moe_table import lookup

    cfg = MoEConfig(num_experts=4, hidden=64, inter=32, top_k=2, weight_dtype="bfloat16")
    tgt = tvm.target.Target(AVX2)
    func = group_gemm_up(cfg, lookup(tgt))
    assert 'W1: T.Buffer((T.int64(4), T.int64(64), T.int64(64)), "bfloat16")' in func.script()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    asm = lib.mod.inspect_source("asm")
    assert "vpslld" in asm and "vfmadd231ps" in asm and "zmm" not in asm


# -- float16 models as they are -------------------------------------------------------------------


def _mha_model(elem: int, heads: int = 4, head_size: int = 16, scale: float | None = None):
    """``com.microsoft::MultiHeadAttention`` as ONNX Runtime GenAI's CPU fp16 builder writes it:
    3-D query/key/value, an additive (B, H, S, T) attention_bias, no cache inputs."""
    hidden = heads * head_size
    attrs = {"num_heads": heads} | ({"scale": scale} if scale is not None else {})
    node = helper.make_node(
        "MultiHeadAttention",
        ["q", "k", "v", "", "", "bias"],
        ["y"],
        domain="com.microsoft",
        **attrs,
    )
    graph = helper.make_graph(
        [node],
        "mha",
        [
            helper.make_tensor_value_info("q", elem, ["B", "S", hidden]),
            helper.make_tensor_value_info("k", elem, ["B", "T", hidden]),
            helper.make_tensor_value_info("v", elem, ["B", "T", hidden]),
            helper.make_tensor_value_info("bias", elem, ["B", heads, "S", "T"]),
        ],
        [helper.make_tensor_value_info("y", elem, ["B", "S", hidden])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


@pytest.mark.parametrize(
    "elem, scale", [(TensorProto.FLOAT, None), (TensorProto.FLOAT16, 0.25)], ids=["fp32", "fp16"]
)
def test_multihead_attention_matches_onnxruntime(tmp_path, elem, scale):
    """float32 compute inside (float16 inputs widened, the output rounded once): within one
    float16 rounding (2^-11 relative) of ONNX Runtime and of NumPy in float64."""
    import onnxruntime as ort

    from qiao.compiler import compile

    model = _mha_model(elem, scale=scale)
    dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    rng = np.random.default_rng(0)
    b, s, t, h, d = 2, 3, 5, 4, 16
    feeds = {n: rng.standard_normal((b, m, h * d)).astype(dtype) for n, m in zip("qkv", (s, t, t))}
    mask = np.where(rng.random((b, 1, s, t)) < 0.3, -65504.0, 0.0)
    feeds["bias"] = np.broadcast_to(mask, (b, h, s, t)).astype(dtype)
    artifact = compile(model, "cpu", tmp_path / "mha")
    got = artifact.run(feeds)["y"]
    assert got.dtype == dtype
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)[0]
    f = {k: v.astype(np.float64) for k, v in feeds.items()}
    qh, kh, vh = (f[n].reshape(b, -1, h, d).transpose(0, 2, 1, 3) for n in "qkv")
    scores = qh @ kh.transpose(0, 1, 3, 2) * (scale or 1 / np.sqrt(d)) + f["bias"]
    p = np.exp(scores - scores.max(-1, keepdims=True))
    exact = ((p / p.sum(-1, keepdims=True)) @ vh).transpose(0, 2, 1, 3).reshape(b, s, h * d)
    tol = 2e-3 if dtype == np.float16 else 1e-5
    assert_close(got.astype(np.float64), exact, rtol=tol, atol=tol)
    assert_close(got.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol)


def test_float16_model_gemm_accumulates_in_float32(tmp_path):
    """A float16 model's MatMul (fp16 activations and weights) as it is: the weights stay float16
    in the artifact, the products accumulate in float32 and round once (within half an fp16 ulp
    of NumPy's float64 result; float16 accumulation over K = 512 would be ~10x further off)."""
    import onnxruntime as ort

    from qiao.compiler import compile

    k, n = 512, 256
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["m", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    artifact = compile(model, "cpu", tmp_path / "fp16")
    assert {str(p.dtype) for p in _params(artifact)} == {"float16"}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for m in (1, 7):
        x = rng.standard_normal((m, k)).astype(np.float16)
        got = artifact.run({"x": x})["y"]
        exact = x.astype(np.float64) @ w.astype(np.float64)
        assert got.dtype == np.float16
        ulp = np.abs(exact) * 2.0**-10 + 2.0**-24
        assert (np.abs(got - exact) <= 0.5 * ulp + 1e-6).all(), np.abs(got - exact).max()
        want = sess.run(None, {"x": x})[0]
        assert_close(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
