"""PadConvRows: a convolution whose output map no register tile divides computes an extra row.

The CPU GEMM schedule reads a convolution's input in place (``qiao.compiler.schedules.cpu_gemm
.direct_rows``: the image positions as register-tile rows, no im2col panel) only where a tile
height of 4 .. 8 rows (4 .. 6 with 16 vector registers) divides the positions of a map, because a
padded tile row would read past the input. Maps of odd sides without a factor 5 or 7 (57x57,
113x113, 17x17, 13x13, 9x9: Inception-style or odd input resolutions) fall back to packed im2col
panels, which ran 1.2-1.9x as long (small maps up to 4x). This pass gives such a convolution ``e``
more output rows, padding its input's bottom by ``e * stride_h`` more zeros so that the window of
every new row stays inside the padded input, and slices them off:

    strided_slice(conv2d(x, w, padding (top, left, bottom + e * s_h, right)), axes (2,), end (H,))

(operator fusion puts the slice and what follows it, bias, residual add, ReLU, in the convolution's
kernel: no copy of the output).

``e`` is the fewest rows (at most an eighth of the map's, ``MAX_EXTRA``) after which a tile height
divides the positions. Applied on CPU targets to float32 NCHW/OIHW convolutions with one group and
static channels and spatial dims that ``direct_rows`` would take but for the positions
(``cpu_gemm.direct_window``: enough output channels for its tiles, a window and a reduction long
enough). The positions are counted as the schedule counts them: one image's map, or the whole batch
where it is static.

Measured per call, one Conv node (+ bias), without the pass and with it (slice included),
interleaved with ONNX Runtime in one process (2-core AMD EPYC VM, Zen 4; 2026-12-07, medians of
7-21 rounds): host code (AVX-512), 3x3 64 -> 64 over 57x57 19.6 -> 10.7 ms at batch 8 (ORT 10.4)
and 1.89 -> 1.26 ms at batch 1 (ORT 1.27); 113x113 66.9 -> 39.3 ms at batch 8 (ORT 37.6); 256 ->
256 over 17x17 15.4 -> 13.5 ms at batch 8 (ORT 12.7) and 1.93 -> 1.70 ms at batch 1 (ORT 1.62).
AVX2 code (``x86-64-v3``): 57x57 batch 8 14.7 -> 9.9 ms, 17x17 batch 1 2.32 -> 2.02 ms. Small maps,
host code: 64 -> 64 over 13x13 at batch 1 0.357 -> 0.079 ms (ORT 0.097), batch 8 1.88 -> 0.52 (ORT
0.45); 256 -> 256 over 13x13 batch 1 4.30 -> 1.02 (ORT 0.91); 64 -> 64 over 11x11 0.167 -> 0.054
(ORT 0.056); over 9x9 0.068 -> 0.044 (ORT 0.055), 128 -> 128 over 9x9 batch 8 1.47 -> 1.02 (ORT
0.94). A 7x7 map (ResNet's last stage on AVX2 code: 49 positions, 56 with a row more, 14 % more
work) went either way: 512 channels batch 8 10.9 -> 10.8 ms, 64 channels batch 1 0.054 -> 0.046,
256 channels batch 1 0.403 -> 0.430: ``MAX_EXTRA`` leaves it. Whole ResNet-18 (``qiao.models
.vision``, TorchScript export, interleaved with ORT) at 227x227 input (57x57 and 29x29 maps), ORT's
time over qiao's: host code 0.79 -> 0.98 at batch 1 and 0.75 -> 0.93 at batch 8; AVX2 code 0.77 ->
0.84 and 0.74 -> 0.85; at 299x299 (19x19), batch 1, host code 0.80 -> 0.90.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qiao.compiler.passes.placeholders import rewrite_functions
from qiao.compiler.passes.relax_util import (
    conv_kind,
    conv_like,
    current_cpu,
    static_dims,
    tensor_dtype,
)

# Extra output rows allowed: at most one per this many rows of the map (12.5 % more work).
MAX_EXTRA = 8


def extra_rows(call, cpu) -> int:
    """Output rows that ``PadConvRows`` adds to the ``relax.nn.conv2d`` ``call`` compiled for
    ``cpu`` (a ``CPUInfo``): 0 where it leaves the call alone."""
    from qiao.compiler.schedules.cpu_gemm import direct_rows_height, direct_window

    if conv_kind(call) != "nn.conv2d":
        return 0
    attrs = call.attrs
    x, w = call.args
    x_shape, w_shape, y_shape = static_dims(x), static_dims(w), static_dims(call)
    if (
        {tensor_dtype(x), tensor_dtype(w), tensor_dtype(call)} != {"float32"}
        or None in (x_shape, w_shape, y_shape)
        or len(y_shape) != 4
        or None in w_shape
        or None in y_shape[1:]
    ):
        return 0
    cout, cin, kh, kw = w_shape  # cin: input channels per group
    vectors = direct_window(cpu.lanes("float32"), cout // int(attrs.groups), cin, kh * kw)
    if not vectors:
        return 0
    batch, height, width = y_shape[0] or 1, y_shape[2], y_shape[3]
    if direct_rows_height(cpu, batch * height * width, vectors):
        return 0
    for extra in range(1, height // MAX_EXTRA + 1):
        if direct_rows_height(cpu, batch * (height + extra) * width, vectors):
            return extra
    return 0


@mutator
class _RowPadder(PyExprMutator):
    def __init__(self, mod, cpu):
        super().__init__(mod)
        self.cpu = cpu

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        extra = extra_rows(call, self.cpu)
        if not extra:
            return call
        attrs = call.attrs
        top, left, bottom, right = (int(p) for p in attrs.padding)
        taller = self.builder_.emit(
            conv_like(
                call,
                call.args[0],
                call.args[1],
                padding=[top, left, bottom + extra * int(attrs.strides[0]), right],
            )
        )
        height = static_dims(call)[2]
        return relax.op.strided_slice(taller, axes=[2], begin=[0], end=[height])


@tvm.transform.module_pass(opt_level=0, name="PadConvRows")
class PadConvRows:
    """Give convolutions whose map no register tile divides extra output rows, sliced off (see
    the module docstring). ``gpu``: the backend's ``is_gpu``, as for ``SubsamplePointwise``
    (``current_cpu``)."""

    def __init__(self, gpu: bool | None = None):
        self.gpu = gpu

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        cpu = current_cpu(self.gpu)
        if cpu is None:
            return mod
        return rewrite_functions(mod, _RowPadder(mod, cpu))
