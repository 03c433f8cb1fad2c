"""What the CPU schedules need to know about a target: SIMD width, vector registers, cores.

Everything is read from the TVM target (``mcpu``/``mattr`` through LLVM's feature tables, and
``num-cores``), never from the machine the compiler runs on, so that cross-compiling for another CPU
schedules for that CPU. TVM's ``llvm_get_vector_width`` is not used: in TVM 0.27 it answers 512 for
every x86 CPU, AVX2-only ones included.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

# (feature, SIMD register bits, number of SIMD registers), widest first.
_X86_SIMD = (("avx512f", 512, 32), ("avx", 256, 16), ("sse2", 128, 16))
_ARM_SIMD = (("sve", 128, 32), ("neon", 128, 32))


@dataclass(frozen=True)
class CPUInfo:
    """SIMD and core facts of a CPU target.

    Parameters
    ----------
    simd_bits : int
        Width of one SIMD register in bits (512 for AVX-512, 256 for AVX2, 128 for SSE/NEON).
    vector_registers : int
        Number of architectural SIMD registers (32 with AVX-512 and on AArch64, else 16).
    num_cores : int
        Cores to parallelise over (the target's ``num-cores``, else this machine's count).
    has_fma : bool
        Whether fused multiply-add is available (register budgets assume it).
    """

    simd_bits: int
    vector_registers: int
    num_cores: int
    has_fma: bool = True

    def lanes(self, dtype: str) -> int:
        """Elements of ``dtype`` in one SIMD register (at least 1)."""
        import tvm

        bits = tvm.DataType(str(dtype)).bits
        return max(self.simd_bits // bits, 1)


def cpu_info(target: Any) -> CPUInfo:
    """Read ``CPUInfo`` from an LLVM target (cached per target JSON)."""
    return _cpu_info(str(target))


@functools.lru_cache(maxsize=64)
def _cpu_info(target_json: str) -> CPUInfo:
    import tvm
    from tvm.target.codegen import llvm_cpu_has_features

    target = tvm.target.Target(target_json)
    cores = target.attrs.get("num-cores")
    num_cores = int(cores) if cores else usable_cores()
    triple = str(target.attrs.get("mtriple", "") or "")
    try:
        host_triple = str(tvm.target.codegen.llvm_get_system_triple())
    except Exception:  # pragma: no cover - LLVM always present in the wheel
        host_triple = ""
    arm = (triple or host_triple).startswith(("aarch64", "arm64"))
    table = _ARM_SIMD if arm else _X86_SIMD

    def has(feature: str) -> bool:
        try:
            return bool(llvm_cpu_has_features(feature, target))
        except Exception:  # an unknown feature name for this triple
            return False

    for feature, bits, regs in table:
        if has(feature):
            return CPUInfo(bits, regs, num_cores, has_fma=arm or has("fma"))
    # Plain x86-64 without SSE2 reporting, or an unknown architecture: scalar-safe 128-bit.
    return CPUInfo(128, 16, num_cores, has_fma=False)


class CPURule:
    """Base of qiao's CPU schedule rules (TVM dlight's ``ScheduleRule`` protocol: ``apply(func,
    target, tunable)`` returns a schedule or ``None``): they apply to LLVM targets only."""

    def is_target_available(self, target: Any) -> bool:
        return target.kind.name == "llvm"


THREADS_ENV = "TVM_NUM_THREADS"


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_device():
    """``tvm.cpu(0)`` with TVM's thread pool sized to this process's cores.

    TVM sizes its pool once, at its first parallel kernel, from ``TVM_NUM_THREADS`` or else half the
    hardware threads (it assumes two per core): one thread on a 2-vCPU machine, so parallel kernels
    used half of it. Unless the user has chosen (``TVM_NUM_THREADS`` set), qiao sets one thread per
    usable core before anything runs. Kernels too small to pay for waking the pool stay serial (the
    ``serial_small_kernels`` pass)."""
    import tvm

    os.environ.setdefault(THREADS_ENV, str(usable_cores()))
    return tvm.cpu(0)
