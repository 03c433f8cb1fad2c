"""transformers' MoE families: every top-k-softmax MoE block exports as one ``com.microsoft::MoE``
node (shared experts and output biases as ordinary ops beside it) and matches transformers' eager
output in ONNX Runtime and in qiao's CPU artifact; routing the node cannot express (PhiMoE's sparse
mixer, DeepSeek-V3's sigmoid group-limited routing) stays ordinary ops, still exact.

Models are tiny transformers models with random weights (no download), fp32; tolerances are stated
at each comparison (RTOL/ATOL: summation order only).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

from qiao.compiler.testing import assert_close

RTOL, ATOL = 1e-4, 1e-4  # fp32, same maths in a different summation order
H = 32

COMMON = dict(
    vocab_size=96,
    hidden_size=H,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
E8K2 = dict(num_experts_per_tok=2)

# family: (config class, CausalLM class, config changes, MoE block attribute in each decoder layer,
#          what the node should say: normalize_routing_weights, activation extras)
FAMILIES = {
    # softmax → top-k → renormalise
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=16, num_local_experts=8, **E8K2),
        "mlp",
        dict(normalize_routing_weights=1),
    ),
    # softmax → top-k, not renormalised; sigmoid-gated shared expert beside the node
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            norm_topk_prob=False,
            **E8K2,
        ),
        "mlp",
        dict(normalize_routing_weights=0),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=16, num_experts=8, norm_topk_prob=False, **E8K2),
        "mlp",
        dict(normalize_routing_weights=0),
    ),
    "minimax": (
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        dict(intermediate_size=16, num_local_experts=8, **E8K2),
        "mlp",
        dict(normalize_routing_weights=1),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            norm_topk_prob=True,
            **E8K2,
        ),
        "mlp",
        dict(normalize_routing_weights=1),
    ),
    # top-k → softmax (= renormalised)
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(intermediate_size=16, num_local_experts=8, **E8K2),
        "block_sparse_moe",
        dict(normalize_routing_weights=1),
    ),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        dict(intermediate_size=16, shared_intermediate_size=24, num_local_experts=8, **E8K2),
        "block_sparse_moe",
        dict(normalize_routing_weights=1),
    ),
    "jetmoe": (  # output bias beside the node
        "JetMoeConfig",
        "JetMoeForCausalLM",
        dict(intermediate_size=16, num_local_experts=8, kv_channels=8, **E8K2),
        "mlp",
        dict(normalize_routing_weights=1),
    ),
    "gpt_oss": (  # router bias, expert biases, clamped SwiGLU (alpha 1.702, beta 1, limit 7)
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(intermediate_size=16, num_local_experts=8, **E8K2),
        "mlp",
        dict(
            normalize_routing_weights=1,
            activation_alpha=1.702,
            activation_beta=1.0,
            swiglu_limit=7.0,
        ),
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        "FlexOlmoForCausalLM",
        dict(
            intermediate_size=16,
            num_experts=8,
            norm_topk_prob=False,
            pad_token_id=0,
            eos_token_id=1,
            **E8K2,
        ),
        "mlp",
        dict(normalize_routing_weights=0),
    ),
    "cohere2_moe": (  # top-k → softmax (its expert_selection_fn="softmax")
        "Cohere2MoeConfig",
        "Cohere2MoeForCausalLM",
        dict(intermediate_size=16, num_experts=8, **E8K2),
        "mlp",
        dict(normalize_routing_weights=1),
    ),
    "aria": (  # transposed expert weights, shared experts added beside the node
        "AriaTextConfig",
        "AriaTextForCausalLM",
        dict(intermediate_size=16, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1),
        "mlp",
        dict(normalize_routing_weights=1),
    ),
    "deepseek_v2": (  # greedy softmax top-k, not renormalised, shared experts beside the node
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            intermediate_size=16,
            moe_intermediate_size=16,
            n_routed_experts=8,
            first_k_dense_replace=0,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_key_value_heads=4,  # MLA: one key/value per head
            **E8K2,
        ),
        "mlp",
        dict(normalize_routing_weights=0),
    ),
}
# recognised too, checked in PyTorch only (their blocks are the ones above)
RECOGNISED_ONLY = {
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        dict(
            intermediate_size=16,
            shared_intermediate_size=24,
            num_local_experts=8,
            layer_types=["attention", "attention"],
            mamba_n_heads=8,
            mamba_d_head=8,
            **E8K2,
        ),
        "block_sparse_moe",
    ),
}
REFUSED = {
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(intermediate_size=16, num_local_experts=8, **E8K2),
        "mlp",
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_key_value_heads=4,  # MLA: one key/value per head
            **E8K2,
        ),
        "mlp",
    ),
}


def spec(family: str) -> tuple:
    return {**FAMILIES, **RECOGNISED_ONLY, **REFUSED}[family]


def moe_nodes(proto: onnx.ModelProto) -> list:
    return [n for n in proto.graph.node if n.domain == "com.microsoft" and n.op_type == "MoE"]


def tiny_model(family: str, seed: int = 0):
    """A random tiny transformers CausalLM of ``family`` (fp32, eval), weights large enough that
    routing and the shared expert matter."""
    import transformers

    cfg_cls, lm_cls, changes = spec(family)[:3]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **changes})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, lm_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model


def block_of(model, family: str, layer: int = 0):
    return getattr(model.model.layers[layer], spec(family)[3])


def eager(module, *args):
    with torch.no_grad():
        out = module(*args)
    return (out[0] if isinstance(out, tuple) else out).numpy()


def export_block(block, path, T=7):
    from qiao.compiler import export

    x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(T))
    export(
        block,
        (x,),
        path,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {1: "seq"}, "y": {1: "seq"}},
    )
    return onnx.load(str(path))


def ort(path, feeds):
    from qiao.compiler.validate import onnxruntime_reference

    return onnxruntime_reference(str(path), feeds)


# ------------------------------------------------------------------------------------------------
# Recognised families: the block alone, token count symbolic
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_is_one_moe_node_and_matches_eager(tmp_path, family):
    from qiao.compiler import compile
    from qiao.compiler.export_moe import find_moe_blocks, refused_moe_blocks

    model = tiny_model(family)
    attr = FAMILIES[family][3]
    assert find_moe_blocks(model) == [f"model.layers.{i}.{attr}" for i in range(2)]
    assert refused_moe_blocks(model) == {}
    block = block_of(model, family)
    proto = export_block(block, tmp_path / "block.onnx")
    nodes = moe_nodes(proto)
    assert len(nodes) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["k"] == 2 and attrs["activation_type"] == b"swiglu"
    assert attrs["swiglu_fusion"] == 1
    for name, want in FAMILIES[family][4].items():
        assert attrs[name] == pytest.approx(want), name
    # no per-expert work unrolled around the node
    assert not {"ScatterND", "GatherND", "NonZero", "Loop"} & {n.op_type for n in proto.graph.node}

    art = compile(str(tmp_path / "block.onnx"), "cpu", tmp_path / "art")
    for T in (1, 7, 19):
        x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(100 + T))
        expected = eager(block, x)
        got_ort = ort(tmp_path / "block.onnx", {"x": x.numpy()})["y"]
        assert_close(got_ort, expected, RTOL, ATOL, f"{family} T={T}: onnxruntime vs eager")
        got = art.run({"x": x.numpy()})["y"]
        assert_close(got, expected, RTOL, ATOL, f"{family} T={T}: qiao vs eager")


@pytest.mark.parametrize("family", [*FAMILIES, *RECOGNISED_ONLY, *REFUSED])
def test_prepared_model_matches_the_users_model(family):
    """The whole model with its blocks swapped (what export traces) equals the original in eager
    PyTorch, and the original is left as it was."""
    from qiao.compiler.export_moe import HFMoEBlock, prepare_for_export

    model = tiny_model(family, seed=2)
    before = {n: type(m) for n, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swapped = prepare_for_export(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    blocks = sum(isinstance(m, HFMoEBlock) for m in swapped.modules())
    assert blocks == (0 if family in REFUSED else 2)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = swapped(input_ids=ids, use_cache=False).logits.numpy()
        expected = model(input_ids=ids, use_cache=False).logits.numpy()
    assert_close(got, expected, 1e-4, 1e-5, family)


# ------------------------------------------------------------------------------------------------
# Recognised families: a small CausalLM (static shapes, like test_moe_models)
# ------------------------------------------------------------------------------------------------
class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "granitemoe"])
def test_causal_lm_exports_compiles_and_matches(tmp_path, family):
    from qiao.compiler import compile, export

    model = LogitsOnly(tiny_model(family, seed=1))
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "lm.onnx"
    export(model, (ids,), path, input_names=["input_ids"], output_names=["logits"])
    assert len(moe_nodes(onnx.load(str(path)))) == 2  # one per decoder layer
    expected = eager(model, ids)
    got_ort = ort(path, {"input_ids": ids.numpy()})["logits"]
    assert_close(got_ort, expected, 1e-3, 1e-4, f"{family}: onnxruntime vs eager")
    art = compile(str(path), "cpu", tmp_path / "art")
    got = art.run({"input_ids": ids.numpy()})["logits"]
    assert_close(got, expected, 1e-3, 1e-4, f"{family}: qiao vs eager")


# ------------------------------------------------------------------------------------------------
# Routing the node cannot express: ordinary ops, never a wrong MoE node
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(REFUSED))
def test_inexpressible_routing_stays_ordinary_ops(tmp_path, family):
    from qiao.compiler import compile
    from qiao.compiler.export_moe import find_moe_blocks, refused_moe_blocks

    model = tiny_model(family)
    attr = REFUSED[family][3]
    assert find_moe_blocks(model) == []
    refused = refused_moe_blocks(model)
    assert set(refused) == {f"model.layers.{i}.{attr}" for i in range(2)}
    assert "routing is not softmax" in refused[f"model.layers.0.{attr}"]
    block = block_of(model, family)
    implementation = block.experts.config._experts_implementation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proto = export_block(block, tmp_path / "block.onnx")
    assert any("exported as ordinary ONNX ops" in str(w.message) for w in caught)
    assert moe_nodes(proto) == []
    assert block.experts.config._experts_implementation == implementation  # user's model alone
    art = compile(str(tmp_path / "block.onnx"), "cpu", tmp_path / "art")
    for T in (1, 7):
        x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(T))
        expected = eager(block, x)
        got_ort = ort(tmp_path / "block.onnx", {"x": x.numpy()})["y"]
        assert_close(got_ort, expected, RTOL, ATOL, f"{family} T={T}: onnxruntime vs eager")
        got = art.run({"x": x.numpy()})["y"]
        assert_close(got, expected, RTOL, ATOL, f"{family} T={T}: qiao vs eager")


def test_a_routing_change_is_caught_not_mis_exported():
    """A Mixtral block whose router is swapped for a sigmoid one (same weights, same interface)
    still looks like a top-k block; the probe sees the difference and refuses it."""
    from qiao.compiler.export_moe import NotExpressible, convert_block

    block = block_of(tiny_model("mixtral"), "mixtral")
    convert_block(block)  # the unmodified block converts
    router = block.gate

    def sigmoid_router(x):
        logits = torch.nn.functional.linear(x.reshape(-1, H), router.weight)
        w, idx = torch.topk(torch.sigmoid(logits), 2, dim=-1)
        return logits, w, idx

    router.forward = sigmoid_router
    with pytest.raises(NotExpressible, match="routing is not softmax"):
        convert_block(block)


# ------------------------------------------------------------------------------------------------
# The eager op and the node's attributes qiao lowers
# ------------------------------------------------------------------------------------------------
def test_moe_reference_matches_onnxruntime_for_gpt_oss_attributes():
    """The custom op's eager body (biases, clamped SwiGLU, no renormalisation) against ONNX
    Runtime's kernel running the same node (tests.test_moe builds it)."""
    from qiao.compiler.export_moe import moe_reference
    from tests.test_moe import make_weights, moe_model, ort_run

    E, INTER, T = 6, 16, 11
    w = make_weights(E, H, INTER, bias=True, seed=3)
    attrs = dict(swiglu_limit=1.5, activation_alpha=1.702, activation_beta=1.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, H)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    expected = ort_run(moe_model(w, 3, normalize=0, **attrs), x, logits)
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    with torch.no_grad():
        got = moe_reference(
            torch.from_numpy(x), torch.from_numpy(logits), t["fc1"], t["fc2"], 3, False,
            t["b1"], t["b2"], "swiglu", 1.702, 1.0, 1.5,
        )  # fmt: skip
    assert_close(got.numpy(), expected, 1e-5, 1e-5)


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"swiglu_limit_after_activation": 1, "swiglu_limit": 7.0}, "swiglu_limit_after"),
        ({"activation": "relu2"}, "relu2"),
        ({"activation": "geglu"}, "geglu"),
    ],
)
def test_node_forms_qiao_cannot_lower_fail_with_a_fix(tmp_path, attrs, message):
    from qiao.compiler import compile
    from qiao.compiler.errors import CompileError
    from tests.test_moe import make_weights, moe_model

    activation = attrs.pop("activation", "swiglu")
    gated = activation in ("swiglu", "geglu")
    w = make_weights(4, 16, 8, activation="swiglu" if gated else "relu", seed=1)
    model = moe_model(w, 2, activation=activation, **attrs)
    if activation == "geglu":
        model.graph.node[0].attribute.append(onnx.helper.make_attribute("swiglu_fusion", 1))
    with pytest.raises(CompileError, match=message) as err:
        compile(model, "cpu", tmp_path / "art")
    assert "fix:" in str(err.value)
