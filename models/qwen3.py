"""Qwen3 and Qwen3-MoE built-in decoders: transformers' own ``Qwen3ForCausalLM`` /
``Qwen3MoeForCausalLM`` with seeded random weights, and a small byte-level BPE tokenizer.

These are *decoder* built-ins (``DecoderSpec``): ``qiao.compiler.export_genai`` writes them once
as an ONNX Runtime GenAI folder (cached under ``$QIAO_CACHE_DIR/genai``) and the driver compiles
that folder like any other decoder source. Built-in models:

- ``qwen3-small``: dense, 4 layers, hidden 256, 8 heads, 4 KV heads, head 32, vocab 1024;
- ``qwen3-moe-small``: Qwen3-MoE, 4 layers, hidden 256, 32 experts top-4, expert intermediate 128;
- ``qwen3-0.6b``: Qwen3-0.6B's dims (28 layers, hidden 1024, tied embeddings, vocab 151936);
- ``qwen3-30b-a3b-2l``: Qwen3-30B-A3B's dims (128 experts top-8, vocab 151936), 2 layers.

Context length 4096 (so shared KV buffers stay small). Weights use ``qwen3_moe.init_random``'s
unit-scale scheme rather than transformers' 0.02-std init: logits then have unit spread, so greedy
decoding is not a near-tie between thousands of tokens and two runtimes agree on it.
"""

from __future__ import annotations

import json

import torch

from qiao.compiler.errors import UnknownModel
from qiao.models import DecoderSpec, register_model
from qiao.models.qwen3_moe import init_random

CONTEXT_LENGTH = 4096
# Special tokens of the built-in tokenizer, at ids 0, 1, 2 (Qwen's names).
PAD, IM_START, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOKENIZER_VOCAB = 512
ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")

_COMMON = dict(
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=CONTEXT_LENGTH,
    bos_token_id=None,
    eos_token_id=2,
    pad_token_id=0,
    attention_bias=False,
    use_sliding_window=False,
    torch_dtype="float32",
)
QWEN3_SMALL = dict(
    _COMMON,
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    tie_word_embeddings=False,
)
QWEN3_MOE_SMALL = dict(
    _COMMON,
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=128,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=False,
)
QWEN3_0_6B = dict(
    _COMMON,
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
)
QWEN3_30B_A3B_2L = dict(
    _COMMON,
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=False,
)


def hf_config(config: dict):
    """A transformers config object (``Qwen3Config`` / ``Qwen3MoeConfig``) from a ``config.json``
    dict."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    cls = Qwen3MoeConfig if "Qwen3MoeForCausalLM" in config.get("architectures", ()) else None
    cls = cls or Qwen3Config
    values = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    return cls(architectures=list(config.get("architectures", ())), **values)


def build_hf_model(config: dict, seed: int = 0) -> torch.nn.Module:
    """transformers' ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` for ``config`` (a
    ``config.json`` dict) with seeded unit-scale random weights, float32, eval mode."""
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM
    from transformers.initialization import no_init_weights

    cfg = hf_config(config)
    cls = Qwen3MoeForCausalLM if "Qwen3MoeForCausalLM" in cfg.architectures else Qwen3ForCausalLM
    with no_init_weights():  # init_random sets every parameter: transformers' init is wasted time
        model = cls(cfg).to(torch.float32).eval()
    if cfg.tie_word_embeddings:
        model.tie_weights()  # before init_random, so the shared table is drawn once
    init_random(model, seed)
    return model


# A fixed text the tokenizer is trained on (deterministic: same merges on every machine).
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A compiler turns a model into code for a machine.
Attention computes a weighted sum of values; the weights come from queries and keys. Each layer
of a decoder reads the tokens before it, stores their keys and values in a cache, and predicts
the next token. Mixture-of-experts layers route every token to a few experts out of many.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2026. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ /
def main():\n    return 0\nfor i in range(10):\n    print(i)\n
"""


def make_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on a fixed text: specials ``PAD``,
    ``IM_START``, ``EOS`` at ids 0-2, the 256 byte symbols, then merges up to ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def save_tokenizer(directory: str, vocab_size: int = TOKENIZER_VOCAB) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (loadable by
    ``tokenizers.Tokenizer.from_file``, transformers and ONNX Runtime GenAI's tokenizer)."""
    import os

    tok = make_tokenizer(vocab_size)
    tok.save(os.path.join(directory, "tokenizer.json"))
    specials = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in (PAD, IM_START, EOS)
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": specials,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "model_max_length": CONTEXT_LENGTH,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "errors": "replace",
        "split_special_tokens": False,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _spec(name: str, config: dict, seed: int, overrides: dict, description: str) -> DecoderSpec:
    unknown = sorted(set(overrides) - set(config))
    if unknown:  # transformers' configs accept any key: a typo would pass silently
        raise UnknownModel(
            f"built-in decoder {name!r} has no option {', '.join(map(repr, unknown))}. fix: use "
            f"seed or config.json keys ({', '.join(sorted(config))}); for real weights pass the "
            "Hugging Face folder itself as the model"
        )
    config = dict(config, **overrides)
    return DecoderSpec(
        name=name,
        config=config,
        seed=seed,
        build=lambda: build_hf_model(config, seed),
        write_tokenizer=save_tokenizer,
        context_length=int(config["max_position_embeddings"]),
        description=description,
    )


@register_model(
    "qwen3-small",
    "Qwen3 decoder (GenAI layout, KV cache), 4 layers, hidden 256, 8 heads / 4 KV, vocab 1024",
)
def build_qwen3_small(seed: int = 0, **config) -> DecoderSpec:
    return _spec("qwen3-small", QWEN3_SMALL, seed, config, "Qwen3 small decoder")


@register_model(
    "qwen3-moe-small",
    "Qwen3-MoE decoder (GenAI layout, KV cache), 4 layers, hidden 256, 32 experts top-4, "
    "vocab 1024",
)
def build_qwen3_moe_small(seed: int = 0, **config) -> DecoderSpec:
    return _spec("qwen3-moe-small", QWEN3_MOE_SMALL, seed, config, "Qwen3-MoE small decoder")


@register_model(
    "qwen3-0.6b",
    "Qwen3-0.6B dims, random weights (GenAI layout): 28 layers, hidden 1024, tied embeddings, "
    "vocab 151936 (2.4 GB fp32)",
)
def build_qwen3_0_6b(seed: int = 0, **config) -> DecoderSpec:
    return _spec("qwen3-0.6b", QWEN3_0_6B, seed, config, "Qwen3-0.6B (random weights)")


@register_model(
    "qwen3-30b-a3b-2l",
    "Qwen3-30B-A3B dims, 2 layers, random weights (GenAI layout): 128 experts top-8, vocab "
    "151936 (7.3 GB fp32)",
)
def build_qwen3_30b_a3b_2l(seed: int = 0, **config) -> DecoderSpec:
    return _spec(
        "qwen3-30b-a3b-2l", QWEN3_30B_A3B_2L, seed, config, "Qwen3-30B-A3B, 2 layers (random)"
    )


__all__ = [
    "ARCHITECTURES",
    "CONTEXT_LENGTH",
    "QWEN3_0_6B",
    "QWEN3_30B_A3B_2L",
    "QWEN3_MOE_SMALL",
    "QWEN3_SMALL",
    "build_hf_model",
    "hf_config",
    "make_tokenizer",
    "save_tokenizer",
]
