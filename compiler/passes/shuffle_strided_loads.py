"""ShuffleStridedLoads: vector loads of every ``s``-th element as contiguous loads and a shuffle.

TVM's LLVM code generation has no strided vector load: a load whose index is
``Ramp(base, s, lanes)`` with ``s != 1`` is emitted one lane at a time (a scalar load and an
insert per lane, the addresses computed in vector registers and extracted one by one). Such loads
come from strided windows: the copy storing a stride-2 window's padded input as phase planes
(``cpu_conv._deinterleave_copy``: ``pad[h, p, j] = x[h, 2·j + p - 1]``), strided pooling and
convolution windows read in place.

This pass, run at the end of qiao's CPU lowering (``cpu_tir_pipeline``), replaces each such load
with contiguous ``lanes``-wide loads of the span it covers (``s`` of them when ``lanes >= s``)
and one ``Shuffle`` picking every ``s``-th element (LLVM: ``vpermt2ps`` on AVX-512, a few
shuffles on AVX2 and NEON). The loads stay inside ``[base, base + s·(lanes - 1)]``, the elements
the strided load reads: the last one ends where that span ends rather than past it, so no address
outside the original access is touched (the span may end a buffer). Strides above ``MAX_STRIDE``
(a load per lane is then about as cheap), loads whose lane count or stride is not a constant, and
loads with fewer lanes than the stride are left alone.
"""

from __future__ import annotations

import functools
from typing import Any

from qiao.compiler.passes.apply_schedule_rules import primfunc_rewrite_pass
from qiao.compiler.schedules.tir_util import static_int

# Largest stride rewritten: s loads of ``lanes`` elements for ``lanes`` useful ones.
MAX_STRIDE = 4
# Name under which the CPU lowering is registered with TVM (``tvm.compile(tir_pipeline=...)``).
PIPELINE = "qiao_cpu"


def shuffled(load):
    """``load`` as contiguous loads and a ``Shuffle`` when its last index is a small constant
    stride ``Ramp``; ``None`` otherwise."""
    from tvm import tirx

    if not load.indices:
        return None
    ramp = load.indices[-1]
    if not isinstance(ramp, tirx.Ramp) or any(isinstance(i, tirx.Ramp) for i in load.indices[:-1]):
        return None
    stride, lanes = static_int(ramp.stride), static_int(ramp.lanes)
    if stride is None or lanes is None or not 2 <= stride <= MAX_STRIDE or lanes < stride:
        return None
    dtype = ramp.base.ty.dtype
    if dtype.lanes != 1:
        return None
    one = tirx.const(1, dtype)
    # The span read is ``stride·(lanes-1) + 1`` elements: whole ``lanes``-wide chunks from its
    # start, the last one ending where the span ends.
    span = stride * (lanes - 1) + 1
    chunks = -(-span // lanes)
    last = span - lanes
    starts = [i * lanes for i in range(chunks - 1)] + [last]
    vectors = [
        tirx.BufferLoad(
            load.source,
            [*load.indices[:-1], tirx.Ramp(ramp.base + tirx.const(s, dtype), one, lanes)],
        )
        for s in starts
    ]
    before_last = (chunks - 1) * lanes
    indices = []
    for j in range(lanes):
        offset = stride * j
        indices.append(offset if offset < before_last else before_last + offset - last)
    return tirx.Shuffle(vectors, [tirx.const(i, "int32") for i in indices])


def shuffle_strided_loads(func):
    """``func`` with every small-stride vector load rewritten by ``shuffled``."""
    import tvm_ffi
    from tvm import ir

    def on_load(node, mutator):
        node = mutator.default_mutate(node)
        new = shuffled(node)
        return node if new is None else new

    return tvm_ffi.structural_mutate(func, [(ir.TensorLoad, on_load)])


def ShuffleStridedLoads() -> Any:  # noqa: N802 - a pass constructor, named like TVM's
    """Module pass applying ``shuffle_strided_loads`` to every PrimFunc."""
    return primfunc_rewrite_pass("ShuffleStridedLoads", shuffle_strided_loads)


@functools.cache
def cpu_tir_pipeline() -> str:
    """Register qiao's CPU TIR lowering (TVM's default, then ``ShuffleStridedLoads``) with TVM,
    once per process, and return its name, for ``tvm.compile(..., tir_pipeline=name)``."""
    import tvm
    from tvm.tirx import compilation_pipeline

    def factory():
        lower, host, device = tvm.tirx.get_tir_pipeline("default")

        @tvm.transform.module_pass(opt_level=0, name=PIPELINE)
        def _pipeline(mod, _ctx):
            return ShuffleStridedLoads()(lower(mod))

        return _pipeline, host, device

    compilation_pipeline.register_tir_pipeline(PIPELINE, factory)
    return PIPELINE


def compile_cpu_kernel(func, target):
    """The PrimFunc ``func`` alone, compiled for the CPU ``target`` as the CPU backend compiles
    a model's kernels (``cpu_tir_pipeline``): what tuning measures and tests run."""
    import tvm

    return tvm.compile(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
        target=target,
        tir_pipeline=cpu_tir_pipeline(),
    )
