"""Hand-off backends: qiao prepares the model, the vendor's compiler builds it.

Ascend's ATC and Cambricon's MagicMind read ONNX themselves, so these backends do not lower through
Relax (``imports_relax = False``). ``build`` writes a *hand-off package* into the artifact
(``handoff/``): the model converted to what the vendor parser accepts (standard ``ai.onnx`` ops in
the opset range it reads; qiao's ``com.microsoft::MoE`` nodes decomposed into standard ops, see
``qiao.compiler.moe_op.to_standard_ops``), input shapes fixed or ranged, the exact build command as
a script, and a README.
When the vendor toolchain is installed qiao runs that same script and the artifact holds its output
(``model.om`` / ``model.mm``, manifest ``status: compiled``). When it is not, the artifact is still
written, complete, with ``status: handoff-only``, and ``after_write`` raises ``ToolchainMissing``
naming what to install and where the package is: the CLI exits 2, nothing half-built is left, and
the package can be copied to a machine with the toolchain and built there with one command."""

from __future__ import annotations

import abc
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx

from qiao.backends.base import Backend
from qiao.compiler import moe_op
from qiao.compiler.errors import CompileError, QiaoError, ToolchainMissing
from qiao.compiler.frontend import save_proto  # large models: weights as external data

PACKAGE_DIR = "handoff"
PACKAGE_MODEL = "model.onnx"
TOOLCHAIN_TIMEOUT_S = 3600


class HandoffBackend(Backend):
    """Shared ``build``/``after_write`` of the hand-off backends. A subclass says how to find its
    toolchain and how to call it (``find_toolchain``, ``write_build_files``, ``build_command``)."""

    imports_relax = False
    opset_range: ClassVar[tuple[int, int]] = (11, 15)
    output_file: ClassVar[str]  # what the vendor compiler writes into the artifact
    install_hint: ClassVar[str]  # what to install, for messages

    # -- what a subclass provides ----------------------------------------------------------------
    @abc.abstractmethod
    def find_toolchain(self) -> str | None:
        """Where the vendor compiler is (a path), or ``None``. Never raises."""

    @abc.abstractmethod
    def write_build_files(
        self, package_dir: str, target: Mapping[str, Any], shapes: list[InputShape]
    ) -> list[str]:
        """Write the build script/config into ``package_dir``; return the exact command (argv, run
        from ``package_dir``) that turns ``model.onnx`` into ``../<output_file>``."""

    def toolchain_env(self, toolchain: str) -> dict[str, str]:
        """Extra environment for running the toolchain."""
        return {}

    # -- shared ----------------------------------------------------------------------------------
    def build(self, model, arch, workdir, options):
        target = self.target(arch)
        shapes = input_shapes(model.inputs, options.get("static_dims"), options.get("dim_ranges"))
        proto = prepare_onnx(model.proto, self.opset_range, shapes)
        package = os.path.join(workdir, PACKAGE_DIR)
        os.makedirs(package)
        save_proto(proto, os.path.join(package, PACKAGE_MODEL))
        command = self.write_build_files(package, target, shapes)
        script = os.path.join(package, "build.sh")
        with open(script, "w") as f:
            f.write(
                "#!/bin/sh\n# Builds ../"
                + self.output_file
                + " from model.onnx with "
                + self.vendor
                + '\'s toolchain. Written by qiao.\nset -e\ncd "$(dirname "$0")"\n'
                + shlex.join(command)
                + "\n"
            )
        os.chmod(script, 0o755)
        toolchain = self.find_toolchain()
        section = {
            "library": None,
            "package": PACKAGE_DIR,
            "command": command,
            "opset": _default_opset(proto),
            "input_shapes": {s.name: s.dims for s in shapes},
            "moe_decomposed": moe_op.count_nodes(model.proto),
        }
        self._write_readme(package, target, command, section)
        if toolchain is None:
            return dict(section, status="handoff-only", output=None)
        self._run(command, package, toolchain)
        if not os.path.isfile(os.path.join(workdir, self.output_file)):
            raise CompileError(
                f"{self.vendor}'s compiler finished but wrote no {self.output_file}; see "
                f"{PACKAGE_DIR}/build.log. fix: check its log, rerun with --debug"
            )
        return dict(section, status="compiled", output=self.output_file)

    def _run(self, command: list[str], package: str, toolchain: str) -> None:
        argv = [toolchain if i == 0 else a for i, a in enumerate(command)]
        env = dict(os.environ, **self.toolchain_env(toolchain))
        try:
            proc = subprocess.run(
                argv,
                cwd=package,
                env=env,
                capture_output=True,
                text=True,
                timeout=TOOLCHAIN_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise CompileError(
                f"could not run {self.vendor}'s compiler {toolchain}: {err}. "
                f"fix: {self.install_hint}"
            ) from err
        with open(os.path.join(package, "build.log"), "w") as f:
            f.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise CompileError(
                f"{self.vendor}'s compiler failed (exit {proc.returncode}): {tail}. fix: read its "
                f"message; the command was: {shlex.join(argv)}"
            )

    def after_write(self, artifact_dir, manifest):
        section = manifest["backend"]
        if section.get("status") == "handoff-only":
            package = os.path.join(artifact_dir, PACKAGE_DIR)
            raise ToolchainMissing(
                f"{self.vendor}'s compiler is not installed here ({self.install_hint}). The "
                "hand-off "
                f"package is complete in {package}: on a machine with the toolchain run "
                f"`sh {os.path.join(package, 'build.sh')}` (it writes {self.output_file}), or run "
                "`qiao compile` there"
            )

    def _write_readme(self, package: str, target, command: list[str], section: dict) -> None:
        shapes = "\n".join(f"- `{n}`: `{d}`" for n, d in section["input_shapes"].items())
        moe = (
            f"{section['moe_decomposed']} `com.microsoft::MoE` node(s) were decomposed into "
            "standard "
            "ONNX ops (dense form: every expert runs on every token, weighted by the top-k routing "
            "weights, zero elsewhere; numerically the same as the fused op, E/k times the FLOPs).\n"
            if section["moe_decomposed"]
            else ""
        )
        with open(os.path.join(package, "README.md"), "w") as f:
            f.write(
                f"# qiao hand-off package for {self.vendor} ({self.name})\n\n"
                f"Target: `{dict(target)}`\n\n"
                f"`{PACKAGE_MODEL}` is the model as {self.vendor}'s parser reads it: ai.onnx opset "
                f"{section['opset']}.\n{moe}\n"
                f"Input shapes (ranges `a~b`, `-1` any size):\n{shapes}\n\n"
                f"Build, from this directory (`build.sh` does exactly this):\n\n"
                f"    {shlex.join(command)}\n\n"
                f"It writes `../{self.output_file}`.\n"
            )


# -- input shapes ----------------------------------------------------------------------------------
class InputShape:
    """One input's shape for the vendor compiler: ints, ``"a~b"`` ranges or ``"-1"``.

    ``dims`` holds strings, as the vendor command lines spell them; ``static`` is True when every
    dim is a fixed size.
    """

    def __init__(self, name: str, dims: list[str]):
        self.name, self.dims = name, dims

    @property
    def static(self) -> bool:
        return all(d.isdigit() for d in self.dims)

    def __repr__(self) -> str:
        return f"InputShape({self.name!r}, {self.dims!r})"


def input_shapes(
    specs: Sequence[Any],
    static_dims: Mapping[str, int] | None = None,
    dim_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> list[InputShape]:
    """Shapes for the vendor compiler from the model's input specs.

    Static dims stay; a symbolic dim (``"batch"``) becomes the size in ``static_dims``, else the
    range ``lo~hi`` from ``dim_ranges``, else ``-1`` (any size the compiler accepts).
    """
    static_dims, dim_ranges = dict(static_dims or {}), dict(dim_ranges or {})
    out = []
    for spec in specs:
        dims = []
        for d in spec.shape:
            if isinstance(d, int):
                dims.append(str(d))
            elif d in static_dims:
                dims.append(str(int(static_dims[d])))
            elif d in dim_ranges:
                lo, hi = dim_ranges[d]
                if not 1 <= int(lo) <= int(hi):
                    raise QiaoError(f"bad range for {d!r}: {lo}~{hi}. fix: pass 1 <= lo <= hi")
                dims.append(f"{int(lo)}~{int(hi)}")
            else:
                dims.append("-1")
        out.append(InputShape(spec.name, dims))
    return out


# -- the ONNX the vendor parser reads --------------------------------------------------------------
def prepare_onnx(
    proto: onnx.ModelProto, opset_range: tuple[int, int], shapes: Sequence[InputShape] = ()
) -> onnx.ModelProto:
    """MoE nodes decomposed, opset moved into ``opset_range``, fixed input dims written in."""
    proto = moe_op.decompose_model(proto)
    unknown = sorted(
        {f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    )
    if unknown:
        raise CompileError(
            f"the model uses non-standard operators the vendor parser does not read: "
            f"{', '.join(unknown)}. fix: re-export without them"
        )
    proto = convert_opset(proto, *opset_range)
    fixed = {s.name: s.dims for s in shapes}
    for vi in proto.graph.input:
        for dim, value in zip(vi.type.tensor_type.shape.dim, fixed.get(vi.name, [])):
            if value.isdigit():
                dim.Clear()
                dim.dim_value = int(value)
    return proto


def _default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def convert_opset(proto: onnx.ModelProto, low: int, high: int) -> onnx.ModelProto:
    """The model with its ``ai.onnx`` opset moved into ``[low, high]`` by ONNX's version converter
    (unchanged when already inside). Fixes the converter's one known gap: going below 18 it keeps
    ``noop_with_empty_axes`` on Reduce ops whose older versions do not have it."""
    version = _default_opset(proto)
    if low <= version <= high:
        return proto
    goal = high if version > high else low
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, goal)
    except Exception as err:
        raise CompileError(
            f"ONNX's version converter cannot move this model from opset {version} to {goal}: "
            f"{str(err).strip().splitlines()[0]}. fix: re-export the model at opset {goal}"
        ) from err
    for node in converted.graph.node:
        if node.op_type.startswith("Reduce") and goal < 18:
            for attr in list(node.attribute):
                if attr.name == "noop_with_empty_axes":
                    if attr.i:
                        raise CompileError(
                            f"node {node.name!r} ({node.op_type}) uses noop_with_empty_axes=1, "
                            "which "
                            f"opset {goal} cannot express. fix: re-export at opset {goal}"
                        )
                    node.attribute.remove(attr)
    try:
        onnx.checker.check_model(converted)
    except Exception as err:
        raise CompileError(
            f"the model converted to opset {goal} fails the ONNX checker: "
            f"{str(err).strip().splitlines()[0]}. fix: re-export the model at opset {goal}"
        ) from err
    return converted


# -- running the vendor's model where its runtime is present ---------------------------------------
def bound_output_sizes(manifest: Mapping[str, Any], inputs: Sequence[np.ndarray]) -> list[int]:
    """Byte size of each output with symbolic dims bound from the inputs (for runtimes that want
    output buffers sized up front); unbound dims count as 1 << 16 elements."""
    bound: dict[str, int] = {}
    for spec, value in zip(manifest["inputs"], inputs):
        for d, n in zip(spec["shape"], value.shape):
            if isinstance(d, str):
                bound[d] = int(n)
    sizes = []
    for spec in manifest["outputs"]:
        n = 1
        for d in spec["shape"]:
            n *= d if isinstance(d, int) else bound.get(d, 1 << 16)
        sizes.append(n * np.dtype(spec["dtype"]).itemsize)
    return sizes


class HandoffRunnerMissing(ToolchainMissing):
    """Raised by ``load`` of a hand-off artifact that cannot run here."""


def require_output(artifact_dir: str, manifest: Mapping[str, Any], backend: HandoffBackend) -> str:
    """Path of the vendor model in an artifact, or ``ToolchainMissing`` when it was never built."""
    section = manifest["backend"]
    if section.get("status") != "compiled" or not section.get("output"):
        raise HandoffRunnerMissing(
            f"{artifact_dir} is a hand-off package only: {backend.vendor}'s compiler did not run "
            f"when it was written. fix: on a machine with it, run "
            f"`sh {os.path.join(artifact_dir, PACKAGE_DIR, 'build.sh')}` or `qiao compile` again"
        )
    return os.path.join(artifact_dir, section["output"])


__all__ = [
    "HandoffBackend",
    "InputShape",
    "bound_output_sizes",
    "convert_opset",
    "input_shapes",
    "prepare_onnx",
    "require_output",
]
