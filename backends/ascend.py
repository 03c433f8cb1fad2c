"""Ascend (Huawei) backend: a hand-off to CANN's ATC, which compiles ONNX into an offline model
(``.om``).

qiao writes the package ATC consumes (see ``handoff.py``) and the exact command::

    atc --framework=5 --model=model.onnx --output=../model --soc_version=<chip>
        --input_format=ND --input_shape="x:-1,64" --precision_mode=<mode>

and runs it when ``atc`` is on ``PATH`` or under ``$ASCEND_TOOLKIT_HOME`` (CANN's ``set_env.sh``
sets both). Symbolic dims become ATC shape ranges (``-1`` or ``lo~hi``; ``static_dims={"batch": 8}``
fixes them). Running the ``.om`` uses ``ais_bench`` (Ascend's inference tool) on a machine with an
NPU.

``--precision_mode`` (ATC's switch in every CANN release; ``--precision_mode_v2`` is newer and the
two cannot be combined) says what qiao validated: ``must_keep_origin_dtype`` by default (the
model's float32 arithmetic; ATC's own default, ``force_fp16``/``fp16``, would silently compute in
fp16), ``force_fp16`` for ``--dtype float16`` or a float16 model (fp16 wherever an operator has it;
inputs and outputs keep the model's types, ATC converts at the edges), and for ``--dtype
bfloat16`` ``allow_mix_precision_bf16`` (bf16 where ATC's built-in lists allow it, float32
elsewhere), which CANN offers on Atlas A2 chips (``Ascend910B*``) only; other chips refuse it."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil

import numpy as np

from qiao.backends.base import Availability, DevicePreset, Runner
from qiao.backends.handoff import HandoffBackend, bound_output_sizes, require_output
from qiao.compiler.errors import CompileError, ToolchainMissing, UnknownTarget

_SOC = re.compile(r"Ascend\d{3}[A-Z]?\d?$")
_BF16_SOC = re.compile(r"Ascend910B\d?$")  # Atlas A2: the chips CANN's bf16 modes run on
PRECISION_MODES = {
    "float32": "must_keep_origin_dtype",
    "float16": "force_fp16",
    "bfloat16": "allow_mix_precision_bf16",
}
_TOOLKIT_DIRS = ("bin", "compiler/bin", "atc/bin")


def find_atc() -> str | None:
    """``atc`` on ``PATH``, else in ``$ASCEND_TOOLKIT_HOME`` (or CANN's default install place)."""
    found = shutil.which("atc")
    if found:
        return found
    homes = [
        os.environ.get("ASCEND_TOOLKIT_HOME"),
        os.environ.get("ASCEND_HOME_PATH"),
        "/usr/local/Ascend/ascend-toolkit/latest",
    ]
    for home in filter(None, homes):
        for sub in _TOOLKIT_DIRS:
            path = os.path.join(home, sub, "atc")
            if os.access(path, os.X_OK):
                return path
    return None


def npu_present() -> bool:
    return os.path.exists("/dev/davinci0")


class AscendBackend(HandoffBackend):
    """Huawei Ascend NPUs through CANN's ATC. ``--arch`` is a preset or an ATC ``--soc_version``."""

    name = "ascend"
    vendor = "Huawei Ascend (CANN)"
    default_preset = "Ascend910B"
    output_file = "model.om"
    install_hint = (
        "install the CANN toolkit (Ascend-cann-toolkit, which provides atc) and `source "
        "<install>/ascend-toolkit/set_env.sh`, or set ASCEND_TOOLKIT_HOME"
    )

    def presets(self):
        return {
            "Ascend910B": DevicePreset(
                "Ascend910B",
                "Atlas 800T/800I A2 (Ascend 910B3; pass --arch Ascend910B1..B4 as npu-smi shows)",
                {"kind": "ascend", "soc_version": "Ascend910B3"},
            ),
            "Ascend310P": DevicePreset(
                "Ascend310P",
                "Atlas 300I Pro / 300V Pro (Ascend 310P3)",
                {"kind": "ascend", "soc_version": "Ascend310P3"},
            ),
        }

    def availability(self):
        missing = []
        if find_atc() is None:
            missing.append(f"atc not found: {self.install_hint}")
        if importlib.util.find_spec("ais_bench") is None or not npu_present():
            missing.append("running needs an Ascend NPU with its driver and ais_bench installed")
        return Availability(True, len(missing) == 0, tuple(missing), find_atc() is None)

    def target(self, arch=None):
        preset = self.preset(arch)
        if preset is not None:
            return dict(preset.target)
        if arch and _SOC.match(arch):
            return {"kind": "ascend", "soc_version": arch}
        raise UnknownTarget(
            f"{arch!r} is neither an ascend preset nor an ATC soc_version. fix: pass --arch "
            "with one "
            f"of {', '.join(self.presets())} or a chip such as Ascend910B1, Ascend310P3"
        )

    def find_toolchain(self):
        return find_atc()

    def precision_flag(self, target, precision):
        soc = target["soc_version"]
        if precision == "bfloat16" and not _BF16_SOC.match(soc):
            raise CompileError(
                f"ATC computes in bfloat16 only on Atlas A2 chips (Ascend910B*), not {soc}. fix: "
                "use --dtype float16 (ATC's force_fp16), or --arch Ascend910B1..B4"
            )
        return f"--precision_mode={PRECISION_MODES[precision]}"

    def write_build_files(self, package_dir, target, shapes, precision="float32"):
        layout = "NCHW" if shapes and all(len(s.dims) == 4 for s in shapes) else "ND"
        spec = ";".join(f"{s.name}:{','.join(s.dims)}" for s in shapes)
        return [
            "atc",
            "--framework=5",
            "--model=model.onnx",
            "--output=../model",
            f"--soc_version={target['soc_version']}",
            f"--input_format={layout}",
            f"--input_shape={spec}",
            self.precision_flag(target, precision),
        ]

    def load(self, artifact_dir, manifest):
        path = require_output(artifact_dir, manifest, self)
        if importlib.util.find_spec("ais_bench") is None or not npu_present():
            raise ToolchainMissing(
                f"running {path} needs an Ascend NPU (/dev/davinci0) and ais_bench "
                "(pip install the ais_bench wheel shipped with CANN's tools). fix: run it on an "
                "Ascend machine"
            )
        return AscendRunner(path, manifest)


class AscendRunner(Runner):
    """Runs an ``.om`` through ais_bench's ``InferSession`` on NPU 0 (not exercised in qiao's CI: it
    needs an NPU)."""

    def __init__(self, om_path: str, manifest):
        from ais_bench.infer.interface import InferSession

        self.manifest = manifest
        self.session = InferSession(0, om_path)
        self.dynamic = any(
            not str(d).isdigit()
            for dims in manifest["backend"]["input_shapes"].values()
            for d in dims
        )

    def run(self, inputs):
        if self.dynamic:
            sizes = bound_output_sizes(self.manifest, inputs)
            outputs = self.session.infer(list(inputs), mode="dymshape", custom_sizes=sizes)
        else:
            outputs = self.session.infer(list(inputs), mode="static")
        return [np.asarray(o) for o in outputs]
