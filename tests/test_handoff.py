"""Hand-off backends (ascend, cambricon): the package the vendor compiler consumes, the exact
command, the vendor toolchain faked by scripts written here that record their arguments and write
the output, and the MoE decomposition checked against ONNX Runtime's com.microsoft::MoE."""

from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qiao.backends import get_backend
from qiao.backends.handoff import (
    PACKAGE_DIR,
    convert_opset,
    input_shapes,
)
from qiao.compiler import compile, load
from qiao.compiler.errors import CompileError, ToolchainMissing
from qiao.compiler.frontend import TensorSpec
from qiao.compiler.moe_op import MoESpec, decompose_model, make_node
from qiao.compiler.testing import assert_close, run_cli

HIDDEN, INTER, EXPERTS, TOP_K = 16, 12, 4, 2


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, ["CPUExecutionProvider"])
    return session.run(None, feeds)


def moe_model(
    activation="swiglu", attrs=None, bias=False, opset=17, seed=0, scale=1.0
) -> onnx.ModelProto:
    """x [tokens, H] → Linear → com.microsoft::MoE (router logits from a second Linear) → y."""
    rng = np.random.default_rng(seed)
    f1 = 2 * INTER if activation == "swiglu" else INTER

    def t(name, *shape, s=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    inits = [
        t("w_in", HIDDEN, HIDDEN),
        t("w_router", HIDDEN, EXPERTS, s=1.0),
        t("fc1", EXPERTS, f1, HIDDEN, s=scale),
        t("fc2", EXPERTS, HIDDEN, INTER),
    ]
    moe_inputs = ["h", "logits", "fc1", "b1", "fc2", "b2"]  # the biases only when ``bias``
    if bias:
        inits += [t("b1", EXPERTS, f1), t("b2", EXPERTS, HIDDEN)]
    attrs = dict(attrs or {})
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h"]),
        helper.make_node("MatMul", ["h", "w_router"], ["logits"]),
        make_node(
            MoESpec(k=TOP_K, activation_type=activation, fc1_bias=bias, fc2_bias=bias, **attrs),
            moe_inputs,
            "y",
            name="moe",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "moe_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", HIDDEN])],
        inits,
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    return model


MOE_CASES = {
    "swiglu-normalized": (
        "swiglu",
        {"swiglu_fusion": 1, "normalize_routing_weights": 1},
        False,
        17,
    ),
    "swiglu-limit-alpha-beta": (
        "swiglu",
        {
            "swiglu_fusion": 1,
            "activation_alpha": 1.702,
            "activation_beta": 1.0,
            "swiglu_limit": 2.0,  # small enough that the clamps bite with these weights
        },
        True,
        18,
    ),
    "relu-bias-opset12": ("relu", {}, True, 12),
    "gelu-normalized": ("gelu", {"normalize_routing_weights": 1}, False, 13),
    "silu": ("silu", {}, False, 15),
    "identity-opset11": ("identity", {}, True, 11),
}


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_decomposition_matches_onnxruntime(case):
    activation, attrs, bias, opset = MOE_CASES[case]
    model = moe_model(activation, attrs, bias, opset, scale=3.0)
    x = np.random.default_rng(1).standard_normal((9, HIDDEN)).astype(np.float32)
    (expected,) = ort_run(model, {"x": x})  # ONNX Runtime's fused contrib op: the reference
    decomposed = decompose_model(model)
    onnx.checker.check_model(decomposed, full_check=True)
    assert {n.domain for n in decomposed.graph.node} <= {""}
    assert [o.domain for o in decomposed.opset_import] == [""]
    (got,) = ort_run(decomposed, {"x": x})
    assert_close(got, expected, rtol=1e-5, atol=1e-5, name=case)
    if activation == "swiglu" and "swiglu_limit" in attrs:  # the limit changed the result
        unlimited = dict(attrs, swiglu_limit=1e9)
        (loose,) = ort_run(moe_model(activation, unlimited, bias, opset, scale=3.0), {"x": x})
        assert np.abs(loose - expected).max() > 1e-2
    converted = convert_opset(decomposed, 11, 15)  # what ATC reads
    (again,) = ort_run(converted, {"x": x})
    assert_close(again, expected, rtol=1e-5, atol=1e-5, name=f"{case} opset 11-15")


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"swiglu_fusion": 3}, "swiglu_fusion=3"),  # not defined by the op
        ({"swiglu_fusion": 0}, "swiglu_fusion=0"),  # separate gate/up, but no fc3 input
        ({"swiglu_fusion": 1, "use_sparse_mixer": 1}, "use_sparse_mixer=1"),
    ],
)
def test_moe_unsupported_forms_are_named(attrs, message):
    """The hand-off accepts what the op defines (swiglu_fusion 0/1/2, tests/test_moe_op.py) and
    names the value of what it does not, with the fix."""
    model = moe_model("swiglu", attrs)
    with pytest.raises(CompileError, match=message) as err:
        decompose_model(model)
    assert "fix:" in str(err.value)


def test_opset_conversion_fixes_reduce_ops():
    """opset 18 ReduceMean → 15: the version converter leaves noop_with_empty_axes behind; qiao
    drops it and the result still computes the same."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["y"]),
        ],
        "center",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [numpy_helper.from_array(np.array([-1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    converted = convert_opset(model, 11, 15)
    assert converted.opset_import[0].version == 15
    (reduce,) = [n for n in converted.graph.node if n.op_type == "ReduceMean"]
    assert "noop_with_empty_axes" not in {a.name for a in reduce.attribute}
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    assert_close(ort_run(converted, {"x": x})[0], x - x.mean(axis=-1, keepdims=True), 1e-6, 1e-6)
    assert convert_opset(converted, 11, 15) is converted  # in range: untouched


def test_input_shapes_fixed_ranged_or_any():
    specs = [TensorSpec("ids", "int64", ["batch", "seq"]), TensorSpec("mask", "bool", ["batch", 8])]
    shapes = input_shapes(specs, static_dims={"batch": 4}, dim_ranges={"seq": (1, 128)})
    assert [(s.name, s.dims) for s in shapes] == [("ids", ["4", "1~128"]), ("mask", ["4", "8"])]
    assert [s.dims for s in input_shapes(specs)] == [["-1", "-1"], ["-1", "8"]]
    assert shapes[1].static and not shapes[0].static


# -- fake vendor toolchains ------------------------------------------------------------------------
FAKE_ATC = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ATC_LOG"], "w") as f:
    json.dump({{"argv": args, "cwd": os.getcwd()}}, f)
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--"))
if not os.path.isfile(opts["model"]):
    sys.exit("ATC: model not found")
if os.environ.get("FAKE_ATC_FAIL"):
    print("E19999: Inner Error! fake failure", file=sys.stderr)
    sys.exit(1)
with open(opts["output"] + ".om", "wb") as f:
    f.write(b"fake om for " + opts["soc_version"].encode())
print("ATC run success")
"""


@pytest.fixture
def fake_atc(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    atc = bindir / "atc"
    atc.write_text(FAKE_ATC.format(python=sys.executable))
    atc.chmod(atc.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "atc-call.json"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ATC_LOG", str(log))
    return log


@pytest.fixture
def moe_onnx(tmp_path):
    path = tmp_path / "moe.onnx"
    onnx.save(moe_model("swiglu", {"swiglu_fusion": 1, "normalize_routing_weights": 1}), path)
    return str(path)


def test_ascend_runs_atc_with_the_exact_command(fake_atc, moe_onnx, tmp_path):
    art = compile(moe_onnx, "ascend", tmp_path / "art", arch="Ascend310P")
    section = art.manifest["backend"]
    assert section["status"] == "compiled" and section["output"] == "model.om"
    call = json.loads(fake_atc.read_text())
    assert call["argv"] == section["command"][1:]
    assert call["argv"] == [
        "--framework=5",
        "--model=model.onnx",
        "--output=../model",
        "--soc_version=Ascend310P3",
        "--input_format=ND",
        f"--input_shape=x:-1,{HIDDEN}",
        "--precision_mode=must_keep_origin_dtype",  # float32, as qiao validated it
    ]
    assert section["precision"]["compute"] == "float32" and section["dequantized"] is None
    # ATC ran inside the package, in the staging directory that then became the artifact.
    assert os.path.basename(call["cwd"]) == PACKAGE_DIR
    assert os.path.basename(os.path.dirname(call["cwd"])).startswith(".art.tmp-")
    with open(os.path.join(art.directory, "model.om"), "rb") as f:
        assert f.read() == b"fake om for Ascend310P3"
    assert "model.om" in art.manifest["files"]  # hashed like every artifact file
    # The package: standard ops only, ATC's opset, same numbers as ORT's fused MoE.
    package = onnx.load(os.path.join(art.directory, PACKAGE_DIR, "model.onnx"))
    assert {n.domain for n in package.graph.node} == {""}
    assert package.opset_import[0].version == 15 and section["moe_decomposed"] == 1
    x = np.random.default_rng(3).standard_normal((5, HIDDEN)).astype(np.float32)
    (expected,) = ort_run(onnx.load(moe_onnx), {"x": x})
    assert_close(ort_run(package, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    with open(os.path.join(art.directory, PACKAGE_DIR, "build.sh")) as f:
        script = f.read()
    assert f"--input_shape=x:-1,{HIDDEN}" in script and "--soc_version=Ascend310P3" in script
    with pytest.raises(ToolchainMissing, match="Ascend NPU"):  # no NPU here
        load(art.directory).run({"x": x})


def test_ascend_static_dims_fix_the_shape(fake_atc, moe_onnx, tmp_path):
    art = compile(moe_onnx, "ascend", tmp_path / "art", static_dims={"tokens": 8})
    assert f"--input_shape=x:8,{HIDDEN}" in json.loads(fake_atc.read_text())["argv"]
    assert "--soc_version=Ascend910B3" in art.manifest["backend"]["command"]
    package = onnx.load(os.path.join(art.directory, PACKAGE_DIR, "model.onnx"))
    dims = package.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [8, HIDDEN]


def test_atc_failure_leaves_nothing(fake_atc, moe_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ATC_FAIL", "1")
    with pytest.raises(CompileError, match="E19999"):
        compile(moe_onnx, "ascend", tmp_path / "art")
    assert not (tmp_path / "art").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".art")]


def test_atc_found_through_ascend_toolkit_home(tmp_path, monkeypatch):
    from qiao.backends.ascend import find_atc

    home = tmp_path / "ascend-toolkit" / "latest"
    (home / "bin").mkdir(parents=True)
    atc = home / "bin" / "atc"
    atc.write_text("#!/bin/sh\n")
    atc.chmod(0o755)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(home))
    assert find_atc() == str(atc)
    assert get_backend("ascend").availability().can_compile


@pytest.fixture
def no_vendor_toolchains(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        monkeypatch.delenv(var, raising=False)
    if os.path.isdir("/usr/local/Ascend"):
        pytest.skip("CANN is installed here")


def test_without_atc_the_package_is_complete_and_the_stop_is_clear(
    no_vendor_toolchains, moe_onnx, tmp_path
):
    backend = get_backend("ascend")
    assert backend.availability().status.startswith("toolchain missing")
    # compile() writes the complete package, then stops: the toolchain is missing.
    with pytest.raises(ToolchainMissing) as err:
        compile(moe_onnx, "ascend", tmp_path / "art")
    art = load(tmp_path / "art")
    section = art.manifest["backend"]
    assert section["status"] == "handoff-only" and section["output"] is None
    package = os.path.join(art.directory, PACKAGE_DIR)
    assert sorted(os.listdir(package)) == ["README.md", "build.sh", "model.onnx"]
    assert os.access(os.path.join(package, "build.sh"), os.X_OK)
    assert "CANN" in str(err.value) and package in str(err.value)
    with pytest.raises(ToolchainMissing, match="hand-off package only"):
        load(art.directory).run({"x": np.zeros((2, HIDDEN), np.float32)})


def test_cli_without_atc_exits_2_and_keeps_the_package(no_vendor_toolchains, moe_onnx, tmp_path):
    # Needs compile() to call Backend.after_write once the artifact is in place (driver change).
    out = tmp_path / "art"
    proc = run_cli("compile", moe_onnx, "--target", "ascend", "-o", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "CANN" in proc.stderr
    assert os.path.isfile(out / PACKAGE_DIR / "build.sh")
    assert json.loads((out / "manifest.json").read_text())["backend"]["status"] == "handoff-only"


# -- Cambricon: MagicMind is a Python library; the fake is a package that records its calls --------
FAKE_MAGICMIND = """
import json, os

LOG = os.environ["FAKE_MM_LOG"]


def record(**kw):
    calls = json.load(open(LOG)) if os.path.exists(LOG) else []
    calls.append(kw)
    json.dump(calls, open(LOG, "w"))


class Status:
    def ok(self):
        return True


class ModelKind:
    kOnnx = "onnx"


class Dims:
    def __init__(self, dims):
        self.dims = list(dims)


class _Input:
    def __init__(self, index):
        self.index = index

    def set_dimension(self, dims):
        record(call="set_dimension", index=self.index, dims=dims.dims)
        return Status()


class Network:
    def get_input(self, index):
        return _Input(index)


class BuilderConfig:
    def parse_from_string(self, text):
        record(call="config", config=json.loads(text))
        return Status()


class _Model:
    def serialize_to_file(self, path):
        record(call="serialize", path=path)
        with open(path, "wb") as f:
            f.write(b"fake magicmind model")
        return Status()


class Builder:
    def build_model(self, name, network, config):
        record(call="build_model", name=name)
        return _Model()
"""

FAKE_PARSER = """
import os
from magicmind.python.runtime import Status, record


class Parser:
    def __init__(self, kind):
        self.kind = kind

    def parse(self, network, path):
        name, exists = os.path.basename(path), os.path.isfile(path)
        record(call="parse", kind=self.kind, path=name, exists=exists)
        return Status()
"""


@pytest.fixture
def fake_magicmind(tmp_path, monkeypatch):
    site = tmp_path / "site"
    runtime = site / "magicmind" / "python" / "runtime"
    runtime.mkdir(parents=True)
    (site / "magicmind" / "__init__.py").write_text("")
    (site / "magicmind" / "python" / "__init__.py").write_text("")
    (runtime / "__init__.py").write_text(FAKE_MAGICMIND)
    (runtime / "parser.py").write_text(FAKE_PARSER)
    log = tmp_path / "mm-calls.json"
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("FAKE_MM_LOG", str(log))
    return log


def test_cambricon_builds_with_magicmind(fake_magicmind, moe_onnx, tmp_path):
    backend = get_backend("cambricon")
    assert backend.availability().status.startswith("compiles only")  # MagicMind, no MLU
    art = compile(
        moe_onnx, "cambricon", tmp_path / "art", arch="mlu590", dim_ranges={"tokens": (1, 64)}
    )
    section = art.manifest["backend"]
    assert section["status"] == "compiled" and section["command"] == [
        "python3",
        "build_magicmind.py",
    ]
    calls = json.loads(fake_magicmind.read_text())
    assert [c["call"] for c in calls] == [
        "parse",
        "set_dimension",
        "config",
        "build_model",
        "serialize",
    ]
    assert calls[0] == {"call": "parse", "kind": "onnx", "path": "model.onnx", "exists": True}
    assert calls[1]["dims"] == [-1, HIDDEN]
    assert calls[2]["config"] == {
        "archs": ["mtp_592"],
        "graph_shape_mutable": True,
        "precision_config": {"precision_mode": "force_float32"},
        "dim_range": {"0": {"min": [1, HIDDEN], "max": [64, HIDDEN]}},
    }
    with open(os.path.join(art.directory, "model.mm"), "rb") as f:
        assert f.read() == b"fake magicmind model"
    package = onnx.load(os.path.join(art.directory, PACKAGE_DIR, "model.onnx"))
    assert {n.domain for n in package.graph.node} == {""}


def test_cambricon_without_magicmind_writes_the_package(moe_onnx, tmp_path):
    backend = get_backend("cambricon")
    if backend.availability().can_run or not backend.availability().handoff_only:
        pytest.skip("MagicMind is installed here")
    with pytest.raises(ToolchainMissing, match="MagicMind"):
        compile(moe_onnx, "cambricon", tmp_path / "art")
    art = load(tmp_path / "art")
    package = os.path.join(art.directory, PACKAGE_DIR)
    assert sorted(os.listdir(package)) == [
        "README.md",
        "build.sh",
        "build_config.json",
        "build_magicmind.py",
        "model.onnx",
    ]
    with open(os.path.join(package, "build_config.json")) as f:
        assert json.load(f)["builder_config"]["archs"] == ["mtp_372"]
