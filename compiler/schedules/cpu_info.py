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
CACHE_LINE_BYTES = 64  # x86-64 and AArch64 server cores (software prefetch and loop steps)


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


# Linux /proc/cpuinfo flag -> LLVM feature name, for the features that change generated code.
# A CPU name alone does not say what a machine can run: a VM may report a Zen 4 CPU and mask
# AVX-512, so the host target masks what the OS does not report, and an artifact records these.
_X86_FLAGS = {
    "sse4_1": "sse4.1", "sse4_2": "sse4.2", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "f16c": "f16c", "bmi1": "bmi", "bmi2": "bmi2", "avx512f": "avx512f", "avx512cd": "avx512cd",
    "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi", "avx512_vbmi2": "avx512vbmi2",
    "avx512_vnni": "avx512vnni", "avx512_bf16": "avx512bf16", "avx512_fp16": "avx512fp16",
    "avx512_bitalg": "avx512bitalg", "avx512_vpopcntdq": "avx512vpopcntdq",
    "avx_vnni": "avxvnni", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
    "amx_tile": "amx-tile", "amx_bf16": "amx-bf16", "amx_int8": "amx-int8",
}  # fmt: skip
_ARM_FLAGS = {
    "asimd": "neon", "asimddp": "dotprod", "fphp": "fullfp16", "sve": "sve", "sve2": "sve2",
    "i8mm": "i8mm", "bf16": "bf16",
}  # fmt: skip


def _arch_of(triple: str) -> str:
    triple = triple.lower()
    if triple.startswith(("aarch64", "arm64")):
        return "aarch64"
    if triple.startswith(("x86_64", "amd64")):
        return "x86_64"
    return triple.split("-", 1)[0]


@functools.lru_cache(maxsize=1)
def host_arch() -> str:
    """``x86_64``, ``aarch64``... of this machine, as LLVM names its triple."""
    import tvm

    return _arch_of(str(tvm.target.codegen.llvm_get_system_triple()))


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str | None:
    """``/proc/cpuinfo``'s text, read once (``None``: not there, another OS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def host_cpu_features() -> frozenset[str] | None:
    """LLVM names of the checked SIMD features this machine's OS reports (``None``: unknown)."""
    table = _ARM_FLAGS if host_arch() == "aarch64" else _X86_FLAGS
    text = _cpuinfo()
    if text is None:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return frozenset(llvm for flag, llvm in table.items() if flag in flags)


def checked_features(target: Any) -> list[str]:
    """The SIMD features ``target``'s code may use that a host can be checked for, sorted."""
    from tvm.target.codegen import llvm_get_cpu_features

    triple = str(target.attrs.get("mtriple", "") or "") or _system_triple()
    table = _ARM_FLAGS if _arch_of(triple) == "aarch64" else _X86_FLAGS
    have = {str(f) for f in llvm_get_cpu_features(target)}
    return sorted(set(table.values()) & have)


def _system_triple() -> str:
    import tvm

    return str(tvm.target.codegen.llvm_get_system_triple())


def host_target_attrs() -> dict[str, Any]:
    """``mcpu`` and ``mattr`` describing this machine: LLVM's CPU name, with every checked feature
    that name implies but the OS does not report switched off (``-avx512f`` on a VM that calls
    itself Zen 4 and masks AVX-512)."""
    import tvm

    mcpu = str(tvm.target.codegen.llvm_get_system_cpu())
    host = host_cpu_features()
    attrs: dict[str, Any] = {"mcpu": mcpu}
    if host is not None:
        implied = checked_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
        masked = [f"-{f}" for f in implied if f not in host]
        if masked:
            attrs["mattr"] = masked
    return attrs


def missing_on_host(arch: str, features: Any) -> list[str]:
    """What this machine lacks to run code for ``arch`` using ``features`` (LLVM names); an
    architecture mismatch is reported as the architecture."""
    if arch != host_arch():
        return [arch]
    host = host_cpu_features()
    if host is None:  # nothing to check against (no /proc/cpuinfo): trust the caller
        return []
    return sorted(set(features) - host)


def target_arch(target: Any) -> str:
    """The architecture ``target`` generates code for."""
    return _arch_of(str(target.attrs.get("mtriple", "") or "") or _system_triple())


def missing_here(target: Any) -> list[str]:
    """What this machine lacks to run code compiled for ``target`` (empty: it can run it)."""
    return missing_on_host(target_arch(target), checked_features(target))


def require_runnable_here(target: Any, doing: str) -> None:
    """Raise ``QiaoError`` unless this machine can run code compiled for ``target``: ``doing`` says
    what needed to run it (``"tune"``, ``"measure"``)."""
    from qiao.compiler.errors import QiaoError

    missing = missing_here(target)
    if missing:
        raise QiaoError(
            f"cannot {doing} for mcpu={target.attrs.get('mcpu')!r} here: this machine "
            f"({host_arch()}) lacks {', '.join(missing)}, so that code would crash it. fix: "
            f"{doing} on a machine with those features, or use --arch host"
        )


class CPURule:
    """Base of qiao's CPU schedule rules (TVM dlight's ``ScheduleRule`` protocol: ``apply(func,
    target, tunable)`` returns a schedule or ``None``): they apply to CPU targets only (TVM's
    ``cpu`` target key, as dlight's GPU rules check ``gpu``), whichever backend chose them."""

    def is_target_available(self, target: Any) -> bool:
        return "cpu" in target.keys


# The CPU family a kernel runs on, for the one schedule choice only the running machine settles:
# the software prefetch of the few-token weight streams in generic-ISA code
# (``MoESchedule.few_prefetch_off``: AVX2 code wants it on a Zen 4, runs faster without on a Zen 5).
# TVM has no cpuid intrinsic and a TIR kernel no global state, so qiao's runners publish this
# machine's family in the environment (``cpu_device``; a bundle's runtime likewise, its own copy)
# and the kernel reads it with libc's getenv, once per call: ``vendor code * 256 + family``
# (``cpu_family_code``); 0 or unset: unknown, the compiled choice stands.
CPU_FAMILY_ENV = "QIAO_CPU_FAMILY"
# /proc/cpuinfo ``vendor_id`` -> the vendor of a family name (``amd-26``), and its code
CPU_VENDORS = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}
CPU_VENDOR_CODES = {"amd": 1, "intel": 2}


def cpu_family_code(name: str) -> int:
    """The code kernels compare for a CPU family name: ``<vendor>-<family>``, the vendor ``amd``
    or ``intel`` and the family as ``/proc/cpuinfo`` gives it (``amd-25``: Zen 3 and 4, ``amd-26``:
    Zen 5, ``intel-6``: most Intel cores). ``ValueError`` for another form."""
    vendor, _, family = str(name).partition("-")
    if vendor not in CPU_VENDOR_CODES or not family.isdigit() or not 0 < int(family) < 256:
        raise ValueError(
            f"{name!r} is not a CPU family: use <vendor>-<family>, the vendor one of "
            f"{sorted(CPU_VENDOR_CODES)} and the family a number 1 .. 255 as /proc/cpuinfo's "
            "'cpu family' gives it (amd-26)"
        )
    return CPU_VENDOR_CODES[vendor] * 256 + int(family)


def cpu_family_of(cpuinfo: str) -> str | None:
    """The family name (``amd-26``) of the first processor in ``/proc/cpuinfo``'s text; ``None``
    for a vendor or format this does not know (an ARM machine, another OS)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block ends
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    vendor = CPU_VENDORS.get(fields.get("vendor_id", ""))
    family = fields.get("cpu family", "")
    return f"{vendor}-{int(family)}" if vendor and family.isdigit() else None


def host_cpu_family() -> str | None:
    """This machine's CPU family name (``cpu_family_of``); ``None`` where it cannot tell."""
    text = _cpuinfo()
    return None if text is None else cpu_family_of(text)


def publish_cpu_family() -> None:
    """Tell the kernels this machine's CPU family (``CPU_FAMILY_ENV``) unless the user has."""
    family = host_cpu_family()
    os.environ.setdefault(CPU_FAMILY_ENV, str(cpu_family_code(family) if family else 0))


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
    ``serial_small_kernels`` pass). The machine's CPU family is published for the kernels that
    choose by it (``publish_cpu_family``)."""
    import tvm

    os.environ.setdefault(THREADS_ENV, str(usable_cores()))
    publish_cpu_family()
    return tvm.cpu(0)
