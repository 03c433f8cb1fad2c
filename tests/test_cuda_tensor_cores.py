"""CUDA tensor cores for float16/bfloat16 GEMMs, checked without a GPU: the SASS nvcc writes for
sm_80 and sm_90 holds HMMA (warp matrix multiply-accumulate, float32 accumulators) in the GEMM
kernels themselves, and float32 builds hold none.

Numerics need a GPU (``benchmarks/device/check.py``); here the generated device code is read with
``cuobjdump -sass`` (PyPI ``nvidia-cuda-cuobjdump``, the ``test`` extra)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from qiao.compiler.testing import has_nvcc


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    pattern = os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "*", "bin")
    for folder in sorted(glob.glob(pattern)):
        path = os.path.join(folder, "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    return None


CUOBJDUMP = _cuobjdump()
pytestmark = [
    pytest.mark.skipif(not has_nvcc(), reason="nvcc (CUDA toolkit) not installed"),
    pytest.mark.skipif(
        CUOBJDUMP is None,
        reason="cuobjdump not found (pip install nvidia-cuda-cuobjdump, the test extra)",
    ),
]
ARCHS = ("sm_80", "sm_90")


def sass_by_kernel(fatbin: bytes, tmp_path) -> dict[str, str]:
    """``{kernel name: its SASS}`` of the ELF images in ``fatbin``."""
    path = tmp_path / "k.fatbin"
    path.write_bytes(fatbin)
    out = subprocess.run(
        [CUOBJDUMP, "-sass", str(path)], capture_output=True, text=True, check=True
    ).stdout
    kernels: dict[str, str] = {}
    name = None
    for line in out.splitlines():
        if "Function :" in line:
            name = line.split("Function :", 1)[1].strip()
            kernels[name] = ""
        elif name is not None:
            kernels[name] += line + "\n"
    assert kernels, out[:500]
    return kernels


def _device_fatbin(mod, target) -> bytes:
    """``mod``'s PrimFuncs compiled for ``target`` as the CUDA backend does (TVM's CUDA C, nvcc)."""
    import tvm

    from qiao.backends.cuda import compile_fatbin

    lib = tvm.compile(mod, target)

    def modules(m):
        yield m
        for child in m.imports:
            yield from modules(child)

    (cuda,) = [m for m in modules(lib.mod) if m.kind == "cuda"]
    return compile_fatbin(cuda.inspect_source(), str(target.attrs["arch"]))


def _linear_sass(tmp_path, dtype: str, arch: str, k: int = 256, n: int = 256):
    """SASS of the scheduled GEMM ``x[m, k] @ astype(w[k, n], float32)`` (``m`` symbolic: the
    token dimension), lowered by the pipeline's own prepare (FoldWeightCasts) / legalize /
    schedule phases for CUDA; ``dtype`` float32 is the plain float32 GEMM."""
    import tvm
    from tvm import relax

    from qiao.compiler.passes.fold_weight_casts import FoldWeightCasts
    from qiao.compiler.pipeline import legalize_passes
    from qiao.compiler.schedules import gpu_schedule_passes

    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            wide = bb.emit(relax.op.astype(w, "float32")) if dtype != "float32" else w
            out = bb.emit_output(relax.op.matmul(x, wide))
        bb.emit_func_output(out)
    with target:
        mod = tvm.transform.Sequential(
            [FoldWeightCasts(gpu=True), *legalize_passes(target), *gpu_schedule_passes(target)]
        )(bb.get())
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    fatbin = _device_fatbin(
        tvm.IRModule({g: f.with_attr("global_symbol", g) for g, f in funcs.items()}), target
    )
    return funcs, sass_by_kernel(fatbin, tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_weight_gemm_runs_on_tensor_cores(tmp_path, dtype, arch):
    """A GEMM with half weights: the activations are cast to the weights' dtype at its input
    (their own small kernel here; in a model the producer's epilogue) and the GEMM kernel is
    tensor-core MMA with float32 accumulators (``HMMA.16816.F32``, ``.BF16`` for bfloat16),
    the symbolic token dimension padded by the schedule."""
    funcs, sass = _linear_sass(tmp_path, dtype, arch)
    gemm = [name for name in sass if "matmul" in name]
    assert len(gemm) == 1, sorted(sass)
    hmma = [line for line in sass[gemm[0]].splitlines() if "HMMA" in line]
    assert hmma, f"no tensor-core instruction in {gemm[0]}"
    assert all(".F32" in line for line in hmma)  # float32 accumulation
    assert all((".BF16" in line) == (dtype == "bfloat16") for line in hmma)
    others = [name for name in sass if name not in gemm and "HMMA" in sass[name]]
    assert not others, others
    cast = [f for name, f in funcs.items() if "matmul" not in name]
    assert len(cast) == 1 and f'"{dtype}"' in cast[0].script()  # x -> half, then the GEMM


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_gemm_has_no_tensor_core_code(tmp_path, arch):
    """The control: the same GEMM in float32 stays on FMA (no HMMA anywhere), so the tests
    above see what the half-precision path adds."""
    _, sass = _linear_sass(tmp_path, "float32", arch)
    assert any("matmul" in name for name in sass)
    assert not [name for name, code in sass.items() if "HMMA" in code]
    assert any("FFMA" in code for code in sass.values())


def _moe_sass(tmp_path, weight_dtype: str, arch: str):
    """SASS of the MoE grouped GEMMs (gate/up with SwiGLU, down) for ``weight_dtype`` experts:
    ``{"group_gemm_up": {kernel: sass}, "group_gemm_down": {...}}``. Each PrimFunc holds two
    kernels: the GEMV (``_kernel``, up to ``gpu_gemv_max_tokens`` tokens) and the tiled GEMM
    (``_kernel_1``)."""
    import tvm

    from qiao.compiler.kernels.group_gemm import group_gemm_down, group_gemm_up
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules.moe_table import lookup

    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    cfg = MoEConfig(num_experts=8, hidden=64, inter=32, top_k=2, weight_dtype=weight_dtype)
    found = {}
    with target:
        sched = lookup(target)
        for build in (group_gemm_up, group_gemm_down):
            func = build(cfg, sched, gpu=True).with_attr("global_symbol", build.__name__)
            fatbin = _device_fatbin(tvm.IRModule({build.__name__: func}), target)
            found[build.__name__] = sass_by_kernel(fatbin, tmp_path)
    return found


@pytest.mark.parametrize(
    "dtype, arch", [("float16", "sm_80"), ("bfloat16", "sm_80"), ("bfloat16", "sm_90")]
)
def test_moe_grouped_gemm_runs_on_tensor_cores(tmp_path, dtype, arch):
    """MoE experts in half precision: the tiled grouped GEMMs (``group_gemm_up_kernel_1``,
    ``group_gemm_down_kernel_1``) multiply on tensor cores with float32 accumulators; the GEMV
    kernels (few tokens: bandwidth-bound) read the narrow weights with float32 FMAs."""
    for name, sass in _moe_sass(tmp_path, dtype, arch).items():
        assert sorted(sass) == [f"{name}_kernel", f"{name}_kernel_1"], sorted(sass)
        hmma = [line for line in sass[f"{name}_kernel_1"].splitlines() if "HMMA" in line]
        assert hmma and all(".F32" in line for line in hmma), name
        assert all((".BF16" in line) == (dtype == "bfloat16") for line in hmma)
        assert "HMMA" not in sass[f"{name}_kernel"] and "FFMA" in sass[f"{name}_kernel"]


def test_float32_moe_grouped_gemm_has_no_tensor_core_code(tmp_path):
    for name, sass in _moe_sass(tmp_path, "float32", "sm_80").items():
        assert not [k for k, code in sass.items() if "HMMA" in code], name
        assert "FFMA" in sass[f"{name}_kernel_1"]


def test_builtin_mlp_float16_artifact(tmp_path):
    """The built-in MLP compiled with ``--dtype float16`` for H100/H200: its 256 x 256 layer
    (``fused_matmul1_...``) runs on tensor cores; the 64-deep first layer and the 10-wide head
    stay on FMA with float32 activations (a static GEMM dimension <= 64 stays off tensor cores)."""
    from qiao.compiler import compile

    art = compile("mlp", "cuda", tmp_path / "mlp", arch="sm_90", dtype="float16")
    with open(os.path.join(art.directory, art.manifest["backend"]["device_code"]), "rb") as f:
        sass = sass_by_kernel(f.read(), tmp_path)
    tensor = sorted(name for name, code in sass.items() if "HMMA" in code)
    assert len(tensor) == 1 and tensor[0].startswith("fused_matmul1_"), tensor
    assert len([n for n in sass if "matmul" in n]) == 3, sorted(sass)
    # the manifest says the GEMM inputs are rounded, and `qiao validate` widens its default for it
    from qiao.compiler.validate import HALF_ACTIVATION_TOLERANCE, tolerances

    assert art.manifest["dtype"]["compute"].startswith("float16 GEMM inputs")
    assert tolerances(art, None, None) == (HALF_ACTIVATION_TOLERANCE["float16"],) * 2
    assert tolerances(art, 1e-6, None)[0] == 1e-6  # an explicit tolerance is kept


def test_float32_compute_manifest_on_cpu(tmp_path):
    """The same option on the CPU keeps float32 activations: the default tolerance stays."""
    from qiao.compiler import compile
    from qiao.compiler.validate import tolerances
    from qiao.models import get_model

    art = compile("mlp", "cpu", tmp_path / "mlp", dtype="float16")
    assert art.manifest["dtype"]["compute"] == "float32"
    spec = get_model("mlp")
    assert tolerances(art, None, None) == (spec.rtol, spec.atol)
