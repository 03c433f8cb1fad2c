"""The operators of ONNX Runtime GenAI's decoders (``compiler/frontend/convert_genai.py``) against
ONNX Runtime's CPU kernels: ``com.microsoft`` GroupQueryAttention, RotaryEmbedding and
SkipSimplifiedLayerNormalization, default-domain SimplifiedLayerNormalization (and ONNX's
RotaryEmbedding through the same converter). Each model is compiled once with symbolic batch,
sequence and past dims and run at several shapes: a prompt with no cache, a ragged batch-2 prompt
into a shared buffer, decode steps against a past of the previous length and against a shared
buffer with ragged ``seqlens_k``, and a chunked prefill. Then the model builder's tiny Qwen3
decoder end to end: logits and present KV for a prefill and two decode steps.

GroupQueryAttention leaves rows it does not define unspecified (query rows past a padded entry's
length, cache rows at or beyond ``seqlens_k + 1``); only defined rows are compared.
Tolerances: 1e-5 abs/rel for single ops (float32; observed differences ~5e-7), 1e-4 for the
decoder's logits (two layers of float32 matmuls in a different order).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper

from qiao.compiler import compile
from qiao.compiler.testing import assert_close, genai_builder, hf_qwen3_folder

RNG = np.random.default_rng(12)
HQ, HKV, D = 4, 2, 16  # ORT's CPU kernel needs a head size that is a multiple of 16 with rotary
MAX_POS = 32
ATOL = RTOL = 1e-5


def _vi(name, elem, shape):
    """Value info; an int shape is that rank with unknown dims."""
    shape = [None] * shape if isinstance(shape, int) else shape
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, opset=22):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _ort(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _rope_cache(width: int, positions: int = MAX_POS):
    freq = 1.0 / (10000 ** (np.arange(width) / width))
    angles = np.arange(positions)[:, None] * freq[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# --- GroupQueryAttention ------------------------------------------------------------------------
def _gqa(inputs, outputs, **attrs):
    return helper.make_node(
        "GroupQueryAttention",
        inputs,
        outputs,
        domain="com.microsoft",
        num_heads=HQ,
        kv_num_heads=HKV,
        **attrs,
    )


# Variant -> (node inputs after q, k, v, past_key, past_value, seqlens_k, total, attributes).
_BASE = ["pk", "pv", "seqlens", "total"]
GQA_VARIANTS = {
    # The builder's form: rotary inside, halves, default scale.
    "rope": (["q", "k", "v", *_BASE, "cos", "sin"], {"do_rotary": 1}),
    "rope_interleaved_window": (
        ["q", "k", "v", *_BASE, "cos", "sin"],
        {"do_rotary": 1, "rotary_interleaved": 1, "local_window_size": 2},
    ),
    "softcap_bias_sink": (
        ["q", "k", "v", *_BASE, "", "", "", "bias", "sink"],
        {"softcap": 1.5, "scale": 0.3},
    ),
    "packed_smooth_positions": (
        ["qkv", "", "", *_BASE, "cos", "sin", "pos"],
        {"do_rotary": 1, "smooth_softmax": 1},
    ),
    "query_seqlens": (
        ["q", "k", "v", *_BASE, "cos", "sin", "", "", "", "", "", "", "", "qlens"],
        {"do_rotary": 1},
    ),
}


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """One model holding every variant (one compile), its artifact and an ORT session."""
    nodes = [helper.make_node("Concat", ["q", "k", "v"], ["qkv"], axis=2)]
    outputs = []
    for name, (ins, attrs) in GQA_VARIANTS.items():
        outs = [f"{name}.y", f"{name}.present_key", f"{name}.present_value"]
        nodes.append(_gqa(ins, outs, **attrs))
        outputs += [_vi(outs[0], TP.FLOAT, ["b", "s", HQ * D])]
        outputs += [_vi(o, TP.FLOAT, ["b", HKV, "present", D]) for o in outs[1:]]
    inputs = [
        _vi("q", TP.FLOAT, ["b", "s", HQ * D]),
        _vi("k", TP.FLOAT, ["b", "s", HKV * D]),
        _vi("v", TP.FLOAT, ["b", "s", HKV * D]),
        _vi("pk", TP.FLOAT, ["b", HKV, "p", D]),
        _vi("pv", TP.FLOAT, ["b", HKV, "p", D]),
        _vi("seqlens", TP.INT32, ["b"]),
        _vi("total", TP.INT32, []),
        _vi("cos", TP.FLOAT, [MAX_POS, D // 2]),
        _vi("sin", TP.FLOAT, [MAX_POS, D // 2]),
        _vi("bias", TP.FLOAT, [1, HQ, "s", "t"]),
        _vi("sink", TP.FLOAT, [HQ]),
        _vi("pos", TP.INT64, ["b", "s"]),
        _vi("qlens", TP.INT32, ["b"]),
    ]
    model = _model(nodes, inputs, outputs)
    artifact = compile(model, "cpu", tmp_path_factory.mktemp("gqa") / "artifact")
    return artifact, _ort(model)


# (batch, new rows S, past length, seqlens_k, total_sequence_length, query_seqlens or None)
GQA_CASES = {
    "prompt_no_cache": (1, 5, 0, [4], 5, None),
    "prompt_ragged_shared_buffer": (2, 5, 12, [2, 4], 5, [2, 3]),
    "decode_past": (2, 1, 6, [6, 6], 7, None),
    "decode_ragged_shared_buffer": (2, 1, 12, [4, 7], 8, None),
    "chunked_prefill": (1, 3, 4, [6], 7, None),
}


@pytest.mark.parametrize("case", list(GQA_CASES))
def test_group_query_attention(gqa, case):
    artifact, sess = gqa
    batch, seq, past, seqlens, total, qlens = GQA_CASES[case]
    cos, sin = _rope_cache(D // 2)
    totals = np.array(seqlens) + 1
    valid = np.minimum(seq, totals)  # query rows each entry defines, without query_seqlens
    starts = totals - valid
    feeds = {
        "q": RNG.standard_normal((batch, seq, HQ * D), np.float32),
        "k": RNG.standard_normal((batch, seq, HKV * D), np.float32),
        "v": RNG.standard_normal((batch, seq, HKV * D), np.float32),
        "pk": RNG.standard_normal((batch, HKV, past, D), np.float32),
        "pv": RNG.standard_normal((batch, HKV, past, D), np.float32),
        "seqlens": np.array(seqlens, np.int32),
        "total": np.array(total, np.int32),
        "cos": cos,
        "sin": sin,
        "bias": RNG.standard_normal((1, HQ, seq, total), np.float32),
        "sink": RNG.standard_normal(HQ).astype(np.float32),
        # Shifted from the default positions, the same for every row of a first prompt (where
        # ONNX Runtime reads only the first element).
        "pos": (starts[:, None] + np.arange(seq)[None] + 3).astype(np.int64),
        "qlens": np.array(qlens if qlens is not None else valid, np.int32),
    }
    names = [o.name for o in sess.get_outputs()]
    want = dict(zip(names, sess.run(None, feeds)))
    got = artifact.run(feeds)
    query_rows = {name: valid for name in GQA_VARIANTS}
    query_rows["query_seqlens"] = feeds["qlens"]
    for variant in GQA_VARIANTS:
        for name in ("y", "present_key", "present_value"):
            key = f"{variant}.{name}"
            assert got[key].shape == want[key].shape, key
        for b in range(batch):
            rows, cached = query_rows[variant][b], totals[b]
            y = f"{variant}.y"
            assert_close(got[y][b, :rows], want[y][b, :rows], RTOL, ATOL, f"{y}[{b}]")
            for name in (f"{variant}.present_key", f"{variant}.present_value"):
                assert_close(got[name][b, :, :cached], want[name][b, :, :cached], RTOL, ATOL, name)


# --- RotaryEmbedding and the RMS norms ---------------------------------------------------------
@pytest.fixture(scope="module")
def norms_and_rotary(tmp_path_factory):
    """SimplifiedLayerNormalization (both outputs, and per head as Qwen3's q/k norms),
    SkipSimplifiedLayerNormalization (all outputs, with bias; and the builder's 2-of-4 form),
    com.microsoft RotaryEmbedding (3D with positions, 4D interleaved with an offset, partial)
    and ai.onnx RotaryEmbedding, in one opset-23 model."""
    hidden = HQ * D
    nodes = [
        helper.make_node(
            "SimplifiedLayerNormalization", ["x", "w"], ["rms", "rms_inv_std"], epsilon=1e-6
        ),
        helper.make_node("Reshape", ["x", "head_shape"], ["x_heads"]),
        helper.make_node(
            "SimplifiedLayerNormalization", ["x_heads", "w_head"], ["rms_heads"], epsilon=1e-6
        ),
        helper.make_node(
            "SkipSimplifiedLayerNormalization",
            ["x", "skip", "w", "beta"],
            ["skip_y", "skip_mean", "skip_inv_std", "skip_sum"],
            domain="com.microsoft",
            epsilon=1e-6,
        ),
        helper.make_node(
            "SkipSimplifiedLayerNormalization",
            ["x", "skip", "w"],
            ["skip2_y", "", "", "skip2_sum"],
            domain="com.microsoft",
            epsilon=1e-6,
        ),
        helper.make_node(
            "RotaryEmbedding",
            ["x", "pos", "cos", "sin"],
            ["rope3d"],
            domain="com.microsoft",
            num_heads=HQ,
        ),
        helper.make_node("Transpose", ["x_heads"], ["x_bnsh"], perm=[0, 2, 1, 3]),
        helper.make_node(
            "RotaryEmbedding",
            ["x_bnsh", "offset", "cos", "sin"],
            ["rope4d_interleaved"],
            domain="com.microsoft",
            interleaved=1,
        ),
        helper.make_node(
            "RotaryEmbedding",
            ["x", "pos", "cos_half", "sin_half"],
            ["rope_partial"],
            domain="com.microsoft",
            num_heads=HQ,
            rotary_embedding_dim=D // 2,
        ),
        helper.make_node("RotaryEmbedding", ["x_bnsh", "cos", "sin", "pos"], ["rope_onnx"]),
    ]
    inputs = [
        _vi("x", TP.FLOAT, ["b", "s", hidden]),
        _vi("skip", TP.FLOAT, ["b", "s", hidden]),
        _vi("w", TP.FLOAT, [hidden]),
        _vi("w_head", TP.FLOAT, [D]),
        _vi("beta", TP.FLOAT, [hidden]),
        _vi("pos", TP.INT64, ["b", "s"]),
        _vi("offset", TP.INT64, [1]),
        _vi("cos", TP.FLOAT, [MAX_POS, D // 2]),
        _vi("sin", TP.FLOAT, [MAX_POS, D // 2]),
        _vi("cos_half", TP.FLOAT, [MAX_POS, D // 4]),
        _vi("sin_half", TP.FLOAT, [MAX_POS, D // 4]),
    ]
    outputs = [
        _vi("rms", TP.FLOAT, 3),
        _vi("rms_inv_std", TP.FLOAT, 3),
        _vi("rms_heads", TP.FLOAT, 4),
        _vi("skip_y", TP.FLOAT, 3),
        _vi("skip_mean", TP.FLOAT, 3),
        _vi("skip_inv_std", TP.FLOAT, 3),
        _vi("skip_sum", TP.FLOAT, 3),
        _vi("skip2_y", TP.FLOAT, 3),
        _vi("skip2_sum", TP.FLOAT, 3),
        _vi("rope3d", TP.FLOAT, 3),
        _vi("rope4d_interleaved", TP.FLOAT, 4),
        _vi("rope_partial", TP.FLOAT, 3),
        _vi("rope_onnx", TP.FLOAT, 4),
    ]
    inits = [onnx.numpy_helper.from_array(np.array([0, 0, HQ, D], np.int64), "head_shape")]
    model = _model(nodes, inputs, outputs, opset=23)
    model.graph.initializer.extend(inits)
    artifact = compile(model, "cpu", tmp_path_factory.mktemp("norms") / "artifact")
    return artifact, _ort(model)


@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 5), (3, 2)])
def test_norms_and_rotary(norms_and_rotary, batch, seq):
    artifact, sess = norms_and_rotary
    hidden = HQ * D
    cos, sin = _rope_cache(D // 2)
    cos_half, sin_half = _rope_cache(D // 4)
    feeds = {
        "x": RNG.standard_normal((batch, seq, hidden), np.float32),
        "skip": RNG.standard_normal((batch, seq, hidden), np.float32),
        "w": RNG.standard_normal(hidden).astype(np.float32),
        "w_head": RNG.standard_normal(D).astype(np.float32),
        "beta": RNG.standard_normal(hidden).astype(np.float32),
        "pos": RNG.integers(0, MAX_POS, (batch, seq)).astype(np.int64),
        "offset": np.array([7], np.int64),
        "cos": cos,
        "sin": sin,
        "cos_half": cos_half,
        "sin_half": sin_half,
    }
    names = [o.name for o in sess.get_outputs()]
    want = dict(zip(names, sess.run(None, feeds)))
    got = artifact.run(feeds)
    # ONNX Runtime's CPU kernel leaves SkipSimplifiedLayerNormalization's ``mean`` unwritten
    # (whatever the buffer held; an RMS norm has no mean): only its shape is compared.
    assert got["skip_mean"].shape == want["skip_mean"].shape
    del want["skip_mean"], got["skip_mean"]
    assert_close(got, want, RTOL, ATOL)


# --- the model builder's Qwen3, end to end -------------------------------------------------------
@pytest.fixture(scope="module")
def builder_qwen3(tmp_path_factory):
    """A 2-layer random Qwen3 as a Hugging Face folder, then ONNX Runtime GenAI's builder on it
    (9 s: made once for both cache layouts)."""
    folder = tmp_path_factory.mktemp("builder_qwen3")
    hf = hf_qwen3_folder(folder / "hf", num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D)
    return Path(genai_builder(hf, folder / "genai"))


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime_genai") is None
    or importlib.util.find_spec("transformers") is None,
    reason="onnxruntime-genai (its model builder makes the decoder) or transformers is not "
    "installed: pip install -e '.[test]'",
)
@pytest.mark.parametrize("kv_cache", ["copy", "inplace"])
def test_builder_qwen3_prefill_and_decode(builder_qwen3, tmp_path, kv_cache):
    """Ragged batch 2 (prompts of 6 and 4 tokens, right-padded), then two decode steps, with the
    cache as a past of the previous length and as GenAI's shared buffer of the context length
    (in place: the shared buffer only, a growing past is too short for it): qiao's logits and
    present KV (its own present fed back) against ONNX Runtime's."""
    folder = builder_qwen3
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    assert config["type"] == "qwen3" and config["decoder"]["num_key_value_heads"] == HKV
    context = config["context_length"]
    path = folder / "model.onnx"
    ops = {(n.domain, n.op_type) for n in onnx.load(path, load_external_data=False).graph.node}
    assert ("com.microsoft", "GroupQueryAttention") in ops
    artifact = compile(str(path), "cpu", tmp_path / "artifact", kv_cache=kv_cache)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    layers = config["decoder"]["num_hidden_layers"]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    lengths = np.array([6, 4])
    prompt = RNG.integers(3, 300, (2, 6)).astype(np.int64)
    prompt[1, 4:] = 0
    steps = [prompt, RNG.integers(3, 300, (2, 1)), RNG.integers(3, 300, (2, 1))]
    for buffer in (0, context) if kv_cache == "copy" else (context,):  # 0: the past grows
        past = {n: np.zeros((2, HKV, buffer, D), np.float32) for n in past_names}
        mine = dict(past)
        totals = lengths.copy()
        for step, ids in enumerate(steps):
            if step:
                totals = totals + 1
            width = int(totals.max())
            mask = (np.arange(width)[None] < totals[:, None]).astype(np.int64)
            feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask}
            want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds | past)))
            got = artifact.run(feeds | mine)
            rows = np.minimum(ids.shape[1], totals)
            for b in range(2):
                label = f"buffer {buffer}, step {step}, entry {b}"
                assert_close(
                    got["logits"][b, : rows[b]],
                    want["logits"][b, : rows[b]],
                    1e-4,
                    1e-4,
                    f"logits ({label})",
                )
                for name in present_names:
                    assert got[name].shape == want[name].shape, name
                    assert_close(
                        got[name][b, :, : totals[b]],
                        want[name][b, :, : totals[b]],
                        1e-4,
                        1e-4,
                        f"{name} ({label})",
                    )
            past = {p: want[q] for p, q in zip(past_names, present_names)}
            mine = {p: got[q] for p, q in zip(past_names, present_names)}
