"""A backend for a TVM target kind qiao has never heard of needs one file: its class.

The toy backends below live in this file only and are registered the way any third-party backend
is, through a ``qiao.backends`` entry point (a ``*.dist-info`` written to a temporary folder on
``sys.path``). Everything the compile side needs of a target — the target itself, CPU or GPU MoE
kernels, schedule rules and passes, MoE tuning keys, the runtime device for RPC — comes from their
class attributes and methods; nothing in ``compiler/`` names their kinds (``test_no_target_switch``
keeps it so).

- ``ToyVulkanBackend`` / ``ToyMetalBackend``: GPU kinds. This TVM has no Vulkan code generator, so
  Vulkan is lowered through every phase before code generation; Metal (source code generation is
  built in) goes all the way to a library with the Metal kernels in it. Neither runs here.
- ``ToyCPUBackend``: the CPU backend under another name, with its own MoE tuning keys: compiles
  through ``qiao.compiler.compile`` and runs, checked against ONNX Runtime.
"""

from __future__ import annotations

import os

import pytest

from qiao.backends.base import Availability, DevicePreset
from qiao.backends.cpu import CPUBackend
from qiao.backends.tvm_backend import GPUBackend, TVMBackend
from qiao.compiler.testing import assert_close

DIST = "qiao-toy-backends"


class _ToyGPU(GPUBackend):
    """A GPU kind: everything the compiler needs is said here."""

    vendor = "toy"
    default_preset = "toy"
    kind: str
    target_attrs: dict = {}

    def presets(self):
        return {"toy": DevicePreset("toy", f"a toy {self.kind} GPU", {"kind": self.kind})}

    def availability(self):
        return Availability(True, False, (f"toy backend: no {self.kind} device is ever used",))

    def target(self, arch=None):
        import tvm

        return tvm.target.Target({"kind": self.kind, **self.target_attrs})

    def arch_name(self, target):
        return "toy1"

    def tuning_keys(self, target):
        # MoE table keys of its own: this backend's name and chip
        return [f"{self.name}/{self.arch_name(target)}", self.name]

    def export(self, executable, target, workdir, options):
        # GPUBackend's device-code readers know CUDA/HIP module layouts; this kind keeps TVM's
        # library as it is and stores the kernels' source beside it.
        section = TVMBackend.export(self, executable, target, workdir, options)
        (source,) = [m.inspect_source() for m in _modules(executable.mod) if m.kind == self.kind]
        with open(os.path.join(workdir, f"model.{self.kind}"), "w") as f:
            f.write(source)
        return {**section, "device_code": f"model.{self.kind}"}

    def device(self):
        import tvm

        return tvm.device(self.device_type)


class ToyVulkanBackend(_ToyGPU):
    name = "toy_vulkan"
    kind = "vulkan"
    target_kinds = ("vulkan",)
    device_type = "vulkan"
    device_module = "vulkan"


class ToyMetalBackend(_ToyGPU):
    name = "toy_metal"
    kind = "metal"
    target_kinds = ("metal",)
    device_type = "metal"
    device_module = "metal"
    # Apple GPUs: 32-lane SIMD groups (the MoE GEMV's warp reductions use them).
    target_attrs = {"thread_warp_size": 32, "max_num_threads": 256}


class ToyCPUBackend(CPUBackend):
    """The CPU under another name; its MoE schedules are keyed ``toy_cpu`` before the CPU's."""

    name = "toy_cpu"
    vendor = "toy"

    def tuning_keys(self, target):
        return ["toy_cpu", *super().tuning_keys(target)]


class ToyClaimsLLVM(CPUBackend):
    """A plugin claiming a kind qiao's CPU backend already claims: it must not take it over."""

    name = "toy_llvm"
    vendor = "toy"


TOYS = {
    "toy_vulkan": ToyVulkanBackend,
    "toy_metal": ToyMetalBackend,
    "toy_cpu": ToyCPUBackend,
    "toy_llvm": ToyClaimsLLVM,
}


def _modules(mod):
    yield mod
    for child in mod.imports:
        yield from _modules(child)


@pytest.fixture
def toys(tmp_path, monkeypatch):
    """The toy backends installed as a distribution with ``qiao.backends`` entry points."""
    from qiao.backends import registry

    info = tmp_path / "qiao_toy_backends-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1.0\n")
    lines = [f"{name} = {__name__}:{cls.__name__}" for name, cls in TOYS.items()]
    (info / "entry_points.txt").write_text("[qiao.backends]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(registry.DISABLE_ENV, raising=False)
    assert {e.dist for n, e in registry.discover().items() if n in TOYS} == {DIST}
    yield {name: registry.get_backend(name) for name in TOYS}


def _moe_module():
    from qiao.compiler.frontend import import_onnx
    from tests.test_moe import BASE, moe_model

    return import_onnx(moe_model(BASE, 2))


def _thread_bound(func) -> bool:
    text = func.script()
    return "blockIdx" in text or "threadIdx" in text


@pytest.mark.parametrize("name", ["toy_vulkan", "toy_metal"])
def test_gpu_kind_plumbing_comes_from_the_backend_class(toys, name, tmp_path, monkeypatch):
    import json

    import tvm

    from qiao.backends.registry import backend_for_kind
    from qiao.compiler import rpc
    from qiao.compiler.pipeline import make_pipeline
    from qiao.compiler.schedules import rules_for, schedule_passes
    from qiao.compiler.schedules.moe_table import lookup

    backend = toys[name]
    target = backend.target()
    kind = backend.kind
    assert str(target.kind.name) == kind and backend_for_kind(kind) is backend
    # schedule rules and passes: GPUBackend's (dlight; no tuning database, no CPU rewrites), the
    # same as the library gives a target of TVM's gpu family
    names = [type(r).__name__ for r in backend.schedule_rules(target)]
    assert names[-1] == "Fallback" and names == [type(r).__name__ for r in rules_for(target)]
    assert len(schedule_passes(target)) == len(backend.schedule_passes(target, {})) == 1
    # the MoE lowering in its phases: GPU kernels and the table entry under its own keys
    table = tmp_path / "moe_table.json"
    table.write_text(json.dumps({"version": 1, "entries": {name: {"block_m": 16}}}))
    monkeypatch.setenv("QIAO_MOE_TABLE", str(table))
    phases = backend.phases(target, {})
    (lower_moe,) = [p for p in phases[0].passes if hasattr(p, "keys")]
    assert lower_moe.gpu is True and lower_moe.keys == [f"{name}/toy1", name]
    found = lookup(target, keys=lower_moe.keys)
    assert (found.device, found.block_m) == (name, 16)
    # the runtime device for RPC: the backend's device_type, also for an artifact whose backend
    # is not installed but whose target kind it claims
    manifest = {"backend": {"name": name, "library": "model.so"}, "target": {"kind": kind}}
    assert rpc.artifact_backend(manifest).device_type == kind
    manifest["backend"]["name"] = "toy_gone"
    assert rpc.artifact_backend(manifest) is backend
    # every phase up to code generation: the MoE kernels thread-bound (is_gpu from the class),
    # every other kernel scheduled by the GPU rules
    with target:
        lowered = make_pipeline(phases, target)(_moe_module().mod)
    prims = {
        gv.name_hint: f for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    }
    for stage in ("moe_gating", "moe_align", "group_gemm_up", "group_gemm_down", "moe_combine"):
        assert _thread_bound(prims[stage]), stage
    unbound = [n for n, f in prims.items() if not _thread_bound(f) and "shape_func" not in n]
    assert not unbound, unbound


def test_rpc_refuses_an_artifact_no_backend_places():
    from qiao.compiler import rpc

    manifest = {"backend": {"name": "toy_gone", "library": "model.so"}, "target": {"kind": "trn"}}
    with pytest.raises(rpc.RPCError, match="no installed backend.*fix:"):
        rpc.artifact_backend(manifest)


@pytest.mark.slow
def test_metal_kind_compiles_to_a_library_with_metal_kernels(toys, tmp_path):
    import tvm

    if tvm.get_global_func("target.build.metal", allow_missing=True) is None:
        pytest.skip("this TVM build has no Metal code generator (target.build.metal)")
    backend = toys["toy_metal"]
    section = backend.build(_moe_module(), None, str(tmp_path), {})
    assert section["library"] == "model.so" and (tmp_path / "model.so").stat().st_size > 0
    source = (tmp_path / section["device_code"]).read_text()
    for stage in ("moe_gating", "moe_align", "group_gemm_up", "group_gemm_down", "moe_combine"):
        assert f"kernel void {stage}" in source, stage
    assert "threadgroup_position_in_grid" in source and "simd_shuffle_down" in source


def test_vulkan_kind_build_skips_without_its_code_generator(toys, tmp_path):
    import tvm

    if tvm.get_global_func("target.build.vulkan", allow_missing=True) is None:
        pytest.skip("this TVM build has no Vulkan code generator (target.build.vulkan)")
    section = toys["toy_vulkan"].build(_moe_module(), None, str(tmp_path), {})
    assert (tmp_path / section["library"]).stat().st_size > 0


@pytest.mark.slow
def test_cpu_backend_under_another_name_compiles_and_runs(toys, tmp_path, monkeypatch):
    import json

    from qiao.backends.registry import backend_for_kind
    from qiao.compiler import compile
    from qiao.compiler.schedules.moe_table import lookup
    from tests.test_moe import BASE, E, H, inputs, moe_model, ort_run

    backend = toys["toy_cpu"]
    target = backend.target()
    # qiao's own CPU backend keeps the llvm kind: a plugin claiming it too takes nothing over
    assert backend_for_kind("llvm").name == "cpu" and "llvm" in toys["toy_llvm"].target_kinds
    assert backend.tuning_keys(target)[0] == "toy_cpu"
    assert backend.tuning_keys(target)[1:] == CPUBackend().tuning_keys(target)
    table = tmp_path / "moe_table.json"
    table.write_text(json.dumps({"version": 1, "entries": {"toy_cpu": {"block_m": 3}}}))
    monkeypatch.setenv("QIAO_MOE_TABLE", str(table))
    # a target alone gets the keys read from it (the CPU's); the toy's phases pass its own
    assert lookup(target).device != "toy_cpu"
    assert lookup(target, keys=backend.tuning_keys(target)).block_m == 3
    (lower_moe,) = [p for p in backend.phases(target, {})[0].passes if hasattr(p, "keys")]
    assert lower_moe.keys == backend.tuning_keys(target) and lower_moe.gpu is False
    model = moe_model(BASE, 2)
    artifact = compile(model, "toy_cpu", tmp_path / "toy")
    assert artifact.manifest["backend"]["name"] == "toy_cpu"
    for tokens in (1, 5):
        x, logits = inputs(tokens, H, E, seed=tokens)
        got = artifact.run({"x": x, "logits": logits})["y"]
        assert_close(got, ort_run(model, x, logits), 1e-4, 1e-5, "vs onnxruntime")
