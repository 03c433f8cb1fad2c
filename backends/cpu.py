"""CPU backend: LLVM code generation with qiao's CPU schedules; runs here."""

from __future__ import annotations

import os
import subprocess

from qiao.backends.base import Availability, DevicePreset
from qiao.backends.toolchains import find_lld
from qiao.backends.tvm_backend import TVMBackend
from qiao.compiler.errors import ArtifactIncompatible, CompileError, ToolchainMissing, UnknownTarget
from qiao.compiler.schedules.cpu_info import (
    checked_features,
    cpu_device,
    host_target_attrs,
    missing_on_host,
    target_arch,
    usable_cores,
)

# LLVM CPU names of other architectures, and the triple qiao cross-compiles them with.
_CROSS_TRIPLES = {"aarch64": "aarch64-linux-gnu"}


class CPUBackend(TVMBackend):
    """x86-64 / AArch64 through LLVM. ``--arch``: a preset or any LLVM CPU name (default: host)."""

    name = "cpu"
    vendor = "generic (LLVM)"
    default_preset = "host"
    lift_weight_packing = True  # the CPU GEMM rules pack weights; do it once, at load
    target_kinds = ("llvm", "c")
    device_type = "cpu"
    runtime_libraries = ("libtvm_runtime.so",)
    reference_device = "cpu"
    ort_providers = ("CPUExecutionProvider",)

    def presets(self):
        return {
            "host": DevicePreset(
                "host",
                "this machine's CPU (LLVM's CPU name, minus the features the OS does not report)",
                {},
            ),
            "x86-64-v3": DevicePreset(
                "x86-64-v3", "any AVX2 x86-64 (Haswell+, Zen+)", {"mcpu": "x86-64-v3"}
            ),
            "znver4": DevicePreset(
                "znver4", "AMD Zen 4 (EPYC 9004, Ryzen 7000)", {"mcpu": "znver4"}
            ),
            "sapphirerapids": DevicePreset(
                "sapphirerapids", "Intel Xeon 4th gen (AVX-512, AMX)", {"mcpu": "sapphirerapids"}
            ),
        }

    def availability(self):
        try:
            import tvm  # noqa: F401

            return Availability(True, True)
        except Exception as err:  # never raise from a probe
            return Availability(False, False, (f"apache-tvm does not import: {err}",))

    def target(self, arch=None):
        import tvm

        preset = self.preset(arch)
        if preset is not None:
            attrs = dict(preset.target) if preset.target else host_target_attrs()
        else:
            attrs = {"mcpu": arch}
            triple = str(tvm.target.codegen.llvm_get_system_triple())
            if not tvm.target.codegen.llvm_is_valid_cpu(arch, triple):
                cross = next(
                    (
                        t
                        for t in _CROSS_TRIPLES.values()
                        if tvm.target.codegen.llvm_is_valid_cpu(arch, t)
                    ),
                    None,
                )
                if cross is None:
                    raise UnknownTarget(
                        f"{arch!r} is neither a cpu preset nor an LLVM CPU name. "
                        f"fix: pass --arch with one of {', '.join(self.presets())} "
                        "or an LLVM CPU such as skylake-avx512, znver3, neoverse-v1"
                    )
                attrs["mtriple"] = cross
        return tvm.target.Target({"kind": "llvm", **attrs, "num-cores": usable_cores()})

    def export(self, executable, target, workdir, options):
        """Write the library; record the architecture and SIMD features its code needs (checked
        at load: a missing one is a clear error, not an illegal instruction)."""
        from qiao.backends.tvm_backend import LIBRARY

        arch = target_arch(target)
        if arch == self.host_arch():
            executable.export_library(os.path.join(workdir, LIBRARY))
        else:  # no cross linker needed: LLVM writes the object, ld.lld links it
            export_cross_library(executable, os.path.join(workdir, LIBRARY), arch)
        return {"cpu": {"arch": arch, "features": checked_features(target)}}

    @staticmethod
    def host_arch() -> str:
        from qiao.compiler.schedules.cpu_info import host_arch

        return host_arch()

    def load(self, artifact_dir, manifest):
        needs = manifest["backend"].get("cpu")
        if needs:
            missing = missing_on_host(needs["arch"], needs["features"])
            if missing:
                raise ArtifactIncompatible(
                    f"{artifact_dir} was compiled for a {needs['arch']} CPU with "
                    f"{', '.join(needs['features']) or 'no extra features'}; this machine "
                    f"({self.host_arch()}) lacks {', '.join(missing)}, so running it would crash. "
                    "fix: recompile it here (--arch host), or for a baseline every machine you "
                    "deploy to has (--arch x86-64-v3 for any AVX2 x86-64)"
                )
        return super().load(artifact_dir, manifest)

    def schedule_rules(self, target) -> list:
        """qiao's CPU rules: GEMM, convolution, reductions, then parallel/vectorised defaults."""
        from qiao.compiler.schedules.cpu import cpu_rules

        return cpu_rules(target)

    def schedule_passes(self, target, options=None) -> list:
        """The CPU rules with this device's tuning records (``options`` may ask to tune first:
        ``tune``, ``trials``; see ``qiao.compiler.schedules.tuning_database``), then the CPU loop
        rewrites (ragged vectors, vectorisable math, serial small kernels)."""
        from qiao.compiler.schedules import cpu_schedule_passes

        return cpu_schedule_passes(target, options, rules=self.schedule_rules(target))

    def tir_pipeline(self, target) -> str:
        """TVM's lowering, then strided vector loads as contiguous loads and shuffles."""
        from qiao.compiler.passes.shuffle_strided_loads import cpu_tir_pipeline

        return cpu_tir_pipeline()

    def device(self):
        return cpu_device()


def export_cross_library(executable, path: str, arch: str) -> None:
    """Export a library for another architecture: LLVM already wrote the object code for it, and
    ``ld.lld`` (any architecture) links it into a shared library; no cross compiler is needed."""
    lld = find_lld()
    if lld is None:
        raise ToolchainMissing(
            f"linking a library for {arch} on this {CPUBackend.host_arch()} machine needs "
            "ld.lld, which is not installed. fix: apt-get install lld-19, or compile on the "
            f"{arch} machine itself"
        )

    def link(output, objects, options=None, **_kwargs):
        proc = subprocess.run(
            [lld, "-shared", "-o", output, *objects], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise CompileError(
                f"ld.lld failed to link the {arch} library: {proc.stderr.strip()[:300]}. "
                "fix: report this with the model attached"
            )

    link.output_format = "so"
    executable.export_library(path, fcompile=link)
