"""qiao.compiler.kernels — qiao's own TIR kernels, each documenting its tensors.

The MoE dispatch, in the order ``qiao.compiler.passes.LowerMoE`` calls them (CPU and GPU schedules
of the same stages; shared definitions in ``moe_common``):

- ``moe_gating.moe_gating``: softmax + top-k + renormalise, fused;
- ``moe_align.moe_align``: per-expert counts, padded prefix sums, slots sorted by expert;
- ``group_gemm.group_gemm_up`` / ``group_gemm_down``: grouped GEMMs over routed pairs only (gate/up
  with the activation fused; down with the routing weight fused), GEMV kernels for decode;
- ``moe_combine.moe_combine``: weighted rows summed back in token order (deterministic).

GroupQueryAttention (``qiao.compiler.passes.LowerAttention``): ``attention.gqa_attention`` (online-
softmax attention over the cache rows each entry uses) and ``attention.kv_append`` (the in-place
cache update).
"""

from qiao.compiler.tvmscript import fast_frames

# the kernels are nested TVMScript macros: expanding them at TVM's pace took most of a compile
fast_frames()
