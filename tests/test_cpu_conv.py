"""CPUWindowReduction (depthwise convolutions, pooling) against PyTorch.

Kernels come from Relax operators legalised and fused as the pipeline does, with a symbolic batch;
each scheduled kernel runs through the CPU passes that follow the rules and is compared with
``torch.nn.functional`` in float64. Nothing here times anything: speed lives in benchmarks/.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax

from qiao.compiler.passes.shuffle_strided_loads import compile_cpu_kernel
from qiao.compiler.schedules.cpu_gemm import DIRECT_ROWS, IMAGE_ROWS
from qiao.compiler.schedules.cpu_info import cpu_info
from qiao.compiler.testing import assert_close, fused_module, marked, prim_func, relax_calls

# float32 sums of at most 25 products of N(0, 1) values, against float64.
TOL = {"rtol": 1e-5, "atol": 1e-5}
# float32 sums of up to a few hundred products of N(0, 1) values, against float64.
TOL_SUM = {"rtol": 1e-4, "atol": 1e-4}


def _target():
    from qiao.backends.cpu import CPUBackend

    return CPUBackend().target()


def _kernel(build, prefix):
    """The one kernel named ``prefix`` or ``fused_<prefix>…`` that ``build(bb)`` lowers to."""
    return prim_func(fused_module(build), prefix)


def _schedule(func, target):
    """``(scheduled function, rule name)``: the first CPU rule that applies, then the passes that
    follow the rules in the schedule phase."""
    from qiao.compiler.passes.serial_small_kernels import serial_when_small
    from qiao.compiler.schedules import rules_for

    for rule in rules_for(target):
        sch = rule.apply(func, target, False)
        if sch is not None:
            return serial_when_small(_after_rules(sch.mod["main"])), type(rule).__name__
    raise AssertionError("no rule applied")


def _after_rules(func):
    """``func`` through the vector passes that follow the rules in the schedule phase."""
    from qiao.compiler.passes.vectorizable_math import rewrite_math
    from qiao.compiler.passes.vectorize_ragged_loops import split_ragged_vector_loops

    return rewrite_math(split_ragged_vector_loops(func))


def _build(func, target):
    return compile_cpu_kernel(func, target).jit()["main"]


def _call(fn, inputs, out_shape):
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in inputs]
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)
    fn(*args, out)
    return out.numpy()


def _depthwise(channels, size, stride, padding, kernel, epilogue, batch=None):
    """A depthwise convolution and its epilogue over a symbolic batch ``n`` (or ``batch``)."""
    n = tvm.tirx.Var("n", "int64") if batch is None else batch

    def build(bb):
        x = relax.Var("x", relax.TensorType((n, channels, size, size), "float32"))
        w = relax.Var("w", relax.TensorType((channels, 1, kernel, kernel), "float32"))
        b = relax.Var("b", relax.TensorType((channels,), "float32"))
        with bb.function("main", [x, w, b]):
            with bb.dataflow():
                y = bb.emit(
                    relax.op.nn.conv2d(x, w, strides=stride, padding=padding, groups=channels)
                )
                if "bias" in epilogue:
                    y = bb.emit(relax.op.add(y, relax.op.reshape(b, (1, channels, 1, 1))))
                if "relu6" in epilogue:
                    y = bb.emit(
                        relax.op.minimum(relax.op.maximum(y, relax.const(0.0)), relax.const(6.0))
                    )
                elif "relu" in epilogue:
                    y = bb.emit(relax.op.nn.relu(y))
                elif "silu" in epilogue:
                    y = bb.emit(relax.op.multiply(y, relax.op.sigmoid(y)))
                out = bb.emit_output(y)
            bb.emit_func_output(out)

    return build


def _torch_padding(padding):
    """ONNX/Relax ``(top, left, bottom, right)`` padding as ``F.pad``'s ``(left, right, top,
    bottom)``."""
    if isinstance(padding, int):
        padding = (padding,) * 4
    top, left, bottom, right = padding
    return (left, right, top, bottom)


# (channels, plane, stride, padding, kernel, epilogue): channel counts that are not a multiple of
# the SIMD width, planes of 2x2 (many per task) to 80x80 (tasks of rows), odd padded widths at
# stride 2 (the deinterleaved layout needs its own padding), no padding at all (no producer).
DEPTHWISE = [
    (6, 9, 1, 1, 3, "relu"),
    (20, 7, 1, 1, 3, "relu6"),
    (16, 32, 1, 1, 3, ""),
    (48, 32, 2, (0, 0, 1, 1), 3, "relu6"),
    (24, 8, 2, 1, 3, "bias relu6"),
    (36, 4, 1, 1, 3, "bias relu6"),
    (96, 2, 1, 1, 3, "relu6"),
    (36, 4, 2, (0, 0, 1, 1), 3, "relu6"),
    (8, 12, 1, 2, 5, "bias"),
    (10, 7, 2, 0, 3, ""),
    (4, 80, 1, 1, 3, "relu6"),
    # SiLU (EfficientNet): the epilogue runs after the task's sums, over whole planes.
    (20, 14, 1, 1, 3, "bias silu"),
    (12, 7, 2, 2, 5, "bias silu"),
    (3, 80, 1, 1, 3, "silu"),
    # Large planes in tasks of whole rows (``rows_per_task``): 14 of 56 stride-2 output rows,
    # and 35 of a prime 113 (the last task partial).
    (4, 112, 2, 1, 3, "bias silu"),
    (2, 113, 1, 1, 3, "silu"),
]


@pytest.mark.parametrize("channels,size,stride,padding,kernel,epilogue", DEPTHWISE)
def test_depthwise_conv_matches_torch(channels, size, stride, padding, kernel, epilogue):
    target = _target()
    func = _kernel(_depthwise(channels, size, stride, padding, kernel, epilogue), "conv2d")
    _check_depthwise(func, target, channels, size, stride, padding, kernel, epilogue)


def _check_depthwise(func, target, channels, size, stride, padding, kernel, epilogue):
    """Schedule the depthwise kernel ``func`` with the CPU rules (the window rule must take it)
    and compare it with torch's conv2d and ``epilogue`` in float64 at batch 1 and 3."""
    import torch.nn.functional as F

    scheduled, rule = _schedule(func, target)
    assert rule == "CPUWindowReduction"
    assert "T.parallel(" in scheduled.script()
    if "silu" in epilogue:
        assert _epilogue_after_sums(scheduled), "the SiLU epilogue still runs per output vector"
    fn = _build(scheduled, target)
    rng = np.random.default_rng(channels * size)
    w = rng.standard_normal((channels, 1, kernel, kernel)).astype("float32")
    b = rng.standard_normal(channels).astype("float32")
    for batch in (1, 3):  # one compiled kernel, symbolic batch
        x = rng.standard_normal((batch, channels, size, size)).astype("float32")
        xt = F.pad(torch.from_numpy(x).double(), _torch_padding(padding))
        ref = F.conv2d(xt, torch.from_numpy(w).double(), stride=stride, groups=channels)
        if "bias" in epilogue:
            ref = ref + torch.from_numpy(b).double()[None, :, None, None]
        if "relu6" in epilogue:
            ref = ref.clamp(0.0, 6.0)
        elif "relu" in epilogue:
            ref = ref.clamp(min=0.0)
        elif "silu" in epilogue:
            ref = ref * torch.sigmoid(ref)
        ref = ref.numpy()
        inputs = [x, w, b.reshape(1, channels, 1, 1)] if "bias" in epilogue else [x, w]
        got = _call(fn, inputs, ref.shape)
        assert_close(got, ref.astype("float32"), name=f"batch {batch}", **TOL)


# (channels, plane, kernel, padding, epilogue): stride-2 windows whose padded and in-bounds widths
# are even (EfficientNet's 3x3 over 112x112 and 5x5 over 56x56, MobileNet's 3x3 over 8x8).
EVEN_STRIDED = [
    (4, 112, 3, 1, "bias silu"),
    (6, 56, 5, 2, "bias silu"),
    (24, 8, 3, 1, "bias relu6"),
]


@pytest.mark.parametrize("channels,size,kernel,padding,epilogue", EVEN_STRIDED)
def test_strided_window_copies_its_padded_input_as_whole_vectors(
    channels, size, kernel, padding, epilogue
):
    """The padded input of a stride-2 window is stored as two column phase planes. Laid out
    before its zero padding was decomposed, the copy's bounds test coupled phase and column
    (``1 <= 2·j + p``), the padding stayed one block with an ``if_then_else`` per element, and
    TVM scalarised the whole copy. Now the padding is decomposed first (a fill block, an
    in-bounds copy without a test), the copy's vector runs along one phase plane, and the
    kernel matches torch."""
    from tvm import tirx

    target = _target()
    func = _kernel(_depthwise(channels, size, 2, padding, kernel, epilogue), "conv2d")
    scheduled, rule = _schedule(func, target)
    assert rule == "CPUWindowReduction"
    copies, fills, conditional = [], [], []

    def on_block(block):
        name = block.name_hint
        if name.startswith("pad_temp"):
            (fills if "pad_const" in name else copies).append(block)
            conditional.append("if_then_else" in str(block.body))

    tvm_ffi.structural_walk(scheduled.body, [(tvm.s_tir.SBlock, on_block)])
    assert fills and copies and not any(conditional)
    (shape,) = {tuple(int(d) for d in b.writes[0].source.shape[-2:]) for b in copies + fills}
    assert shape[0] == 2  # two phase planes of every other column
    vector_copies = []

    def on_for(loop):
        if loop.kind == tirx.ForKind.VECTORIZED:
            tvm_ffi.structural_walk(
                loop.body,
                [(tvm.s_tir.SBlock, lambda b: vector_copies.append(b.name_hint == "pad_temp"))],
            )

    tvm_ffi.structural_walk(scheduled.body, [(tirx.For, on_for)])
    assert any(vector_copies)
    _check_depthwise(func, target, channels, size, 2, padding, kernel, epilogue)


def _loops(func, n: int = 1) -> list:
    """``(kind, extent)`` of every loop of ``func``, symbolic extents evaluated at ``n`` for
    every variable."""
    import tvm_ffi
    from tvm import tirx

    analyzer, out = tvm.sym.Analyzer(), []

    def on_for(loop):
        extent = loop.extent
        if not isinstance(extent, tirx.IntImm):
            extent = tvm_ffi.structural_mutate(
                extent, [(tirx.Var, lambda v, _m: tirx.IntImm("int64", n))]
            )
        out.append((int(loop.kind), int(analyzer.simplify(extent))))

    tvm_ffi.structural_walk(func.body, [(tirx.For, on_for)])
    return out


@pytest.mark.parametrize(
    "channels,size,stride,padding,kernel,epilogue",
    [(96, 112, 2, 1, 3, "bias silu"), (16, 112, 2, 1, 3, "relu"), (96, 7, 1, 1, 3, "relu6")],
)
def test_static_batch_depthwise_scheduled_as_symbolic(
    channels, size, stride, padding, kernel, epilogue
):
    """``torch.onnx.export``'s default: a static batch of 1, which has no batch loop. The rule
    sized tasks from the whole batch's padded input (one output row per task over 112x112) and
    stored the stride-phase layout column by column (scattered); small planes were not grouped.
    Now the static kernel has the symbolic one's loops at batch 1, and matches torch."""
    import torch.nn.functional as F

    target = _target()
    symbolic, _ = _schedule(
        _kernel(_depthwise(channels, size, stride, padding, kernel, epilogue), "conv2d"), target
    )
    static, rule = _schedule(
        _kernel(_depthwise(channels, size, stride, padding, kernel, epilogue, 1), "conv2d"), target
    )
    assert rule == "CPUWindowReduction"
    # The symbolic kernel also has a serial variant for small batches (``serial_when_small``,
    # decided at run time; the static one is decided at compile time): its parallel variant
    # comes last.
    extents = [extent for _, extent in _loops(static)]
    assert extents == [extent for _, extent in _loops(symbolic)][-len(extents) :]
    if size > 56:  # enough work to take both cores at batch 1
        parallel = int(tvm.tirx.ForKind.PARALLEL)
        assert [lp for lp in _loops(static) if lp[0] == parallel] == [
            lp for lp in _loops(symbolic) if lp[0] == parallel
        ]
    rng = np.random.default_rng(channels)
    x = rng.standard_normal((1, channels, size, size)).astype("float32")
    w = rng.standard_normal((channels, 1, kernel, kernel)).astype("float32")
    b = rng.standard_normal(channels).astype("float32")
    xt = F.pad(torch.from_numpy(x).double(), _torch_padding(padding))
    ref = F.conv2d(xt, torch.from_numpy(w).double(), stride=stride, groups=channels)
    if "bias" in epilogue:
        ref = ref + torch.from_numpy(b).double()[None, :, None, None]
    ref = {"silu": lambda r: r * torch.sigmoid(r), "relu": lambda r: r.clamp(min=0.0)}.get(
        epilogue.split()[-1], lambda r: r.clamp(0.0, 6.0)
    )(ref)
    inputs = [x, w, b.reshape(1, channels, 1, 1)] if "bias" in epilogue else [x, w]
    got = _call(_build(static, target), inputs, tuple(ref.shape))
    assert_close(got, ref.numpy().astype("float32"), **TOL)


# (channels, plane, stride, padding, kernel, epilogue): depthwise convolutions whose output rows
# are 7 or 14 wide (3x3 and 5x5, stride 1 and 2, with and without bias, a SiLU tail run after the
# sums row by row), and a 4-wide output that stays as it is (padding it to 8 would double the
# work).
WIDENED = [
    (20, 7, 1, 1, 3, "relu6"),
    (16, 14, 1, 1, 3, "bias relu"),
    (12, 14, 2, 1, 3, "bias relu6"),
    (24, 14, 1, 2, 5, "bias"),
    (8, 7, 1, 2, 5, ""),
    (20, 14, 1, 1, 3, "bias silu"),
    (12, 8, 2, 1, 3, "relu"),
    (12, 28, 1, 2, 5, "bias silu"),
]
# Output widths computed as whole vectors, per SIMD lanes (float32): 7 and 14 on AVX2 (8 lanes,
# 14 % extra columns) and on AVX-512 (7 as one half vector of 8 lanes: 16 would pad by 129 %;
# 28 as two vectors, 14 % extra).
WIDE_ROWS = {8: {7: 8, 14: 16}, 16: {7: 8, 14: 16, 28: 32}}


@pytest.mark.parametrize("channels,size,stride,padding,kernel,epilogue", WIDENED)
def test_depthwise_rows_widened_to_whole_vectors(channels, size, stride, padding, kernel, epilogue):
    """``WidenDepthwiseRows`` pads a narrow depthwise output to whole vectors (the convolution
    over a wider zero padding, then a slice fused into the kernel); the kernel the pipeline's
    legalize phase makes of it matches torch."""
    from qiao.compiler.passes.widen_depthwise_rows import WidenDepthwiseRows
    from qiao.compiler.pipeline import legalize_passes

    target = _target()
    bb = relax.BlockBuilder()
    _depthwise(channels, size, stride, padding, kernel, epilogue)(bb)
    with target:
        mod = WidenDepthwiseRows()(bb.get())
    out = (size + sum(_torch_padding(padding)[:2]) - kernel) // stride + 1
    wide = WIDE_ROWS.get(cpu_info(target).lanes("float32"), {}).get(out)
    widths = []
    for call in relax_calls(mod["main"], "relax.nn.conv2d"):
        widths.append(int(call.ty.shape.values[3]))
    assert widths == [wide or out]
    assert len(relax_calls(mod["main"], "relax.strided_slice")) == (wide is not None)
    func = prim_func(tvm.transform.Sequential(legalize_passes(None))(mod), "conv2d")
    _check_depthwise(func, target, channels, size, stride, padding, kernel, epilogue)


@pytest.mark.parametrize("size", [14, 28])
@pytest.mark.parametrize("arch", [None, "x86-64-v3"], ids=["host", "avx2"])
def test_short_rows_are_one_vector_group(arch, size):
    """Rows one to two vectors wide of a SiLU epilogue (after a widened depthwise convolution:
    14 on AVX2, 28 on AVX-512) are one vector group, which LLVM splits into its vectors
    (28 = 16 + 8 + 4 lanes), not a vector and a scalar tail: the
    tail computed SiLU's exponential one element at a time (measured 1.23 -> 1.09 ms for
    EfficientNet-B0's 240-channel 28x28 5x5 at batch 8 on AVX-512, 0.49 -> 0.40 ms for its
    480-channel 14x14 3x3 on AVX2). Code generation only (the numbers: the widened cases above)."""
    from tvm import s_tir

    from qiao.backends.cpu import CPUBackend
    from qiao.compiler.passes.widen_depthwise_rows import WidenDepthwiseRows
    from qiao.compiler.pipeline import legalize_passes

    target = CPUBackend().target(arch)
    lanes = cpu_info(target).lanes("float32")
    bb = relax.BlockBuilder()
    _depthwise(12, size, 1, 2, 5, "bias silu")(bb)
    with target:
        mod = WidenDepthwiseRows()(bb.get())
    func = prim_func(tvm.transform.Sequential(legalize_passes(None))(mod), "conv2d")
    scheduled, rule = _schedule(func, target)
    assert rule == "CPUWindowReduction"
    names = []
    tvm_ffi.structural_walk(scheduled.body, [(s_tir.SBlock, lambda b: names.append(b.name_hint))])
    tails = [n for n in names if n.startswith("T_multiply") and n.endswith("_tail")]
    assert not tails, f"scalar tails on rows of {size} ({lanes} lanes): {tails}"
    # the control: the padded copy's rows stay in whole vectors and a tail beyond one vector
    assert ("pad_temp_tail" in names) == (size > lanes), names


def test_chained_rows():
    """Rows of a plane that share each window tap, against the registers the weights leave."""
    from qiao.compiler.schedules.cpu_conv import chained_rows

    # AVX-512 (32 registers), a 5x5 window: 25 weights stay in registers, 5 left for sums
    assert chained_rows(14, 16, 16, 32, 25) == 2
    assert chained_rows(7, 8, 16, 32, 25) == 7  # prime height: the whole 7x7 map
    assert chained_rows(28, 32, 16, 32, 25) == 2  # two vectors a row
    # beside a hard-swish epilogue's 5 operands no register is left for a second row's sums,
    # but a 7x7 map still sums all its rows together
    assert chained_rows(14, 16, 16, 32, 25, live=27) == 1
    assert chained_rows(7, 8, 16, 32, 25, live=27) == 7
    # a 3x3 window: a quarter of the registers for sums
    assert chained_rows(28, 16, 16, 32, 9) == 7
    assert chained_rows(56, 16, 16, 32, 9) == 8
    # AVX2 (16 registers): a 5x5 window's weights are broadcast from memory, a 3x3 one's kept
    assert chained_rows(28, 8, 8, 16, 25) == 4
    assert chained_rows(14, 16, 8, 16, 25) == 2
    assert chained_rows(14, 8, 8, 16, 9) == 2
    assert chained_rows(7, 8, 8, 16, 9) == 7
    # nothing to gain: one row, a symbolic height, rows too wide for two sums
    assert chained_rows(1, 16, 16, 32, 25) == 1
    assert chained_rows(None, 16, 16, 32, 25) == 1
    assert chained_rows(14, 64, 8, 16, 25) == 1


@pytest.mark.parametrize("epilogue", ["bias relu6", "bias silu"])
@pytest.mark.parametrize("arch", [None, "x86-64-v3"], ids=["host", "avx2"])
def test_rows_share_each_window_tap(arch, epilogue):
    """A 5x5 depthwise convolution over 16x16 planes sums ``chained_rows`` output rows tap by
    tap (the row loop unrolled inside the window loops: independent chains of multiply-adds,
    one load of an input row for every row it feeds), and a cheap epilogue runs over those rows
    unrolled, not as a loop LLVM vectorises across the rows with gathers and scatters. Code
    generation for both ISAs (the numbers: ``test_depthwise_conv_matches_torch``, which runs
    chained rows on this host)."""
    from tvm import tirx

    from qiao.backends.cpu import CPUBackend
    from qiao.compiler.schedules.cpu_conv import chained_rows

    target = CPUBackend().target(arch)
    info = cpu_info(target)
    lanes = info.lanes("float32")
    func = _kernel(_depthwise(12, 16, 1, 2, 5, epilogue), "conv2d")
    scheduled, rule = _schedule(func, target)
    assert rule == "CPUWindowReduction"
    inside_taps = []

    def on_for(loop):
        if loop.kind == tirx.ForKind.UNROLLED and int(loop.extent) == 5:
            tvm_ffi.structural_walk(
                loop.body,
                [
                    (
                        tirx.For,
                        lambda inner: (
                            inside_taps.append(int(inner.extent))
                            if inner.kind == tirx.ForKind.UNROLLED
                            else None
                        ),
                    )
                ],
            )

    tvm_ffi.structural_walk(scheduled.body, [(tirx.For, on_for)])
    rows = [n for n in inside_taps if n != 5]
    assert rows, "no unrolled loop of output rows inside the taps"
    together = rows[0]
    assert together > 1 and 16 % together == 0 and set(rows) == {together}, inside_taps
    # the budget: a 16-wide row is one AVX-512 vector beside 25 weights (and ReLU6's bias, 0
    # and 6: the SiLU epilogue runs after the task's sums), or two AVX2 vectors
    live = info.vector_registers - (0 if "silu" in epilogue else 3)
    assert together == chained_rows(16, 16, lanes, info.vector_registers, 25, live), together
    text = scheduled.script()
    if "silu" not in epilogue:
        serial = [ln.strip() for ln in text.splitlines() if f"in range(T.int64({together}))" in ln]
        assert not serial, f"the epilogue loops over the chained rows: {serial}"
    if arch is None:
        _check_depthwise(func, target, 12, 16, 1, 2, 5, epilogue)


def test_widened_width():
    """Output widths the pass pads, against lanes: under two vectors, not already whole, at most
    15 % extra (13 -> 16 would be 23 %)."""
    from qiao.compiler.passes.widen_depthwise_rows import widened_width

    cases = {(7, 8): 8, (14, 8): 16, (14, 16): 16, (7, 16): 8, (5, 8): None, (15, 16): 16}
    cases.update(
        {(8, 8): None, (16, 8): None, (28, 8): None, (56, 8): None, (13, 8): None, (15, 8): 16}
    )
    # AVX-512: half vectors (8 lanes) where a whole one wastes too much.
    cases.update({(8, 16): None, (24, 16): None, (12, 16): None, (3, 16): None})
    for (width, lanes), wide in cases.items():
        assert widened_width(width, lanes) == wide, (width, lanes)


def _epilogue_after_sums(func) -> bool:
    """Whether the SiLU output block runs after the task's sums are complete: of the loops that
    hold both it and the window sums, none holds another (only the task loop, in each run-time
    variant; per output vector, the row and column loops inside it hold both too)."""
    import tvm_ffi
    from tvm import tirx

    shared = []

    def on_for(loop):
        stores = set()
        tvm_ffi.structural_walk(
            loop.body, [(tirx.BufferStore, lambda st: stores.add(st.buffer.name))]
        )
        if any("multiply" in n for n in stores) and any("conv2d" in n for n in stores):
            shared.append(loop)

    tvm_ffi.structural_walk(func.body, [(tirx.For, on_for)])
    nested = []
    for loop in shared:
        tvm_ffi.structural_walk(
            loop.body,
            [(tirx.For, lambda inner: nested.append(any(inner.same_as(o) for o in shared)))],
        )
    return bool(shared) and not any(nested)


# (kind, channels, plane, kernel, stride, padding): ResNet's stem pool, an unpadded 2x2 pool, an
# average pool (its divide is the epilogue).
POOLS = [
    ("max", 5, 16, 3, 2, 1),
    ("max", 3, 9, 2, 2, 0),
    ("avg", 5, 8, 3, 1, 1),
]


@pytest.mark.parametrize("kind,channels,size,kernel,stride,padding", POOLS)
def test_pooling_matches_torch(kind, channels, size, kernel, stride, padding):
    import torch.nn.functional as F

    n = tvm.tirx.Var("n", "int64")

    def build(bb):
        x = relax.Var("x", relax.TensorType((n, channels, size, size), "float32"))
        op = relax.op.nn.max_pool2d if kind == "max" else relax.op.nn.avg_pool2d
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(op(x, pool_size=kernel, strides=stride, padding=padding))
            bb.emit_func_output(out)

    target = _target()
    func = _kernel(build, f"{kind}_pool2d")
    scheduled, rule = _schedule(func, target)
    assert rule == "CPUWindowReduction"
    fn = _build(scheduled, target)
    rng = np.random.default_rng(size)
    x = rng.standard_normal((2, channels, size, size)).astype("float32")
    xt = torch.from_numpy(x).double()
    if kind == "max":
        ref = F.max_pool2d(xt, kernel, stride, padding)
    else:
        ref = F.avg_pool2d(xt, kernel, stride, padding, count_include_pad=False)
    ref = ref.numpy()
    assert_close(_call(fn, [x], ref.shape), ref.astype("float32"), **TOL)


def test_window_rule_declines_row_reductions():
    from qiao.compiler.schedules.cpu_conv import CPUWindowReduction

    n = tvm.tirx.Var("n", "int64")

    def build(bb):
        x = relax.Var("x", relax.TensorType((n, 6, 5, 5), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.mean(x, axis=[2, 3], keepdims=True))
            bb.emit_func_output(out)

    func = _kernel(build, "mean")
    assert CPUWindowReduction().apply(func, _target(), False) is None


@pytest.mark.parametrize("cin, cout", [(8, 2), (48, 8), (16, 3)])
def test_squeeze_excitation_conv_gets_the_gemm_rule(cin, cout):
    """A squeeze-excitation block's 1×1 convolution over the pooled 1×1 map, symbolic batch: the
    GEMM rule takes it with the weights as the vectorised operand (the image's one position cannot
    be laid out as panels: TVM refused it and a slower rule took the zoo's EfficientNet and
    RegNet kernels), and matches torch's conv2d."""
    import torch.nn.functional as F

    target = _target()
    n = tvm.tirx.Var("n", "int64")

    def build(bb):
        x = relax.Var("x", relax.TensorType((n, cin, 1, 1), "float32"))
        w = relax.Var("w", relax.TensorType((cout, cin, 1, 1), "float32"))
        with bb.function("main", [x, w]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.sigmoid(relax.op.nn.conv2d(x, w)))
            bb.emit_func_output(out)

    scheduled, rule = _schedule(_kernel(build, "conv2d"), target)
    assert rule == "CPUMatmul"
    fn = _build(scheduled, target)
    rng = np.random.default_rng(cin + cout)
    w = rng.standard_normal((cout, cin, 1, 1)).astype("float32")
    for batch in (1, 5):
        x = rng.standard_normal((batch, cin, 1, 1)).astype("float32")
        ref = torch.sigmoid(F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double()))
        got = _call(fn, [x, w], ref.shape)
        assert_close(got, ref.numpy().astype("float32"), name=f"batch {batch}", **TOL)


# (in channels, gated channels, map size): squeeze-excitation gates of EfficientNet-B0 (6 -> 144
# over 56x56, 48 -> 1152 over 7x7), a 3-wide map (a ragged vector row) and a 1x1 map (no
# broadcast).
SE_GATES = [(6, 144, 56), (48, 1152, 7), (8, 40, 3), (8, 40, 1)]


@pytest.mark.parametrize("cin,cout,size", SE_GATES)
def test_squeeze_excitation_gate_computed_once_per_channel(cin, cout, size):
    """A squeeze-excitation tail, ``sigmoid(conv1x1(pooled) + bias) * x``, fused in one kernel
    (symbolic batch): the bias and sigmoid run in the GEMM's write-back, once per channel; the
    broadcast multiply that writes the output holds no exponential (before: a sigmoid for every
    element of ``x``, 4x the kernel's time) and runs over whole planes when its rows are narrow.
    Matches torch in float64 at batch 1 and 3."""
    import torch.nn.functional as F
    import tvm_ffi
    from tvm import s_tir, tirx

    target = _target()
    n = tvm.tirx.Var("n", "int64")

    def build(bb):
        p = relax.Var("p", relax.TensorType((n, cin, 1, 1), "float32"))
        w = relax.Var("w", relax.TensorType((cout, cin, 1, 1), "float32"))
        b = relax.Var("b", relax.TensorType((1, cout, 1, 1), "float32"))
        x = relax.Var("x", relax.TensorType((n, cout, size, size), "float32"))
        with bb.function("main", [p, w, b, x]):
            with bb.dataflow():
                y = bb.emit(relax.op.add(relax.op.nn.conv2d(p, w), b))
                out = bb.emit_output(relax.op.multiply(relax.op.sigmoid(y), x))
            bb.emit_func_output(out)

    func = _kernel(build, "conv2d")
    scheduled, rule = _schedule(func, target)
    assert rule == "CPUMatmul"
    writers, transcendental = [], []

    def on_block(block):
        if block.name_hint.startswith("T_multiply"):  # and its ragged tail
            writers.append(block)

    def on_call(call):
        if "exp" in str(getattr(call.op, "name", "")):
            transcendental.append(call)

    tvm_ffi.structural_walk(scheduled.body, [(s_tir.SBlock, on_block)])
    for block in writers:
        tvm_ffi.structural_walk(
            block.body, [(tirx.Let, transcendental.append), (tvm.ir.Call, on_call)]
        )
    # A 1x1 map needs no broadcast: the multiply joins the write-back too.
    assert bool(writers) == (size > 1)
    assert not transcendental, "the sigmoid is recomputed for every broadcast element"
    lanes = cpu_info(target).lanes("float32")
    if size > 1 and size % lanes and size < 4 * lanes:
        # rows narrower than a few vectors run as one plane (vectors of 16 over 7-wide rows
        # were all scalar tail): a loop of the plane's vectors encloses the multiply
        enclosing = []

        def on_for(loop):
            inner = []
            tvm_ffi.structural_walk(loop.body, [(s_tir.SBlock, inner.append)])
            if any(b.name_hint == "T_multiply" for b in inner):
                enclosing.append(loop.extent)

        tvm_ffi.structural_walk(scheduled.body, [(tirx.For, on_for)])
        assert -(-size * size // lanes) in [int(e) for e in enclosing if isinstance(e, tirx.IntImm)]
    fn = _build(scheduled, target)
    rng = np.random.default_rng(cin + cout + size)
    w = rng.standard_normal((cout, cin, 1, 1)).astype("float32")
    b = rng.standard_normal((1, cout, 1, 1)).astype("float32")
    for batch in (1, 3):
        p = rng.standard_normal((batch, cin, 1, 1)).astype("float32")
        x = rng.standard_normal((batch, cout, size, size)).astype("float32")
        t = {k: torch.from_numpy(v).double() for k, v in dict(p=p, w=w, b=b, x=x).items()}
        ref = torch.sigmoid(F.conv2d(t["p"], t["w"]) + t["b"]) * t["x"]
        got = _call(fn, [p, w, b, x], ref.shape)
        assert_close(got, ref.numpy().astype("float32"), name=f"batch {batch}", **TOL)


# (in channels, out channels, input map, kernel, stride, padding, positions as rows): a 7x7 output
# (49 positions pad to 64 on two-vector tiles of 8 or 16 lanes: 31 % waste) against 64 output
# channels (none) takes the positions as rows, a 3x3 and a 1x1 window, stride 1 and 2; a 14x14
# output of a 1x1 convolution (196 positions: 6 % / 14 % waste) and 40 output channels (20 % /
# 60 % waste) keep them as the vector columns.
SMALL_MAPS = [
    (32, 64, 7, 3, 1, 1, True),
    (24, 64, 7, 1, 1, 0, True),
    (16, 64, 14, 3, 2, 1, True),
    (16, 32, 14, 1, 1, 0, False),
    (24, 40, 7, 1, 1, 0, False),
]


def _residual_conv(cin, cout, size, kernel, stride, padding):
    """``(scheduled kernel, check)``: a convolution with bias, residual add and ReLU fused after
    it (symbolic batch) through the CPU rules; ``check()`` runs it at batch 1 and 3 against
    torch's conv2d in float64 within ``atol`` (and a relative 1e-4)."""
    import torch.nn.functional as F

    target = _target()
    n = tvm.tirx.Var("n", "int64")
    out_size = (size + 2 * padding - kernel) // stride + 1

    def build(bb):
        x = relax.Var("x", relax.TensorType((n, cin, size, size), "float32"))
        w = relax.Var("w", relax.TensorType((cout, cin, kernel, kernel), "float32"))
        b = relax.Var("b", relax.TensorType((1, cout, 1, 1), "float32"))
        r = relax.Var("r", relax.TensorType((n, cout, out_size, out_size), "float32"))
        with bb.function("main", [x, w, b, r]):
            with bb.dataflow():
                y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=padding))
                y = bb.emit(relax.op.add(y, b))
                y = bb.emit(relax.op.nn.relu(relax.op.add(y, r)))
                out = bb.emit_output(y)
            bb.emit_func_output(out)

    scheduled, rule = _schedule(_kernel(build, "conv2d"), target)
    assert rule == "CPUMatmul"

    def check(atol: float):
        fn = _build(scheduled, target)
        rng = np.random.default_rng(cin * cout + size)
        w = rng.standard_normal((cout, cin, kernel, kernel)).astype("float32")
        b = rng.standard_normal((1, cout, 1, 1)).astype("float32")
        for batch in (1, 3):
            x = rng.standard_normal((batch, cin, size, size)).astype("float32")
            r = rng.standard_normal((batch, cout, out_size, out_size)).astype("float32")
            t = [torch.from_numpy(a).double() for a in (x, w, b, r)]
            conv = F.conv2d(t[0], t[1], t[2].flatten(), stride=stride, padding=padding)
            ref = torch.relu(conv + t[3])
            got = _call(fn, [x, w, b, r], ref.shape)
            assert_close(
                got, ref.numpy().astype("float32"), name=f"batch {batch}", rtol=1e-4, atol=atol
            )

    return scheduled, check


@pytest.mark.parametrize("cin,cout,size,kernel,stride,padding,swapped", SMALL_MAPS)
def test_small_map_convolution_takes_positions_as_rows(
    cin, cout, size, kernel, stride, padding, swapped
):
    """A convolution over a small feature map (symbolic batch, bias, residual add and ReLU fused
    after it) gets the GEMM rule in the orientation ``J_WASTE_SWAP`` picks, and matches torch's
    conv2d in float64 at batch 1 and 3 (the im2col rows gathered through ``// 7`` and ``% 7``,
    stores strided by the map)."""
    scheduled, check = _residual_conv(cin, cout, size, kernel, stride, padding)
    assert marked(scheduled, IMAGE_ROWS) == swapped
    # float32 sums of up to cin * 9 = 288 products of N(0, 1) values.
    check(atol=1e-4)


# (in channels, out channels, input map, kernel, stride, padding, SIMD lanes (float32) on which it
# is read in place): windowed convolutions whose output positions divide into register tiles of
# 4 to 6 rows (16 registers) or 4 to 8 (32 registers) with two-vector tiles (8 to 16 rows of one
# vector, 4 to 9 of three): 3x3 over 16x16 and 14x14 (196 positions: tiles of 4 or 7 rows
# crossing image rows), a strided 5x5 and a 7x7 stride-2 stem over 3 channels (49 taps, a
# 147-long reduction). 16 output channels fill AVX2's two-vector tile (16 lanes) and one AVX-512
# vector; 40 take three AVX-512 vectors (48, ``direct_vectors``) and five one-vector AVX2 tiles.
# They keep the im2col panels over an 11x11 or 17x17 output (121 and 289 positions: no such
# divisor), for a 1x1 window and for a 3x3 stem over 3 channels (a 27-long reduction, under
# ``DIRECT_MIN_K``).
BOTH = (8, 16)
DIRECT = [
    (16, 32, 16, 3, 1, 1, BOTH),
    (16, 32, 14, 3, 1, 1, BOTH),
    (8, 32, 15, 5, 2, 2, BOTH),
    (3, 32, 32, 7, 2, 3, BOTH),
    (3, 16, 32, 7, 2, 3, BOTH),
    (16, 16, 16, 3, 1, 1, BOTH),
    (16, 40, 16, 3, 1, 1, BOTH),
    (16, 48, 14, 3, 1, 1, BOTH),
    (16, 32, 11, 3, 1, 1, ()),
    (16, 32, 17, 3, 1, 1, ()),
    (16, 32, 16, 1, 1, 0, ()),
    (3, 16, 32, 3, 2, 1, ()),
]


@pytest.mark.parametrize("cin,cout,size,kernel,stride,padding,lanes", DIRECT)
def test_convolution_reads_its_input_in_place(cin, cout, size, kernel, stride, padding, lanes):
    """A windowed convolution (symbolic batch, bias, residual add and ReLU fused after it) whose
    positions fit whole register tiles broadcasts its input where it lies (``direct_rows``), and
    matches torch's conv2d in float64 at batch 1 and 3 either way: the unrolled taps read the
    zero-padded input at constant offsets, including tiles that cross image rows."""
    scheduled, check = _residual_conv(cin, cout, size, kernel, stride, padding)
    direct = cpu_info(_target()).lanes("float32") in lanes
    assert marked(scheduled, DIRECT_ROWS) == direct
    # The reduction loads topi's zero-padded input itself, not a packed copy of it.
    assert _reads_in_place(scheduled, "pad_temp") == direct
    assert marked(scheduled, IMAGE_ROWS) or not direct
    # float32 sums of up to 16 * 25 = 400 products of N(0, 1) values.
    check(atol=2e-4)


def test_direct_rows_tile():
    """The tile of a 3x3 convolution read in place, 64 channels over 56x56 (``choose_tile``): two
    vectors of output channels, the tallest row count up to 6 (16 registers) or 8 (32) that
    divides the 3136 positions, unrolled by the 9 taps, one weight panel per task and row blocks
    that still leave 4 tasks per core at batch 1."""
    from qiao.compiler.schedules.cpu_gemm import GemmShape, check_tile, choose_tile
    from qiao.compiler.schedules.cpu_info import CPUInfo

    for cpu, lanes, mr in ((CPUInfo(256, 16, 2), 8, 4), (CPUInfo(512, 32, 2), 16, 8)):
        shape = GemmShape(None, 3136, 64, 576, "float32", image_rows=True, taps=9)
        tile = choose_tile(cpu, shape)
        check_tile(tile, shape, lanes)
        assert (tile.mr, tile.nr_vectors, tile.nc_tiles, tile.k_unroll) == (mr, 2, 1, 9), tile
        tasks = 3136 // mr // tile.mc_tiles * (64 // tile.nr(lanes))
        assert tasks >= 4 * cpu.num_cores, (cpu, tile)
        assert 3136 // mr % tile.mc_tiles == 0


def test_direct_vectors():
    """The vectors of a tile row read in place, against the output channels (per group): two
    where they fill two-vector tiles within ``J_WASTE_SWAP`` (112 channels of 16 lanes pad to 128,
    12.5 %), else the width that pads the fewest (ties: the wider); and the direct tile's height
    fits the registers with that width (AVX2: 16 registers, AVX-512: 32)."""
    from qiao.compiler.schedules.cpu_gemm import (
        GemmShape,
        choose_tile,
        direct_rows_height,
        direct_vectors,
        fits_registers,
    )
    from qiao.compiler.schedules.cpu_info import CPUInfo

    avx512 = {32: 2, 64: 2, 112: 2, 48: 3, 40: 3, 80: 1, 16: 1, 8: 1, 24: 2, 17: 2, 33: 3}
    avx2 = {16: 2, 32: 2, 24: 3, 8: 1, 4: 1, 40: 1, 48: 2, 20: 3}
    for lanes, expected in ((16, avx512), (8, avx2)):
        got = {channels: direct_vectors(lanes, channels) for channels in expected}
        assert got == expected, lanes
    assert direct_vectors(16, None) == 0
    for cpu, lanes in ((CPUInfo(256, 16, 2), 8), (CPUInfo(512, 32, 2), 16)):
        for channels in (16, 24, 40, 48, 80):
            nv = direct_vectors(lanes, channels)
            mr = direct_rows_height(cpu, 3136, nv)
            if not mr:
                continue
            shape = GemmShape(None, 3136, channels, 576, "float32", image_rows=True, taps=9)
            tile = choose_tile(cpu, shape)
            assert (tile.mr, tile.nr_vectors) == (mr, nv), (cpu, channels, tile)
            assert fits_registers(cpu, mr, nv, order="outer"), (cpu, channels, tile)


def _reads_in_place(func, name: str) -> bool:
    """Whether the GEMM's reduction block loads buffer ``name`` itself (no packed copy)."""
    import tvm_ffi
    from tvm import s_tir, tirx

    found = []

    def on_block(block):
        if any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars):
            found.extend(r.source.name == name for r in block.reads)

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, on_block)])
    return any(found)


# (in channels, out channels, input map, stride, read in place): a 1x1 convolution whose input
# planes are whole column tiles (256 and 64 positions), few output channels (at most
# ``IN_PLACE_B_ROW_TILES`` row tiles) and a column tile within ``IN_PLACE_B_BYTES`` reads them
# where they are; many output channels, a stride (every other position), a ragged map (196
# positions) or a long reduction (512 channels) keep the packed panels.
POINTWISE = [
    (96, 16, 16, 1, True),
    (72, 24, 8, 1, True),
    (16, 192, 16, 1, False),
    (96, 16, 32, 2, False),
    (96, 16, 14, 1, False),
    (512, 16, 16, 1, False),
]


@pytest.mark.parametrize("cin,cout,size,stride,in_place", POINTWISE)
def test_pointwise_convolution_reads_its_input_in_place(cin, cout, size, stride, in_place):
    """A 1x1 convolution (symbolic batch; bias, residual add and ReLU fused) reads its input in
    place or packs it as ``_reads_b_in_place`` decides, and matches torch's conv2d in float64 at
    batch 1 and 3 either way."""
    scheduled, check = _residual_conv(cin, cout, size, 1, stride, 0)
    assert _reads_in_place(scheduled, "x") == in_place
    # float32 sums of up to 512 products of N(0, 1) values.
    check(atol=2e-4)


# (in channels, out channels, input map, kernel, padding): a 1x1 convolution whose input planes a
# symbolic batch reads in place (``_reads_b_in_place``), and a 3x3 one whose zero-padded positions
# are read in place as rows (``direct_rows``; its padding stage is no parameter either way).
STATIC_BATCH = [(96, 16, 16, 1, 0), (16, 32, 16, 3, 1)]


@pytest.mark.parametrize("cin,cout,size,kernel,padding", STATIC_BATCH)
def test_static_batch_convolution_scheduled_as_symbolic(cin, cout, size, kernel, padding):
    """A model exported with a fixed batch of 1 (``torch.onnx.export``'s default): its activations
    are static-shaped parameters of the kernels, as its weights are. Scheduled through
    ``ApplyScheduleRules`` (which tells each kernel which parameters ``main`` binds to the model's
    input), the convolution still reads its input in place as with a symbolic batch (taken for a
    weight, a 1x1 convolution's input was packed whole up front), and matches torch's conv2d in
    float64."""
    import torch.nn.functional as F

    from qiao.compiler.passes.apply_schedule_rules import ApplyScheduleRules
    from qiao.compiler.schedules import rules_for
    from qiao.compiler.schedules.tir_util import ACTIVATION_PARAMS

    target = _target()

    def build(bb):
        x = relax.Var("x", relax.TensorType((1, cin, size, size), "float32"))
        w = relax.Var("w", relax.TensorType((cout, cin, kernel, kernel), "float32"))
        with bb.function("main", [x, w], attrs={"num_input": 1}):
            with bb.dataflow():
                y = bb.emit(relax.op.nn.conv2d(x, w, padding=padding))
                out = bb.emit_output(relax.op.nn.relu(y))
            bb.emit_func_output(out)

    with target:
        mod = ApplyScheduleRules(rules_for(target), strict=True)(fused_module(build))
    kernel_func = prim_func(mod, "conv2d")
    assert [int(i) for i in kernel_func.attrs[ACTIVATION_PARAMS]] == [0]
    scheduled = _after_rules(kernel_func)
    if kernel == 1:
        assert _reads_in_place(scheduled, "x")
    else:
        assert marked(scheduled, DIRECT_ROWS)
        assert _reads_in_place(scheduled, "pad_temp")
    rng = np.random.default_rng(cin + cout)
    x = rng.standard_normal((1, cin, size, size)).astype("float32")
    w = rng.standard_normal((cout, cin, kernel, kernel)).astype("float32")
    ref = torch.relu(
        F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), padding=padding)
    )
    got = _call(_build(scheduled, target), [x, w], ref.shape)
    # float32 sums of up to 144 products of N(0, 1) values.
    assert_close(got, ref.numpy().astype("float32"), rtol=1e-4, atol=2e-4)


def test_static_batch_convolution_tile():
    """A convolution's weight rows against a static batch take the tile of a symbolic batch
    (``GemmShape.weight_rows``): every output channel and a block of positions per task, not the
    dense layers' row tasks."""
    from qiao.compiler.schedules.cpu_gemm import GemmShape, choose_tile
    from qiao.compiler.schedules.cpu_info import CPUInfo

    for cpu in (CPUInfo(256, 16, 2), CPUInfo(512, 32, 2)):
        for m, n, k in ((24, 3136, 144), (16, 12544, 32), (40, 784, 240)):
            symbolic = choose_tile(cpu, GemmShape(None, m, n, k, "float32"))
            for batch in (1, 8):
                static = GemmShape(batch, m, n, k, "float32", weight_rows=True)
                assert choose_tile(cpu, static) == symbolic, (cpu, m, n, k, batch)


def test_positions_as_rows_tile():
    """The tile of a 7x7 map as rows: the height that pads the fewest of the 49 rows (5 with 16
    registers, 7 with 32), every row in every task (``mc_tiles=0``: the im2col rows packed once),
    and column tasks of whole weight panels, several per core, as many on each core."""
    from qiao.compiler.schedules.cpu_gemm import GemmShape, check_tile, choose_tile, task_balance
    from qiao.compiler.schedules.cpu_info import CPUInfo

    for cpu, lanes, mr in ((CPUInfo(256, 16, 2), 8, 5), (CPUInfo(512, 32, 2), 16, 7)):
        shape = GemmShape(None, 49, 512, 4608, "float32", image_rows=True)
        tile = choose_tile(cpu, shape)
        check_tile(tile, shape, lanes)
        assert (tile.mr, tile.nr_vectors, tile.mc_tiles) == (mr, 2, 0), (cpu, tile)
        n_tiles = 512 // tile.nr(lanes)
        assert n_tiles // tile.nc_tiles >= 4 * cpu.num_cores, (cpu, tile)
        # 576 channels (18 or 36 column tiles): whole blocks that share out evenly over the two
        # cores (not 9 tasks of two tiles with AVX-512)
        wide = GemmShape(None, 49, 576, 96, "float32", image_rows=True)
        tile = choose_tile(cpu, wide)
        tasks = 576 // tile.nr(lanes) // (tile.nc_tiles or 576 // tile.nr(lanes))
        assert tasks >= 4 * cpu.num_cores and task_balance(tasks, cpu.num_cores) == 1, (cpu, tile)


def test_few_column_tasks_split_their_rows_over_the_cores():
    """A 1x1 convolution over a 14x14 map (196 positions: 7 column tiles of 32 with AVX-512, 13
    of 16 with AVX2) splits its 672 output channels into row blocks so that the tasks share out
    evenly over 2 and 4 cores (``TASK_BALANCE``); 64 column tiles (a 64x64 map) stay whole-row
    tasks."""
    from qiao.compiler.schedules.cpu_gemm import (
        TASK_BALANCE,
        GemmShape,
        check_tile,
        choose_tile,
        task_balance,
    )
    from qiao.compiler.schedules.cpu_info import CPUInfo

    for bits, regs, lanes in ((256, 16, 8), (512, 32, 16)):
        for cores in (2, 4):
            cpu = CPUInfo(bits, regs, cores)
            for positions, split in ((196, True), (4096, False)):
                shape = GemmShape(None, 672, positions, 112, "float32")
                tile = choose_tile(cpu, shape)
                check_tile(tile, shape, lanes)
                n_tiles = -(-positions // tile.nr(lanes))
                m_tiles = -(-672 // tile.mr)
                tasks = n_tiles // (tile.nc_tiles or n_tiles) * (m_tiles // tile.mc_tiles)
                assert task_balance(tasks, cores) >= TASK_BALANCE, (cpu, tile, tasks)
                assert (tile.mc_tiles < m_tiles) == split, (cpu, tile)


def test_long_reduction_convolution_takes_tall_one_vector_tiles():
    """A pointwise convolution with a long reduction takes one-vector tiles as tall as the 32
    registers allow, in row tasks that share out evenly over the cores (EfficientNet-B0's
    projections: 672 -> 112 as 8 tiles of 14, 480 -> 80 as 8 of 10); the same extents packed from
    a window or a stride (each row task would pack the im2col columns again), a tile read in
    place, or 16 registers keep the two-vector tile."""
    from qiao.compiler.schedules.cpu_gemm import GemmShape, check_tile, choose_tile, task_balance
    from qiao.compiler.schedules.cpu_info import CPUInfo

    avx512 = CPUInfo(512, 32, 2)
    for m, n, k, mr in ((112, 196, 672, 14), (80, 196, 480, 10), (320, 49, 1152, 16)):
        shape = GemmShape(None, m, n, k, "float32", weight_rows=True, pointwise=True)
        tile = choose_tile(avx512, shape)
        check_tile(tile, shape, 16)
        assert (tile.mr, tile.nr_vectors, tile.mc_tiles, tile.nc_tiles) == (mr, 1, 1, 0), tile
        assert task_balance(-(-m // mr), 2) == 1
    packed = GemmShape(None, 112, 196, 672, "float32", weight_rows=True)
    windowed = GemmShape(None, 112, 196, 672, "float32", taps=9, weight_rows=True)
    for cpu, shape in ((avx512, packed), (avx512, windowed), (CPUInfo(256, 16, 2), windowed)):
        assert choose_tile(cpu, shape).nr_vectors == 2, shape
    pointwise = GemmShape(None, 112, 196, 672, "float32", weight_rows=True, pointwise=True)
    assert choose_tile(CPUInfo(256, 16, 2), pointwise).nr_vectors == 2


def test_pointwise_convolution_takes_tall_one_vector_tiles():
    """A pointwise convolution (1x1, unit stride) takes the one-vector row-task tile on a target
    with 32 registers whatever its reduction (MobileNetV3-Small's 240 -> 40 over 14x14, a 30 KB
    panel: 4 tiles of 10 rows); the same shape not pointwise (a strided 1x1 convolution) or on 16
    registers keeps the two-vector tile. The flag comes from the convolution itself: set for a
    1x1 window of unit stride, not for stride 2 or a padded 3x3 window."""
    from qiao.compiler.schedules.cpu_gemm import GemmShape, choose_tile
    from qiao.compiler.schedules.cpu_info import CPUInfo

    avx512, avx2 = CPUInfo(512, 32, 2), CPUInfo(256, 16, 2)
    pointwise = GemmShape(None, 40, 196, 240, "float32", weight_rows=True, pointwise=True)
    tile = choose_tile(avx512, pointwise)
    assert (tile.mr, tile.nr_vectors, tile.mc_tiles, tile.nc_tiles) == (10, 1, 1, 0), tile
    assert choose_tile(avx2, pointwise).nr_vectors == 2
    strided = GemmShape(None, 40, 196, 240, "float32", weight_rows=True)
    assert choose_tile(avx512, strided).nr_vectors == 2
    for kernel, stride, padding, flagged in ((1, 1, 0, True), (1, 2, 0, False), (3, 1, 1, False)):
        scheduled, _ = _residual_conv(64, 48, 14, kernel, stride, padding)
        assert ("qiao.gemm_pointwise" in scheduled.script()) == flagged, (kernel, stride)


def test_pointwise_convolution_matches_torch():
    """A 1x1 convolution 24 -> 88 over 28x28 (bias, residual add and ReLU fused; on a host with 32
    vector registers through the one-vector row-task tile) matches torch in float64 at batch 1
    and 3."""
    from qiao.compiler.schedules.cpu_info import cpu_info

    scheduled, check = _residual_conv(24, 88, 28, 1, 1, 0)
    if cpu_info(_target()).vector_registers >= 32:
        assert "T.unroll(T.int64(11))" in scheduled.script()  # 8 row tiles of 11 x 1 vector
    check(atol=1e-4)


def test_long_reduction_convolution_matches_torch():
    """A 1x1 convolution 672 -> 112 over 14x14 (bias, residual add and ReLU fused) matches torch
    in float64 at batch 1 and 3; on a host with 32 vector registers through the 14-row
    one-vector tile."""
    from qiao.compiler.schedules.cpu_info import cpu_info

    scheduled, check = _residual_conv(672, 112, 14, 1, 1, 0)
    if cpu_info(_target()).vector_registers >= 32:
        assert "T.unroll(T.int64(14))" in scheduled.script()
    check(atol=1e-3)


def test_row_blocks_of_a_small_map_convolution_match_torch():
    """The 1x1 convolution over 14x14 with its output channels in row blocks (on this host's
    cores; residual add and ReLU fused) matches torch's conv2d in float64 at batch 1 and 3."""
    scheduled, check = _residual_conv(40, 96, 14, 1, 1, 0)
    check(atol=1e-4)


def test_rows_outside_only_for_a_small_column_block():
    """A task sweeps its column tiles inside each row tile (long contiguous output runs) only
    when its whole ``B`` block fits ``ROWS_OUTSIDE_B_BYTES``: convolution tasks (1x1 from 16
    channels and 3x3 from 64 channels over 56x56: 14 KB and 252 KB blocks) and a dense layer's
    task of 64 columns of a 1024-row weight (256 KB: dense column blocks are capped to fit), not a
    task of a single column tile (1x1 from 24 channels over 28x28: 49 tiles, one per task; a
    3072-row weight, 192 KB per 16 columns)."""
    from qiao.compiler.schedules.cpu_gemm import GemmShape, _rows_outside, choose_tile
    from qiao.compiler.schedules.cpu_info import CPUInfo

    cpu = CPUInfo(256, 16, 2)
    cases = (
        (None, 72, 3136, 16, True),
        (None, 64, 3136, 576, True),
        (None, 88, 784, 24, False),
        (1, None, 1024, 1024, True),
        (1, None, 1024, 3072, False),
    )
    for s, m, n, k, outside in cases:
        shape = GemmShape(s, m, n, k, "float32")
        tile = choose_tile(cpu, shape)
        assert _rows_outside(shape, tile, tile.nr(8), tile.nc_tiles == 0) == outside, (shape, tile)


def test_rows_per_task():
    """Output rows per task of a large plane: a divisor of the rows when one is at least half
    the L1 cap, else the cap (a partial last task)."""
    from qiao.compiler.schedules.cpu_conv import rows_per_task

    assert rows_per_task(56, 17) == 14
    assert rows_per_task(112, 35) == 28
    assert rows_per_task(80, 48) == 40
    assert rows_per_task(113, 35) == 35  # prime: no divisor but 1
    assert rows_per_task(60, 23) == 20
    assert rows_per_task(28, 100) == 28
    assert rows_per_task(9, 0) == 1


def test_row_vector_width():
    """Rows of a depthwise window: whole vectors where they divide, the fewest instructions
    otherwise; a row of at most two vectors under a 5x5 window is one vector group."""
    from qiao.compiler.schedules.cpu_conv import _row_vector_width

    assert _row_vector_width(56, 8, 9) == 8
    assert _row_vector_width(14, 8, 9) == 4  # 3 vectors + 2 elements, not 8 + 6 elements
    assert _row_vector_width(14, 8, 25) == 14  # 8 + 4 + 2 lanes
    assert _row_vector_width(28, 8, 25) == 8  # more than two vectors: whole vectors + tail
    assert _row_vector_width(7, 8, 25) == 7
    assert _row_vector_width(None, 16, 25) == 16


def test_strided_convolution_over_derived_symbolic_dims():
    """SegFormer's stride-2 patch embedding: the image dims are expressions of symbolic sizes
    (``1 + (h - 1) / 4``), where TVM refuses the stride-phase layout of the padded input; the GEMM
    rule still takes the convolution (plain layout) and matches torch at two image sizes."""
    import torch.nn.functional as F
    from tvm import tirx

    from qiao.compiler.schedules.cpu_gemm import CPUMatmul

    target = _target()
    n, h, w = (tvm.tirx.Var(v, "int64") for v in "nhw")
    one, four = tirx.IntImm("int64", 1), tirx.IntImm("int64", 4)
    rows, cols = one + tirx.Div(h - one, four), one + tirx.Div(w - one, four)

    def build(bb):
        x = relax.Var("x", relax.TensorType((n, 16, rows, cols), "float32"))
        wt = relax.Var("wt", relax.TensorType((32, 16, 3, 3), "float32"))
        with bb.function("main", [x, wt]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.nn.conv2d(x, wt, strides=2, padding=1))
            bb.emit_func_output(out)

    func = _kernel(build, "conv2d")
    assert CPUMatmul().apply(func, target, False) is not None
    scheduled, rule = _schedule(func, target)
    assert rule == "CPUMatmul"
    fn = _build(scheduled, target)
    rng = np.random.default_rng(7)
    wt = rng.standard_normal((32, 16, 3, 3)).astype("float32")
    for image in (33, 64):  # h = w = image: maps of 9x9 and 16x16
        size = 1 + (image - 1) // 4
        x = rng.standard_normal((2, 16, size, size)).astype("float32")
        ref = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(wt).double(), None, 2, 1)
        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.zeros(ref.shape, "float32"), dev)
        fn(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(wt, dev), image, image, out)
        assert_close(out.numpy(), ref.numpy().astype("float32"), name=f"{image}", **TOL_SUM)


def _parallel_blocks(func) -> list[set]:
    """The names of the blocks under each parallel loop of ``func``."""
    import tvm_ffi
    from tvm import s_tir, tirx

    found = []

    def on_for(loop):
        if loop.kind == tirx.ForKind.PARALLEL:
            names = set()
            tvm_ffi.structural_walk(loop.body, [(s_tir.SBlock, lambda b: names.add(b.name_hint))])
            found.append(names)

    tvm_ffi.structural_walk(func.body, [(tirx.For, on_for)])
    return found


def test_row_blocks_pack_their_own_columns():
    """A convolution whose output channels split into row blocks so that its tasks share out over
    the cores (``_balancing_split``: a 3-channel 3x3 stride-2 stem over 299x299, 150x150 outputs,
    for an AVX-512 CPU of two cores, code generated, not run: 11 column tasks an image, taken as 22
    in two row blocks) packs each task's im2col columns inside the task, beside its GEMM, instead
    of the whole image up front (a second parallel pass over a 2.5 MB panel per image, its padded
    input made by a third; 16.2 -> 7.2 ms at batch 8 on the 2-core AVX-512 EPYC VM). The host's
    own schedule of it matches torch in float64 at batch 1 and 3."""
    from qiao.compiler.schedules.cpu_gemm import GemmShape, choose_tile

    wide = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    tile = choose_tile(
        cpu_info(wide), GemmShape(None, 32, 150 * 150, 27, "float32", weight_rows=True)
    )
    assert tile.mc_tiles * tile.mr < 32  # the row blocks this is about

    def build(bb):
        n = tvm.tirx.Var("n", "int64")
        x = relax.Var("x", relax.TensorType((n, 3, 299, 299), "float32"))
        w = relax.Var("w", relax.TensorType((32, 3, 3, 3), "float32"))
        with bb.function("main", [x, w]):
            with bb.dataflow():
                y = bb.emit(relax.op.nn.conv2d(x, w, strides=2, padding=1))
                out = bb.emit_output(relax.op.nn.relu(y))
            bb.emit_func_output(out)

    scheduled, rule = _schedule(_kernel(build, "conv2d"), wide)
    assert rule == "CPUMatmul"
    blocks = _parallel_blocks(scheduled)
    packing = [names for names in blocks if any(n.startswith("pad_temp_reindex") for n in names)]
    assert packing and all("conv2d_nchw_update" in names for names in packing), blocks
    _, check = _residual_conv(3, 32, 299, 3, 2, 1)
    check(atol=1e-4)
