"""Bad input: one clear message, the right exit code, no traceback, no artifact left behind."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qiao.compiler import (
    ArtifactCorrupt,
    InputMismatch,
    InvalidModel,
    UnknownTarget,
    UnsupportedOps,
    compile,
    load,
)
from qiao.compiler.testing import run_cli


def _unsupported_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu0"),
        helper.make_node("FancyOp", ["a"], ["b"], name="fancy_a", domain="my.domain"),
        helper.make_node("FancyOp", ["b"], ["c"], name="fancy_b", domain="my.domain"),
        helper.make_node("OtherOp", ["c"], ["y"], name="other_1", domain="my.domain"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)]
    )
    onnx.save(model, path)
    return path


def _assert_clean_failure(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_not_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a protobuf at all \x00\x01")
    with pytest.raises(InvalidModel):
        compile(bad, "cpu", tmp_path / "out")
    proc = run_cli("compile", str(bad), "-o", str(tmp_path / "out"))
    _assert_clean_failure(proc, 2, "bad.onnx", "fix:")
    assert not (tmp_path / "out").exists()


def test_truncated_onnx_file(tmp_path, compiled_builtin):
    src = os.path.join(compiled_builtin("mlp").directory, "model.onnx")
    data = open(src, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    proc = run_cli("compile", str(cut), "-o", str(tmp_path / "out"))
    _assert_clean_failure(proc, 2, "cut.onnx")
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")], "staging dir left behind"


def test_unsupported_ops_listed_with_node_names(tmp_path):
    path = _unsupported_model(tmp_path / "u.onnx")
    with pytest.raises(UnsupportedOps) as info:
        compile(path, "cpu", tmp_path / "out")
    assert set(info.value.ops) == {"my.domain::FancyOp", "my.domain::OtherOp"}
    assert info.value.ops["my.domain::FancyOp"] == ["fancy_a", "fancy_b"]
    proc = run_cli("compile", str(path), "-o", str(tmp_path / "out"))
    _assert_clean_failure(proc, 2, "FancyOp", "fancy_a", "OtherOp", "other_1")
    assert not (tmp_path / "out").exists()


def test_unknown_target_lists_known(tmp_path):
    with pytest.raises(UnknownTarget):
        compile("mlp", "tpu9000", tmp_path / "out")
    proc = run_cli("compile", "mlp", "--target", "tpu9000", "-o", str(tmp_path / "out"))
    _assert_clean_failure(proc, 2, "tpu9000", "cpu")
    assert not (tmp_path / "out").exists()


def test_unknown_model_name(tmp_path):
    proc = run_cli("compile", "no-such-model", "-o", str(tmp_path / "out"))
    _assert_clean_failure(proc, 2, "no-such-model", "mlp")


def test_run_time_input_errors(compiled_builtin, tmp_path):
    artifact = compiled_builtin("mlp")
    good = np.zeros((3, 64), np.float32)
    with pytest.raises(InputMismatch, match="missing input.*'x'"):
        artifact.run({})
    with pytest.raises(InputMismatch, match="'x'.*dtype float32.*float64"):
        artifact.run({"x": good.astype(np.float64)})
    with pytest.raises(InputMismatch, match=r"'x'.*\(batch, 64\).*\(3, 65\)"):
        artifact.run({"x": np.zeros((3, 65), np.float32)})
    with pytest.raises(InputMismatch, match="rank"):
        artifact.run({"x": np.zeros((64,), np.float32)})
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 65), np.float32))
    proc = run_cli("run", artifact.directory, "--inputs", str(tmp_path / "bad.npz"))
    _assert_clean_failure(proc, 2, "'x'", "(3, 65)")


def test_modified_artifact_refused(tmp_path):
    artifact = compile("mlp", "cpu", tmp_path / "a")
    with open(os.path.join(artifact.directory, "params.npz"), "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(ArtifactCorrupt, match="modified: params.npz"):
        load(artifact.directory)
    proc = run_cli("run", artifact.directory)
    _assert_clean_failure(proc, 2, "params.npz", "recompile")


def test_unknown_format_version_refused(tmp_path):
    artifact = compile("mlp", "cpu", tmp_path / "a")
    manifest_path = os.path.join(artifact.directory, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["format_version"] = 999
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(ArtifactCorrupt, match="format version 999"):
        load(artifact.directory)


def test_failed_compile_keeps_previous_artifact(tmp_path):
    out = tmp_path / "a"
    compile("mlp", "cpu", out)
    before = sorted(os.listdir(out))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(InvalidModel):
        compile(bad, "cpu", out)
    assert sorted(os.listdir(out)) == before
    load(out)  # still intact


def test_debug_shows_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    proc = run_cli("--debug", "compile", str(bad), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
