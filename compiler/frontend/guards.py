"""Checks on an untrusted ONNX model before native code parses it or anything big is allocated.

ONNX's checker accepts models that still break qiao or TVM later (an output listed twice, an opset
from the future, an element type with no NumPy dtype, a tensor that declares exabytes), and an
external-data ``location`` is a path chosen by whoever wrote the file. ``check_graph`` and
``check_external_data`` turn each into an ``InvalidModel`` naming the tensor and the fix.
"""

from __future__ import annotations

import math
import os

import onnx

from qiao.compiler.errors import InvalidModel

# Declared tensors larger than this are refused outright: no device holds 256 TiB, and sizes near
# 2^63 overflow the int64 arithmetic of the code that would allocate them.
MAX_DECLARED_BYTES = 1 << 48


def format_bytes(n: int) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


def host_memory_bytes() -> int:
    """Physical memory of this machine (what a tensor read into host memory must fit in)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not Linux/POSIX: no limit beyond the declared
        return MAX_DECLARED_BYTES


def _itemsize(elem_type: int, what: str, where: str) -> float:
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, ValueError, TypeError) as err:
        raise InvalidModel(
            f"{where}: {what} has element type {elem_type}, which is not an ONNX tensor type. "
            "fix: re-export the model; a damaged file fails this way"
        ) from err
    if elem_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1):
        return 0.5
    if elem_type in (getattr(onnx.TensorProto, "INT2", -1), getattr(onnx.TensorProto, "UINT2", -1)):
        return 0.25
    return dtype.itemsize if dtype.kind not in "OSU" else 8


def check_graph(proto: onnx.ModelProto, where: str) -> None:
    """Refuse what the ONNX checker lets through but qiao cannot compile truthfully: opsets newer
    than this ``onnx`` knows, no or duplicate graph outputs, unknown element types, negative
    dims, and declared tensor sizes beyond ``MAX_DECLARED_BYTES`` or this machine's memory."""
    known = onnx.defs.onnx_opset_version()
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx") and not 1 <= entry.version <= known:
            raise InvalidModel(
                f"{where} imports ONNX opset {entry.version}; this qiao (onnx "
                f"{onnx.__version__}) knows opsets 1 to {known}. fix: export at opset {known} or "
                "older"
            )
    graph = proto.graph
    if not graph.output:
        raise InvalidModel(
            f"{where}: the graph has no outputs, so there is nothing to compute. fix: re-export "
            "the model with its outputs"
        )
    names = [o.name for o in graph.output]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidModel(
            f"{where}: graph output(s) {', '.join(map(repr, twice))} listed more than once. "
            "fix: list each output once (add an Identity node for a second name)"
        )
    memory = host_memory_bytes()
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for vi in values:
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue  # sequences, maps, optionals: the importer judges those
            item = _itemsize(tt.elem_type, f"{kind} {vi.name!r}", where) if tt.elem_type else 4
            dims = [d.dim_value for d in tt.shape.dim if d.HasField("dim_value")]
            if any(d < 0 for d in dims):
                raise InvalidModel(
                    f"{where}: {kind} {vi.name!r} has a negative dimension {list(dims)}. "
                    "fix: use a dim_param name for a dynamic dimension"
                )
            _check_size(math.prod(dims) * item, f"{kind} {vi.name!r}", where, MAX_DECLARED_BYTES)
    for tensor in _tensors(graph):
        item = _itemsize(tensor.data_type, f"tensor {tensor.name!r}", where)
        if any(d < 0 for d in tensor.dims):
            raise InvalidModel(
                f"{where}: tensor {tensor.name!r} has a negative dimension {list(tensor.dims)}. "
                "fix: re-export the model; a damaged file fails this way"
            )
        # weights are read into host memory: one larger than it would exhaust it
        _check_size(math.prod(tensor.dims) * item, f"tensor {tensor.name!r}", where, memory)


def _tensors(graph: onnx.GraphProto):
    from qiao.compiler.frontend import iter_tensors

    return iter_tensors(graph)


def _check_size(nbytes: float, what: str, where: str, limit: int) -> None:
    if nbytes > limit:
        whose = "this machine's" if limit < MAX_DECLARED_BYTES else "any device's"
        raise InvalidModel(
            f"{where}: {what} declares {format_bytes(int(nbytes))}, more than "
            f"{format_bytes(limit)} ({whose} memory); refused before allocating it. fix: check "
            "the model's shapes (a damaged or hostile file declares sizes like these)"
        )


def check_external_data(proto: onnx.ModelProto, model_path: str) -> None:
    """Every external-data ``location`` must name a regular file inside the model's folder (no
    ``..``, no absolute path, no symlink leading out), and what it declares must fit in memory.
    Runs before a byte of external data is read."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    base = os.path.realpath(os.path.dirname(os.path.abspath(model_path)))
    total = 0
    for tensor in _tensors(proto.graph):
        if not uses_external_data(tensor):
            continue
        try:
            info = ExternalDataInfo(tensor)
        except (ValueError, TypeError) as err:  # offset/length that are not numbers
            raise InvalidModel(
                f"{model_path}: tensor {tensor.name!r} has unreadable external-data fields "
                f"({err}). fix: re-save the model with its data"
            ) from err
        location = info.location or ""
        resolved = os.path.realpath(os.path.join(base, location))
        inside = os.path.commonpath([base, resolved]) == base and resolved != base
        if not location or os.path.isabs(location) or not inside:
            raise InvalidModel(
                f"{model_path}: tensor {tensor.name!r} keeps its data at {location!r}, outside "
                f"the model's folder {base}; refused (a model file may only name data beside "
                "it). fix: move the data file into the model's folder and re-save the model"
            )
        if not os.path.isfile(resolved):
            raise InvalidModel(
                f"{model_path}: tensor {tensor.name!r} keeps its data in {location!r}, which is "
                "missing or not a file. fix: keep the data files the model names beside it"
            )
        size = os.path.getsize(resolved)
        offset = int(info.offset or 0)
        length = int(info.length) if info.length is not None else size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidModel(
                f"{model_path}: tensor {tensor.name!r} reads bytes {offset}..{offset + length} of "
                f"{location!r}, which holds {size}. fix: keep the data files complete"
            )
        total += length
    memory = host_memory_bytes()
    if total > memory:
        raise InvalidModel(
            f"{model_path}: its external data totals {format_bytes(total)}, more than this "
            f"machine's {format_bytes(memory)} of memory; refused before reading it. fix: compile "
            "on a machine with more memory"
        )


# Shape inference runs on models up to this serialised size (a hostile constant subgraph is tiny;
# a large model's weights would be copied into the inference's own proto).
_INFER_LIMIT = 64 << 20


def check_constant_sizes(proto: onnx.ModelProto, where: str) -> None:
    """Refuse values computed from constants alone (``ConstantOfShape``, ``Expand``, ``Tile``... of
    initializers) larger than this machine's memory: compiling folds them, which would allocate
    them. Shapes come from ONNX shape inference; models it cannot take are left to the importer."""
    try:
        if proto.ByteSize() > _INFER_LIMIT:
            return
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - inference failing is the importer's to report
        return
    graph = inferred.graph
    constant = {t.name for t in graph.initializer}
    producer = {}
    for node in graph.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            continue
        if all(not name or name in constant for name in node.input):
            constant.update(o for o in node.output if o)
            producer.update({o: node for o in node.output})
    memory = host_memory_bytes()
    for vi in list(graph.value_info) + list(graph.output):
        node = producer.get(vi.name)
        tt = vi.type.tensor_type
        if node is None or not tt.elem_type or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if None in dims:
            continue
        nbytes = math.prod(dims) * _itemsize(tt.elem_type, f"value {vi.name!r}", where)
        if nbytes > memory:
            raise InvalidModel(
                f"{where}: node {node.name or node.op_type!r} ({node.op_type}) computes a constant "
                f"{vi.name!r} of shape {dims} ({format_bytes(int(nbytes))}) from constants alone; "
                f"compiling folds it, which needs more than this machine's {format_bytes(memory)}; "
                "refused. fix: check the model's shape constants (a hostile or damaged file makes "
                "sizes like these)"
            )
