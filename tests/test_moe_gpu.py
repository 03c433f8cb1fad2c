"""MoE kernels for GPUs: the same four-stage lowering scheduled with thread blocks and shared
memory. Without a GPU, the kernels the lowering emits for CUDA and ROCm run on the CPU as their
serial twins (``SerializeGPUThreads``: thread loops serial, cut at barriers and warp shuffles, with
the hardware's warp width: 32 lanes on NVIDIA, 64 on AMD CDNA) against ONNX Runtime, and the CUDA
source and packed device code are checked for every MoE kernel; on a GPU they run for real."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qiao.compiler.testing import assert_close, can_compile_for, has_cuda_gpu, has_nvcc
from tests.test_moe import BASE, inputs, make_weights, moe_model, numpy_moe, ort_run

KERNELS = (
    "moe_gating_kernel",
    "moe_align_kernel",
    "group_gemm_up_kernel",
    "group_gemm_down_kernel",
    "moe_combine_kernel",
)


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


@pytest.mark.skipif(not has_nvcc(), reason="nvcc not installed: CUDA artifacts need it")
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
    from qiao.compiler import compile

    if not can_compile_for("rocm"):
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


# ------------------------------------------------------------------------------------------------
# The GPU kernels on the CPU: every thread-bound kernel the lowering emits, as its serial twin
# ------------------------------------------------------------------------------------------------
GPU_TARGETS = {
    "cuda": {"kind": "cuda", "arch": "sm_80"},
    "rocm": {"kind": "rocm", "mcpu": "gfx942"},  # CDNA3: 64-lane wavefronts
}
STAGES = ["group_gemm_down", "group_gemm_up", "moe_align", "moe_combine", "moe_gating"]


def _serial_gpu_moe(model, target: str):
    """``model``'s MoE lowered for the GPU ``target`` (thread-bound kernels), each kernel replaced
    by its serial twin with the target's warp width, built for this CPU: ``run(x, logits) -> y``
    and the hardware warp width used."""
    import tvm
    from tvm import relax

    from qiao.compiler.frontend import import_onnx
    from qiao.compiler.passes import LowerMoE
    from qiao.compiler.passes.serialize_gpu_threads import SerializeGPUThreads, has_thread_bindings
    from qiao.compiler.pipeline import default_phases, make_pipeline

    gpu = tvm.target.Target(GPU_TARGETS[target])
    warp = int(gpu.attrs["thread_warp_size"])  # TVM's statement of the hardware warp
    imported = import_onnx(model)
    with gpu:
        mod = LowerMoE(gpu)(imported.mod)

    def bound(m):
        return sorted(
            gv.name_hint
            for gv, f in m.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and has_thread_bindings(f)
        )

    assert bound(mod) == STAGES  # the GPU kernels, not the CPU ones
    mod = SerializeGPUThreads(warp)(mod)
    assert bound(mod) == []
    cpu = tvm.target.Target("llvm")
    ex = tvm.compile(mod, target=cpu, relax_pipeline=make_pipeline(default_phases(cpu), cpu))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    # main(x, logits, *params): the weights follow the inputs in the import's order
    weights = [tvm.runtime.tensor(np.asarray(w)) for w in imported.params.values()]

    def run(x, logits):
        out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(logits), *weights)
        return (out if hasattr(out, "numpy") else out[0]).numpy()

    return run, warp


@pytest.mark.parametrize("target", sorted(GPU_TARGETS))
def test_gpu_moe_kernels_on_the_cpu_match_onnxruntime(target):
    """Both GPU paths (the warp-shuffle GEMV up to ``gpu_gemv_max_tokens`` tokens, the shared-memory
    tiled GEMM above) for CUDA (32-lane warps) and ROCm (64-lane wavefronts: the GEMV's 32-lane
    shuffles stay inside their half of the wavefront), against ONNX Runtime."""
    import tvm

    from qiao.compiler.schedules.moe_table import lookup

    run, warp = _serial_gpu_moe(moe_model(BASE, 2), target)
    assert warp == {"cuda": 32, "rocm": 64}[target]
    gemv_max = lookup(tvm.target.Target(GPU_TARGETS[target])).gpu_gemv_max_tokens
    tokens = (1, 3, gemv_max, gemv_max + 1, 64)
    assert min(tokens) <= gemv_max < max(tokens)  # both paths run
    for T in tokens:
        x, logits = inputs(T, 64, 8, seed=T)
        ref = ort_run(moe_model(BASE, 2), x, logits)
        assert_close(run(x, logits), ref, 1e-4, 1e-5, f"{target} T={T}")


@pytest.mark.parametrize(
    ("activation", "fusion", "bias", "k", "normalize"),
    [("swiglu", 2, True, 2, 1), ("gelu", 0, True, 3, 0), ("relu", 0, False, 1, 1)],
)
def test_gpu_moe_kernel_variants_on_the_cpu(activation, fusion, bias, k, normalize):
    """Concatenated gate/up rows, biases, non-gated activations, k = 1 and 3, unnormalised
    weights: the GPU kernels' epilogues, GEMV and GEMM paths, against the NumPy reference (ONNX
    Runtime's CPU MoE refuses concatenated gate/up rows)."""
    w = make_weights(8, 64, 32, activation, bias=bias, seed=11)
    run, _ = _serial_gpu_moe(moe_model(w, k, normalize, activation, fusion or 1), "cuda")
    layout = "concat" if fusion == 2 else "interleaved"
    for T in (1, 9):
        x, logits = inputs(T, 64, 8, seed=20 + T)
        ref = numpy_moe(
            x,
            logits,
            w["fc1"],
            w["fc2"],
            k,
            bool(normalize),
            activation,
            layout,
            w.get("b1"),
            w.get("b2"),
        )
        assert_close(run(x, logits), ref.astype(np.float32), 1e-4, 1e-5, f"T={T}")


def _warp_sum_kernel(threads: int, width: int):
    """``out[t] = `` the shuffle-down tree sum over ``t``'s ``width``-lane segment, at each
    segment's first lane (other lanes hold partial sums)."""
    from tvm.script import tirx as T

    steps = width.bit_length() - 1

    @T.prim_func(s_tir=True)
    def warp_sum(a: T.Buffer((threads,), "float32"), out: T.Buffer((threads,), "float32")):
        with T.sblock("root"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                v = T.alloc_buffer((1,), "float32", scope="local")
                v[0] = a[tx]
                for s in T.unroll(steps):
                    v[0] = v[0] + T.tvm_warp_shuffle_down(
                        T.tvm_warp_activemask(), v[0], T.shift_right(width // 2, s), width, width
                    )
                out[tx] = v[0]

    return warp_sum


def _run_serial(func, warp_size, *arrays):
    import tvm

    from qiao.compiler.passes.serialize_gpu_threads import serialize_gpu_threads

    lib = tvm.compile(serialize_gpu_threads(func, warp_size), target="llvm")
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib(*tensors)
    return [t.numpy() for t in tensors]


@pytest.mark.parametrize(("width", "warp_size"), [(32, 32), (32, 64), (16, 32), (16, 64)])
def test_serial_twin_of_a_warp_shuffle_reduction(width, warp_size):
    """Segments of ``width`` lanes reduce separately, in 32- and 64-lane warps alike (what the GEMV
    kernels rely on); checked against NumPy sums of each segment."""
    a = np.random.default_rng(width).standard_normal(128).astype(np.float32)
    _, out = _run_serial(_warp_sum_kernel(128, width), warp_size, a, np.zeros(128, np.float32))
    heads = out[::width]
    assert_close(heads, a.reshape(-1, width).sum(axis=1), 1e-5, 1e-5, "segment sums")
    # a lane whose source lies past its segment keeps its own value: the last lane is untouched
    assert out[width - 1] == np.float32(a[width - 1] * 2 ** (width.bit_length() - 1))


def test_serial_twin_refuses_what_a_gpu_cannot_run():
    """A shuffle wider than the hardware warp, and a barrier only some threads reach."""
    from tvm.script import tirx as T

    from qiao.compiler.errors import CompileError
    from qiao.compiler.passes.serialize_gpu_threads import serialize_gpu_threads

    with pytest.raises(CompileError, match="64-lane shuffle does not fit 128 threads in 32-lane"):
        serialize_gpu_threads(_warp_sum_kernel(128, 64), 32)

    @T.prim_func(s_tir=True)
    def divergent_barrier(a: T.Buffer((64,), "float32")):
        with T.sblock("root"):
            for tx in T.thread_binding(64, thread="threadIdx.x"):
                if tx < 32:
                    a[tx] = T.float32(1)
                    T.tvm_storage_sync("shared")

    with pytest.raises(CompileError, match="condition that differs between threads"):
        serialize_gpu_threads(divergent_barrier, 32)


def test_serial_twin_keeps_barrier_order():
    """Shared memory written by every thread, a barrier, then read by other threads: the twin runs
    the whole first phase before the second (a plain serial loop would read unwritten values)."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def reverse(a: T.Buffer((2, 32), "float32"), out: T.Buffer((2, 32), "float32")):
        with T.sblock("root"):
            for bx in T.thread_binding(2, thread="blockIdx.x"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    tile = T.alloc_buffer((32,), "float32", scope="shared")
                    tile[tx] = a[bx, tx]
                    T.tvm_storage_sync("shared")
                    out[bx, tx] = tile[31 - tx]

    a = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    _, out = _run_serial(reverse, 32, a, np.zeros((2, 32), np.float32))
    assert_close(out, a[:, ::-1].copy(), 0, 0, "reversed rows")


@pytest.mark.skipif(not can_compile_for("rocm"), reason="ROCm code generation needs ld.lld")
def test_rocm_shuffles_stay_inside_32_lane_segments_of_a_wavefront():
    """The GEMV's 32-lane shuffle tree on a 64-lane CDNA wavefront: TVM's ROCm lowering takes the
    lane from the whole wavefront (``v_mbcnt``), masks it to the 32-lane segment (``and 31``) and
    keeps a lane's own value past the segment, which is what the serial twin above emulates with
    ``warp_size=64``; one ``ds_bpermute`` per tree step."""
    import tvm

    from qiao.backends import get_backend

    backend = get_backend("rocm")
    target = backend.target("gfx942")
    func = _warp_sum_kernel(128, 32).with_attr("global_symbol", "warp_sum")
    with backend.compile_context(target):
        lib = tvm.tirx.build(tvm.IRModule({"warp_sum": func}), target=target)
    (hip,) = [m for m in lib.imports if m.kind == "hip"]
    asm = hip.inspect_source("asm")
    assert "v_mbcnt_lo_u32_b32" in asm and "v_mbcnt_hi_u32_b32" in asm
    assert re.search(r"v_and_b32_e32 v\d+, 31, v\d+", asm), "no 32-lane segment mask"
    assert asm.count("ds_bpermute_b32") == 5  # log2(32) steps


def test_gemv_shuffle_tree_follows_its_lane_count(monkeypatch):
    """``GEMV_LANES`` is a real parameter: a full 64-lane wavefront on ROCm matches ONNX Runtime
    (the tree had 5 fixed steps from 16, right for 32 lanes only), and the same kernels are refused
    for CUDA's 32-lane warps."""
    import qiao.compiler.kernels.group_gemm as group_gemm

    monkeypatch.setattr(group_gemm, "GEMV_LANES", 64)
    run, warp = _serial_gpu_moe(moe_model(BASE, 2), "rocm")
    assert warp == 64
    for T in (1, 3):
        x, logits = inputs(T, 64, 8, seed=T)
        assert_close(run(x, logits), ort_run(moe_model(BASE, 2), x, logits), 1e-4, 1e-5, f"T={T}")
    from qiao.compiler.errors import CompileError

    # RuntimeError: TVM's pass machinery rethrows what a Python pass raised as its own error
    with pytest.raises((CompileError, RuntimeError), match="64-lane shuffle does not fit"):
        _serial_gpu_moe(moe_model(BASE, 2), "cuda")
