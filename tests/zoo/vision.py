"""Vision models from ``transformers`` (CNNs and vision transformers), tiny configs, random weights.

CNNs take symbolic batch *and* spatial dims; vision transformers whose position embeddings fix the
image size take a symbolic batch only.
"""

from __future__ import annotations

import transformers as tf

from tests.zoo.common import he_init, hf, images

PIXELS = ["pixel_values"]
BATCH = {"pixel_values": {0: "batch"}}
BATCH_HW = {"pixel_values": {0: "batch", 2: "height", 3: "width"}}


def _vit_dims(**extra):
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attn_implementation="eager",
        **extra,
    )


def resnet():
    config = tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 1, 1], layer_type="bottleneck"
    )
    return hf(he_init(tf.ResNetModel(config)), PIXELS, images(), BATCH_HW, "pooler_output")


def mobilenet_v1():
    config = tf.MobileNetV1Config(image_size=32, depth_multiplier=0.25, min_depth=8)
    return hf(he_init(tf.MobileNetV1Model(config)), PIXELS, images(), BATCH)


def mobilenet_v2():
    config = tf.MobileNetV2Config(image_size=32, depth_multiplier=0.35, min_depth=8)
    return hf(he_init(tf.MobileNetV2Model(config)), PIXELS, images(), BATCH)


def convnext():
    config = tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])
    return hf(tf.ConvNextModel(config), PIXELS, images(), BATCH_HW, "pooler_output")


def convnext_v2():
    config = tf.ConvNextV2Config(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])
    return hf(tf.ConvNextV2Model(config), PIXELS, images(), BATCH_HW, "pooler_output")


def regnet():
    config = tf.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, layer_type="y"
    )
    return hf(he_init(tf.RegNetModel(config)), PIXELS, images(), BATCH_HW, "pooler_output")


def efficientnet(dynamic=BATCH):
    config = tf.EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320
    )
    return hf(he_init(tf.EfficientNetModel(config)), PIXELS, images(), dynamic, "pooler_output")


def efficientnet_hw():
    return efficientnet(BATCH_HW)


def vit():
    config = tf.ViTConfig(image_size=32, patch_size=8, **_vit_dims())
    return hf(tf.ViTModel(config, add_pooling_layer=False), PIXELS, images(), BATCH)


def deit():
    config = tf.DeiTConfig(image_size=32, patch_size=8, **_vit_dims())
    return hf(tf.DeiTModel(config, add_pooling_layer=False), PIXELS, images(), BATCH)


def beit():
    config = tf.BeitConfig(
        image_size=32, patch_size=8, use_relative_position_bias=True, **_vit_dims()
    )
    return hf(tf.BeitModel(config, add_pooling_layer=False), PIXELS, images(), BATCH)


def dinov2(dynamic=BATCH):
    # Dinov2 resamples its position embeddings (bicubic Resize) to the image's grid.
    config = tf.Dinov2Config(image_size=32, patch_size=8, **_vit_dims())
    return hf(tf.Dinov2Model(config), PIXELS, images(), dynamic)


def dinov2_hw():
    return dinov2(BATCH_HW)


def clip_vision():
    config = tf.CLIPVisionConfig(image_size=32, patch_size=8, **_vit_dims())
    return hf(tf.CLIPVisionModel(config), PIXELS, images(), BATCH)


def yolos():
    config = tf.YolosConfig(
        image_size=[32, 32], patch_size=8, num_detection_tokens=4, **_vit_dims()
    )
    return hf(tf.YolosModel(config, add_pooling_layer=False), PIXELS, images(), BATCH)


def swin():
    config = tf.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=4
    )
    return hf(tf.SwinModel(config), PIXELS, images(), BATCH)


def poolformer():
    config = tf.PoolFormerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        padding=[2, 1],
    )
    return hf(tf.PoolFormerModel(config), PIXELS, images(), BATCH_HW)


def segformer():
    config = tf.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
    )
    return hf(tf.SegformerModel(config), PIXELS, images(), BATCH_HW)


def mobilevit():
    config = tf.MobileViTConfig(
        image_size=32,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 48],
        num_attention_heads=2,
        expand_ratio=2.0,
    )
    return hf(he_init(tf.MobileViTModel(config)), PIXELS, images(), BATCH)


def levit():
    config = tf.LevitConfig(
        image_size=64,
        patch_size=16,
        hidden_sizes=[16, 32],
        num_attention_heads=[2, 2],
        depths=[1, 1],
        key_dim=[8, 8],
        drop_path_rate=0,
        mlp_ratio=[2, 2],
        attention_ratio=[2, 2],
        down_ops=[["Subsample", 8, 2, 4, 2, 2]],
    )
    # LeViT's linear layers (each with a batch norm at unit running variance) shrink the signal
    # at std-0.02 init: its pooled output had a standard deviation of 3e-8.
    return hf(he_init(tf.LevitModel(config), linear=True), PIXELS, images(), BATCH, "pooler_output")
