"""MoE kernels for GPUs: the same four-stage lowering scheduled with thread blocks and shared
memory. Here (no GPU) the CUDA source and the packed device code are checked for every MoE kernel;
the run against ONNX Runtime happens where a GPU is present."""

from __future__ import annotations

import functools
import re

import pytest

from qiao.compiler.testing import assert_close, has_command
from tests.test_moe import BASE, inputs, moe_model, ort_run

KERNELS = (
    "moe_gating_kernel",
    "moe_align_kernel",
    "group_gemm_up_kernel",
    "group_gemm_down_kernel",
    "moe_combine_kernel",
)


@functools.cache
def has_cuda_gpu() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


def _cuda_source(arch: str) -> str:
    import tvm

    from qiao.compiler.frontend import import_onnx
    from qiao.compiler.pipeline import default_phases, make_pipeline

    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    mod = import_onnx(moe_model(BASE, 2)).mod
    ex = tvm.compile(
        mod, target=target, relax_pipeline=make_pipeline(default_phases(target), target)
    )

    def modules(m):
        yield m
        for child in m.imports:
            yield from modules(child)

    cuda = [m for m in modules(ex.mod) if m.kind == "cuda"]
    assert len(cuda) == 1, [m.kind for m in modules(ex.mod)]
    return cuda[0].inspect_source()


def test_moe_cuda_source_holds_every_stage_kernel():
    """TVM generates CUDA for sm_90 from the same lowering: gating, alignment, the grouped GEMMs
    (tiled GEMM and the decode GEMV, both per projection), combine; shared memory in the GEMM tiles.
    """
    src = _cuda_source("sm_90")
    pattern = r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\('
    names = set(re.findall(pattern, src))
    for kernel in KERNELS:
        assert kernel in names, f"{kernel} missing from {sorted(names)}"
    assert {"group_gemm_up_kernel_1", "group_gemm_down_kernel_1"} <= names  # GEMV + GEMM each
    assert "__shared__" in src and "__syncthreads()" in src and "__shfl_down_sync" in src


@pytest.mark.skipif(not has_command("nvcc"), reason="nvcc not installed: CUDA artifacts need it")
def test_moe_cuda_artifact_device_code(tmp_path):
    from qiao.compiler import compile

    art = compile(moe_model(BASE, 2), "cuda", tmp_path / "art", arch="sm_90")
    blobs = [p for p in (tmp_path / "art").iterdir() if p.suffix in (".fatbin", ".cubin")]
    assert blobs, list((tmp_path / "art").iterdir())
    data = b"".join(p.read_bytes() for p in blobs)
    assert b"sm_90" in data
    for kernel in KERNELS:
        assert kernel.encode() in data, kernel
    assert art.manifest["backend"]["arch"] == "sm_90"


def test_moe_rocm_artifact_device_code(tmp_path):
    from qiao.backends import get_backend
    from qiao.compiler import compile

    if not get_backend("rocm").availability().can_compile:
        pytest.skip("ROCm code generation needs ld.lld (apt-get install lld-19)")
    compile(moe_model(BASE, 2), "rocm", tmp_path / "art", arch="gfx942")
    code = b"".join(p.read_bytes() for p in (tmp_path / "art").iterdir() if p.suffix == ".hsaco")
    assert b"gfx942" in code
    for kernel in KERNELS:
        assert kernel.encode() in code, kernel


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda_gpu(), reason="no CUDA GPU visible to TVM")
def test_moe_runs_on_cuda(tmp_path):
    """Both GPU paths (GEMV up to gpu_gemv_max_tokens tokens, tiled GEMM above) against ORT."""
    from qiao.compiler import compile

    art = compile(moe_model(BASE, 2), "cuda", tmp_path / "art")
    for T in (1, 3, 4, 5, 64):
        x, logits = inputs(T, 64, 8, seed=T)
        assert_close(
            art.run({"x": x, "logits": logits})["y"],
            ort_run(moe_model(BASE, 2), x, logits),
            1e-4,
            1e-5,
            f"T={T}",
        )
