"""PropagateNaN: float ``min``/``max`` in CPU kernels return NaN when either operand is NaN.

TVM's LLVM code generator emits ``max(a, b)`` as ``a > b ? a : b`` (``maxps``), which returns
``b`` when ``a`` is NaN: ``Relu(NaN)`` is 0, ``Max(NaN, 2)`` is 2, a ``ReduceMax`` over a row
with a NaN is the largest other element, ``Clip(NaN)`` is the lower bound. ONNX Runtime, PyTorch
and NumPy propagate NaN through all of these, so a model whose activations overflow would look
healthy compiled by qiao and broken everywhere else. The differential fuzzer
(``qiao.compiler.fuzzing``) found it; ``tests/test_fuzz_regressions.py`` keeps the cases.

The rewrite: ``max(x, c)`` with a constant ``c`` becomes ``max(c, x)`` (``c > x ? c : x`` is
``x`` for a NaN ``x``: still one ``maxps``); ``max(a, b)`` of two variables becomes LLVM's
``llvm.maximum`` (IEEE 754-2019 ``maximum``: NaN if either is NaN, vectorised by LLVM; native
``fmax`` on AArch64). The same for ``min``. Integer min/max are unchanged.
"""

from __future__ import annotations

from typing import Any


def propagate_nan(func):
    """``func`` with every float ``Min``/``Max`` NaN-propagating (see the module docstring)."""
    import tvm_ffi
    from tvm import tirx

    def on_minmax(value, mutator):
        new = mutator.default_mutate(value)
        ty = str(new.a.ty)
        if not ty.startswith(("float", "bfloat")):
            return new
        a, b = new.a, new.b
        if isinstance(a, tirx.FloatImm):
            a, b = b, a
        if isinstance(b, tirx.FloatImm):
            # ``c > a ? c : a`` is ``a`` for a NaN ``a``: one max instruction, as before
            return type(new)(b, a)
        name = "llvm.maximum" if isinstance(new, tirx.Max) else "llvm.minimum"
        return tirx.call_llvm_pure_intrin(ty, name, a, b)

    return tvm_ffi.structural_mutate(func, [(tirx.Max, on_minmax), (tirx.Min, on_minmax)])


def PropagateNaN() -> Any:  # noqa: N802 - a pass constructor, named like TVM's
    """Module pass applying ``propagate_nan`` to every PrimFunc.

    Returns
    -------
    tvm.transform.Pass
    """
    from qiao.compiler.passes.apply_schedule_rules import primfunc_rewrite_pass

    return primfunc_rewrite_pass("PropagateNaN", propagate_nan)
