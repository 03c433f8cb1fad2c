"""ROCm backend: artifacts carry an HSA code object (ELF, machine AMDGPU) for the requested gfx
arch with every kernel the model needs; checked on the CPU. Running needs an AMD GPU (clear error
without)."""

from __future__ import annotations

import os
import re

import onnx
import pytest

from qiao.backends import rocm
from qiao.backends.binfmt import EM_AMDGPU, DeviceModule, read_elf, read_library_imports
from qiao.compiler import compile, load
from qiao.compiler.errors import ToolchainMissing
from qiao.compiler.testing import can_compile_for, has_rocm_gpu
from tests.test_backends import write_tiny_onnx

# EF_AMDGPU_MACH values from LLVM's ELF.h (the low byte of e_flags of an AMDGPU code object).
EF_AMDGPU_MACH = {"gfx90a": 0x3F, "gfx942": 0x4C}

needs_lld = pytest.mark.skipif(not can_compile_for("rocm"), reason="ld.lld not installed (lld-19)")


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    from qiao.compiler.driver import resolve_model

    path = tmp_path_factory.mktemp("rocm") / "mlp.onnx"
    onnx.save(resolve_model("mlp").proto, path)
    return str(path)


@pytest.fixture(scope="module")
def mlp_artifacts(mlp_onnx, tmp_path_factory):
    if not can_compile_for("rocm"):
        pytest.skip("ld.lld not installed (lld-19)")
    root = tmp_path_factory.mktemp("rocm-art")
    return {arch: compile(mlp_onnx, "rocm", root / arch, arch=arch) for arch in EF_AMDGPU_MACH}


@needs_lld
@pytest.mark.parametrize("arch", sorted(EF_AMDGPU_MACH))
def test_code_object_is_for_requested_gfx_with_every_kernel(mlp_artifacts, arch):
    art = mlp_artifacts[arch]
    section = art.manifest["backend"]
    assert section["device_format"] == "hsaco" and section["arch"] == arch
    with open(os.path.join(art.directory, section["device_code"]), "rb") as f:
        code = f.read()
    info = read_elf(code)
    assert info.machine == EM_AMDGPU
    assert info.flags & 0xFF == EF_AMDGPU_MACH[arch]
    # The target id in the metadata note (amdhsa.target), e.g. amdgcn-amd-amdhsa-hcc-gfx942.
    assert re.search(rb"amdgcn-amd-amdhsa[\w-]*-" + arch.encode() + rb"(?![0-9a-z])", code)
    kernels = set(section["kernels"])
    assert kernels and kernels <= set(info.functions), kernels - set(info.functions)
    matmuls = [k for k in kernels if "matmul" in k]  # three Linear layers
    assert len(matmuls) == 3
    # What runs is the library: it embeds exactly this code object.
    imports = read_library_imports(os.path.join(art.directory, section["library"]))
    (module,) = [DeviceModule.parse(p) for kind, p in imports.modules if kind == "hip"]
    assert module.fmt == "hsaco" and module.code == code
    assert sorted(module.kernel_names()) == section["kernels"]


@needs_lld
def test_running_without_gpu_is_a_clear_error(mlp_artifacts):
    if has_rocm_gpu():
        pytest.skip("this machine has a ROCm GPU")
    art = load(mlp_artifacts["gfx942"].directory)
    with pytest.raises(ToolchainMissing, match="needs an AMD GPU"):
        art.run(art.random_inputs())


def test_without_lld_compile_stops_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(rocm, "find_lld", lambda: None)
    avail = rocm.ROCmBackend().availability()
    assert not avail.can_compile and any("lld" in m for m in avail.missing)
    with pytest.raises(ToolchainMissing, match="ld.lld"):
        compile(write_tiny_onnx(tmp_path / "tiny.onnx"), "rocm", tmp_path / "out", arch="gfx942")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]


@needs_lld
def test_link_callbacks_are_scoped_to_the_compile():
    import tvm_ffi

    backend = rocm.ROCmBackend()
    before = tvm_ffi.get_global_func("tvm_callback_rocm_bitcode_path", allow_missing=True)
    with backend.compile_context(backend.target("gfx942")):
        inside = tvm_ffi.get_global_func("tvm_callback_rocm_bitcode_path")
        libs = list(inside())
        assert libs == [] or all(p.endswith(".bc") for p in libs)
        if rocm.find_bitcode_dir() is None:
            assert libs == []  # no device libraries here: link without them
    after = tvm_ffi.get_global_func("tvm_callback_rocm_bitcode_path", allow_missing=True)
    assert (before is None) == (after is None)
    if after is not None:  # TVM's own callback is back: it looks for ROCm, which is absent here
        if rocm.find_bitcode_dir() is None and not os.path.isdir("/opt/rocm"):
            with pytest.raises(RuntimeError):
                after()
