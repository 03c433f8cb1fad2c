"""Machine and software fingerprint recorded in every benchmark result.

Results from different machines are only comparable when each says what it ran on: CPU model and
cores, GPUs with their driver (from ``nvidia-smi`` / ``rocm-smi`` where those exist), OS, and the
versions of qiao, TVM, ONNX Runtime and PyTorch. Every probe is best effort: a missing tool leaves
its field ``None`` and never raises.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any

from qiao.compiler.schedules.cpu_info import usable_cores

# Distribution names whose versions are recorded (``None`` when not installed).
SOFTWARE = (
    "qiao",
    "apache-tvm",
    "apache-tvm-ffi",
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "onnx",
    "numpy",
)
# Environment variables that change how many threads the engines use.
THREAD_ENV = (
    "TVM_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
)


def _command_output(argv: list[str], timeout: float = 10.0) -> str | None:
    """stdout of ``argv`` or ``None`` when the tool is absent or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def cpu_model() -> str | None:
    """The CPU's marketing name (``/proc/cpuinfo``, ``sysctl`` on macOS, else ``platform``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        out = _command_output(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return out.strip()
    return platform.processor() or None


def _memory_total_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            match = re.search(r"MemTotal:\s+(\d+) kB", f.read())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def cpu_info() -> dict[str, Any]:
    """CPU model, logical/physical/usable cores, LLVM's name for the host CPU, memory."""
    physical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    usable = usable_cores()
    llvm_cpu = None
    try:
        import tvm

        llvm_cpu = str(tvm.target.codegen.llvm_get_system_cpu())
    except Exception:  # TVM without LLVM: a fingerprint never fails
        pass
    return {
        "model": cpu_model(),
        "arch": platform.machine(),
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
        "cores_usable": usable,
        "llvm_cpu": llvm_cpu,
        "memory_bytes": _memory_total_bytes(),
    }


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """Parse ``nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap
    --format=csv,noheader,nounits``: one GPU a line."""
    gpus = []
    for line in text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 2 or not fields[0]:
            continue
        gpu: dict[str, Any] = {"vendor": "nvidia", "name": fields[0], "driver": fields[1]}
        if len(fields) > 2 and fields[2].replace(".", "", 1).isdigit():
            gpu["memory_bytes"] = int(float(fields[2]) * 1024 * 1024)  # MiB
        if len(fields) > 3 and fields[3] and fields[3] != "[N/A]":
            gpu["compute_capability"] = fields[3]
        gpus.append(gpu)
    return gpus


def parse_rocm_smi(text: str) -> list[dict[str, Any]]:
    """Parse ``rocm-smi --showproductname --showdriverversion --json``: ``{"card0": {...},
    "system": {"Driver version": ...}}``; the key names vary between ROCm releases."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []
    driver = None
    for key, value in data.items():
        if key.lower() == "system" and isinstance(value, dict):
            driver = value.get("Driver version") or value.get("driver_version")
    gpus = []
    for key, card in sorted(data.items()):
        if not key.lower().startswith("card") or not isinstance(card, dict):
            continue
        name = next(
            (
                card[k]
                for k in ("Card Series", "Card series", "Card SKU", "Device Name", "Card model")
                if card.get(k)
            ),
            key,
        )
        gpu = {"vendor": "amd", "name": name, "driver": card.get("Driver version") or driver}
        gfx = card.get("GFX Version") or card.get("gfx_version")
        if gfx:
            gpu["gfx"] = gfx
        gpus.append(gpu)
    return gpus


def gpu_info(run: Callable[[list[str]], str | None] = _command_output) -> list[dict[str, Any]]:
    """GPUs reported by ``nvidia-smi`` and ``rocm-smi`` (empty when neither tool exists)."""
    gpus = []
    out = run(
        [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,compute_cap",
            "--format=csv,noheader,nounits",
        ]
    )
    if out:
        gpus += parse_nvidia_smi(out)
    out = run(["rocm-smi", "--showproductname", "--showdriverversion", "--json"])
    if out:
        gpus += parse_rocm_smi(out)
    return gpus


def dist_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (``None``: not installed)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, str | None]:
    """Installed versions of qiao and the engines it is compared with (``None``: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in SOFTWARE:
        out[dist] = dist_version(dist)
    try:
        import onnxruntime

        out["onnxruntime_providers"] = list(onnxruntime.get_available_providers())
    except Exception:
        out["onnxruntime_providers"] = None
    return out


def machine_fingerprint() -> dict[str, Any]:
    """Everything about this machine a benchmark result depends on (never raises).

    Returns
    -------
    dict
        ``hostname``, ``os`` (system, release, platform string), ``cpu`` (see ``cpu_info``),
        ``gpus`` (see ``gpu_info``), ``env`` (thread-count variables that are set) and
        ``load_average`` (1, 5, 15 minutes) when the benchmark started.
    """
    return {
        "hostname": socket.gethostname(),
        "os": {
            "system": platform.system(),
            "release": platform.release(),
            "platform": platform.platform(),
        },
        "cpu": cpu_info(),
        "gpus": gpu_info(),
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        # Other work on the machine skews timings; the load says how busy it was.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def describe(machine: dict[str, Any]) -> str:
    """One line: ``hostname: CPU (N cores), GPU name (driver D)``."""
    cpu = machine.get("cpu") or {}
    parts = [f"{cpu.get('model') or 'unknown CPU'} ({cpu.get('cores_usable') or '?'} cores)"]
    for gpu in machine.get("gpus") or []:
        parts.append(f"{gpu.get('name')} (driver {gpu.get('driver') or '?'})")
    return f"{machine.get('hostname', '?')}: " + ", ".join(parts)
