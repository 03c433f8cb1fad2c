"""Small questions Relax passes ask of an expression (its dtype, its operator, its static dims) and
of the target they run under (``current_cpu``, ``cpu_float32_lanes``); ``conv_kind``, which
convolutions the CPU rewrites take, and ``conv_like``, the convolution they emit in one's place."""

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


def current_cpu(gpu: bool | None):
    """The current target's ``CPUInfo`` when it is a CPU target (its keys say ``cpu``) and
    ``gpu`` (the backend's ``is_gpu``; ``None``: whether the keys say ``gpu``) is not set, else
    ``None``: the CPU-only Relax rewrites leave the module alone."""
    target = tvm.target.Target.current(allow_none=True)
    if target is None or "cpu" not in target.keys:
        return None
    if gpu or (gpu is None and "gpu" in target.keys):
        return None
    from qiao.compiler.schedules.cpu_info import cpu_info

    return cpu_info(target)


def cpu_float32_lanes(gpu: bool | None) -> int | None:
    """The float32 lanes of the current target's vectors where ``current_cpu(gpu)`` gives a CPU,
    else ``None``."""
    cpu = current_cpu(gpu)
    return None if cpu is None else cpu.lanes("float32")


# the convolutions the CPU rewrites handle, in their channels-first layouts: (op, data, kernel)
CONV_LAYOUTS = {
    "nn.conv1d": (relax.op.nn.conv1d, "NCW", "OIW"),
    "nn.conv2d": (relax.op.nn.conv2d, "NCHW", "OIHW"),
}


def conv_kind(call) -> str | None:
    """``"nn.conv1d"`` / ``"nn.conv2d"`` where ``call`` is that convolution with its data,
    kernel and output in ``CONV_LAYOUTS``'s layouts (NCW / OIW / NCW, NCHW / OIHW / NCHW), else
    ``None``."""
    name = next((n for n in CONV_LAYOUTS if is_op(call, n)), None)
    if name is None:
        return None
    _, data_layout, kernel_layout = CONV_LAYOUTS[name]
    attrs = call.attrs
    layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
    return name if layouts == (data_layout, kernel_layout, data_layout) else None


def conv_like(call, data, weight, **changes):
    """The convolution ``call`` is (one ``conv_kind`` names) of ``data`` and ``weight``, with
    ``call``'s attributes but those named in ``changes`` (``strides``, ``padding``,
    ``dilation``, ``groups``)."""
    attrs = call.attrs
    op, data_layout, kernel_layout = CONV_LAYOUTS[call.op.name.removeprefix("relax.")]
    args = dict(
        strides=[int(s) for s in attrs.strides],
        padding=[int(p) for p in attrs.padding],
        dilation=[int(d) for d in attrs.dilation],
        groups=int(attrs.groups),
    )
    args.update(changes)
    return op(
        data,
        weight,
        **args,
        data_layout=data_layout,
        kernel_layout=kernel_layout,
        out_layout=data_layout,
        out_dtype=attrs.out_dtype,
    )
