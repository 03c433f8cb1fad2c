"""SplitGroupedConv: a grouped convolution runs as one dense convolution per group.

The CPU GEMM schedule (``qiao.compiler.schedules.cpu_gemm``) takes a convolution of ``groups`` 1:
its input channel is an affine function of the reduction axis. In a grouped one (AlexNet's
``groups`` 2, ShuffleNet's grouped 1x1 convolutions, ResNeXt) the input channel depends on the
output channel's group (``(f // (F / G)) · (C / G) + c``), which no GEMM rule accepts, and
depthwise convolutions (``groups`` = input channels) are the window rule's
(``cpu_conv.CPUWindowReduction``). Those in between fell to a generic reduction schedule at a
few GFLOP/s. This pass rewrites ``conv2d(x, w, groups=G)`` (1 < G < input channels) as

    concat([conv2d(split(x, G, axis 1)[g], split(w, G, axis 0)[g], groups=1) for g < G], axis 1)

so that each group is a dense convolution the GEMM schedule packs and blocks (its weight slice
a constant: packed once at load). The concatenation is a copy of the output, which FuseOps
joins with the elementwise tail that follows (bias, ReLU). 2-D (NCHW/OIHW) and 1-D (NCW/OIW:
wav2vec2's and HuBERT's positional convolution, 16 groups) convolutions with a static channel
count and at most ``MAX_GROUPS`` groups (more, each of a few channels, as in ResNeXt and RegNet,
are left to the generic schedule: see ``MAX_GROUPS``), CPU targets only.

Measured on a 2-core AMD Zen 5 VM (2026-12-07, host code; ``python -m pytest
benchmarks/test_cpu_models.py --benchmark-only -s -k caffe2``: the networks of the Caffe2-era
model zoo at full size, exported as those files are, IR 3 with the initializers listed as
inputs, batch 1; without the pass, then with it): AlexNet (227², three convolutions of 2 groups)
254 -> 16.1 ms, ONNX Runtime 8.8 / 9.9 ms (ORT ÷ qiao 0.03 -> 0.62); ShuffleNet v1 (224², grouped
1x1 convolutions of 3 groups) 42.1 -> 2.35 ms, ONNX Runtime 1.41 / 1.46 ms (0.03 -> 0.65); and
(``-k pos``) wav2vec2's positional convolution at base size (768 channels in 16 groups, kernel
128, 500 frames) 1435 -> 30.3 ms, ONNX Runtime 13.7 / 14.1 ms (0.01 -> 0.46).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qiao.compiler.passes.placeholders import rewrite_functions
from qiao.compiler.passes.relax_util import (
    CONV_LAYOUTS,
    conv_kind,
    conv_like,
    current_cpu,
    static_dims,
)

# The most groups split. One 3x3 convolution, batch 1, qiao split / unsplit (the generic
# schedule) / ONNX Runtime, Zen 5 VM, 2026-12-07: 240 channels in 3 groups over 28x28 3.4 / 61 /
# 0.60 ms; 256 in 8, 28x28 0.63 / 23 / 0.26; 768 in 16, 14x14 4.5 / 28 / 0.29. Beyond, groups of
# a few channels make GEMMs too small to block and the compile grows with the groups: 128 in 32
# over 56x56 1.5 / 0.47 / 0.66 (split slower), 256 in 32, 28x28 1.0 / 4.2 / 0.27, 432 in 54
# 1.7 / 7.0 / 0.42, 1512 in 189 over 7x7 1.8 / 1.6 / 0.18 ms, 56 s to compile split.
MAX_GROUPS = 16


def split_groups(call) -> int | None:
    """The groups a ``relax.nn.conv1d`` / ``conv2d`` call is split into, or ``None`` to leave it:
    channels first (NCW / OIW, NCHW / OIHW) with a static input channel count, 1 < groups <
    input channels, at most ``MAX_GROUPS`` groups."""
    name = conv_kind(call)
    x_shape = static_dims(call.args[0]) if name else None
    if x_shape is None or len(x_shape) != len(CONV_LAYOUTS[name][1]) or x_shape[1] is None:
        return None
    groups = int(call.attrs.groups)
    return groups if 1 < groups < x_shape[1] and groups <= MAX_GROUPS else None


@mutator
class _Splitter(PyExprMutator):
    def visit_call_(self, call):  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        groups = split_groups(call)
        if groups is None:
            return call
        xs = self.builder_.emit(relax.op.split(call.args[0], groups, axis=1))
        ws = self.builder_.emit(relax.op.split(call.args[1], groups, axis=0))
        parts = [
            self.builder_.emit(
                conv_like(call, relax.TupleGetItem(xs, g), relax.TupleGetItem(ws, g), groups=1)
            )
            for g in range(groups)
        ]
        return relax.op.concat(parts, axis=1)


@tvm.transform.module_pass(opt_level=0, name="SplitGroupedConv")
class SplitGroupedConv:
    """Run grouped convolutions as one dense convolution per group (see the module docstring);
    ``gpu`` (the backend's ``is_gpu``) as ``current_cpu`` takes it: nothing changes off the CPU."""

    def __init__(self, gpu: bool | None = None):
        self.gpu = gpu

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        return mod if current_cpu(self.gpu) is None else rewrite_functions(mod, _Splitter(mod))
