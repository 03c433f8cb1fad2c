"""CPU backend: LLVM code generation with qiao's CPU schedules; runs here."""

from __future__ import annotations

from qiao.backends.base import Availability, DevicePreset
from qiao.backends.tvm_backend import TVMBackend
from qiao.compiler.errors import UnknownTarget
from qiao.compiler.schedules.cpu_info import cpu_device, usable_cores


def host_cpu() -> str:
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


class CPUBackend(TVMBackend):
    """x86-64 / AArch64 through LLVM. ``--arch``: a preset or any LLVM CPU name (default: host)."""

    name = "cpu"
    vendor = "generic (LLVM)"
    default_preset = "host"
    lift_weight_packing = True  # the CPU GEMM rules pack weights; do it once, at load

    def presets(self):
        return {
            "host": DevicePreset(
                "host", "this machine's CPU (LLVM -mcpu detected at compile time)", {}
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
            mcpu = preset.target.get("mcpu") or host_cpu()
        else:
            mcpu = arch
            if not tvm.target.codegen.llvm_is_valid_cpu(
                mcpu, tvm.target.codegen.llvm_get_system_triple()
            ):
                raise UnknownTarget(
                    f"{arch!r} is neither a cpu preset nor an LLVM CPU name. "
                    f"fix: pass --arch with one of {', '.join(self.presets())} "
                    "or an LLVM CPU such as skylake-avx512, znver3"
                )
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": usable_cores()})

    def schedule_passes(self, target, options=None) -> list:
        """qiao's CPU schedules (GEMM, convolution, attention, then parallel/vectorised defaults),
        with this device's tuning records; ``options`` may ask to tune first (``tune``, ``trials``).
        """
        from qiao.compiler.schedules import schedule_passes

        return schedule_passes(target, options)

    def device(self):
        return cpu_device()
