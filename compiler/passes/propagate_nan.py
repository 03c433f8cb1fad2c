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
    """``func`` with every float ``Min``/``Max`` NaN-propagating (see the module docstring), its
    max (min) accumulators starting from ``-inf`` (``+inf``): ``infinite_identities``."""
    import tvm_ffi
    from tvm import tirx

    func = infinite_identities(func)

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


def infinite_identities(func):
    """``func`` with each float max (min) accumulator initialised to ``-inf`` (``+inf``) instead
    of TOPI's identity, the lowest (highest) finite float: a ReduceMax row of only ``-inf`` (a
    fully masked attention row) was ``-3.4e38`` where ONNX Runtime, PyTorch and NumPy give
    ``-inf`` (found by ``qiao.compiler.fuzzing``).

    An accumulator is a buffer that some store updates as ``buf[i] = max(buf[i], v)`` (``min``);
    the stores of the finite identity into it (a ``T.init``, or the init block that
    ``decompose_reduction`` split off) store the infinity instead. This runs *after* the schedule
    rules: with an infinite init before them, TVM's ``rfactor`` no longer recognises the max
    reducer and ``CPURowReduction`` fell back to a scalar loop (4ddf20a); once scheduled, only
    the stored constant changes. Other stores of ``-3.4e38`` (an attention mask's fill, a pad
    value) are left as they are."""
    import numpy as np
    import tvm_ffi
    from tvm import ir, tirx

    kinds = []  # (buffer, sign): -1 for a max accumulator, +1 for min

    def on_store(store):
        value = store.value
        if not isinstance(value, (tirx.Max, tirx.Min)):
            return
        dtype = str(store.buffer.dtype)
        if not dtype.startswith("float"):
            return
        for operand in (value.a, value.b):
            if (
                isinstance(operand, ir.TensorLoad)
                and operand.source.same_as(store.buffer)
                and tvm_ffi.structural_equal(list(operand.indices), list(store.indices))
            ):
                kinds.append((store.buffer, -1 if isinstance(value, tirx.Max) else 1))
                return

    tvm_ffi.structural_walk(func.body, [(tirx.BufferStore, on_store)])
    if not kinds:
        return func

    def sign_of(buffer):
        signs = {s for b, s in kinds if b.same_as(buffer)}
        return signs.pop() if len(signs) == 1 else None

    def on_store_mutate(store, mutator):
        new = mutator.default_mutate(store)
        value = new.value
        if not isinstance(value, tirx.FloatImm):
            return new
        sign = sign_of(new.buffer)
        if sign is None:
            return new
        try:
            finite = float(np.finfo(np.dtype(str(value.ty))).max)
        except TypeError:  # bfloat16 and other dtypes NumPy lacks
            return new
        if float(value.value) != sign * finite:
            return new
        infinite = tirx.const(sign * float("inf"), str(value.ty))
        return tirx.BufferStore(new.buffer, infinite, new.indices)

    return tvm_ffi.structural_mutate(func, [(tirx.BufferStore, on_store_mutate)])


def PropagateNaN() -> Any:  # noqa: N802 - a pass constructor, named like TVM's
    """Module pass applying ``propagate_nan`` to every PrimFunc.

    Returns
    -------
    tvm.transform.Pass
    """
    from qiao.compiler.passes.apply_schedule_rules import primfunc_rewrite_pass

    return primfunc_rewrite_pass("PropagateNaN", propagate_nan)
