"""WidenDepthwiseRows: depthwise convolutions over narrow maps compute whole vectors per row.

The CPU window-reduction schedule (``qiao.compiler.schedules.cpu_conv``) vectorises a depthwise
convolution along its output rows. A row of 7 or 14 elements (MobileNet's and EfficientNet's last
stages) is not a whole number of 8-lane AVX2 vectors: it takes 3 vector instructions per tap
(4 + 2 + 1 lanes) per 7 elements, where ONNX Runtime, vectorising across 8 channels of its
blocked layout, needs one per 8 outputs. This pass pads such a convolution's output rows to whole
vectors instead: ``conv2d(x, w, groups=C)`` with ``W`` output columns becomes

    strided_slice(conv2d(x, w, groups=C, padding=(top, left, bottom, right + (Wv - W)·stride)),
                  axis 3, 0:W)

where ``Wv`` is ``W`` rounded up to whole vectors. The extra columns read zero padding only, and
are computed and dropped in registers: FuseOps puts the slice and the elementwise tail after it
into the convolution's kernel, whose rows are then single full vectors (one instruction per tap:
8 instead of 21 per tap and row of a 7x7 map). Applied where it saves instructions and wastes
little: float32 NCHW depthwise convolutions (``groups`` = input channels) whose static output
width is under two vectors and pads by at most ``MAX_WASTE`` of it (7 and 14, on AVX2 and on
AVX-512, where a 7-wide row becomes one 8-lane vector). CPU targets only. A SiLU tail, which the
window schedule runs after a task's sums over whole planes, then runs row by row (one full vector
each) rather than over the plane as one run, which the slice breaks.

Measured on a 2-core AVX2 EPYC at batch 8, interleaved in one process: 576 channels over 7x7 with
ReLU, 5x5 0.57 -> 0.37 ms, 3x3 0.19 -> 0.16 ms; MobileNetV3-Small end to end (its hard-swish
depthwise stages over 7x7 and 14x14), ONNX Runtime's time / qiao's 0.96 -> 1.04 at batch 1 and
0.78 -> 0.85 at batch 8. With SiLU (EfficientNet), 5x5 over 7x7 0.80 -> 0.63 ms, over 14x14 with
672 channels 3.2 -> 2.8 ms. On a 2-core AVX-512 EPYC (7-wide rows as 8-lane vectors): 576 channels
5x5 over 7x7 + hard-swish 472 -> 331 us (batch 8); 1152 channels + SiLU 129 -> 105 us (batch 1).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qiao.compiler.passes.placeholders import rewrite_functions
from qiao.compiler.passes.relax_util import (
    conv_kind,
    conv_like,
    cpu_float32_lanes,
    static_dims,
    tensor_dtype,
)

# Largest fraction of extra output columns computed to make a row whole vectors.
MAX_WASTE = 0.15


def widened_width(width: int, lanes: int) -> int | None:
    """The output width a depthwise row of ``width`` elements is computed at on ``lanes``-wide
    vectors, or ``None`` to leave it (already whole vectors, two or more vectors wide, or too
    much padding)."""
    if width % lanes == 0 or width >= 2 * lanes:
        return None
    # With 16 lanes (AVX-512), half vectors too: a 7-wide row as one 8-lane vector (an AVX2-width
    # instruction) rather than a 16-lane one with 9 idle lanes; measured on an AVX-512 EPYC,
    # 576 channels 5x5 over 7x7 + hard-swish 472 -> 331 us (batch 8), 65 -> 47 us (batch 1).
    for unit in (lanes, lanes // 2) if lanes >= 16 else (lanes,):
        if width % unit == 0:
            return None
        wide = -(-width // unit) * unit
        if (wide - width) / width <= MAX_WASTE:
            return wide
    return None


@mutator
class _Widener(PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if conv_kind(call) != "nn.conv2d" or tensor_dtype(call) != "float32":
            return call
        attrs = call.attrs
        x_shape, out_shape = static_dims(call.args[0]), static_dims(call)
        if (
            x_shape is None
            or out_shape is None
            or x_shape[1] is None
            or int(attrs.groups) != x_shape[1]
            or int(attrs.groups) < 2
            or out_shape[3] is None
        ):
            return call
        width = out_shape[3]
        wide = widened_width(width, self.lanes)
        if wide is None:
            return call
        top, left, bottom, right = (int(p) for p in attrs.padding)
        stride = int(attrs.strides[1])
        conv = self.builder_.emit(
            conv_like(
                call,
                call.args[0],
                call.args[1],
                padding=[top, left, bottom, right + (wide - width) * stride],
            )
        )
        return relax.op.strided_slice(conv, axes=[3], begin=[0], end=[width])


@tvm.transform.module_pass(opt_level=0, name="WidenDepthwiseRows")
class WidenDepthwiseRows:
    """Compute narrow depthwise convolution rows as whole vectors (see the module docstring).

    Parameters
    ----------
    gpu : bool, optional
        The backend's ``is_gpu``: nothing changes there. Default: whether the current target's
        keys say ``gpu``. A target whose keys do not say ``cpu`` is left alone too.
    """

    def __init__(self, gpu: bool | None = None):
        self.gpu = gpu

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        # Only a CPU target's window schedule vectorises rows this way.
        lanes = cpu_float32_lanes(self.gpu)
        return mod if lanes is None else rewrite_functions(mod, _Widener(mod, lanes))
