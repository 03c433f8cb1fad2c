"""Converters for ONNX control flow with loop-carried state: Scan and Loop.

TVM's Relax importer converts ``If`` (its ``_convert_subgraph``) but has no loop. Both ops here
convert their ``body`` subgraph with qiao's converter map (``run_body``) and

* Scan: unroll over the scan axis, whose length is static (it is a dim of a scan input);
* Loop: unroll when the trip count is a constant and the condition is constant or never changes
  (``cond_out`` is ``cond_in`` or a constant true); otherwise the loop becomes a recursive Relax
  function (``If`` + tail call), its scan outputs growing by concatenation, so trip count and
  condition may be values known only at run time.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.errors import CompileError
from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import const, materialize, static_dims

_UNIQUE = itertools.count()


def _parse_attrs(node: onnx.NodeProto) -> dict:
    attrs = tvm_onnx.ONNXGraphImporter._parse_attr(None, node.attribute)  # uses no state
    attrs["tvm_custom"] = {"name": node.name, "num_outputs": len(node.output)}
    return attrs


def run_body(bb, graph: onnx.GraphProto, bound: dict, outer: dict, opset: int) -> list:
    """Convert the nodes of subgraph ``graph`` with ``bb`` and return its outputs.

    Parameters
    ----------
    bb : relax.BlockBuilder
        Where the body's bindings are emitted.
    graph : onnx.GraphProto
        The subgraph (a Loop/Scan/If body).
    bound : dict
        ``{body input name: relax.Expr}`` for the subgraph's formal inputs.
    outer : dict
        ``{name: relax.Expr}`` of the enclosing scope (names the body uses without defining).
    opset : int
        The model's opset, for choosing converter versions.

    Returns
    -------
    list
        One ``relax.Expr`` per graph output, in order.
    """
    from qiao.compiler.frontend import _convert_map

    convert_map = _convert_map()
    nodes = dict(outer)
    nodes.update(bound)
    for init in graph.initializer:
        nodes[init.name] = relax.const(onnx.numpy_helper.to_array(init))
    for node in graph.node:
        inputs = tvm_onnx.onnx_input(nodes[i] if i else None for i in node.input)
        attrs = _parse_attrs(node)
        if node.op_type == "If":
            outs = _if(bb, inputs[0], attrs, nodes, opset)
        else:
            if node.op_type not in convert_map:
                raise CompileError(
                    f"operator {node.op_type} inside a loop body has no converter. fix: add one "
                    "in a qiao.compiler.frontend.convert_* module"
                )
            out = convert_map[node.op_type].get_converter(opset)(bb, inputs, attrs, [nodes, {}])
            if isinstance(out, relax.Expr):
                out = bb.normalize(out)
            if isinstance(out, relax.Tuple):
                outs = list(out.fields)
            elif isinstance(out, relax.Expr) and isinstance(out.ty, relax.TupleType):
                if node.op_type.startswith(("Sequence", "Optional", "SplitToSequence")) or (
                    node.op_type == "ConcatFromSequence"
                ):
                    outs = [out]
                else:
                    outs = [bb.emit(relax.TupleGetItem(out, i)) for i in range(len(out.ty.fields))]
            else:
                outs = [out]
        for name, value in zip(node.output, outs):
            if name:
                nodes[name] = value
    return [nodes[o.name] for o in graph.output]


def _if(bb, cond, attrs, nodes, opset):
    """An ``If`` inside a body: the branch is chosen at import time when ``cond`` is constant."""
    value = tvm_onnx.get_constant(cond, [{}, {}])
    if isinstance(value, tvm.ir.GenericConst):
        branch = attrs["then_branch"] if bool(value.value.numpy()) else attrs["else_branch"]
        return run_body(bb, branch, {}, nodes, opset)
    raise CompileError(
        "an If with a run-time condition inside a Loop/Scan body is not supported. fix: hoist "
        "the If out of the loop, or make its condition a constant"
    )


def _index(bb, x, axis: int, i: int):
    """``x`` at position ``i`` of ``axis``, the axis removed."""
    sliced = relax.op.strided_slice(x, [axis], [i], [i + 1])
    return bb.normalize(relax.op.squeeze(sliced, [axis]))


def _stack(bb, items: list, axis: int, dtype_of=None):
    return bb.normalize(relax.op.stack(items, axis=axis))


class _Versioned(tvm_onnx.OnnxOpConverter):
    """A converter whose implementation needs the opset (to convert its body's nodes)."""

    @classmethod
    def get_converter(cls, opset):
        def convert(bb, inputs, attr, params):
            return cls.convert(bb, inputs, attr, params, opset)

        return convert

    @classmethod
    def convert(cls, bb, inputs, attr, params, opset):
        raise NotImplementedError


# --- Scan -----------------------------------------------------------------------------------------
@register_converter("Scan")
class Scan(_Versioned):
    """Scan, unrolled over the scan axis (static: a dim of the scan inputs). Opset 8's batched
    form (a leading batch axis, optional ``sequence_lens``) runs the scan per batch entry."""

    @classmethod
    def convert(cls, bb, inputs, attr, params, opset):
        body = attr["body"]
        n_scan = int(attr["num_scan_inputs"])
        outer = params[0]
        if opset < 9:
            return cls._batched(bb, inputs, attr, outer, opset)
        states, scans = list(inputs[: len(inputs) - n_scan]), list(inputs[len(inputs) - n_scan :])
        return relax.Tuple(cls._scan(bb, body, states, scans, attr, outer, opset))

    @classmethod
    def _scan(cls, bb, body, states, scans, attr, outer, opset, batched=False):
        n_scan = len(scans)
        in_axes = list(attr.get("scan_input_axes", [0] * n_scan))
        in_dirs = list(attr.get("scan_input_directions", attr.get("directions", [0] * n_scan)))
        lengths = set()
        for x, axis in zip(scans, in_axes):
            dims = static_dims(x)
            if dims is None:
                raise CompileError(
                    "Scan needs the scan inputs' shapes static to unroll. fix: give the model's "
                    "inputs static shapes"
                )
            lengths.add(dims[axis if axis >= 0 else axis + len(dims)])
        if len(lengths) != 1:
            raise CompileError(f"Scan inputs disagree on the scan length: {sorted(lengths)}")
        (length,) = lengths
        names = [i.name for i in body.input]
        n_state = len(states)
        collected: list[list] = []
        for t in range(length):
            bound = dict(zip(names, states))
            for k, (x, axis, rev) in enumerate(zip(scans, in_axes, in_dirs)):
                axis = axis if axis >= 0 else axis + x.ty.ndim
                bound[names[n_state + k]] = _index(bb, x, axis, length - 1 - t if rev else t)
            outs = run_body(bb, body, bound, outer, opset)
            states = outs[:n_state]
            collected.append(outs[n_state:])
        n_out = len(body.output) - n_state
        out_axes = list(attr.get("scan_output_axes", [0] * n_out))
        out_dirs = list(attr.get("scan_output_directions", [0] * n_out))
        results = list(states)
        for k in range(n_out):
            items = [step[k] for step in collected]
            if out_dirs[k] if k < len(out_dirs) else 0:
                items = items[::-1]
            rank = items[0].ty.ndim + 1
            axis = out_axes[k] if k < len(out_axes) else 0
            results.append(_stack(bb, items, axis if axis >= 0 else axis + rank))
        return results

    @classmethod
    def _batched(cls, bb, inputs, attr, outer, opset):
        if inputs[0] is not None:
            raise CompileError(
                "Scan-8 with sequence_lens is not supported. fix: re-export with opset 9 or "
                "later, or drop sequence_lens when every sequence is full length"
            )
        n_scan = int(attr["num_scan_inputs"])
        values = list(inputs[1:])
        states, scans = values[: len(values) - n_scan], values[len(values) - n_scan :]
        batch = static_dims(values[0])[0]
        per_batch = []
        scan_attr = {"scan_input_directions": list(attr.get("directions", [0] * n_scan))}
        for b in range(batch):
            s = [_index(bb, x, 0, b) for x in states]
            x = [_index(bb, v, 0, b) for v in scans]
            per_batch.append(cls._scan(bb, attr["body"], s, x, scan_attr, outer, opset))
        return relax.Tuple(
            [_stack(bb, [r[k] for r in per_batch], 0) for k in range(len(per_batch[0]))]
        )


# --- Loop -----------------------------------------------------------------------------------------
# Constant trip counts up to this many iterations are unrolled; longer loops recurse.
MAX_UNROLL = 64


def _graph_refs(graph: onnx.GraphProto) -> set[str]:
    """Names ``graph`` (and its nested subgraphs) reads without defining them."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _graph_refs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    used |= _graph_refs(g)
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


def _keeps_condition(body: onnx.GraphProto) -> bool:
    """True when the body's condition output is its condition input (through Identity) or a
    constant true: the loop then runs exactly its trip count."""
    want, cond_in = body.output[0].name, body.input[1].name
    producers = {o: n for n in body.node for o in n.output}
    while want in producers and producers[want].op_type == "Identity":
        want = producers[want].input[0]
    if want == cond_in:
        return True
    node = producers.get(want)
    if node is not None and node.op_type == "Constant":
        value = onnx.numpy_helper.to_array(node.attribute[0].t)
        return value.size == 1 and bool(value.reshape(-1)[0])
    return False


def _scalar_const(x, params):
    if x is None:
        return None
    value = tvm_onnx.get_constant(x, params)
    if isinstance(value, tvm.ir.GenericConst):
        return value.value.numpy().reshape(-1)[0].item()
    return None


def _tensor_ty(x):
    ty = x.ty
    if not isinstance(ty, relax.TensorType):
        raise CompileError(
            f"Loop: a loop-carried value of type {ty} (an ONNX sequence or optional) is not "
            "supported, only tensors. fix: carry tensors (e.g. concatenate instead of "
            "SequenceInsert)"
        )
    return ty


@register_converter("Loop")
class Loop(_Versioned):
    """Loop: unrolled for a constant trip count with an unchanging condition, else a recursive
    Relax function (see the module docstring)."""

    @classmethod
    def convert(cls, bb, inputs, attr, params, opset):
        body = attr["body"]
        trip, cond = inputs[0], inputs[1]
        carried = list(inputs[2:])
        outer = params[0]
        trip_c = _scalar_const(trip, params)
        cond_c = _scalar_const(cond, params) if cond is not None else True
        if (
            trip_c is not None
            and 0 < trip_c <= MAX_UNROLL
            and cond_c is not None
            and bool(cond_c)
            and _keeps_condition(body)
        ):
            return cls._unrolled(bb, body, int(trip_c), carried, outer, opset)
        return cls._recursive(bb, body, trip, cond, carried, outer, opset)

    @classmethod
    def _unrolled(cls, bb, body, trip, carried, outer, opset):
        names = [i.name for i in body.input]
        n_v = len(carried)
        scans: list[list] = []
        cond = relax.const(True, "bool")
        for t in range(trip):
            bound = {names[0]: const(t, "int64"), names[1]: cond}
            bound.update(zip(names[2:], carried))
            outs = run_body(bb, body, bound, outer, opset)
            cond, carried = outs[0], outs[1 : 1 + n_v]
            scans.append(outs[1 + n_v :])
        stacked = [_stack(bb, [s[k] for s in scans], 0) for k in range(len(scans[0]))]
        return relax.Tuple(list(carried) + stacked)

    @classmethod
    def _recursive(cls, bb, body, trip, cond, carried, outer, opset):
        names = [i.name for i in body.input]
        n_v = len(carried)
        n_scan = len(body.output) - 1 - n_v
        trip = (
            const(np.iinfo(np.int64).max, "int64")
            if trip is None
            else bb.normalize(relax.op.reshape(relax.op.astype(trip, "int64"), ()))
        )
        cond = (
            relax.const(True, "bool")
            if cond is None
            else bb.normalize(relax.op.reshape(relax.op.astype(cond, "bool"), ()))
        )
        # Values of the enclosing graph the body reads become parameters (constants stay).
        free_names, free_values, consts = [], [], {}
        for name in sorted(_graph_refs(body)):
            if name not in outer:
                continue
            value = outer[name]
            if isinstance(value, tvm.ir.GenericConst):
                consts[name] = value
                continue
            value = bb.normalize(materialize(bb, value))
            free_names.append(name)
            free_values.append(value)
        for x in carried:
            _tensor_ty(x)

        scan_dims: list = []

        def params_for(carried_tys, scan_tys, sized=True):
            ps = [
                relax.Var("iter", relax.TensorType((), "int64")),
                relax.Var("trip", relax.TensorType((), "int64")),
                relax.Var("cond", relax.TensorType((), "bool")),
            ]
            size = _sized if sized else (lambda ty, _: ty)
            ps += [relax.Var(f"v{k}", size(ty, f"v{k}")) for k, ty in enumerate(carried_tys)]
            ps += [
                relax.Var(f"scan{k}", _sized(ty, f"s{k}", scan_dims[k]) if sized else ty)
                for k, ty in enumerate(scan_tys)
            ]
            ps += [relax.Var(f"free{k}", v.ty) for k, v in enumerate(free_values)]
            return ps

        def body_outputs(builder, ps):
            bound = {names[0]: ps[0], names[1]: ps[2]}
            bound.update(zip(names[2:], ps[3 : 3 + n_v]))
            scope = dict(consts)
            scope.update(zip(free_names, ps[len(ps) - len(free_values) :]))
            return run_body(builder, body, bound, scope, opset)

        # A first conversion of the body, thrown away, gives the types of its outputs: the scan
        # outputs' element types, and whether the carried values keep their shapes.
        carried_tys = [_tensor_ty(x) for x in carried]
        probe = relax.BlockBuilder()
        ps = params_for(carried_tys, [])
        with probe.function("probe", ps):
            outs = body_outputs(probe, ps)
            out_tys = [o.ty for o in outs]
            probe.emit_func_output(relax.Tuple([const(0, "int64")]))
        # A carried value keeps its static shape when the body's result could have it (each dim
        # equal, or symbolic: e.g. a slice at a run-time offset); the recursion then checks it at
        # run time (match_cast). Otherwise only rank and dtype are carried.
        carried_tys = [
            t if _compatible(t, o) else relax.TensorType(ndim=t.ndim, dtype=t.dtype)
            for t, o in zip(carried_tys, out_tys[1 : 1 + n_v])
        ]
        scan_elem = [_tensor_ty_of(t) for t in out_tys[1 + n_v :]]
        scan_tys = [relax.TensorType(ndim=t.ndim + 1, dtype=t.dtype) for t in scan_elem]
        # Accumulators keep the static dims of the scan outputs, so that concatenating one more
        # step has a known shape (LegalizeOps skips ops whose result shape is unknown).
        scan_dims = [
            [None]
            + [
                int(d) if isinstance(d, tirx.IntImm) else None
                for d in (t.shape.values if t.shape is not None else [None] * t.ndim)
            ]
            for t in scan_elem
        ]
        ret_ty = relax.TupleType(carried_tys + scan_tys)

        name = f"qiao_loop{next(_UNIQUE)}"
        # The stub's result type must stay rank-only: a shaped one would let each call site
        # specialise the result to its arguments' shapes (an empty accumulator: length 0).
        ps = params_for(carried_tys, scan_tys, sized=False)
        stub = relax.Function(ps, relax.Tuple(ps[3 : 3 + n_v + n_scan]), ret_ty)
        gv = bb.add_func(stub, name)

        fb = relax.BlockBuilder()
        ps = params_for(carried_tys, scan_tys)
        with fb.function(name, ps):
            go = fb.emit(relax.op.logical_and(relax.op.less(ps[0], ps[1]), ps[2]))
            fb._begin_binding_block()
            outs = body_outputs(fb, ps)
            step_cond = fb.normalize(relax.op.reshape(relax.op.astype(outs[0], "bool"), ()))
            # The first iteration starts each scan output (its element shape may be known only
            # at run time); later ones append to it.
            first = fb.emit(relax.op.equal(ps[0], const(0, "int64")))
            grown = []
            for acc, item in zip(ps[3 + n_v : 3 + n_v + n_scan], outs[1 + n_v :]):
                start = fb.normalize(relax.op.expand_dims(item, 0))
                # Appending: every step's element has the shape of the first (ONNX requires it);
                # the match_cast says so, so that the concatenation has a known shape.
                elem_ty = relax.TensorType(list(acc.ty.shape.values)[1:], acc.ty.dtype)
                elem = relax.Var("elem", elem_ty)
                appended = relax.SeqExpr(
                    [relax.BindingBlock([relax.MatchCast(elem, item, elem_ty)])],
                    relax.op.concat([acc, relax.op.expand_dims(elem, 0)], axis=0),
                )
                grown.append(fb.emit(relax.If(first, relax.SeqExpr([], start), appended)))
            nxt = fb.normalize(relax.op.add(ps[0], const(1, "int64")))
            carried_next = [
                v if tvm_ffi.structural_equal(v.ty, p.ty) else fb.match_cast(v, p.ty)
                for v, p in zip(outs[1 : 1 + n_v], ps[3 : 3 + n_v])
            ]
            args = [nxt, ps[1], step_cond, *carried_next, *grown, *ps[3 + n_v + n_scan :]]
            rec = fb.emit(relax.Call(gv, args))
            then_seq = relax.SeqExpr([fb._end_block()], rec)
            else_seq = relax.SeqExpr([], relax.Tuple(ps[3 : 3 + n_v + n_scan]))
            result = fb.emit(relax.If(go, then_seq, else_seq))
            fb.emit_func_output(result)
        func = fb.get()[name].with_attr("global_symbol", name)
        bb.update_func(gv, func)

        # Placeholders of the right rank; never read (the first iteration replaces them), and
        # the result when the loop runs zero times.
        empty = [
            relax.const(np.zeros([d or 0 for d in dims], str(t.dtype)), str(t.dtype))
            for t, dims in zip(scan_elem, scan_dims)
        ]
        call = bb.emit(
            relax.Call(gv, [const(0, "int64"), trip, cond, *carried, *empty, *free_values])
        )
        # Fresh symbolic dims for the results, so later ops see shapes (LegalizeOps skips ops on
        # tensors of unknown shape).
        results = []
        for k, ty in enumerate(carried_tys + scan_tys):
            item = bb.emit(relax.TupleGetItem(call, k))
            results.append(
                item if ty.shape is not None else bb.match_cast(item, _sized(ty, "loop"))
            )
        return relax.Tuple(results)


def _sized(ty, prefix: str, dims=None):
    """``ty`` with fresh symbolic dims when it has a rank but no shape (``dims``: ints to keep,
    ``None`` for a fresh dim)."""
    if ty.shape is not None or ty.ndim < 0:
        return ty
    name = f"{prefix}_{next(_UNIQUE)}"
    dims = dims or [None] * ty.ndim
    shape = [tirx.Var(f"{name}_{i}", "int64") if d is None else d for i, d in enumerate(dims)]
    return relax.TensorType(shape, ty.dtype)


def _compatible(carried, out) -> bool:
    """Whether the body's result type ``out`` may hold values of the carried type ``carried``."""
    if not isinstance(out, relax.TensorType) or out.dtype != carried.dtype:
        return False
    if carried.shape is None or out.shape is None or out.ndim != carried.ndim:
        return tvm_ffi.structural_equal(carried, out)
    return all(
        not isinstance(o, tirx.IntImm) or (isinstance(c, tirx.IntImm) and c.value == o.value)
        for c, o in zip(carried.shape.values, out.shape.values)
    )


def _tensor_ty_of(ty):
    if not isinstance(ty, relax.TensorType):
        raise CompileError(
            f"Loop: a scan output of type {ty} is not supported, only tensors. fix: scan tensors"
        )
    return ty
