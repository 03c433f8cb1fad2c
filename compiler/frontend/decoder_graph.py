"""Graph rewrites for decoders in ONNX Runtime GenAI's layout, applied before import.

``last_token_logits``: a decoder computes ``logits`` ``(B, S, vocab)`` for every row of the step,
but generation reads one row per entry: the last valid one. The language-model head is the largest
matrix of a small decoder (Qwen3-0.6B: 155M of its 596M weights; Qwen3-30B-A3B with 2 layers: 311M
of the 426M a token touches), so computing it for all S prompt rows costs prefill up to ~S times
that matrix's work. The rewrite gathers each entry's last valid hidden row before the head:

    rows_b = max(min(S, sum(attention_mask[b])) - 1, 0)        # GroupQueryAttention's Q_b - 1
    logits = head(GatherElements(hidden, rows_b, axis=1))      # (B, 1, vocab)

``min(S, T_b)`` is the number of valid query rows of entry ``b`` in GroupQueryAttention's contract
(right padding: entry ``b``'s new tokens are rows ``[0, Q_b)``), so the gathered row is the one
whose logits choose the next token — for a prompt and for a decode step alike.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

_HEADS = ("MatMul", "Gemm", "MatMulNBits")


def last_token_logits(proto: onnx.ModelProto) -> bool:
    """Rewrite the decoder ``proto`` in place (a decoder's weights may be gigabytes: no copy) so
    that its ``logits`` output is ``(B, 1, vocab)``: the last valid row of each entry (module
    docstring). Returns ``False``, leaving ``proto`` as it was, when the graph does not have the
    shape this rewrite knows (``logits`` made by a MatMul/Gemm/MatMulNBits head, optionally
    followed by elementwise nodes with one graph input, from a ``(B, S, hidden)`` activation):
    all rows are kept then."""
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    outputs = [o.name for o in graph.output]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if "logits" not in outputs or "attention_mask" not in inputs or opset < 13:
        return False  # (ReduceSum takes its axes as an input from opset 13 on)
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get("logits")
    # Walk back over per-row elementwise nodes (a softcap's Div/Tanh/Mul, a bias Add) to the head.
    while node is not None and node.op_type not in _HEADS:
        if node.op_type not in ("Add", "Mul", "Div", "Tanh", "Cast") or len(node.input) > 2:
            return False
        node = producer.get(node.input[0])
    if node is None:
        return False
    hidden, head = node.input[0], node
    names = {n for n in (*(o for n in graph.node for o in n.output), *inputs)}

    def fresh(base: str) -> str:
        name, k = f"qiao_last_{base}", 0
        while name in names:
            k += 1
            name = f"qiao_last_{base}_{k}"
        names.add(name)
        return name

    one, zero = fresh("one"), fresh("zero")
    graph.initializer.extend(
        [
            numpy_helper.from_array(_i64([1]), one),
            numpy_helper.from_array(_i64([0]), zero),
        ]
    )
    shape, seq, total, valid = fresh("shape"), fresh("seq"), fresh("total"), fresh("valid")
    rows, rows_ok, index_shape = fresh("rows"), fresh("rows_ok"), fresh("index_shape")
    index3, index, gathered = fresh("index3"), fresh("index"), fresh("hidden")
    mask64, batch, width = fresh("mask64"), fresh("batch"), fresh("width")
    new_nodes = [
        helper.make_node("Shape", [hidden], [shape]),
        helper.make_node("Gather", [shape, one], [seq], axis=0),  # (1,): S
        helper.make_node("Cast", ["attention_mask"], [mask64], to=TensorProto.INT64),
        helper.make_node("ReduceSum", [mask64, one], [total], keepdims=1),  # (B, 1): T_b
        helper.make_node("Min", [total, seq], [valid]),  # Q_b
        helper.make_node("Sub", [valid, one], [rows]),
        helper.make_node("Max", [rows, zero], [rows_ok]),
        helper.make_node("Unsqueeze", [rows_ok, one], [index3]),  # (B, 1, 1)
        helper.make_node("Slice", [shape, zero, one], [batch]),
        helper.make_node(
            "Slice", [shape, _const(graph, fresh, 2), _const(graph, fresh, 3)], [width]
        ),
        helper.make_node("Concat", [batch, one, width], [index_shape], axis=0),
        helper.make_node("Expand", [index3, index_shape], [index]),  # (B, 1, hidden)
        helper.make_node("GatherElements", [hidden, index], [gathered], axis=1),
    ]
    head.input[0] = gathered
    position = list(graph.node).index(head)
    nodes = list(graph.node)
    graph.ClearField("node")
    graph.node.extend(nodes[:position] + new_nodes + nodes[position:])
    for out in graph.output:
        if out.name == "logits" and out.type.tensor_type.HasField("shape"):
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].Clear()
                dims[1].dim_value = 1
    # Intermediate shapes between the head and ``logits`` changed: drop their stale value infos.
    stale = {o for n in nodes[position:] for o in n.output}
    kept = [vi for vi in graph.value_info if vi.name not in stale]
    graph.ClearField("value_info")
    graph.value_info.extend(kept)
    return True


def _i64(values):
    import numpy as np

    return np.asarray(values, np.int64)


def _const(graph, fresh, value: int) -> str:
    name = fresh(f"c{value}")
    graph.initializer.append(numpy_helper.from_array(_i64([value]), name))
    return name
