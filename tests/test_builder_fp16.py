"""ONNX Runtime GenAI's builder at ``-p fp16 -e cpu`` (issue 13): a float16 Qwen3 in the form the
builder writes for CPUs — ``MultiHeadAttention`` with the KV cache joined by ``Concat`` outside
it (``past_present_share_buffer: false``) and an additive mask built from run-time shapes
(``Shape``/``Gather``/``Concat``/``Expand``/``Tile``) — compiles, and generates the tokens ONNX
Runtime computes on the same file.

References: ONNX Runtime's ``InferenceSession`` on the same ``model.onnx``, driven step by step
(greedy, the cache passed back as ``present``), and transformers (float32 weights) for the logits.
ONNX Runtime GenAI itself fails on its own fp16 CPU model at the first decode step ("Shape
mismatch attempting to re-use buffer" in an inserted Cast, onnxruntime-genai 0.18), and plain
ONNX Runtime needs its memory-pattern reuse switched off for the same reason, so the reference is
the session loop below. Tolerance: float16 logits within 2e-3 absolute of ONNX Runtime's (the
random model's logits are within ±0.6; fp16 spacing there is 2.4e-4 to 4.9e-4).

The pieces it needed are checked on their own: a broadcasting op whose two symbolic dims are
different names for one length, a ``Concat`` of a cache whose head dim is a name (``kv_cache_dim``)
with rows whose head dim is static, and an ``Expand`` of a ``(1, 1, S, S)`` mask to
``(B, 1, S, S + P)`` with ``S = 1`` (TVM's ``broadcast_to`` read past the data there).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qiao.compiler import compile, load
from qiao.compiler.errors import InputMismatch
from qiao.compiler.generate import Generator
from qiao.compiler.testing import genai_builder, hf_qwen3_folder

PROMPT = [5, 17, 100, 42, 7, 99, 3, 250]
NEW = 56  # the tiny model's context is 64 positions


def _ort_session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.enable_mem_reuse = False  # ORT's own buffer reuse fails on this model's decode step
    options.enable_mem_pattern = False
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ort_greedy(path: str, prompt: list[int], new_tokens: int, kv_heads: int, head: int):
    """Greedy tokens and per-step last-row logits from an ONNX Runtime session loop."""
    sess = _ort_session(path)
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    past = {
        n: np.zeros((1, kv_heads, 0, head), np.float16)
        for n in in_names
        if n.startswith("past_key_values")
    }
    ids, total, tokens, logits = np.array([prompt]), len(prompt), [], []
    for _ in range(new_tokens):
        feed = dict(
            past,
            input_ids=ids,
            attention_mask=np.ones((1, total), np.int64),
            position_ids=np.arange(total - ids.shape[1], total)[None],
        )
        outs = dict(zip(out_names, sess.run(None, feed)))
        row = outs["logits"][0, -1].astype(np.float32)
        logits.append(row)
        tokens.append(int(np.argmax(row)))
        past = {
            n.replace("present", "past_key_values"): v
            for n, v in outs.items()
            if n.startswith("present")
        }
        ids, total = np.array([[tokens[-1]]]), total + 1
    return tokens, logits


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("builder_fp16")
    hf = hf_qwen3_folder(root / "hf", seed=0)
    return genai_builder(hf, root / "genai", precision="fp16"), root


def test_builder_fp16_qwen3_generates_onnxruntime_tokens(fp16_folder):
    folder, root = fp16_folder
    model = onnx.load(f"{folder}/model.onnx", load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "MultiHeadAttention" in ops and "GroupQueryAttention" not in ops  # the fp16 CPU form
    artifact = compile(folder, "cpu", root / "art")
    assert artifact.manifest["decoder"]["kv_cache"] == "concat"
    result = Generator(artifact).generate([PROMPT], max_new_tokens=NEW, return_logits=True)
    tokens, logits = _ort_greedy(f"{folder}/model.onnx", PROMPT, NEW, kv_heads=2, head=16)
    assert result.tokens[0] == tokens
    for step, (ours, theirs) in enumerate(zip(result.logits, logits)):
        np.testing.assert_allclose(ours[0], theirs, rtol=0, atol=2e-3, err_msg=f"step {step}")
    # the cache is joined in the graph: a batch of prompts of different lengths is refused
    with pytest.raises(InputMismatch, match="equal lengths"):
        Generator(artifact).generate([PROMPT, PROMPT[:3]], max_new_tokens=2)
    # equal lengths batch: each entry as alone
    both = Generator(load(root / "art")).generate([PROMPT, PROMPT[::-1]], max_new_tokens=6)
    assert both.tokens[0] == tokens[:6]
    assert both.tokens[1] == _ort_greedy(f"{folder}/model.onnx", PROMPT[::-1], 6, 2, 16)[0]


def _run(model: onnx.ModelProto, tmp_path, feeds: list[dict]) -> list[list[np.ndarray]]:
    artifact = compile(model, "cpu", tmp_path / "art")
    return [list(artifact.run(feed).values()) for feed in feeds]


def test_broadcast_of_two_names_for_one_length(tmp_path):
    """``Add`` of ``(B, 1, S, T)`` and ``(B, 1, S, K)``: two names for one length (the GenAI mask
    against the causal mask of ``P + S`` keys). Relax cannot infer the result's shape; qiao casts
    one to the other, checked when it runs: equal lengths add, a 1 broadcasts only where it is
    static, and different lengths are an error, not a wrong result."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", 1, "S", "T"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["B", 1, "S", "K"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 1, "S", "T"])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    artifact = compile(model, "cpu", tmp_path / "art")
    assert artifact.outputs[0]["shape"] == ["B", 1, "S", "T"]
    rng = np.random.default_rng(0)
    for s, t in ((1, 5), (3, 3)):
        feed = {x: rng.standard_normal((2, 1, s, t), np.float32) for x in "ab"}
        (got,) = artifact.run(feed).values()
        np.testing.assert_array_equal(got, feed["a"] + feed["b"])
    feed = {"a": np.zeros((2, 1, 3, 4), np.float32), "b": np.zeros((2, 1, 3, 5), np.float32)}
    with pytest.raises(Exception, match="match_cast|shape"):
        artifact.run(feed)


def test_concat_cache_with_named_head_dim_and_wrapping_expand(tmp_path):
    """``Concat(past (B, 2, P, D_named), new (B, 2, S, 4))`` and the causal mask ``(1, 1, S, S)``
    expanded to ``(B, 1, S, P + S)`` from run-time shapes, at ``S = 1`` (decode) and ``P = 0``
    (prefill), against NumPy (``np.broadcast_to`` of the mask, which at ``S = 1`` repeats the
    one column)."""
    past = helper.make_tensor_value_info("past", TensorProto.FLOAT, ["B", 2, "P", "D"])
    new = helper.make_tensor_value_info("new", TensorProto.FLOAT, ["B", 2, "S", 4])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, "S", "S"])
    present = helper.make_tensor_value_info("present", TensorProto.FLOAT, ["B", 2, "T", 4])
    wide = helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["B", 1, "S", "T"])
    i64 = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [1], [v])
    )
    nodes = [
        helper.make_node("Concat", ["past", "new"], ["present"], axis=2),
        helper.make_node("Shape", ["present"], ["pshape"]),
        i64("c0", 0),
        i64("c2", 2),
        i64("c3", 3),
        helper.make_node("Gather", ["pshape", "c0"], ["batch"]),
        helper.make_node("Gather", ["pshape", "c2"], ["total"]),
        helper.make_node("Shape", ["mask"], ["mshape"]),
        helper.make_node("Gather", ["mshape", "c2"], ["rows"]),
        i64("one", 1),
        helper.make_node("Concat", ["batch", "one", "rows", "total"], ["target"], axis=0),
        helper.make_node("Expand", ["mask", "target"], ["wide"]),
    ]
    graph = helper.make_graph(nodes, "g", [past, new, mask], [present, wide])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(1)
    feeds = []
    for p, s in ((0, 3), (3, 1), (6, 1)):
        feeds.append(
            {
                "past": rng.standard_normal((2, 2, p, 4), np.float32),
                "new": rng.standard_normal((2, 2, s, 4), np.float32),
                "mask": rng.standard_normal((1, 1, s, s), np.float32),
            }
        )
    for feed, (got_present, got_wide) in zip(feeds, _run(model, tmp_path, feeds)):
        p, s = feed["past"].shape[2], feed["new"].shape[2]
        np.testing.assert_array_equal(got_present, np.concatenate([feed["past"], feed["new"]], 2))
        if s == 1 or p == 0:  # ONNX broadcasting: (S, S) to (S, P + S) needs S = 1 or P = 0
            want = np.broadcast_to(feed["mask"], (2, 1, s, p + s))
            np.testing.assert_array_equal(got_wide, want)
