"""MarkHostFuncsNoAlias: declare the VM's shape functions free of aliasing, as the kernels are.

The Relax VM lowering adds host PrimFuncs (``shape_func``: symbolic shape arithmetic on one
``int64`` heap buffer) without the ``tirx.noalias`` attribute every kernel carries. TVM 0.27's
LLVM code generation then compiles the whole module without ``noalias`` on any pointer, kernels
included: LLVM can no longer keep a GEMM's register tile in registers (it reloads and stores the
accumulators around every store to the output), and every kernel of a model with symbolic shapes
ran up to 2.5x slower than the same kernel built alone. A function with at most one buffer
parameter cannot alias, so marking it is always sound.
"""

from __future__ import annotations

from qiao.compiler.passes.apply_schedule_rules import primfunc_rewrite_pass

NOALIAS = "tirx.noalias"


def mark_noalias(func):
    """``func`` with ``tirx.noalias`` when it has at most one buffer parameter and lacks it."""
    if func.attrs is not None and NOALIAS in func.attrs:
        return func
    buffers = sum(1 for p in func.params if getattr(p.ty, "shape", None) is not None)
    return func.with_attr(NOALIAS, True) if buffers <= 1 else func


def MarkHostFuncsNoAlias():  # noqa: N802 - a pass constructor, named like TVM's
    """Module pass applying ``mark_noalias`` to every PrimFunc."""
    return primfunc_rewrite_pass("MarkHostFuncsNoAlias", mark_noalias)
