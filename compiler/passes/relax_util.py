"""Small questions Relax passes ask of an expression: its dtype, its operator, its static dims."""

from __future__ import annotations

import tvm
from tvm import relax


def tensor_dtype(expr) -> str | None:
    """The dtype of ``expr``'s tensor type (``None`` for anything else)."""
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if ty is not None and hasattr(ty, "dtype") else None


def is_op(expr, name: str) -> bool:
    """Whether ``expr`` calls the Relax operator ``relax.<name>``."""
    return (
        isinstance(expr, relax.Call)
        and isinstance(expr.op, tvm.ir.Op)
        and expr.op.name == f"relax.{name}"
    )


def static_dims(expr) -> list | None:
    """The dims of ``expr``'s tensor type, each an ``int`` or ``None`` (symbolic)."""
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None:
        return None
    return [int(v) if isinstance(v, tvm.tirx.IntImm) else None for v in values]
