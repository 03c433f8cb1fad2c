"""SubsamplePointwise: a strided 1x1 convolution reads a subsampled copy of its input.

A 1x1 convolution with stride ``s`` and no padding (ResNet's downsampling shortcut) reads every
``s``-th position of every ``s``-th row: the CPU GEMM schedule (``qiao.compiler.schedules
.cpu_gemm``) gathers them into its im2col panels element by element and treats the convolution
as any packed one. This pass rewrites it as

    conv2d(strided_slice(x, axes (2, 3), strides (s_h, s_w)), w, strides 1)

a separate copy of the positions it reads (a quarter of the input for ``s`` = 2), then a
pointwise convolution, which the GEMM schedule packs from contiguous rows and gives its pointwise
tiles (``GemmShape.pointwise``: on a target with 32 vector registers, tall one-vector tiles
whatever the reduction's length). Applied to NCHW/OIHW convolutions of any dtype and groups with
a 1x1 kernel, a stride above 1, no padding, dilation 1 and static spatial dims. CPU targets only.

Measured per call, one Conv node at a time, the convolution without the pass and with it (slice
included) interleaved in one process (2-core AMD EPYC VM, Zen 4; 2026-12-07; host code, AVX-512):
batch 8 64 -> 128 over 56x56 1.00 -> 0.97 ms, 128 -> 256 over 28x28 1.24 -> 0.78 ms, 256 -> 512
over 14x14 0.83 -> 0.72 ms; batch 1 128 -> 256 over 28x28 0.144 -> 0.113 ms. AVX2 code
(``x86-64-v3``) on the same host: 1.08 -> 1.02, 1.03 -> 0.89, 0.77 -> 0.79 ms at batch 8, and
0.110 -> 0.126 ms at batch 1 (slower: left as is, the batch-8 gains being larger). In ResNet-18
at batch 8 (host code, per-kernel VM instrument times of two runs half an hour apart, not
interleaved) the three shortcuts took 3.57 ms before, 2.38 ms after plus 0.63 ms of copies; the
whole network, interleaved, 0.988x the time at batch 8 (41 rounds) and 1.001x at batch 1 (61):
within this machine's noise.
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
)


def subsampled(call) -> tuple[int, int, int, int] | None:
    """``(height, width, stride_h, stride_w)`` of a ``relax.nn.conv2d`` call this pass rewrites
    (1x1 kernel, a stride above 1, no padding, dilation 1, NCHW/OIHW, static spatial dims), else
    ``None``."""
    if conv_kind(call) != "nn.conv2d":
        return None
    attrs = call.attrs
    x_shape, w_shape = static_dims(call.args[0]), static_dims(call.args[1])
    if (
        x_shape is None
        or w_shape is None
        or len(x_shape) != 4
        or w_shape[2:] != [1, 1]
        or None in x_shape[2:]
    ):
        return None
    strides = [int(s) for s in attrs.strides]
    if max(strides) < 2 or any(int(p) for p in attrs.padding):
        return None
    if any(int(d) != 1 for d in attrs.dilation):
        return None
    return x_shape[2], x_shape[3], strides[0], strides[1]


@mutator
class _Subsampler(PyExprMutator):
    def visit_call_(self, call):  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        found = subsampled(call)
        if found is None:
            return call
        height, width, sh, sw = found
        picked = self.builder_.emit(
            relax.op.strided_slice(
                call.args[0], axes=[2, 3], begin=[0, 0], end=[height, width], strides=[sh, sw]
            )
        )
        return conv_like(
            call, picked, call.args[1], strides=[1, 1], padding=[0, 0, 0, 0], dilation=[1, 1]
        )


@tvm.transform.module_pass(opt_level=0, name="SubsamplePointwise")
class SubsamplePointwise:
    """Rewrite strided 1x1 convolutions as a subsampling copy and a pointwise convolution (see
    the module docstring). ``gpu``: the backend's ``is_gpu``, as for ``WidenDepthwiseRows``
    (``cpu_float32_lanes``)."""

    def __init__(self, gpu: bool | None = None):
        self.gpu = gpu

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if cpu_float32_lanes(self.gpu) is None:
            return mod
        return rewrite_functions(mod, _Subsampler(mod))
