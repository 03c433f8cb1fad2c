"""FoldPadding: an explicit Pad before a convolution or a pooling becomes that op's own padding.

Exporters emit a separate ``Pad`` node where the op after it cannot say its padding: TorchScript's
opset-9 export of an average pooling that counts its padded zeros (``count_include_pad``, torch's
default; ShuffleNet's shortcut, Inception), TensorFlow converters' asymmetric "SAME" padding
before a convolution. The frontend imports a constant Pad as ``relax.nn.pad``; run as its own
kernel it writes the whole padded tensor out and the next kernel reads it back (ShuffleNet v1's
three shortcut pads: 0.30 ms of a 1.4 ms network; the Caffe2-era ShuffleNet at full size, AMD Zen
5 VM, 2026-12-07, ONNX Runtime's time over qiao's 0.92 -> 1.10, ``python -m pytest
benchmarks/test_cpu_models.py --benchmark-only -s -k caffe2``). This pass rewrites

    conv1d / conv2d(pad(x, zeros on the spatial axes), padding p)  ->  conv(x, padding p + pads)
    avg_pool2d(pad(x, zeros), padding 0)          ->  avg_pool2d(x, padding pads, count_include_pad)
    max_pool2d(pad(x, -inf or the lowest float), padding p)  ->  max_pool2d(x, padding p + pads)

for channels-first layouts (NCW, NCHW), non-negative pads on the spatial axes only, poolings
without ``ceil_mode``. The pad stays
where something else reads it. Every target: the rewritten ops are the same computation.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qiao.compiler.passes.placeholders import rewrite_functions
from qiao.compiler.passes.relax_util import CONV_LAYOUTS, conv_kind, conv_like, is_op


def _spatial_pads(pad_call, rank: int) -> list[tuple[int, int]] | None:
    """``[(before, after), ...]`` for the spatial axes of a constant ``relax.nn.pad`` over a
    channels-first tensor of ``rank`` dims, or ``None`` when it pads the batch or the channels,
    or is not a constant pad."""
    attrs = pad_call.attrs
    if str(attrs.pad_mode) != "constant":
        return None
    widths = [int(w) for w in attrs.pad_width]
    if len(widths) != 2 * rank or any(w < 0 for w in widths) or any(widths[:4]):
        return None
    return [(widths[2 * d], widths[2 * d + 1]) for d in range(2, rank)]


def _pad_value(pad_call) -> float | None:
    value = pad_call.attrs.pad_value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _lowest(value: float, dtype: str) -> bool:
    """Whether ``value`` is -inf or the lowest finite ``dtype`` (what max pooling pads with)."""
    return value == float("-inf") or (
        dtype.startswith("float") and value <= float(np.finfo(dtype).min)
    )


@mutator
class _Folder(PyExprMutator):
    def _pad_of(self, expr):
        """The ``relax.nn.pad`` call bound to ``expr`` (a dataflow var), or ``None``."""
        if isinstance(expr, relax.Var):
            expr = self.lookup_binding(expr)  # None for a function parameter
        return expr if is_op(expr, "nn.pad") else None

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if conv_kind(call):
            return self._conv(call)
        if is_op(call, "nn.avg_pool2d") or is_op(call, "nn.max_pool2d"):
            return self._pool(call)
        return call

    def _conv(self, call):
        pad = self._pad_of(call.args[0])
        rank = len(CONV_LAYOUTS[call.op.name.removeprefix("relax.")][1])
        pads = None if pad is None else _spatial_pads(pad, rank)
        if pads is None or _pad_value(pad) != 0.0:
            return call
        return conv_like(call, pad.args[0], call.args[1], padding=_merged(call, pads))

    def _pool(self, call):
        attrs = call.attrs
        pad = self._pad_of(call.args[0])
        pads = None if pad is None else _spatial_pads(pad, 4)
        if pads is None or str(attrs.layout) != "NCHW" or str(attrs.out_layout) != "NCHW":
            return call
        if bool(attrs.ceil_mode):
            return call  # a ceil-mode window may start in the pad, which its own padding forbids
        value = _pad_value(pad)
        own = [int(p) for p in attrs.padding]
        if is_op(call, "nn.avg_pool2d"):
            # the padded zeros count in every window: only where the pool pads nothing itself
            # (or counts its own padding too)
            if value != 0.0 or (any(own) and not bool(attrs.count_include_pad)):
                return call
            op, extra = relax.op.nn.avg_pool2d, {"count_include_pad": True}
        else:
            dtype = str(pad.ty.dtype)
            if value is None or not _lowest(value, dtype):
                return call
            op, extra = relax.op.nn.max_pool2d, {"count_include_pad": False}
        return op(
            pad.args[0],
            pool_size=[int(k) for k in attrs.pool_size],
            strides=[int(s) for s in attrs.strides],
            padding=_merged(call, pads),
            dilation=[int(d) for d in attrs.dilation],
            layout="NCHW",
            out_layout="NCHW",
            **extra,
        )


def _merged(call, pads: list[tuple[int, int]]) -> list[int]:
    """``call``'s own padding plus ``pads`` ((before, after) per spatial axis), in Relax's order:
    all befores, then all afters."""
    own = [int(p) for p in call.attrs.padding]
    dims = len(pads)
    return [own[d] + pads[d][0] for d in range(dims)] + [
        own[dims + d] + pads[d][1] for d in range(dims)
    ]


@tvm.transform.module_pass(opt_level=0, name="FoldPadding")
class FoldPadding:
    """Give convolutions and poolings the padding of an explicit pad before them (see the
    module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        mod = rewrite_functions(mod, _Folder(mod))
        # the pads nothing reads any more
        updates = {
            gv: relax.analysis.remove_all_unused(func)
            for gv, func in mod.functions_items()
            if isinstance(func, relax.Function)
        }
        for gv, func in updates.items():
            mod[gv] = func
        return mod
