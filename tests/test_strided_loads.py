"""ShuffleStridedLoads: vector loads of every s-th element as contiguous loads and a shuffle.

The rewrite's index arithmetic is checked element by element (which elements each contiguous load
covers, which lanes the shuffle picks), and kernels compiled with qiao's CPU lowering are run
against NumPy. Nothing here times anything: speed lives in benchmarks/.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import tirx
from tvm.script import tirx as T

from qiao.compiler.passes.shuffle_strided_loads import (
    MAX_STRIDE,
    compile_cpu_kernel,
    shuffled,
)
from qiao.compiler.schedules.tir_util import static_int


def _target():
    from qiao.backends.cpu import CPUBackend

    return CPUBackend().target()


@pytest.mark.parametrize("stride", [2, 3, 4])
@pytest.mark.parametrize("lanes", [2, 4, 8, 16])
def test_shuffle_picks_every_strided_element_and_reads_no_other(stride, lanes):
    """Each contiguous load lies inside the strided load's span ``[base, base + s·(lanes-1)]``
    (nothing past it is touched: the span may end a buffer), and the shuffle of their
    concatenation yields exactly the elements ``base + s·j``."""
    buf = tirx.decl_buffer((1024,), "float32", name="A")
    base = tirx.Var("base", "int32")
    load = tirx.BufferLoad(buf, [tirx.Ramp(base, stride, lanes)])
    new = shuffled(load)
    if lanes < stride:  # more loads than lanes: left to TVM's lane-by-lane loads
        assert new is None
        return
    assert isinstance(new, tirx.Shuffle)
    span = stride * (lanes - 1)
    elements = []
    analyzer = tvm.sym.Analyzer()
    for vec in new.vectors:
        (ramp,) = vec.indices
        assert static_int(ramp.stride) == 1 and static_int(ramp.lanes) == lanes
        start = static_int(analyzer.simplify(ramp.base - base))
        assert start is not None and 0 <= start and start + lanes - 1 <= span
        elements.extend(range(start, start + lanes))
    picked = [elements[static_int(i)] for i in new.indices]
    assert picked == [stride * j for j in range(lanes)]


def test_loads_left_alone():
    """Contiguous loads, strides past ``MAX_STRIDE``, symbolic strides and scalar loads."""
    buf = tirx.decl_buffer((4096,), "float32", name="A")
    base = tirx.Var("base", "int32")
    s = tirx.Var("s", "int32")
    for index in (
        tirx.Ramp(base, 1, 8),
        tirx.Ramp(base, MAX_STRIDE + 1, 8),
        tirx.Ramp(base, s, 8),
        base,
    ):
        assert shuffled(tirx.BufferLoad(buf, [index])) is None


def _strided_copy(stride: int, lanes: int, offset: int):
    """``B[i] = A[stride·i + offset]`` for ``lanes`` values, vectorised; ``A`` ends at the last
    element read."""
    size = stride * (lanes - 1) + offset + 1

    @T.prim_func(s_tir=True)
    def func(a: T.Buffer((size,), "float32"), b: T.Buffer((lanes,), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in T.vectorized(lanes):
            with T.sblock("copy"):
                vi = T.axis.spatial(lanes, i)
                b[vi] = a[vi * stride + offset]

    return func, size


@pytest.mark.parametrize("stride,lanes,offset", [(2, 16, 1), (2, 8, 0), (3, 8, 2), (4, 4, 3)])
def test_strided_copy_compiles_to_shuffles_and_matches_numpy(stride, lanes, offset):
    """Compiled with qiao's CPU lowering, the strided load is whole-vector loads and a
    ``shufflevector`` (TVM's own lowering loads it one float at a time), and copies the right
    elements."""
    func, size = _strided_copy(stride, lanes, offset)
    target = _target()
    ex = compile_cpu_kernel(func, target)
    ll = ex.mod.inspect_source("ll")
    plain = tvm.compile(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target
    ).mod.inspect_source("ll")
    assert "load float," in plain  # TVM's lowering: one scalar load per lane
    assert "shufflevector" in ll and "load float," not in ll
    a = np.random.default_rng(stride * lanes).standard_normal(size).astype("float32")
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(lanes, "float32"), dev)
    ex.jit()["main"](tvm.runtime.tensor(a, dev), out)
    np.testing.assert_array_equal(out.numpy(), a[offset::stride][:lanes])
