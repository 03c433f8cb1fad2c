"""ROCm backend: TVM's ROCm target (LLVM AMDGPU) → an HSA code object for the chosen gfx arch.

TVM generates an AMDGPU object with its own LLVM and asks two callbacks for the rest: a linker
(``tvm_callback_rocm_link``: ``ld.lld`` turns the object into the code object the HIP runtime loads)
and the ROCm device-library bitcode (``tvm_callback_rocm_bitcode_path``). qiao registers both while
it compiles: any ``ld.lld`` it finds (Debian's ``lld-19`` works), and the device libraries when
installed, else none — most models need no ROCm math functions; one that does fails at link time
with a message naming ``rocm-device-libs``. The code object is packed into the library by TVM; a
copy sits beside it (``model.gfx942.hsaco``)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

from qiao.backends.base import Availability, DevicePreset
from qiao.backends.toolchains import find_lld
from qiao.backends.tvm_backend import GPUBackend, tvm_global_funcs
from qiao.compiler.errors import CompileError, ToolchainMissing, UnknownTarget

_ARCH = re.compile(r"gfx[0-9a-f]{3,4}$")
_BITCODE_DIRS = (
    "{rocm}/amdgcn/bitcode",
    "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode",  # Debian's rocm-device-libs
    "/usr/lib/aarch64-linux-gnu/amdgcn/bitcode",
    "/usr/share/amdgcn/bitcode",
)


def find_bitcode_dir() -> str | None:
    """The ROCm device-library bitcode directory (``ocml.bc`` ...), if installed."""
    rocm = os.environ.get("ROCM_PATH", "/opt/rocm")
    for pattern in _BITCODE_DIRS:
        path = pattern.format(rocm=rocm)
        if os.path.isfile(os.path.join(path, "ocml.bc")):
            return path
    return None


def rocm_device_arch() -> str | None:
    """``gfx...`` of GPU 0 when TVM's ROCm runtime sees one, else ``None``; never raises."""
    try:
        import tvm

        dev = tvm.rocm(0)
        return f"gfx{dev.compute_version.replace('.', '')}" if dev.exist else None
    except Exception:
        return None


class ROCmBackend(GPUBackend):
    """AMD Instinct GPUs. ``--arch`` is a preset or any ``gfxNNN`` LLVM's AMDGPU target knows."""

    name = "rocm"
    vendor = "AMD"
    default_preset = "gfx942"
    device_module = "hip"
    target_kinds = ("rocm",)
    device_type = "rocm"
    runtime_libraries = ("libtvm_runtime.so", "libtvm_runtime_rocm.so")
    is_gpu = True
    reference_device = "rocm"
    ort_providers = ("ROCMExecutionProvider", "MIGraphXExecutionProvider")

    def presets(self):
        return {
            "gfx90a": DevicePreset(
                "gfx90a",
                "AMD Instinct MI210 / MI250 / MI250X (CDNA2)",
                {"kind": "rocm", "mcpu": "gfx90a"},
            ),
            "gfx942": DevicePreset(
                "gfx942",
                "AMD Instinct MI300X / MI300A / MI325X (CDNA3)",
                {"kind": "rocm", "mcpu": "gfx942"},
            ),
        }

    def availability(self):
        missing = []
        lld = find_lld()
        if lld is None:
            missing.append("ld.lld not found (apt-get install lld-19, or ROCm's llvm)")
        gpu = rocm_device_arch()
        if gpu is None:
            missing.append("no ROCm GPU visible to TVM (needs the amdgpu driver and a GPU)")
        return Availability(lld is not None, gpu is not None, tuple(missing))

    def target(self, arch=None):
        import tvm

        name = arch or self.default_preset
        if not _ARCH.match(name):
            raise UnknownTarget(
                f"{name!r} is not an AMD GPU architecture. fix: pass --arch with one of "
                f"{', '.join(self.presets())} or another gfxNNN (e.g. gfx1100)"
            )
        return tvm.target.Target({"kind": "rocm", "mcpu": name})

    def arch_name(self, target):
        return str(target.attrs["mcpu"])

    def compile_context(self, target):
        lld = find_lld()
        if lld is None:
            raise ToolchainMissing(
                "compiling for ROCm needs ld.lld, which is not installed here. fix: apt-get "
                "install "
                "lld-19 (Debian/Ubuntu), or install ROCm and set ROCM_PATH"
            )
        bitcode_dir = find_bitcode_dir()

        def link(obj: bytes) -> bytearray:
            return bytearray(link_code_object(bytes(obj), lld, bitcode_dir))

        def bitcode_path(rocdl_dir=None):
            import tvm
            from tvm.support.rocm import callback_rocm_bitcode_path

            if bitcode_dir is not None:
                try:  # TVM's own choice and order of the device libraries
                    return callback_rocm_bitcode_path(bitcode_dir)
                except RuntimeError:
                    pass
            return tvm.runtime.convert([])

        return tvm_global_funcs(
            {"tvm_callback_rocm_link": link, "tvm_callback_rocm_bitcode_path": bitcode_path}
        )

    def device(self):
        import tvm

        return tvm.rocm(0)

    def load(self, artifact_dir, manifest):
        want = manifest["backend"].get("arch") or self.default_preset
        have = rocm_device_arch()
        if have is None:
            raise ToolchainMissing(
                "running this ROCm artifact needs an AMD GPU with the amdgpu driver; none is "
                "visible "
                f"here. fix: copy {artifact_dir} to a machine with a {want} GPU and run it there"
            )
        if have != want:
            raise ToolchainMissing(
                f"this artifact holds code for {want}, the GPU here is {have}. fix: recompile with "
                f"--arch {have}"
            )
        return super().load(artifact_dir, manifest)


def link_code_object(obj: bytes, lld: str, bitcode_dir: str | None) -> bytes:
    """Link TVM's AMDGPU relocatable object into a shared HSA code object with ``ld.lld``."""
    with tempfile.TemporaryDirectory(prefix="qiao-lld-") as tmp:
        src, out = os.path.join(tmp, "kernels.o"), os.path.join(tmp, "kernels.hsaco")
        with open(src, "wb") as f:
            f.write(obj)
        proc = subprocess.run(
            [lld, "--no-undefined", "-shared", src, "-o", out], capture_output=True, text=True
        )
        if proc.returncode != 0:
            msg = " ".join(proc.stderr.split())[:400]
            hint = (
                "the model calls ROCm math functions; install the device libraries "
                "(apt-get install rocm-device-libs, or ROCm) and compile again"
                if "undefined symbol" in msg and bitcode_dir is None
                else "rerun with --debug and report it with the model attached"
            )
            raise CompileError(f"ld.lld failed to link the ROCm code object: {msg}. fix: {hint}")
        with open(out, "rb") as f:
            return f.read()
