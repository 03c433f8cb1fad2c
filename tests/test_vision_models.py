"""The torchvision-architecture built-ins (``qiao.models.vision``): ResNet-18, MobileNetV3-Small and
EfficientNet-B0, written locally because torchvision does not import beside the CPU torch wheel.

Their parameter counts are checked against torchvision's published figures (the model cards of
``torchvision.models``), which a wrong channel table or a missing block changes; a saved
``state_dict`` loads back through ``weights=PATH``; two of them compile and validate against
PyTorch eager and ONNX Runtime, one from the built-in (dynamo) export, one from a TorchScript
opset-13 file as the issue's users export it.
"""

from __future__ import annotations

import pytest
import torch

from qiao.models.vision import ARCHITECTURES, build_classifier

# torchvision.models: ResNet18_Weights / MobileNet_V3_Small_Weights / EfficientNet_B0_Weights
# "num_params" of the ImageNet classifiers.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "mobilenet_v3_small": 2_542_856,
    "efficientnet_b0": 5_288_548,
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_parameter_count_matches_torchvision(name):
    model = build_classifier(name)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]
    assert not model.training


def test_weights_path_loads_a_state_dict(tmp_path):
    from qiao.models import get_model

    source = build_classifier("mobilenet_v3_small", seed=7)
    path = tmp_path / "mnv3.pt"
    torch.save(source.state_dict(), path)
    spec = get_model("mobilenet_v3_small", image=64, weights=str(path))
    (x,) = spec.example_inputs
    with torch.no_grad():
        torch.testing.assert_close(spec.module(x), source(x), rtol=0, atol=0)
        assert not torch.equal(spec.module(x), build_classifier("mobilenet_v3_small")(x))


def test_bad_weights_path_is_one_clear_error(tmp_path):
    from qiao.compiler.errors import InvalidModel

    with pytest.raises(InvalidModel, match="cannot read resnet18 weights.*fix:"):
        build_classifier("resnet18", weights=str(tmp_path / "missing.pt"))
    other = tmp_path / "other.pt"
    torch.save(build_classifier("mobilenet_v3_small").state_dict(), other)
    with pytest.raises(InvalidModel, match="is not a resnet18 state_dict.*fix:"):
        build_classifier("resnet18", weights=str(other))


def test_mobilenet_v3_small_builtin_validates(tmp_path):
    """Depthwise 3×3/5×5, squeeze-excitation with hard-sigmoid, hard-swish: compiled from the
    built-in export and matched to PyTorch eager and ONNX Runtime at two batch sizes."""
    import numpy as np

    from qiao.compiler import compile, validate

    artifact = compile(
        "mobilenet_v3_small", "cpu", tmp_path / "art", model_options={"image": 64, "batch": 2}
    )
    report = validate(artifact)
    assert report.ok, report.format()
    assert {c.reference for c in report.comparisons} >= {"onnxruntime", "torch"}
    x = np.random.default_rng(3).standard_normal((5, 3, 64, 64)).astype(np.float32)
    assert validate(artifact, inputs={"image": x}).ok


def test_efficientnet_b0_torchscript_opset13_validates(tmp_path, caplog):
    """The TorchScript exporter at opset 13 (SiLU as Sigmoid·Mul, squeeze-excitation's
    GlobalAveragePool and 1×1 convolutions), symbolic batch, against ONNX Runtime; every kernel
    gets its schedule rule (no fallback warning)."""
    import logging

    import numpy as np

    from qiao.compiler import compile, validate
    from tests.zoo.harness import FALLBACK

    path = tmp_path / "effnet.onnx"
    torch.onnx.export(
        build_classifier("efficientnet_b0"),
        (torch.randn(1, 3, 64, 64),),
        path,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}},
        opset_version=13,
        dynamo=False,
    )
    with caplog.at_level(logging.WARNING, logger="qiao.schedules"):
        artifact = compile(path, "cpu", tmp_path / "art")
    assert not [r.getMessage() for r in caplog.records if FALLBACK.search(r.getMessage())]
    x = np.random.default_rng(4).standard_normal((3, 3, 64, 64)).astype(np.float32)
    report = validate(artifact, inputs={"image": x}, rtol=1e-3, atol=1e-4)
    assert report.ok, report.format()
