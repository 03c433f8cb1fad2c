"""Text models from ``transformers``: encoders (with a padding mask), decoder-only stacks (causal,
no cache) and the encoders of seq2seq models. Tiny configs, random weights, symbolic batch and
sequence dims. ``attn_implementation="eager"`` keeps attention exportable below opset 14 (the
TorchScript exporter has no ``scaled_dot_product_attention`` there)."""

from __future__ import annotations

import transformers as tf

from tests.zoo.common import hf, tokens

VOCAB = 100
IDS = ["input_ids"]
IDS_MASK = ["input_ids", "attention_mask"]
SEQ = {0: "batch", 1: "seq"}
EAGER = {"attn_implementation": "eager"}


def _dims(**extra):
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        **EAGER,
        **extra,
    )


def _encoder(model):
    return hf(model, IDS_MASK, tokens(VOCAB, mask=True), {n: SEQ for n in IDS_MASK})


def _decoder(model, output="last_hidden_state"):
    return hf(model, IDS, tokens(VOCAB), {"input_ids": SEQ}, output)


# --- encoders -------------------------------------------------------------------------------------
def bert():
    return _encoder(tf.BertModel(tf.BertConfig(**_dims()), add_pooling_layer=False))


def roberta():
    return _encoder(tf.RobertaModel(tf.RobertaConfig(**_dims()), add_pooling_layer=False))


def distilbert():
    config = tf.DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=64,
        **EAGER,
    )
    return _encoder(tf.DistilBertModel(config))


def albert():
    return _encoder(tf.AlbertModel(tf.AlbertConfig(embedding_size=16, **_dims())))


def electra():
    return _encoder(tf.ElectraModel(tf.ElectraConfig(embedding_size=16, **_dims())))


def deberta_v2():
    config = tf.DebertaV2Config(
        relative_attention=True,
        position_buckets=16,
        max_relative_positions=32,
        pos_att_type=["p2c", "c2p"],
        **_dims(),
    )
    return _encoder(tf.DebertaV2Model(config))


def mpnet():
    return _encoder(tf.MPNetModel(tf.MPNetConfig(**_dims()), add_pooling_layer=False))


def t5_encoder():
    config = tf.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        **EAGER,
    )
    return _encoder(tf.T5EncoderModel(config))


def bart_encoder():
    config = tf.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        **EAGER,
    )
    return _encoder(tf.BartModel(config).get_encoder())


# --- decoders -------------------------------------------------------------------------------------
def _llama_like(config_cls, model_cls, **extra):
    config = config_cls(num_key_value_heads=2, **_dims(**extra))
    return _decoder(model_cls(config))


def gpt2():
    config = tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **EAGER
    )
    return _decoder(tf.GPT2LMHeadModel(config), "logits")


def gpt_neo():
    config = tf.GPTNeoConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=64,
        **EAGER,
    )
    return _decoder(tf.GPTNeoModel(config))


def opt():
    config = tf.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        **EAGER,
    )
    return _decoder(tf.OPTModel(config))


def bloom():
    config = tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **EAGER)
    return _decoder(tf.BloomModel(config))


def llama():
    return _llama_like(tf.LlamaConfig, tf.LlamaModel)


def qwen2():
    return _llama_like(tf.Qwen2Config, tf.Qwen2Model)


def qwen3():
    return _llama_like(tf.Qwen3Config, tf.Qwen3Model, head_dim=8)


def mistral():
    return _llama_like(tf.MistralConfig, tf.MistralModel, sliding_window=4)


def phi3():
    return _llama_like(tf.Phi3Config, tf.Phi3Model, pad_token_id=0)


def gemma():
    return _llama_like(tf.GemmaConfig, tf.GemmaModel, head_dim=8)


def falcon():
    config = tf.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        new_decoder_architecture=False,
        multi_query=True,
        parallel_attn=True,
        alibi=False,
        **EAGER,
    )
    return _decoder(tf.FalconModel(config))
