"""Audio models from ``transformers``: raw-waveform encoders (convolutional feature extractor +
transformer: symbolic batch and sample count) and spectrogram encoders (fixed frame count:
symbolic batch)."""

from __future__ import annotations

import torch
import transformers as tf

from tests.zoo.common import Built, HFModel, hf

_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    attn_implementation="eager",
)


def _waveform(size):
    batch, samples = size
    gen = torch.Generator().manual_seed(batch * 1000 + samples)
    return (torch.randn(batch, samples, generator=gen),)


def _features(frames, bins):
    def make(size):
        gen = torch.Generator().manual_seed(size[0])
        return (torch.randn(size[0], frames, bins, generator=gen),)

    return make


def _wav_config(cls):
    return cls(
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        **_TINY,
    )


def wav2vec2():
    model = tf.Wav2Vec2Model(_wav_config(tf.Wav2Vec2Config))
    return hf(model, ["input_values"], _waveform, {"input_values": {0: "batch", 1: "samples"}})


def hubert(dynamic=None):
    model = tf.HubertModel(_wav_config(tf.HubertConfig))
    return hf(model, ["input_values"], _waveform, dynamic or {"input_values": {0: "batch"}})


def hubert_samples():
    return hubert({"input_values": {0: "batch", 1: "samples"}})


def whisper_encoder():
    config = tf.WhisperConfig(
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=16,
        attn_implementation="eager",
    )
    encoder = tf.WhisperModel(config).get_encoder()

    def make(size):
        gen = torch.Generator().manual_seed(size[0])
        return (torch.randn(size[0], 16, 32, generator=gen),)  # (batch, mel bins, 2 x positions)

    return Built(
        HFModel(encoder, ["input_features"]),
        ["input_features"],
        make,
        {"input_features": {0: "batch"}},
    )


def ast():
    config = tf.ASTConfig(
        patch_size=8, frequency_stride=8, time_stride=8, max_length=32, num_mel_bins=16, **_TINY
    )
    model = tf.ASTModel(config)
    return hf(model, ["input_values"], _features(32, 16), {"input_values": {0: "batch"}})
