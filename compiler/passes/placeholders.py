"""What the passes lowering a converter's placeholder calls (``qiao.moe``, ``qiao.gqa_attention``,
``qiao.kv_append``: ``call_dps_packed`` of an extern that never exists at run time) share."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax


def extern_symbol(expr: relax.Expr) -> str | None:
    """The extern's name when ``expr`` is a placeholder call (``call_dps_packed`` of an
    ``ExternFunc``), else ``None``."""
    if (
        isinstance(expr, relax.Call)
        and isinstance(expr.op, tvm.ir.Op)
        and expr.op.name == "relax.call_dps_packed"
        and isinstance(expr.args[0], relax.ExternFunc)
    ):
        return str(expr.args[0].global_symbol)
    return None


def contains_call(mod: tvm.IRModule, is_placeholder: Callable[[relax.Expr], bool]) -> bool:
    """Whether any Relax function of ``mod`` holds an expression ``is_placeholder`` accepts."""
    found = []

    def visit(expr):
        if not found and is_placeholder(expr):
            found.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
            if found:
                return True
    return False


def rewrite_functions(mod: tvm.IRModule, mutator) -> tvm.IRModule:
    """Every Relax function of ``mod`` through ``mutator`` (a ``PyExprMutator`` built on ``mod``);
    the module its builder holds afterwards."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
