"""Qwen3-MoE models: qiao's built-ins and Hugging Face transformers' implementation export with one
``com.microsoft::MoE`` node per MoE block, compile, and match ONNX Runtime and PyTorch eager;
weights load from local Hugging Face-format safetensors checkpoints."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from qiao.compiler.testing import assert_close


def moe_nodes(proto: onnx.ModelProto) -> int:
    return sum(1 for n in proto.graph.node if n.domain == "com.microsoft" and n.op_type == "MoE")


def hf_config(**changes):
    from transformers import Qwen3MoeConfig

    values = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=64,
        rope_theta=10000.0,
    )
    values.update(changes)
    cfg = Qwen3MoeConfig(**values)
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(seed=0, **changes):
    """A random transformers Qwen3MoeForCausalLM (no download), weights large enough to route."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(hf_config(**changes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


# ------------------------------------------------------------------------------------------------
# qiao's built-in Qwen3-MoE models
# ------------------------------------------------------------------------------------------------
def test_qwen3_moe_tiny_validates_against_ort_and_torch(compiled_builtin):
    from qiao.compiler import validate
    from qiao.compiler.export_moe import MoEBlock
    from qiao.models import get_model

    art = compiled_builtin("qwen3-moe-tiny")
    report = validate(art)
    refs = {c.reference for c in report.comparisons}
    assert report.ok and refs == {"onnxruntime", "torch"}, report.format()
    blocks = sum(isinstance(m, MoEBlock) for m in get_model("qwen3-moe-tiny").module.modules())
    assert blocks == 2 and moe_nodes(onnx.load(f"{art.directory}/model.onnx")) == blocks


def test_qwen3_moe_tiny_one_artifact_every_shape(compiled_builtin):
    from qiao.models import get_model

    art = compiled_builtin("qwen3-moe-tiny")
    assert art.inputs[0]["shape"] == ["batch", "seq"]
    module = get_model("qwen3-moe-tiny").module
    for batch, seq in ((1, 1), (2, 5), (1, 19)):
        ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seq))
        got = art.run({"input_ids": ids.numpy()})["logits"]
        with torch.no_grad():
            assert_close(got, module(ids).numpy(), 1e-3, 1e-4, f"batch={batch} seq={seq}")


_SMALL = {  # qwen3_moe.SMALL's sizes, as builder overrides of the torch qwen3-moe-tiny
    "vocab_size": 1024,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 128,
}


def test_qwen3_moe_small_and_block_builders():
    from qiao.compiler.export_moe import MoEBlock
    from qiao.models import get_model, list_models

    assert {"qwen3-moe-tiny", "qwen3-moe-small", "qwen3-moe-30b-a3b-block"} <= set(list_models())
    # qwen3-moe-small is now a GenAI-layout decoder (models/qwen3.py); its sizes as a torch model:
    small = get_model("qwen3-moe-tiny", **_SMALL).module
    blocks = [m for m in small.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == 4 and blocks[0].num_experts == 32 and blocks[0].top_k == 4
    # the real-size block, shrunk through the builder's config overrides (2.4 GB otherwise)
    spec = get_model(
        "qwen3-moe-30b-a3b-block", num_experts=16, hidden_size=64, moe_intermediate_size=32
    )
    assert spec.module.fc1.shape == (16, 64, 64)
    assert spec.dynamic_axes["hidden_states"] == {0: "tokens"}


def test_qwen3_moe_small_exports_one_node_per_block(tmp_path):
    from qiao.compiler import export
    from qiao.models import get_model

    spec = get_model("qwen3-moe-tiny", seq=4, **_SMALL)
    export(
        spec.module,
        spec.example_inputs,
        tmp_path / "m.onnx",
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_axes=spec.dynamic_axes,
    )
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert moe_nodes(proto) == 4
    # no unrolled per-expert work and no dense gather of expert weights around the MoE nodes
    assert not {"TopK", "ScatterND", "GatherND", "NonZero"} & {n.op_type for n in proto.graph.node}


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers' Qwen3-MoE
# ------------------------------------------------------------------------------------------------
def test_hf_qwen3_moe_model_exports_compiles_and_matches(tmp_path):
    from qiao.compiler import compile, export
    from qiao.compiler.validate import onnxruntime_reference

    model = LogitsOnly(hf_model())
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    # static shapes: TVM's importer cannot yet take transformers' dynamic attention-mask graph
    export(model, (ids,), tmp_path / "hf.onnx", input_names=["input_ids"], output_names=["logits"])
    proto = onnx.load(str(tmp_path / "hf.onnx"))
    assert moe_nodes(proto) == 2  # one per decoder layer's sparse MoE block
    art = compile(str(tmp_path / "hf.onnx"), "cpu", tmp_path / "art")
    got = art.run({"input_ids": ids.numpy()})["logits"]
    with torch.no_grad():
        expected = model(ids).numpy()
    assert_close(got, expected, 1e-3, 1e-4, "vs transformers eager")
    ort = onnxruntime_reference(str(tmp_path / "hf.onnx"), {"input_ids": ids.numpy()})["logits"]
    assert_close(got, ort, 1e-3, 1e-4, "vs onnxruntime")


def test_hf_sparse_moe_block_dynamic_tokens(tmp_path):
    """The transformers block alone, token count symbolic: one artifact, every T."""
    from qiao.compiler import compile, export

    block = hf_model().model.layers[0].mlp
    x = torch.randn(1, 5, 32)
    export(
        block,
        (x,),
        tmp_path / "block.onnx",
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {1: "seq"}, "y": {1: "seq"}},
    )
    assert moe_nodes(onnx.load(str(tmp_path / "block.onnx"))) == 1
    art = compile(str(tmp_path / "block.onnx"), "cpu", tmp_path / "art")
    for T in (1, 9, 33):
        x = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            expected = block(x).numpy()
        assert_close(art.run({"x": x.numpy()})["y"], expected, 1e-4, 1e-5, f"T={T}")


def test_prepare_for_export_leaves_the_users_model_alone():
    from qiao.compiler.export_moe import MoEBlock, find_moe_blocks, prepare_for_export

    model = hf_model()
    before = {n: type(m) for n, m in model.named_modules()}
    swapped = prepare_for_export(model)
    assert find_moe_blocks(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert isinstance(swapped.model.layers[1].mlp, MoEBlock) and find_moe_blocks(swapped) == []
    # attention weights are shared, not copied
    q_proj = model.model.layers[0].self_attn.q_proj
    assert swapped.model.layers[0].self_attn.q_proj.weight is q_proj.weight
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        assert_close(
            swapped(input_ids=ids).logits.numpy(), model(input_ids=ids).logits.numpy(), 1e-5, 1e-6
        )


# ------------------------------------------------------------------------------------------------
# Hugging Face-format checkpoints
# ------------------------------------------------------------------------------------------------
def write_checkpoint(model, directory, per_expert: bool = True):
    """The model's weights as a real Qwen3-MoE checkpoint: per-expert names (as published) or
    transformers 5.x's stacked ones, plus config.json."""
    from safetensors.torch import save_file

    tensors = {}
    for name, t in model.state_dict().items():
        if per_expert and name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                tensors[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                tensors[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].contiguous()
        elif per_expert and name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                tensors[f"{prefix}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            tensors[name] = t.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), default=str))
    return directory


@pytest.mark.parametrize("per_expert", [True, False], ids=["per-expert-names", "stacked-names"])
def test_causal_lm_from_checkpoint_matches_transformers(tmp_path, per_expert):
    from qiao.models.qwen3_moe import Qwen3MoEConfig, build_causal_lm

    hf = hf_model(seed=3)
    ckpt = write_checkpoint(hf, tmp_path / "ckpt", per_expert)
    cfg = Qwen3MoEConfig.from_hf(json.loads((ckpt / "config.json").read_text()))
    ours = build_causal_lm(cfg, checkpoint=str(ckpt))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids).numpy(), hf(input_ids=ids).logits.numpy(), 1e-4, 1e-5)


def test_builtin_model_loads_checkpoint_option(tmp_path):
    """``model_options={"checkpoint": path}`` (CLI: --model-option checkpoint=PATH) reads the
    weights, and the block model takes one layer of the same checkpoint."""
    from qiao.models import get_model

    hf = hf_model(seed=4)
    ckpt = write_checkpoint(hf, tmp_path / "ckpt")
    spec = get_model("qwen3-moe-tiny", checkpoint=str(ckpt), seq=5)
    ids = spec.example_inputs[0]
    with torch.no_grad():
        assert_close(spec.module(ids).numpy(), hf(input_ids=ids).logits.numpy(), 1e-4, 1e-5)
    block = get_model("qwen3-moe-30b-a3b-block", checkpoint=str(ckpt), layer=1).module
    x = torch.randn(6, 32)
    with torch.no_grad():
        assert_close(block(x).numpy(), hf.model.layers[1].mlp(x[None])[0].numpy(), 1e-5, 1e-6)


def test_checkpoint_errors_name_the_problem(tmp_path):
    from safetensors.torch import save_file

    from qiao.compiler.errors import QiaoError
    from qiao.models import get_model

    with pytest.raises(QiaoError, match="does not exist.*fix:"):
        get_model("qwen3-moe-tiny", checkpoint=str(tmp_path / "nowhere"))
    ckpt = write_checkpoint(hf_model(), tmp_path / "ckpt")
    tensors = {"model.embed_tokens.weight": torch.zeros(96, 32)}
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(QiaoError, match="no tensor 'model.norm.weight'.*fix:"):
        get_model("qwen3-moe-tiny", checkpoint=str(ckpt))
    save_file({"model.embed_tokens.weight": torch.zeros(5, 5)}, str(ckpt / "model.safetensors"))
    with pytest.raises(QiaoError, match=r"shape \(5, 5\).*expects \(96, 32\)"):
        get_model("qwen3-moe-tiny", checkpoint=str(ckpt))


def test_moe_reference_is_the_transformers_loop():
    """qiao's eager MoE (the custom op's body, the torch baseline) equals transformers' experts."""
    from qiao.compiler.export_moe import MoEBlock, moe_op

    block = hf_model().model.layers[0].mlp
    ours = MoEBlock.from_hf_qwen3(block)
    x = torch.randn(11, 32)
    with torch.no_grad():
        logits = ours.gate(x)
        got = moe_op()(x, logits, ours.fc1, ours.fc2, 2, True)
        assert_close(got.numpy(), block(x[None])[0].numpy(), 1e-5, 1e-6)
        assert np.isfinite(got.numpy()).all()
