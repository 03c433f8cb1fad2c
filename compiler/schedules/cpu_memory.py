"""Where the CPU keeps large weights: 2 MB transparent huge pages.

Used by the runners (``qiao.backends.tvm_backend`` re-exports these) and by ``qiao tune moe``
(``moe_table.time_stage_kernels``), so that the tuner times its kernels on the pages the runner
will give them: on 4 KB pages the MoE block's gate/up GEMM at T = 128 took 130 against 113 ms
(E = 128, AVX-512 EPYC, 2026-12-04), which would rank schedules by TLB misses. The standalone
runtime of ``qiao pack`` bundles keeps its own copy (``compiler/bundle/qiao_runtime.py``: it imports
nothing of qiao), held equal by ``tests/test_pack.py``.
"""

from __future__ import annotations

import functools

import numpy as np

# Weights of at least HUGE_PAGE_MIN_BYTES live on the CPU on 2 MB transparent huge pages where
# Linux allows it (THP mode "madvise", a common default, gives them only to memory that asks):
# streamed from memory on 4 KB pages, a weight costs a TLB miss every 4 KB and the hardware
# prefetcher stops at every page boundary. The Qwen3-30B-A3B MoE block's grouped GEMMs at T = 128
# (2026-12-03, AVX-512 EPYC, 5 interleaved rounds): gate/up 0.94-1.0x (median 0.96), down
# 0.69-1.04x (median 0.89) the time on 4 KB pages.
HUGE_PAGE_BYTES = 2 << 20
HUGE_PAGE_MIN_BYTES = 8 << 20
_MADV_HUGEPAGE = 14
_DLPACK_CPU = 1


@functools.cache
def libc():
    """The C library, looked up once per process (``find_library`` runs ``ldconfig``), with
    ``madvise``'s argument types set; None where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


def advise_huge_pages(ptr: int, nbytes: int) -> bool:
    """Ask Linux to back the whole 2 MB pages inside ``[ptr, ptr + nbytes)`` with transparent huge
    pages (``madvise(MADV_HUGEPAGE)``); effective for pages not yet written. False where it was
    not done (another OS, no whole page inside, THP unavailable)."""
    import sys

    start = -(-ptr // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (ptr + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    lib = libc() if sys.platform.startswith("linux") and end > start else None
    if lib is None:
        return False
    return lib.madvise(start, end - start, _MADV_HUGEPAGE) == 0


def weight_tensor(value, device):
    """``value`` (a NumPy array or a tensor) as a tensor on ``device``. A large one on the CPU is a
    fresh copy whose memory is advised onto huge pages before it is written
    (``HUGE_PAGE_MIN_BYTES``); anything else is ``tvm.runtime.tensor``'s copy (or the tensor)."""
    import tvm

    is_array = isinstance(value, np.ndarray)
    if is_array:
        value = np.asarray(value, order="C")
    nbytes = value.nbytes if is_array else value.numel() * tvm.DataType(value.dtype).itemsize
    if device.dlpack_device_type() != _DLPACK_CPU or nbytes < HUGE_PAGE_MIN_BYTES:
        return tvm.runtime.tensor(value, device) if is_array else value
    out = tvm.runtime.empty(value.shape, str(value.dtype), device)
    advise_huge_pages(out.data_ptr(), nbytes)
    if is_array:
        out.copyfrom(value)
    else:
        value.copyto(out)
    return out
