"""The model zoo: architectures nobody in this project designed, built from code with random
weights by three exporters, compiled by qiao and matched to ONNX Runtime (``tests/test_zoo.py``).

``ENTRIES`` lists every model with its exporter, opset and the two input sizes it is checked at;
``ci=True`` marks the representative subset the default test run takes (``QIAO_ZOO=full`` runs
all), ``gpu=True`` the subset also compiled for CUDA and ROCm (code generation only).

Sizes are ``(batch, height[, width])`` for images, ``(batch, seq)`` for tokens, ``(batch,
samples)`` for waveforms and ``(batch,)`` for fixed-length spectrograms.
"""

from __future__ import annotations

from tests.zoo import audio, classic, text, vision
from tests.zoo.common import CAFFE2, DYNAMO, EXPORTERS, TORCHSCRIPT, Entry

__all__ = ["CAFFE2", "DYNAMO", "ENTRIES", "EXPORTERS", "TORCHSCRIPT", "Entry", "by_name"]

IMG_HW = ((2, 32), (1, 48))  # symbolic batch and spatial dims
IMG_B = ((2, 32), (3, 32))  # symbolic batch; the image size is fixed by position embeddings
TOK = ((2, 7), (3, 12))
WAVE = ((2, 400), (1, 640))  # symbolic batch and sample count
WAVE_B = ((2, 400), (3, 400))  # symbolic batch
SPEC = ((2,), (3,))
STATIC_FC = ((1, 32), (2, 32))  # static files, flattening classifier: the batch changes
STATIC_CONV = ((1, 32), (2, 48))  # static files, fully convolutional: batch and image change

TS, DY, C2 = TORCHSCRIPT, DYNAMO, CAFFE2


def _broken(reason: str) -> dict:
    """A known qiao limitation that stops the compile: every test of the entry is a strict xfail."""
    return {"xfail": reason, "xfail_compile": reason}


def _e(name, arch, family, exporter, opset, build, sizes, **kw) -> Entry:
    return Entry(name, arch, family, exporter, opset, build, sizes, **kw)


ENTRIES: list[Entry] = [
    # --- vision (transformers) ---------------------------------------------------------------
    _e("resnet-ts9", "ResNet (bottleneck)", "vision", TS, 9, vision.resnet, IMG_HW, gpu=True),
    _e("mobilenet_v1-ts10", "MobileNetV1", "vision", TS, 10, vision.mobilenet_v1, IMG_B),
    _e("mobilenet_v2-dy18", "MobileNetV2", "vision", DY, 18, vision.mobilenet_v2, IMG_B),
    _e("convnext-dy18", "ConvNeXt", "vision", DY, 18, vision.convnext, IMG_HW),
    _e("convnext_v2-ts13", "ConvNeXt V2", "vision", TS, 13, vision.convnext_v2, IMG_HW),
    _e("regnet-ts11", "RegNet (Y)", "vision", TS, 11, vision.regnet, IMG_HW),
    _e(
        "efficientnet-dy18",
        "EfficientNet",
        "vision",
        DY,
        18,
        vision.efficientnet,
        IMG_B,
        xfail="degenerate reference: with transformers 5's initialisation this tiny EfficientNet's "
        "pooled output has a standard deviation of 1e-43 in PyTorch itself, so the comparison "
        "proves nothing and the test refuses it (its kernels all get their rules: see the "
        "fallback test)",
    ),
    _e(
        "efficientnet-dy18-hw",
        "EfficientNet",
        "vision",
        DY,
        18,
        vision.efficientnet_hw,
        IMG_HW,
        **_broken(
            "symbolic image dims: the 'same' padding arithmetic reaches TVM's LLVM build as "
            "prim.if_then_else, which has no FInferType ('Cannot find the FInferType attribute "
            "registered to op: prim.if_then_else')"
        ),
    ),
    _e("vit-ts12", "ViT", "vision", TS, 12, vision.vit, IMG_B, gpu=True),
    _e("deit-dy18", "DeiT", "vision", DY, 18, vision.deit, IMG_B),
    _e("beit-ts13", "BEiT", "vision", TS, 13, vision.beit, IMG_B),
    _e("dinov2-dy18", "DINOv2", "vision", DY, 18, vision.dinov2, IMG_B),
    _e(
        "dinov2-dy18-hw",
        "DINOv2",
        "vision",
        DY,
        18,
        vision.dinov2_hw,
        IMG_HW,
        **_broken(
            "symbolic image dims: TVM's Pow converter applies Python's ** to a symbolic dim "
            "((height // 8) ** 2: 'unsupported operand type(s) for **'); past that, the resized "
            "position embeddings have a rank but no shape, which qiao's LayerNormalization "
            "converter reads"
        ),
    ),
    _e("clip_vision-ts11", "CLIP vision", "vision", TS, 11, vision.clip_vision, IMG_B),
    _e("yolos-dy18", "YOLOS", "vision", DY, 18, vision.yolos, IMG_B),
    _e("swin-dy18", "Swin", "vision", DY, 18, vision.swin, IMG_B),
    _e("poolformer-ts11", "PoolFormer", "vision", TS, 11, vision.poolformer, IMG_HW),
    _e(
        "segformer-dy18",
        "SegFormer",
        "vision",
        DY,
        18,
        vision.segformer,
        IMG_HW,
    ),
    _e(
        "mobilevit-dy18",
        "MobileViT",
        "vision",
        DY,
        18,
        vision.mobilevit,
        IMG_B,
        **_broken(
            "a Resize whose sizes input is a shape with the symbolic batch (R.shape([batch, 32, "
            "2, 2])): TVM's converter refuses the symbolic size and qiao's run-time path needs "
            "the data's shape static ('Resize with run-time scales or sizes needs the data's "
            "shape static')"
        ),
    ),
    _e(
        "mobilevit-ts13",
        "MobileViT",
        "vision",
        TS,
        13,
        vision.mobilevit,
        IMG_B,
        **_broken(
            "TVM's Div converter folds Cast(Shape(x)[2], float32) / 2.0 through NumPy into a "
            "float64 value; the Mul by a float32 2.0 after Ceil then fails ('Binary operators "
            "must have the same datatype')"
        ),
    ),
    _e("levit-dy18", "LeViT", "vision", DY, 18, vision.levit, ((2, 64), (3, 64))),
    # --- text encoders -----------------------------------------------------------------------
    _e("bert-ts11", "BERT", "encoder", TS, 11, text.bert, TOK, ci=True),
    _e("bert-dy18", "BERT", "encoder", DY, 18, text.bert, TOK, gpu=True),
    _e("roberta-dy18", "RoBERTa", "encoder", DY, 18, text.roberta, TOK),
    _e("distilbert-ts12", "DistilBERT", "encoder", TS, 12, text.distilbert, TOK),
    _e("albert-ts13", "ALBERT", "encoder", TS, 13, text.albert, TOK),
    _e("electra-dy18", "ELECTRA", "encoder", DY, 18, text.electra, TOK),
    _e(
        "deberta_v2-dy18",
        "DeBERTa-v2",
        "encoder",
        DY,
        18,
        text.deberta_v2,
        TOK,
        **_broken(
            "the relative-position code exports a Tile (aten.repeat) whose repeats are a Concat "
            "of symbolic shape values; TVM's importer refuses a ShapeExpr input to any op outside "
            "its shape-compatible list ('Node node_repeat cannot handle ShapeExpr inputs')"
        ),
    ),
    # TorchScript at opset 11 writes an MPNet file ONNX Runtime rejects (a Type Error in its
    # relative-position bucket): an exporter bug, so MPNet goes through dynamo.
    _e("mpnet-dy18", "MPNet", "encoder", DY, 18, text.mpnet, TOK),
    _e("t5_encoder-ts13", "T5 encoder", "encoder", TS, 13, text.t5_encoder, TOK),
    _e("bart_encoder-dy18", "BART encoder", "encoder", DY, 18, text.bart_encoder, TOK),
    # --- decoders ----------------------------------------------------------------------------
    _e("gpt2-dy18", "GPT-2 (LM head)", "decoder", DY, 18, text.gpt2, TOK),
    # GPT-Neo's local attention uses aten::diff, which the TorchScript exporter cannot write.
    _e(
        "gpt_neo-dy18",
        "GPT-Neo",
        "decoder",
        DY,
        18,
        text.gpt_neo,
        TOK,
        **_broken(
            "an Add whose type has a rank but no shape (after the position embedding's "
            "symbolic-length slice) reaches qiao's LayerNormalization converter, which reads "
            "its dims ('NoneType' object has no attribute 'values')"
        ),
    ),
    _e("opt-ts13", "OPT", "decoder", TS, 13, text.opt, TOK),
    _e(
        "bloom-dy18",
        "BLOOM",
        "decoder",
        DY,
        18,
        text.bloom,
        TOK,
        **_broken(
            "the ALiBi bias exports a Tile (aten.repeat) whose repeats are a Concat of symbolic "
            "shape values; TVM's importer refuses a ShapeExpr input to any op outside its "
            "shape-compatible list ('Node node_repeat cannot handle ShapeExpr inputs')"
        ),
    ),
    _e("llama-dy18", "Llama", "decoder", DY, 18, text.llama, TOK, gpu=True),
    # Hugging Face's causal-mask code for Qwen2 uses aten::diff (no TorchScript symbolic).
    _e("qwen2-dy18", "Qwen2", "decoder", DY, 18, text.qwen2, TOK),
    _e("qwen3-dy18", "Qwen3", "decoder", DY, 18, text.qwen3, TOK),
    _e("mistral-dy18", "Mistral", "decoder", DY, 18, text.mistral, TOK, ci=True),
    _e("phi3-dy18", "Phi-3", "decoder", DY, 18, text.phi3, TOK),
    _e("gemma-dy20", "Gemma", "decoder", DY, 20, text.gemma, TOK),
    _e("falcon-dy18", "Falcon", "decoder", DY, 18, text.falcon, TOK),
    # --- audio -------------------------------------------------------------------------------
    _e("wav2vec2-ts13", "Wav2Vec2", "audio", TS, 13, audio.wav2vec2, WAVE),
    _e("hubert-dy18", "HuBERT", "audio", DY, 18, audio.hubert, WAVE_B),
    _e(
        "hubert-dy18-samples",
        "HuBERT",
        "audio",
        DY,
        18,
        audio.hubert_samples,
        WAVE,
        **_broken(
            "symbolic sample count: the positional-convolution sum has a rank but no shape, "
            "which qiao's LayerNormalization converter reads ('NoneType' object has no "
            "attribute 'values'); with its dims bound, TVM's build then stops at 'Currently "
            "does not support rewrite buffer with dynamic shape'"
        ),
    ),
    _e("whisper_encoder-dy18", "Whisper encoder", "audio", DY, 18, audio.whisper_encoder, SPEC),
    _e("ast-ts12", "AST", "audio", TS, 12, audio.ast, SPEC, gpu=True),
    # --- classic CNNs, Caffe2-style files (IR 3, initializers listed as inputs) --------------
    _e("alexnet-c2", "AlexNet", "classic", C2, 9, classic.alexnet, STATIC_FC),
    _e("zfnet-c2", "ZFNet", "classic", C2, 8, classic.zfnet, STATIC_FC),
    _e("vgg-c2", "VGG", "classic", C2, 9, classic.vgg, STATIC_FC),
    _e(
        "squeezenet-c2",
        "SqueezeNet",
        "classic",
        C2,
        9,
        classic.squeezenet,
        STATIC_CONV,
        ci=True,
        gpu=True,
    ),
    _e(
        "googlenet-c2", "GoogLeNet (Inception v1)", "classic", C2, 9, classic.googlenet, STATIC_CONV
    ),
    _e("inception_v2-c2", "Inception v2", "classic", C2, 9, classic.inception_v2, STATIC_CONV),
    _e(
        "resnet50_style-c2",
        "ResNet-50-style",
        "classic",
        C2,
        9,
        classic.resnet50_style,
        STATIC_CONV,
    ),
    _e("densenet-c2", "DenseNet", "classic", C2, 9, classic.densenet, STATIC_CONV),
    _e("shufflenet-c2", "ShuffleNet", "classic", C2, 9, classic.shufflenet, STATIC_CONV),
]


def by_name(name: str) -> Entry:
    """The entry called ``name``."""
    (entry,) = [e for e in ENTRIES if e.name == name]
    return entry
