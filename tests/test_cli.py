"""End-to-end CLI in a subprocess: compile, run, validate, targets, models, --help, --version."""

from __future__ import annotations

import json

import numpy as np

from qiao.compiler import load
from qiao.compiler.testing import assert_close, run_cli


def test_version_and_help():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("qiao ")
    for cmd in ["compile", "run", "validate", "targets", "models"]:
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0, (cmd, proc.stderr)
        assert "usage: qiao" in proc.stdout


def test_models_and_targets():
    proc = run_cli("models")
    assert proc.returncode == 0
    for name in ("mlp", "cnn", "transformer"):
        assert name in proc.stdout
    proc = run_cli("targets", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["cpu"]["status"] == "ready"


def test_compile_run_validate_roundtrip(tmp_path):
    out = tmp_path / "mlp-art"
    proc = run_cli("compile", "mlp", "--target", "cpu", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}]
    assert manifest["target"]["kind"] == "llvm"
    assert set(manifest["files"]) >= {"model.so", "params.npz", "model.onnx"}

    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    proc = run_cli(
        "run", str(out), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")
    )
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "out.npz")["logits"]
    assert_close(got, load(out).run({"x": x})["logits"], rtol=0, atol=0)

    proc = run_cli("run", str(out), "--dim", "batch=3")
    assert proc.returncode == 0 and "logits: float32[3, 10]" in proc.stdout

    proc = run_cli("validate", str(out), "--inputs", str(tmp_path / "in.npz"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "onnxruntime" in proc.stdout and "torch" in proc.stdout and "PASS" in proc.stdout


def test_validate_mismatch_exits_1(tmp_path):
    # An impossible tolerance turns float rounding differences into a reported mismatch.
    proc = run_cli(
        "validate", "transformer", "-o", str(tmp_path / "t"), "--rtol", "0", "--atol", "0"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "MISMATCH" in proc.stdout and "FAIL" in proc.stdout


def test_default_output_dir(tmp_path):
    proc = run_cli("compile", "mlp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mlp-cpu" / "manifest.json").is_file()
