"""A third-party qiao backend that runs the artifact's ONNX model with ONNX Runtime on the CPU."""

from __future__ import annotations

import os

from qiao.backends.base import Availability, Backend, DevicePreset, Runner


class OrtRunner(Runner):
    def __init__(self, path: str):
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs):
        return self.session.run(None, dict(zip(self.names, inputs)))


class DemoOrtBackend(Backend):
    name = "demo_ort"
    vendor = "qiao test fixture"
    default_preset = "cpu"
    imports_relax = False  # reads the ONNX model itself

    def presets(self):
        return {"cpu": DevicePreset("cpu", "ONNX Runtime CPU execution provider", {"ep": "cpu"})}

    def availability(self):
        try:
            import onnxruntime  # noqa: F401
        except Exception as err:
            return Availability(False, False, (f"onnxruntime does not import: {err}",))
        return Availability(True, True)

    def target(self, arch=None):
        return dict(self.require_preset(arch).target, kind="demo_ort")

    def build(self, model, arch, workdir, options):
        # The driver already stores the source model as model.onnx in every artifact.
        return {"library": None, "runs": "model.onnx"}

    def load(self, artifact_dir, manifest):
        return OrtRunner(os.path.join(artifact_dir, manifest["backend"]["runs"]))
