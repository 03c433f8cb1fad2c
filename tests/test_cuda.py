"""CUDA backend: artifacts carry a fatbin compiled ahead of time for the requested sm_XX, holding
every kernel the model needs. Checked on the CPU by reading the library and the fatbin; run on a
GPU only where one exists (that test is skipped elsewhere, its CPU-side siblings are not)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qiao.backends import cuda
from qiao.backends.binfmt import (
    EM_CUDA,
    DeviceModule,
    PackedImports,
    cubin_arch,
    elf_symbol_offset,
    fatbin_entries,
    read_elf,
    read_library_imports,
)
from qiao.compiler import compile, load
from qiao.compiler.errors import CompileError, ToolchainMissing
from qiao.compiler.testing import assert_close, has_cuda_gpu, has_nvcc, run_cli
from tests.test_backends import write_tiny_onnx

needs_nvcc = pytest.mark.skipif(not has_nvcc(), reason="nvcc (CUDA toolkit) not installed")
HAS_GPU = has_cuda_gpu()


@pytest.fixture(scope="module")
def mlp_sm90(tmp_path_factory):
    """The built-in MLP compiled through the CLI for H100/H200 (one nvcc run for the module)."""
    if not has_nvcc():
        pytest.skip("nvcc (CUDA toolkit) not installed")
    out = tmp_path_factory.mktemp("cuda") / "mlp-sm90"
    proc = run_cli("compile", "mlp", "--target", "cuda", "--arch", "sm_90", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return str(out), json.loads((out / "manifest.json").read_text())


def elf_images(fatbin: bytes):
    return [e for e in fatbin_entries(fatbin) if e.kind == "elf"]


@needs_nvcc
def test_fatbin_is_for_requested_arch_with_every_kernel(mlp_sm90):
    directory, manifest = mlp_sm90
    section = manifest["backend"]
    assert section["device_format"] == "fatbin" and section["arch"] == "sm_90"
    with open(os.path.join(directory, section["device_code"]), "rb") as f:
        fatbin = f.read()
    entries = fatbin_entries(fatbin)
    assert {(e.kind, e.arch) for e in entries} == {("elf", 90), ("ptx", 90)}
    (image,) = elf_images(fatbin)
    assert not image.compressed
    info = read_elf(image.payload)
    assert info.machine == EM_CUDA
    assert cubin_arch(info.flags, info.abi_version) == 90
    kernels = set(section["kernels"])
    assert kernels and kernels <= set(info.functions), kernels - set(info.functions)
    # The MLP has three Linear layers: three fused matmul kernels, the first with the ReLU and the
    # second with the GELU (erf) fused in.
    matmuls = sorted(k for k in kernels if "matmul" in k)
    assert len(matmuls) == 3
    assert any("relu" in k for k in matmuls) and any("erf" in k for k in matmuls)


@needs_nvcc
def test_library_holds_the_fatbin_not_cuda_source(mlp_sm90):
    directory, manifest = mlp_sm90
    library = os.path.join(directory, manifest["backend"]["library"])
    imports = read_library_imports(library)
    kinds = [kind for kind, _ in imports.modules]
    assert kinds == ["relax.VMExecutable", "_lib", "cuda"]
    module = DeviceModule.parse(imports.modules[2][1])
    with open(os.path.join(directory, manifest["backend"]["device_code"]), "rb") as f:
        assert module.fmt == "fatbin" and module.code == f.read()
    assert sorted(module.kernel_names()) == manifest["backend"]["kernels"]
    with open(library, "rb") as f:
        data = f.read()
    assert b'extern "C" __global__' not in data, "CUDA source left in the library"
    start = elf_symbol_offset(data, "__tvm_ffi__library_bin")
    blob = data[start : start + 8 + int.from_bytes(data[start : start + 8], "little")]
    assert PackedImports.parse(blob).to_bytes() == blob  # the packer writes what it reads


@needs_nvcc
def test_other_arch_through_the_library_api(tmp_path):
    art = compile(write_tiny_onnx(tmp_path / "tiny.onnx"), "cuda", tmp_path / "a", arch="sm_80")
    with open(os.path.join(art.directory, art.manifest["backend"]["device_code"]), "rb") as f:
        (image,) = elf_images(f.read())
    info = read_elf(image.payload)
    assert cubin_arch(info.flags, info.abi_version) == 80
    assert set(art.manifest["backend"]["kernels"]) <= set(info.functions)
    assert art.manifest["target"]["arch"] == "sm_80"


@needs_nvcc
def test_nvcc_errors_are_compile_errors():
    with pytest.raises(CompileError, match="nvcc failed for sm_90"):
        cuda.compile_fatbin("this is not CUDA", "sm_90")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a CUDA GPU; the GPU test covers running")
@needs_nvcc
def test_running_without_gpu_is_a_clear_error(mlp_sm90):
    directory, _ = mlp_sm90
    artifact = load(directory)
    with pytest.raises(ToolchainMissing, match="needs an NVIDIA GPU"):
        artifact.run(artifact.random_inputs())
    proc = run_cli("validate", directory)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "cannot validate on 'cuda' here" in proc.stderr


def test_without_nvcc_compile_stops_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda, "find_nvcc", lambda: None)
    backend = cuda.CUDABackend()
    avail = backend.availability()
    assert not avail.can_compile and any("nvcc" in m for m in avail.missing)
    with pytest.raises(ToolchainMissing, match="nvcc"):
        compile(write_tiny_onnx(tmp_path / "tiny.onnx"), "cuda", tmp_path / "out", arch="sm_90")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]
    with pytest.raises(ToolchainMissing, match="install the CUDA toolkit"):
        cuda.compile_fatbin("", "sm_90")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU with its driver (none visible to TVM)")
def test_cuda_artifact_matches_cpu_references_on_gpu(tmp_path):
    from qiao.compiler.validate import validate
    from qiao.models import get_model

    arch = cuda.cuda_device_arch()
    artifact = compile("mlp", "cuda", tmp_path / "mlp", arch=arch)
    spec = get_model("mlp")
    inputs = {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs)}
    got = artifact.run(inputs)["logits"]
    expected = spec.module(*spec.example_inputs).detach().numpy()
    assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for batch in (1, 7):  # the symbolic batch on the GPU too
        x = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
        import torch

        ref = spec.module(torch.from_numpy(x)).detach().numpy()
        assert_close(artifact.run({"x": x})["logits"], ref, rtol=1e-4, atol=1e-4)
    report = validate(artifact)
    assert report.ok, report.format()
