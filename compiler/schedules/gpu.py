"""The GPU rule set: TVM's dlight GPU rules, most specific first.

CUDA, ROCm and the other GPU kinds share it (``GPUBackend.schedule_rules`` returns it; a backend
may choose another); ``Fallback`` binds whatever no other rule took, so every kernel gets a thread
mapping.
Kernels qiao writes already scheduled (the MoE lowering) carry ``tirx.is_scheduled`` and are skipped
by ``ApplyScheduleRules``.
"""

from __future__ import annotations

from typing import Any


def gpu_rules(target: Any) -> list:
    """The ordered dlight GPU schedule rules for ``target``."""
    import tvm.s_tir.dlight as dl

    return [
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]
