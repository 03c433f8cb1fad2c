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


def wrap_free_lanes(block, var, lanes: int) -> int:
    """The widest vector (a power of two, at most ``lanes``) over ``var`` that no ``// c`` or
    ``% c`` of ``block`` wraps inside: every such ``c`` must be a multiple of the width.

    TVM's vectoriser simplifies ``ramp(b, 1, n) % c`` as if the ramp never wrapped, so an index
    such as ``v % 8`` (a rotary embedding's half-head) vectorised 16 wide reads the wrong
    elements. Returns 1 when no width of two or more is safe."""
    import math

    import tvm_ffi
    from tvm import tirx

    divisors: list[int] = []

    def on_div(node):
        if isinstance(node.b, tirx.IntImm) and uses_var(node.a, var):
            divisors.append(abs(int(node.b.value)))

    kinds = (tirx.FloorMod, tirx.FloorDiv, tirx.Mod, tirx.Div)
    tvm_ffi.structural_walk(block.body, [(k, on_div) for k in kinds])
    width = lanes
    if divisors:
        period = math.gcd(*divisors)
        while width > 1 and period % width:
            width //= 2
    return width
