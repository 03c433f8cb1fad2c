"""Half-precision weights (``--dtype bfloat16|float16``): an ONNX rewrite before import.

``cast_weights(proto, dtype)`` stores the float32 weights of the layers whose cost is reading
their weights in ``dtype`` and widens them back where they are read:

- ``MatMul`` with a constant weight (either operand, 2-D or more: dense layers, decoders' linear
  layers, the LM head), ``Gemm``'s constant ``B``;
- ``Gather`` of a constant table (embeddings);
- ``com.microsoft::MoE`` expert weights (``fc1``/``fc2``/``fc3``; biases stay float32).

Each such initializer ``w`` becomes ``w.<bf16|fp16>`` (rounded to nearest even) and a
``Cast(w.<bf16|fp16>, to=FLOAT)`` node producing ``w``, so every consumer is unchanged and ONNX
Runtime runs the very graph qiao compiles: the validation reference uses the same rounded
weights. A MoE router (the MatMul/Gemm feeding a MoE node's ``router_probs``) stays float32:
routing is a discrete top-k choice a rounded router can flip. Weights with fewer than
``MIN_ELEMENTS`` elements stay float32 (nothing to gain).

qiao then reads the narrow weights as they are: ``qiao.compiler.passes.fold_weight_casts`` folds
each cast into the GEMM, MoE kernel or gather that reads it, so the artifact stores (and the
kernels read) half the bytes, widening to float32 in registers. Compute stays float32: float32
activations, float32 accumulation, norms, softmax and reductions in float32; model inputs and
outputs keep their declared dtypes. On CUDA GPUs with tensor cores for ``dtype`` the GEMMs and
the MoE grouped GEMMs also round their activations to ``dtype`` at the GEMM input and multiply on
tensor cores, still accumulating in float32 (``fold_weight_casts``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qiao.compiler.errors import QiaoError

DTYPES = ("bfloat16", "float16")
SHORT = {"bfloat16": "bf16", "float16": "fp16"}
ONNX_TYPES = {"bfloat16": TensorProto.BFLOAT16, "float16": TensorProto.FLOAT16}
MIN_ELEMENTS = 256  # weights smaller than this stay float32
MS_DOMAIN = "com.microsoft"
COMPUTE = "weights {dtype}, compute float32 with float32 accumulation"


def check_dtype(value) -> str:
    """``value`` when it names a supported weight dtype, else ``QiaoError`` with the fix."""
    if value not in DTYPES:
        raise QiaoError(
            f"dtype {value!r} is not supported. fix: use one of {', '.join(map(repr, DTYPES))} "
            "(float32 is the default: leave the option out)"
        )
    return value


def narrow(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` rounded to ``dtype`` (round to nearest even), as the ml_dtypes/NumPy array
    qiao stores; ``narrow(w, d).astype(np.float32)`` is the weight the compiled model uses."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(array, np.float32).astype(ml_dtypes.bfloat16)
    return np.asarray(array, np.float32).astype(np.float16)


def _tensor(array: np.ndarray, name: str, dtype: str) -> onnx.TensorProto:
    if dtype == "bfloat16":  # numpy_helper.from_array has no ml_dtypes bfloat16 on every onnx
        raw = np.ascontiguousarray(array).tobytes()
        return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, raw, raw=True)
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def weight_inputs(graph: onnx.GraphProto) -> dict[str, str]:
    """``{initializer name: op}`` of the float32 initializers ``cast_weights`` narrows."""
    inits = {t.name: t for t in graph.initializer}
    routers = _router_outputs(graph)
    found: dict[str, str] = {}

    def take(name: str, op: str, min_rank: int = 2) -> None:
        t = inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) < min_rank:
            return
        if int(np.prod(t.dims)) < MIN_ELEMENTS:
            return
        found.setdefault(name, op)

    for node in graph.node:
        domain = node.domain or ""
        if domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm"):
            if node.output[0] in routers:
                continue
            operands = node.input[:2] if node.op_type == "MatMul" else node.input[1:2]
            for name in operands:
                take(name, node.op_type)
        elif domain in ("", "ai.onnx") and node.op_type == "Gather":
            axis = next(
                (helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0
            )
            if axis == 0:
                take(node.input[0], "Gather")
        elif domain == MS_DOMAIN and node.op_type == "MoE":
            for i in (2, 4, 6):  # fc1, fc2, fc3 experts (3-D)
                if len(node.input) > i and node.input[i]:
                    take(node.input[i], "MoE", 3)
    return found


# Ops between a router's MatMul/Gemm and the MoE node's router_probs that only move its values.
_PASS_THROUGH = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast")


def _router_outputs(graph: onnx.GraphProto) -> set[str]:
    """Names a MoE node's ``router_probs`` is, or comes from through ``_PASS_THROUGH`` ops (ONNX
    Runtime GenAI reshapes the router's output): a MatMul/Gemm writing one is a router."""
    producer = {o: n for n in graph.node for o in n.output}
    found = set()
    for node in graph.node:
        if node.domain != MS_DOMAIN or node.op_type != "MoE" or len(node.input) < 2:
            continue
        name = node.input[1]
        while name and name not in found:
            found.add(name)
            p = producer.get(name)
            name = p.input[0] if p is not None and p.op_type in _PASS_THROUGH else None
    return found


def cast_weights(proto: onnx.ModelProto, dtype: str) -> tuple[onnx.ModelProto, dict]:
    """Store the GEMM / MoE / embedding weights of ``proto`` in ``dtype`` (see the module
    docstring); ``proto`` is not modified. Returns the rewritten model (sharing nothing with
    ``proto``; the float32 weights that were narrowed are never copied) and the manifest's
    ``dtype`` section."""
    from qiao.compiler.quantize import _copy_fields  # quantize's rewrite copies the same way

    check_dtype(dtype)
    graph = proto.graph
    weights = weight_inputs(graph)
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    inits, casts, counts = [], [], Counter()
    bytes_before = bytes_after = 0
    for t in graph.initializer:
        op = weights.get(t.name)
        if op is None:
            inits.append(t)
            continue
        array = numpy_helper.to_array(t)
        low = narrow(array, dtype)
        new_name, k = f"{t.name}.{SHORT[dtype]}", 0
        while new_name in names:
            k += 1
            new_name = f"{t.name}.{SHORT[dtype]}_{k}"
        names.add(new_name)
        inits.append(_tensor(low, new_name, dtype))
        casts.append(helper.make_node("Cast", [new_name], [t.name], to=TensorProto.FLOAT))
        counts[op] += 1
        bytes_before += array.nbytes
        bytes_after += low.nbytes
    out = onnx.ModelProto()
    _copy_fields(proto, out, skip=("graph",))
    _copy_fields(graph, out.graph, skip=("node", "initializer"))
    out.graph.node.extend(casts + list(graph.node))
    out.graph.initializer.extend(inits)
    kept = [
        t.name
        for t in graph.initializer
        if t.data_type == TensorProto.FLOAT and t.name not in weights and len(t.dims) >= 2
    ]
    section = {
        "weights": dtype,
        "compute": "float32",
        "accumulation": "float32",
        "note": COMPUTE.format(dtype=dtype),
        "ops": dict(sorted(counts.items())),
        "weight_bytes": {"float32": bytes_before, dtype: bytes_after},
        "kept_float32": sorted(kept),
    }
    return out, section


__all__ = ["DTYPES", "cast_weights", "check_dtype", "narrow", "weight_inputs"]
