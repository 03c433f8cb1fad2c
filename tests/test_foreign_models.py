"""ONNX models that nobody in this project wrote, compiled by qiao for the CPU and matched against
ONNX Runtime: classic CNNs and transformer stacks from the installed ``transformers`` package (tiny
random configs, nothing downloaded) and ``torch.nn.MultiheadAttention``, exported with
``qiao.compiler.export`` (the dynamo exporter) with dynamic batch (and sequence) dims.

One artifact per model is run at two sizes, so the symbolic dims really stay symbolic.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qiao.compiler import compile, export
from qiao.compiler.testing import assert_close

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


class _Output(torch.nn.Module):
    """Calls a Hugging Face model with keyword inputs and returns one tensor of its output."""

    def __init__(self, model, field):
        super().__init__()
        self.model, self.field = model, field

    def _call(self, **kwargs):
        if "use_cache" in self.model.forward.__code__.co_varnames:
            kwargs["use_cache"] = False
        return getattr(self.model(**kwargs), self.field)


class _ImageModel(_Output):
    def forward(self, pixel_values):
        return self._call(pixel_values=pixel_values)


class _TokenModel(_Output):
    def forward(self, input_ids):
        return self._call(input_ids=input_ids)


class _MaskedTokenModel(_Output):
    def forward(self, input_ids, attention_mask):
        return self._call(input_ids=input_ids, attention_mask=attention_mask)


_WRAPPERS = {
    ("pixel_values",): _ImageModel,
    ("input_ids",): _TokenModel,
    ("input_ids", "attention_mask"): _MaskedTokenModel,
}


def _images(batch):
    return (torch.randn(batch, 3, 32, 32),)


def _tokens(batch, seq, vocab=100):
    return (torch.randint(0, vocab, (batch, seq)),)


def _tokens_and_mask(batch, seq, vocab=100):
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, seq // 2 :] = 0  # padding in the first row: the mask must matter
    return (torch.randint(0, vocab, (batch, seq)), mask)


def _resnet():
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    return transformers.ResNetModel(config), ["pixel_values"], "pooler_output"


def _mobilenet_v2():
    config = transformers.MobileNetV2Config(
        num_channels=3, image_size=32, depth_multiplier=0.35, min_depth=8
    )
    model = transformers.MobileNetV2Model(config)
    # Hugging Face's init (std 0.02) leaves the last feature map numerically zero; He init keeps
    # the activations alive through the ReLU6 stack, so the comparison means something.
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    return model, ["pixel_values"], "last_hidden_state"


def _bert():
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config), ["input_ids", "attention_mask"], "last_hidden_state"


def _qwen3():
    # RMSNorm, RoPE, grouped-query attention (4 query heads, 2 KV heads), SwiGLU MLP.
    config = transformers.Qwen3Config(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.Qwen3Model(config), ["input_ids"], "last_hidden_state"


MODELS = {
    # name: (builder, example inputs(batch, seq), dynamic dims per input, (batch, seq) sizes)
    "resnet": (_resnet, lambda b, s: _images(b), {0: "batch"}, [(2, 0), (3, 0)]),
    "mobilenet_v2": (_mobilenet_v2, lambda b, s: _images(b), {0: "batch"}, [(2, 0), (1, 0)]),
    "bert": (_bert, _tokens_and_mask, {0: "batch", 1: "seq"}, [(2, 7), (3, 12)]),
    "qwen3": (_qwen3, _tokens, {0: "batch", 1: "seq"}, [(2, 7), (3, 5)]),
}


def _compile_and_compare(module, make_inputs, names, dynamic, sizes, tmp_path, rtol, atol):
    module.eval()
    path = tmp_path / "model.onnx"
    export(
        module,
        make_inputs(*sizes[0]),
        path,
        input_names=names,
        output_names=["out"],
        dynamic_axes={n: dynamic for n in names},
    )
    artifact = compile(path, "cpu", tmp_path / "artifact")
    assert [d for d in artifact.inputs[0]["shape"] if isinstance(d, str)], "dims not symbolic"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in sizes:
        feeds = {n: t.numpy() for n, t in zip(names, make_inputs(*size))}
        expected = session.run(None, feeds)[0]
        assert float(np.std(expected)) > 1e-3, "degenerate reference output"
        assert_close(artifact.run(feeds)["out"], expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_model_matches_onnxruntime(name, tmp_path):
    torch.manual_seed(0)
    build, make_inputs, dynamic, sizes = MODELS[name]
    model, names, field = build()
    module = _WRAPPERS[tuple(names)](model, field)
    _compile_and_compare(module, make_inputs, names, dynamic, sizes, tmp_path, 1e-4, 1e-4)


class _SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def test_multihead_attention_dynamic_batch_and_sequence(tmp_path):
    """The dynamo export spells the head split as Shape → Squeeze → Mul → Reshape, which TVM's
    Reshape converter rejects ("the given input is ir.PrimType")."""
    torch.manual_seed(0)
    _compile_and_compare(
        _SelfAttention(),
        lambda b, s: (torch.randn(b, s, 32),),
        ["x"],
        {0: "batch", 1: "seq"},
        [(2, 5), (3, 9)],
        tmp_path,
        1e-4,
        1e-5,
    )
