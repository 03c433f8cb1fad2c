"""Cambricon backend: a hand-off to MagicMind, which builds ONNX into a serialized model (.mm).

MagicMind is a library, so the build step is a short Python script qiao writes into the package
(``build_magicmind.py``): ONNX parser → network with the input dims → ``BuilderConfig`` with the MLU
arch (``archs``), shape mutability and ranges from ``build_config.json`` → ``Builder.build_model`` →
``serialize_to_file("../model.mm")``. qiao runs the same script (``python3 build_magicmind.py``)
when the ``magicmind`` Python package imports here; running the model uses MagicMind's runtime on an
MLU.

Precision: ``builder_config.precision_config.precision_mode`` is ``force_float32`` by default (the
model's float32 arithmetic) and ``force_float16`` for ``--dtype float16`` or a float16 model
(inputs and outputs keep the model's types). MagicMind has no bfloat16 precision mode:
``--dtype bfloat16`` is refused with the fix (``--dtype float16``)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

from qiao.backends.base import Availability, DevicePreset, Runner
from qiao.backends.handoff import HandoffBackend, require_output
from qiao.compiler.errors import CompileError, ToolchainMissing, UnknownTarget

_ARCH = re.compile(r"mtp_\d{3}$")
PRECISION_MODES = {"float32": "force_float32", "float16": "force_float16"}

BUILD_SCRIPT = '''"""Build ../model.mm from model.onnx with Cambricon MagicMind. Written by qiao."""
import json
import os
import sys

import magicmind.python.runtime as mm
from magicmind.python.runtime.parser import Parser

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "build_config.json")) as f:
    cfg = json.load(f)


def check(status, what):
    if not status.ok():
        sys.exit(f"MagicMind: {what} failed: {status}")


network = mm.Network()
check(Parser(mm.ModelKind.kOnnx).parse(network, os.path.join(here, "model.onnx")), "ONNX parsing")
for index, dims in enumerate(cfg["input_dims"]):
    check(network.get_input(index).set_dimension(mm.Dims(dims)), f"input {index} dims")
config = mm.BuilderConfig()
check(config.parse_from_string(json.dumps(cfg["builder_config"])), "builder config")
model = mm.Builder().build_model("qiao_model", network, config)
if model is None:
    sys.exit("MagicMind: build_model returned no model")
check(model.serialize_to_file(os.path.join(here, "..", "model.mm")), "serialization")
'''


def magicmind_location() -> str | None:
    """The directory holding the ``magicmind`` package when it imports here, else ``None``."""
    try:
        spec = importlib.util.find_spec("magicmind")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    where = spec.origin or next(iter(spec.submodule_search_locations or []), None)
    return os.path.dirname(os.path.dirname(where)) if where else None


def mlu_present() -> bool:
    return os.path.exists("/dev/cambricon_ctl") or os.path.exists("/dev/cambricon_dev0")


class CambriconBackend(HandoffBackend):
    """Cambricon MLUs through MagicMind; ``--arch``: a preset or a MagicMind arch (``mtp_372``)."""

    name = "cambricon"
    vendor = "Cambricon (MagicMind)"
    default_preset = "mlu370"
    output_file = "model.mm"
    install_hint = (
        "install Cambricon Neuware with MagicMind and its Python wheel (import magicmind must work)"
    )

    def presets(self):
        return {
            "mlu370": DevicePreset(
                "mlu370", "Cambricon MLU370-S4/X4/X8", {"kind": "cambricon", "archs": ["mtp_372"]}
            ),
            "mlu590": DevicePreset(
                "mlu590", "Cambricon MLU590", {"kind": "cambricon", "archs": ["mtp_592"]}
            ),
        }

    def availability(self):
        missing = []
        if magicmind_location() is None:
            missing.append(f"MagicMind not found: {self.install_hint}")
        if magicmind_location() is None or not mlu_present():
            missing.append("running needs a Cambricon MLU with its driver and MagicMind")
        return Availability(True, len(missing) == 0, tuple(missing), magicmind_location() is None)

    def target(self, arch=None):
        preset = self.preset(arch)
        if preset is not None:
            return {"kind": "cambricon", "archs": list(preset.target["archs"])}
        if arch and _ARCH.match(arch):
            return {"kind": "cambricon", "archs": [arch]}
        raise UnknownTarget(
            f"{arch!r} is neither a cambricon preset nor a MagicMind arch. fix: pass --arch "
            "with one "
            f"of {', '.join(self.presets())} or an arch such as mtp_372"
        )

    def find_toolchain(self):
        return sys.executable if magicmind_location() else None

    def toolchain_env(self, toolchain):
        where = magicmind_location()
        path = os.pathsep.join(filter(None, [where, os.environ.get("PYTHONPATH")]))
        return {"PYTHONPATH": path} if where else {}

    def precision_flag(self, target, precision):
        if precision not in PRECISION_MODES:
            raise CompileError(
                f"MagicMind has no {precision} precision mode (force_float32, force_float16 and "
                "quantized modes only). fix: use --dtype float16 (MagicMind's force_float16)"
            )
        return f"precision_mode={PRECISION_MODES[precision]}"

    def write_build_files(self, package_dir, target, shapes, precision="float32"):
        self.precision_flag(target, precision)
        mutable = not all(s.static for s in shapes)
        builder = {
            "archs": list(target["archs"]),
            "graph_shape_mutable": mutable,
            "precision_config": {"precision_mode": PRECISION_MODES[precision]},
        }
        ranges = {}
        for i, s in enumerate(shapes):
            if any("~" in d for d in s.dims):
                lo = [int(d.split("~")[0]) if "~" in d else int(d) for d in s.dims]
                hi = [int(d.split("~")[1]) if "~" in d else int(d) for d in s.dims]
                ranges[str(i)] = {"min": lo, "max": hi}
        if ranges:
            builder["dim_range"] = ranges
        config = {
            "input_names": [s.name for s in shapes],
            "input_dims": [[int(d) if d.isdigit() else -1 for d in s.dims] for s in shapes],
            "builder_config": builder,
        }
        with open(os.path.join(package_dir, "build_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(package_dir, "build_magicmind.py"), "w") as f:
            f.write(BUILD_SCRIPT)
        return ["python3", "build_magicmind.py"]

    def load(self, artifact_dir, manifest):
        path = require_output(artifact_dir, manifest, self)
        if magicmind_location() is None or not mlu_present():
            raise ToolchainMissing(
                f"running {path} needs a Cambricon MLU (/dev/cambricon_dev0) and MagicMind's "
                "runtime. "
                "fix: run it on a machine with an MLU"
            )
        return MagicMindRunner(path)


class MagicMindRunner(Runner):
    """Runs a serialized MagicMind model on MLU 0 (not exercised in qiao's CI: it needs an MLU)."""

    def __init__(self, model_path: str):
        import magicmind.python.runtime as mm

        self.device = mm.Device()
        self.device.id = 0
        if not self.device.active().ok():
            raise ToolchainMissing("MagicMind could not activate MLU 0. fix: check cnmon")
        self.model = mm.Model()
        if not self.model.deserialize_from_file(model_path).ok():
            raise ToolchainMissing(f"MagicMind could not load {model_path}. fix: rebuild it here")
        self.engine = self.model.create_i_engine()
        self.context = self.engine.create_i_context()
        self.queue = self.device.create_queue()

    def run(self, inputs):
        tensors = self.context.create_inputs()
        for tensor, value in zip(tensors, inputs):
            tensor.from_numpy(value)
        outputs = []
        status = self.context.enqueue(tensors, outputs, self.queue)
        if not status.ok() or not self.queue.sync().ok():
            raise ToolchainMissing(f"MagicMind failed to run the model: {status}")
        return [o.asnumpy() for o in outputs]
