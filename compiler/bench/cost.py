"""FLOPs and bytes of one call, estimated from the ONNX graph (see ``DEFINITIONS``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def shape_only(proto):
    """A copy of ``proto`` whose large initializers keep their shape but not their data: all that
    ``estimate_cost`` needs (small ones stay, shape inference reads them as constants)."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for init in model.graph.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) > 4096 or init.external_data:
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(field)
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
    return model


def _bind_dims(proto, dims: Mapping[str, int]):
    """A shape-only copy of ``proto`` with symbolic input/output dims replaced by ``dims``."""
    model = shape_only(proto)
    del model.graph.value_info[:]
    for value in list(model.graph.input) + list(model.graph.output):
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = int(dims[d.dim_param])
    return model


def estimate_cost(proto, dims: Mapping[str, int]) -> dict[str, Any] | None:
    """Estimated FLOPs and bytes of one call with ``dims`` bound (see ``DEFINITIONS``).

    Returns ``{"flops", "bytes", "counted_nodes", "unknown_nodes"}`` or ``None`` when shape
    inference fails or no node could be counted. Pass ``shape_only(model)`` when calling it for
    many sizes of a large model: only shapes are read."""
    from onnx import helper, shape_inference

    try:
        inferred = shape_inference.infer_shapes(_bind_dims(proto, dims), data_prop=True)
    except Exception:  # custom domains or >2 GiB protos: no estimate rather than a wrong one
        return None
    graph = inferred.graph
    shapes: dict[str, list[int] | None] = {}
    itemsize: dict[str, int] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = value.type.tensor_type
        dims_ = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        shapes[value.name] = None if (not t.HasField("shape") or None in dims_) else dims_
        if t.elem_type:
            itemsize[value.name] = helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
    weights: dict[str, int] = {}
    for init in proto.graph.initializer:  # the original proto: full sizes
        shapes[init.name] = list(init.dims)
        weights[init.name] = int(np.prod(init.dims, dtype=np.int64)) * (
            helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        )

    def numel(name: str) -> int | None:
        s = shapes.get(name)
        return None if s is None else int(np.prod(s, dtype=np.int64))

    flops, counted, unknown = 0, 0, 0
    weight_scale: dict[str, float] = {}
    for node in graph.node:
        op = node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.domain in ("", "ai.onnx") and op == "Constant" and "value" in attrs:
            t = attrs["value"]
            weights[node.output[0]] = int(np.prod(t.dims, dtype=np.int64)) * (
                helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            )
        cost = None
        if op in ("MatMul", "FusedMatMul"):
            a, out = shapes.get(node.input[0]), numel(node.output[0])
            if a and out is not None:
                k = a[-2] if op == "FusedMatMul" and attrs.get("transA") and len(a) > 1 else a[-1]
                cost = 2 * out * k
        elif op == "Gemm":
            a, out = shapes.get(node.input[0]), numel(node.output[0])
            if a and out is not None and len(a) == 2:
                cost = 2 * out * (a[0] if attrs.get("transA") else a[1])
        elif op == "Conv":
            w, out = shapes.get(node.input[1]), numel(node.output[0])
            if w and out is not None:
                cost = 2 * out * int(np.prod(w[1:], dtype=np.int64))
        elif op == "ConvTranspose":
            # W is (Cin, Cout/groups, *kernel): every input element meets Cout/groups*kernel weights
            x, w = numel(node.input[0]), shapes.get(node.input[1])
            if w and x is not None:
                cost = 2 * x * w[1] * int(np.prod(w[2:], dtype=np.int64))
        elif op == "MoE" and node.domain == "com.microsoft":
            x = shapes.get(node.input[0])
            if x:
                tokens, k = int(np.prod(x[:-1], dtype=np.int64)), int(attrs.get("k", 1))
                cost = 0
                for idx in (2, 4, 6):  # fc1, fc2, fc3 expert weights
                    if len(node.input) > idx and node.input[idx] and shapes.get(node.input[idx]):
                        w = shapes[node.input[idx]]
                        cost += 2 * tokens * k * int(np.prod(w[1:], dtype=np.int64))
                        weight_scale[node.input[idx]] = min(1.0, tokens * k / max(1, w[0]))
        else:
            continue
        if cost is None:
            unknown += 1
        else:
            flops += int(cost)
            counted += 1
    if counted == 0:
        return None
    io_bytes = 0
    for value in list(graph.input) + list(graph.output):
        if value.name in weights:
            continue
        n = numel(value.name)
        if n is None:
            return None
        io_bytes += n * itemsize.get(value.name, 4)
    weight_bytes = sum(b * weight_scale.get(name, 1.0) for name, b in weights.items())
    return {
        "flops": int(flops),
        "bytes": int(io_bytes + weight_bytes),
        "counted_nodes": counted,
        "unknown_nodes": unknown,
    }


def load_source(path: str):
    """The artifact's ONNX model without its weights' data (``shape_only``), or ``None``."""
    import onnx

    try:
        return shape_only(onnx.load(path, load_external_data=False))
    except Exception:  # no estimate rather than a failed benchmark
        return None
