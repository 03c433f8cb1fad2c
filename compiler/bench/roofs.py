"""Roofs of the local CPU for the roofline view: what a well-tuned library reaches here."""

from __future__ import annotations

from typing import Any

import numpy as np

from qiao.compiler.bench.timing import time_callable


def measure_cpu_roofs(n: int = 1024, copy_mib: int = 64, trials: int = 3) -> dict[str, Any]:
    """Attainable ceilings of this CPU measured with numpy: float32 GEMM (BLAS) and a large copy.

    Not datasheet peaks: what a well-tuned library reaches here, which is what the roofline view
    compares qiao's kernels with."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    gemm_s = min(time_callable(lambda: a @ b, trials, 1))
    src = np.ones(copy_mib * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    copy_s = min(time_callable(lambda: np.copyto(dst, src), trials, 1))
    return {
        "peak_gflops": 2.0 * n**3 / gemm_s / 1e9,
        "bandwidth_gbs": 2.0 * src.nbytes / copy_s / 1e9,  # read + write
        "method": f"numpy float32 GEMM {n}^3 (BLAS) and a {copy_mib} MiB copy (read + write), "
        f"best of {trials}: attainable ceilings, not datasheet peaks",
    }
