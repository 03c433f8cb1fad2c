"""Small TIR expression helpers shared by the CPU rules and passes."""

from __future__ import annotations


def static_int(expr) -> int | None:
    """The value of an integer constant, ``None`` for a symbolic expression."""
    from tvm import tirx

    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def var_names(expr) -> set[str]:
    """Names of the variables ``expr`` mentions."""
    import tvm_ffi
    from tvm.ir.expr import Var

    names: set[str] = set()
    tvm_ffi.structural_walk(expr, [(Var, lambda v: (names.add(v.name), None)[1])])
    return names


def uses_var(expr, var) -> bool:
    """Whether ``expr`` mentions the variable ``var`` (by identity, not name)."""
    import tvm_ffi
    from tvm.ir.expr import Var

    hits = []
    tvm_ffi.structural_walk(expr, [(Var, lambda v: (hits.append(v.same_as(var)), None)[1])])
    return any(hits)
