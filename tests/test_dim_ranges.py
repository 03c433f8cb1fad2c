"""``dim_ranges`` on the TVM backends: ``main``'s symbolic dims bounded for memory planning
(``BoundSymbolicDims``), recorded in the manifest, and inputs outside the range refused."""

from __future__ import annotations

import json
import re

import pytest

from qiao.compiler import compile
from qiao.compiler.errors import QiaoError
from qiao.compiler.testing import assert_close, has_nvcc, run_cli


def _storages(dump_dir) -> list[str]:
    """The size arguments of ``main``'s ``alloc_storage`` calls in the finalized IR."""
    text = (dump_dir / "07-finalize.py").read_text()
    main = text[text.index("    def main(") :]
    return re.findall(r"R\.vm\.alloc_storage\((.*?), 0, R\.dtype", main)


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    """The built-in ``cnn`` compiled for the CPU with and without ``batch`` in 1..4."""
    root = tmp_path_factory.mktemp("dim-ranges")
    art = compile(
        "cnn", "cpu", root / "bounded", dim_ranges={"batch": (1, 4)}, dump_ir=str(root / "b")
    )
    free = compile("cnn", "cpu", root / "free", dump_ir=str(root / "f"))
    return art, free, root


def test_bounded_batch_plans_storage_once_for_the_largest(bounded):
    """With the bound every storage of ``main`` but the outputs' (fresh on every call) has a
    static size, and layers share them (fewer storages); without it each size depends on
    ``batch`` (``make_shape``)."""
    art, free, root = bounded
    assert art.manifest["dim_ranges"] == {"batch": [1, 4]}
    assert "dim_ranges" not in free.manifest
    sized = _storages(root / "b")
    outputs = len(art.outputs)
    assert sum(not s.startswith("R.shape([") for s in sized) <= outputs, sized
    unsized = _storages(root / "f")
    assert sum(not s.startswith("R.shape([") for s in unsized) > outputs, unsized
    assert len(sized) < len(unsized)


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_bounded_artifact_matches_onnxruntime(bounded, batch):
    """Outputs within the range equal the unbounded artifact's and ONNX Runtime's (float32
    convolutions: 1e-4)."""
    import onnxruntime as ort

    art, free, _ = bounded
    inputs = art.random_inputs(batch, {"batch": batch})
    got = art.run(inputs)
    session = ort.InferenceSession(
        f"{art.directory}/model.onnx", providers=["CPUExecutionProvider"]
    )
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
    for name, value in got.items():
        assert value.shape[0] == batch
        assert_close(value, want[name], rtol=1e-4, atol=1e-4, name=name)
        assert_close(value, free.run(inputs)[name], rtol=1e-5, atol=1e-5, name=name)


def test_inputs_outside_the_range_are_refused(bounded):
    art, _, _ = bounded
    assert art.random_inputs(0)[art.inputs[0]["name"]].shape[0] == 2  # default size, in range
    for batch in (5, 0):
        with pytest.raises(QiaoError, match=r"outside the range 1\.\.4.*--dim-range batch="):
            art.run(art.random_inputs(0, {"batch": batch}))


def test_unknown_dim_range_is_refused_before_writing(tmp_path):
    with pytest.raises(QiaoError, match=r"'seq'.*fix: range its symbolic dimensions: batch"):
        compile("cnn", "cpu", tmp_path / "out", dim_ranges={"seq": (1, 8)})
    assert not (tmp_path / "out").exists()


def test_cli_dim_range(tmp_path):
    out = tmp_path / "art"
    proc = run_cli("compile", "cnn", "--target", "cpu", "-o", str(out), "--dim-range", "batch=1:2")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["dim_ranges"] == {"batch": [1, 2]}
    proc = run_cli("run", str(out), "--dim", "batch=3")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "outside the range 1..2" in proc.stderr + proc.stdout
    for bad in ("batch=2", "batch=3:1", "=1:2", "batch=a:b"):
        proc = run_cli(
            "compile", "cnn", "--target", "cpu", "-o", str(tmp_path / "x"), "--dim-range", bad
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, bad
        assert "fix: write it as NAME=LO:HI" in proc.stderr + proc.stdout, bad
        assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not has_nvcc(), reason="nvcc (CUDA toolkit) not installed")
def test_cuda_plans_bounded_storage_too(tmp_path):
    """The CUDA backend shares the phase: the built-in MLP for sm_90 with ``batch`` in 1..16
    compiles (kernels through nvcc) with every storage of ``main`` but the output's static, and
    records the range (it runs only on a GPU; the CPU tests above run the same plan)."""
    art = compile(
        "mlp", "cuda", tmp_path / "a", arch="sm_90", dim_ranges={"batch": (1, 16)},
        dump_ir=str(tmp_path / "d"),
    )  # fmt: skip
    assert art.manifest["dim_ranges"] == {"batch": [1, 16]}
    sized = _storages(tmp_path / "d")
    assert sized and sum(not s.startswith("R.shape([") for s in sized) <= len(art.outputs), sized
