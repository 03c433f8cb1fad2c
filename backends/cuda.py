"""CUDA backend: TVM's CUDA target with dlight GPU schedules, compiled ahead of time by ``nvcc``.

TVM 0.27 built without a CUDA driver leaves CUDA C source in the library and would compile it when
the library is loaded on the GPU machine. qiao instead compiles that source here, with ``nvcc``,
into a fatbin holding SASS for the chosen ``sm_XX`` plus its PTX (so newer GPUs can JIT it), and
packs the fatbin into the library in place of the source: running the artifact needs the CUDA
driver, never a compiler. A copy of the fatbin sits beside the library (``model.sm_XX.fatbin``) for
inspection."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping
from typing import Any

from qiao.backends.base import Availability, DevicePreset
from qiao.backends.binfmt import FATBIN_MAGIC
from qiao.backends.tvm_backend import GPUBackend, tvm_global_funcs
from qiao.compiler.errors import CompileError, ToolchainMissing, UnknownTarget

_ARCH = re.compile(r"sm_(\d+)([af]?)$")
NVCC_TIMEOUT_S = 600


def find_nvcc() -> str | None:
    """``nvcc`` from ``PATH``, ``$CUDA_HOME/bin`` or ``/usr/local/cuda/bin``; ``None`` if absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def cuda_device_arch() -> str | None:
    """``sm_XY`` of GPU 0 when TVM's CUDA runtime sees one, else ``None``; never raises."""
    try:
        import tvm

        dev = tvm.cuda(0)
        if not dev.exist:
            return None
        return "sm_" + dev.compute_version.replace(".", "")
    except Exception:
        return None


class CUDABackend(GPUBackend):
    """NVIDIA GPUs. ``--arch`` is a preset or any ``sm_XY`` nvcc accepts (default ``sm_80``: its PTX
    also runs, JIT-compiled by the driver, on every newer GPU)."""

    name = "cuda"
    vendor = "NVIDIA"
    default_preset = "sm_80"
    device_module = "cuda"
    target_kinds = ("cuda",)
    device_type = "cuda"
    runtime_libraries = ("libtvm_runtime.so", "libtvm_runtime_cuda.so")
    is_gpu = True
    reference_device = "cuda"
    ort_providers = ("CUDAExecutionProvider",)

    def presets(self):
        return {
            "sm_80": DevicePreset(
                "sm_80", "NVIDIA A100 (Ampere)", {"kind": "cuda", "arch": "sm_80"}
            ),
            "sm_89": DevicePreset(
                "sm_89", "NVIDIA L40S / L4 / RTX 4090 (Ada)", {"kind": "cuda", "arch": "sm_89"}
            ),
            "sm_90": DevicePreset(
                "sm_90", "NVIDIA H100 / H200 (Hopper)", {"kind": "cuda", "arch": "sm_90"}
            ),
        }

    def availability(self):
        missing = []
        nvcc = find_nvcc()
        if nvcc is None:
            missing.append(
                "nvcc not found (install the CUDA toolkit, e.g. apt-get install "
                "nvidia-cuda-toolkit, "
                "or put $CUDA_HOME/bin on PATH)"
            )
        gpu = cuda_device_arch()
        if gpu is None:
            missing.append("no CUDA GPU visible to TVM (needs an NVIDIA driver and a GPU)")
        return Availability(nvcc is not None, gpu is not None, tuple(missing))

    def target(self, arch=None):
        import tvm

        name = arch or self.default_preset
        if not _ARCH.match(name):
            raise UnknownTarget(
                f"{name!r} is not a CUDA architecture. fix: pass --arch with one of "
                f"{', '.join(self.presets())} or another sm_XY (e.g. sm_86, sm_100)"
            )
        return tvm.target.Target({"kind": "cuda", "arch": name})

    def arch_name(self, target):
        return str(target.arch)

    def compile_context(self, target):
        # Where TVM's CUDA runtime is linked (a machine with a driver), it compiles the source while
        # building, through this callback: make that nvcc for the chosen arch too, not NVRTC.
        arch = self.arch_name(target)

        def compile_source(code, *_):
            return bytearray(compile_fatbin(str(code), arch))

        return tvm_global_funcs({"tvm_callback_cuda_compile": compile_source})

    def device_code(self, fmt, code, target, options):
        if fmt == "cuda":  # TVM without a CUDA runtime: source, compile it now
            return "fatbin", compile_fatbin(code.decode(), self.arch_name(target), options)
        if code[:4] == struct.pack("<I", FATBIN_MAGIC):  # compiled at build time through our
            return "fatbin", code  # callback (TVM with a driver), which TVM labels "cubin"
        return fmt, code

    def device(self):
        import tvm

        return tvm.cuda(0)

    def load(self, artifact_dir, manifest):
        want = manifest["backend"].get("arch") or self.default_preset
        have = cuda_device_arch()
        if have is None:
            raise ToolchainMissing(
                f"running this CUDA artifact needs an NVIDIA GPU and driver; none is visible here. "
                f"fix: copy {artifact_dir} to a machine with a GPU of compute capability >= {want} "
                "and run it there (no compiler needed)"
            )
        if _arch_number(have) < _arch_number(want):
            raise ToolchainMissing(
                f"this artifact is compiled for {want}, the GPU here is {have}. fix: recompile "
                "with "
                f"--arch {have}"
            )
        return super().load(artifact_dir, manifest)


def _arch_number(arch: str) -> int:
    m = _ARCH.match(arch)
    return int(m.group(1)) if m else 0


def compile_fatbin(source: str, arch: str, options: Mapping[str, Any] | None = None) -> bytes:
    """Compile TVM's CUDA C source with nvcc into a fatbin: SASS for ``arch`` plus its PTX.

    Parameters
    ----------
    source : str
        CUDA C source as TVM generated it (``extern "C" __global__`` kernels).
    arch : str
        ``sm_XY`` (optionally ``sm_XYa``).
    options : Mapping, optional
        ``fast_math=True`` adds ``--use_fast_math`` (off by default: validation compares with fp32
        CPU references).

    Returns
    -------
    bytes
        The fatbin.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise ToolchainMissing(
            "compiling for CUDA needs nvcc, which is not installed here. fix: install the CUDA "
            "toolkit "
            "(apt-get install nvidia-cuda-toolkit, or NVIDIA's cuda-toolkit package) or put "
            "$CUDA_HOME/bin on PATH"
        )
    m = _ARCH.match(arch)
    if not m:
        raise UnknownTarget(f"{arch!r} is not a CUDA architecture (sm_XY)")
    number = m.group(1) + m.group(2)
    with tempfile.TemporaryDirectory(prefix="qiao-nvcc-") as tmp:
        src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, "kernels.fatbin")
        with open(src, "w") as f:
            f.write(source)
        cmd = [
            nvcc,
            "--fatbin",
            "-O3",
            f"-gencode=arch=compute_{number},code=[sm_{number},compute_{number}]",
            "-w",  # TVM's generated code has many unused temporaries
            "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            *(["--use_fast_math"] if (options or {}).get("fast_math") else []),
            "-o",
            out,
            src,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise CompileError(
                f"nvcc could not run ({err}). fix: check the CUDA installation"
            ) from err
        if proc.returncode != 0:
            log = (proc.stderr or proc.stdout).strip().splitlines()
            errors = [line for line in log if "error" in line.lower()] or log[-3:]
            raise CompileError(
                f"nvcc failed for {arch}: {' | '.join(errors[:3])}. fix: check that this nvcc "
                "supports "
                f"{arch} (nvcc --list-gpu-arch); rerun with --debug and report it otherwise"
            )
        with open(out, "rb") as f:
            return f.read()
