"""``SerializeGPUThreads``: a thread-bound GPU PrimFunc rewritten as serial loops that run on a CPU,
with the same arithmetic, so GPU kernels are tested numerically on machines without a GPU.

What a GPU gives a kernel, and its serial twin here:

- ``blockIdx.*`` loops: blocks are independent, so each becomes a serial loop.
- ``threadIdx.*`` loops: threads of a block run in lockstep between barriers. The body is cut at
  every barrier (``tvm_storage_sync``) and every warp shuffle; each piece runs for all threads
  (serial loops over the thread indices) before the next piece starts. A loop or ``if`` that holds
  a barrier or a shuffle must be the same for every thread (its bounds or condition use no thread
  index and no per-thread register), as on the GPU; otherwise the pass refuses the kernel.
- ``local`` buffers (per-thread registers) become arrays indexed by the thread indices first;
  ``shared`` buffers become one ordinary buffer per block.
- ``tvm_warp_shuffle_down/up/shuffle(mask, value, delta, width, warp_size)``: every thread first
  writes ``value`` to an exchange array, then reads the lane the shuffle names. Lanes are counted
  within the hardware warp (``warp_size`` of the pass: 32 on NVIDIA, 64 on AMD's CDNA wavefronts),
  segments of ``width`` lanes never exchange, and a lane whose source falls outside its segment
  keeps its own value (CUDA's ``__shfl_*_sync`` and TVM's ROCm lowering agree on this). A shuffle
  ``width`` wider than the hardware warp is refused: the GPU could not run it.

The pass is for testing (``tests/test_moe_gpu.py``), not for compiling models for CPUs.
"""

from __future__ import annotations

from typing import Any

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import Call

from qiao.compiler.errors import CompileError

_SYNC = "tirx.tvm_storage_sync"
_SHUFFLES = ("tirx.tvm_warp_shuffle_down", "tirx.tvm_warp_shuffle_up", "tirx.tvm_warp_shuffle")
_AXES = ("threadIdx.x", "threadIdx.y", "threadIdx.z")  # fastest first: a thread's linear id


def _op_name(node) -> str:
    return str(node.op.name) if isinstance(node, Call) and hasattr(node.op, "name") else ""


def _calls(node, names) -> list:
    found: list = []
    tvm_ffi.structural_walk(
        node, [(Call, lambda c: (found.append(c) if _op_name(c) in names else None, None)[1])]
    )
    return found


def _communicates(stmt) -> bool:
    return bool(_calls(stmt, (_SYNC, *_SHUFFLES)))


def _is_loop(stmt, prefix: str) -> bool:
    return (
        isinstance(stmt, tirx.For)
        and stmt.kind == tirx.ForKind.THREAD_BINDING
        and str(stmt.thread_binding.thread_tag).startswith(prefix)
    )


def _seq(stmts: list):
    if not stmts:
        return tirx.Evaluate(0)
    return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)


def _uses(expr, vars_) -> bool:
    hits: list = []
    tvm_ffi.structural_walk(
        expr,
        [(tvm.ir.expr.Var, lambda v: (hits.append(any(v.same_as(t) for t in vars_)), None)[1])],
    )
    return any(hits)


class _ThreadBlock:
    """Serialises one nest of ``threadIdx`` loops (one thread block's body)."""

    def __init__(self, loops: list, warp_size: int, name: str):
        self.loops = loops  # outermost first
        self.warp_size = warp_size
        self.name = name
        self.extents = []
        for loop in loops:
            if not isinstance(loop.extent, tirx.IntImm):
                raise CompileError(f"{name}: thread extent {loop.extent} is not a constant")
            self.extents.append(int(loop.extent.value))
        self.count = 1
        for e in self.extents:
            self.count *= e
        self.vars = [loop.loop_var for loop in loops]
        self.locals: list = []  # (original buffer, per-thread array)
        self.shared: list = []  # (original buffer, per-block buffer)
        self.allocs: list = []

    # -- the thread index ----------------------------------------------------------------------
    def linear_id(self):
        """The thread's index in the block, ``threadIdx.x`` fastest (lanes of a warp)."""
        tid, stride = tirx.const(0, "int32"), 1
        for axis in _AXES:
            for loop in self.loops:
                if _tag(loop) == axis:
                    tid = tid + tirx.Cast("int32", loop.loop_var) * stride
                    stride *= int(loop.extent.value)
        return tid

    def wrap(self, stmt):
        """``stmt`` for every thread of the block (serial loops, ``threadIdx.x`` innermost)."""
        for loop in reversed(self.loops):
            stmt = tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, stmt)
        return stmt

    # -- buffers -------------------------------------------------------------------------------
    def take_allocations(self, stmt):
        """``stmt`` without its ``AllocBuffer``s, whose buffers move outside the thread loops."""

        def on_alloc(node, _mutator):
            buf = node.buffer
            scope = buf.scope()
            if scope.startswith("local"):
                new = tirx.decl_buffer(
                    [*self.extents, *buf.shape], buf.dtype, f"{buf.name}_per_thread"
                )
                self.locals.append((buf, new))
            elif scope.startswith("shared"):
                new = tirx.decl_buffer(list(buf.shape), buf.dtype, f"{buf.name}_block")
                self.shared.append((buf, new))
            else:
                raise CompileError(f"{self.name}: cannot serialise a {scope!r} buffer {buf.name}")
            self.allocs.append(tirx.AllocBuffer(new))
            return tirx.Evaluate(0)

        return tvm_ffi.structural_mutate(stmt, [(tirx.AllocBuffer, on_alloc)])

    def _mapped(self, buf):
        for old, new in self.locals:
            if old.same_as(buf):
                return new, True
        for old, new in self.shared:
            if old.same_as(buf):
                return new, False
        return None, False

    def per_thread(self, node):
        """``node`` with per-thread and per-block buffers replaced by their serial arrays."""

        def on_load(load, mutator):
            indices = [mutator.mutate(i) for i in load.indices]
            new, local = self._mapped(load.source)
            if new is None:
                return tirx.BufferLoad(load.source, indices)
            return tirx.BufferLoad(new, [*self.vars, *indices] if local else indices)

        def on_store(store, mutator):
            indices = [mutator.mutate(i) for i in store.indices]
            value = mutator.mutate(store.value)
            new, local = self._mapped(store.buffer)
            if new is None:
                return tirx.BufferStore(store.buffer, value, indices)
            return tirx.BufferStore(new, value, [*self.vars, *indices] if local else indices)

        return tvm_ffi.structural_mutate(
            node, [(tvm.ir.expr.TensorLoad, on_load), (tirx.BufferStore, on_store)]
        )

    def _uniform(self, expr) -> bool:
        if _uses(expr, self.vars):
            return False
        loads: list = []
        tvm_ffi.structural_walk(
            expr, [(tvm.ir.expr.TensorLoad, lambda b: (loads.append(b), None)[1])]
        )
        return not any(self._mapped(b.source)[1] for b in loads)

    # -- cutting at barriers and shuffles ------------------------------------------------------
    def split(self, stmt) -> list:
        """Serial statements equivalent to ``stmt`` run by all threads in lockstep."""
        if not _communicates(stmt):
            return [self.wrap(self.per_thread(stmt))]
        if isinstance(stmt, tirx.SeqStmt):
            out, run = [], []
            for child in stmt.seq:
                if _communicates(child):
                    if run:
                        out.append(self.wrap(self.per_thread(_seq(run))))
                        run = []
                    out += self.split(child)
                else:
                    run.append(child)
            if run:
                out.append(self.wrap(self.per_thread(_seq(run))))
            return out
        if isinstance(stmt, tirx.Evaluate) and _op_name(stmt.value) == _SYNC:
            return []  # the cut itself is the barrier
        if isinstance(stmt, tirx.For) and stmt.kind != tirx.ForKind.THREAD_BINDING:
            if not (self._uniform(stmt.min) and self._uniform(stmt.extent)):
                raise CompileError(
                    f"{self.name}: a loop holding a barrier or shuffle has bounds that differ "
                    "between threads (the GPU would deadlock or read inactive lanes)"
                )
            body = _seq(self.split(stmt.body))
            return [tirx.For(stmt.loop_var, stmt.min, stmt.extent, tirx.ForKind.SERIAL, body)]
        if isinstance(stmt, tirx.IfThenElse):
            if not self._uniform(stmt.condition):
                raise CompileError(
                    f"{self.name}: a barrier or shuffle under a condition that differs between "
                    "threads"
                )
            other = _seq(self.split(stmt.else_case)) if stmt.else_case is not None else None
            return [tirx.IfThenElse(stmt.condition, _seq(self.split(stmt.then_case)), other)]
        if isinstance(stmt, tirx.BufferStore):
            return self._shuffle(stmt)
        raise CompileError(
            f"{self.name}: cannot serialise a {type(stmt).__name__} holding a barrier or shuffle"
        )

    def _shuffle(self, store) -> list:
        calls = _calls(store, _SHUFFLES)
        if len(calls) != 1 or _calls(store, (_SYNC,)):
            raise CompileError(f"{self.name}: one warp shuffle per statement is supported")
        (call,) = calls
        _, value, lane_arg, width, _ = call.args
        if not isinstance(width, tirx.IntImm):
            raise CompileError(f"{self.name}: shuffle width {width} is not a constant")
        w = int(width.value)
        if w > self.warp_size or self.warp_size % w or self.count % w:
            raise CompileError(
                f"{self.name}: a {w}-lane shuffle does not fit {self.count} threads in "
                f"{self.warp_size}-lane warps"
            )
        if not self._uniform(lane_arg) and _op_name(call) != "tirx.tvm_warp_shuffle":
            raise CompileError(f"{self.name}: shuffle distance differs between threads")
        exchange = tirx.decl_buffer([self.count], value.ty.dtype, "warp_exchange")
        self.allocs.append(tirx.AllocBuffer(exchange))
        tid = self.linear_id()
        # lanes count within the hardware warp; segments of w lanes are aligned inside it
        segment_lane = tirx.floormod(tirx.floormod(tid, self.warp_size), w)
        delta = tirx.Cast("int32", self.per_thread(lane_arg))
        kind = _op_name(call)
        if kind == "tirx.tvm_warp_shuffle_down":
            source = tirx.Select(segment_lane + delta < w, tid + delta, tid)
        elif kind == "tirx.tvm_warp_shuffle_up":
            source = tirx.Select(segment_lane >= delta, tid - delta, tid)
        else:  # lane index within the segment
            source = tid - segment_lane + tirx.floormod(delta, w)
        publish = tirx.BufferStore(exchange, self.per_thread(value), [tid])

        def on_call(node, mutator):
            if _op_name(node) in _SHUFFLES:  # the one shuffle of this statement
                return tirx.BufferLoad(exchange, [source])
            return mutator.default_mutate(node)

        read = self.per_thread(tvm_ffi.structural_mutate(store, [(Call, on_call)]))
        return [self.wrap(publish), self.wrap(read)]


def _tag(loop) -> str:
    return str(loop.thread_binding.thread_tag)


def _serialize(stmt, warp_size: int, name: str):
    if _is_loop(stmt, "blockIdx"):
        body = _serialize(stmt.body, warp_size, name)
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, tirx.ForKind.SERIAL, body)
    if _is_loop(stmt, "threadIdx"):
        loops, inner = [], stmt
        while _is_loop(inner, "threadIdx"):
            loops.append(inner)
            inner = inner.body
        block = _ThreadBlock(loops, warp_size, name)
        inner = block.take_allocations(inner)
        pieces = block.split(inner)
        return _seq([*block.allocs, *pieces])
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([_serialize(s, warp_size, name) for s in stmt.seq])
    if isinstance(stmt, tirx.IfThenElse):
        other = stmt.else_case
        return tirx.IfThenElse(
            stmt.condition,
            _serialize(stmt.then_case, warp_size, name),
            _serialize(other, warp_size, name) if other is not None else None,
        )
    if isinstance(stmt, tirx.For):
        body = _serialize(stmt.body, warp_size, name)
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body)
    return stmt


def has_thread_bindings(func) -> bool:
    """Whether a PrimFunc binds loops to GPU blocks or threads."""
    found: list = []
    tvm_ffi.structural_walk(
        func.body,
        [(tirx.For, lambda f: (found.append(f.kind == tirx.ForKind.THREAD_BINDING), None)[1])],
    )
    return any(found)


def serialize_gpu_threads(func, warp_size: int = 32, name: str = "kernel"):
    """The CPU-runnable serial twin of a thread-bound PrimFunc (see the module docstring).

    Parameters
    ----------
    func : tvm.tirx.PrimFunc
        A GPU kernel: ``blockIdx``/``threadIdx`` loops under its root block.
    warp_size : int
        Lanes of the hardware warp whose shuffles are emulated (32 NVIDIA, 64 AMD CDNA).
    name : str
        The kernel's name, for messages.

    Returns
    -------
    tvm.tirx.PrimFunc
        The same function with serial loops only.
    """
    from qiao.compiler.schedules.tir_util import with_root_body

    root = func.body.block
    body = _serialize(root.body, warp_size, name)
    return with_root_body(func, body, root.alloc_buffers)


@tvm.transform.module_pass(opt_level=0, name="SerializeGPUThreads")
class SerializeGPUThreads:
    """Replace every thread-bound PrimFunc of a module by its serial twin.

    Parameters
    ----------
    warp_size : int
        Lanes of the hardware warp the shuffles assume (32 NVIDIA, 64 AMD CDNA).
    """

    def __init__(self, warp_size: int = 32):
        self.warp_size = warp_size

    def transform_module(self, mod: tvm.IRModule, ctx: Any) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and has_thread_bindings(func):
                updates[gv] = serialize_gpu_threads(func, self.warp_size, gv.name_hint)
        if not updates:
            return mod
        out = mod.clone()  # the caller's module stays as it was
        for gv, func in updates.items():
            out[gv] = func
        return out


__all__ = ["SerializeGPUThreads", "has_thread_bindings", "serialize_gpu_threads"]
