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
the package can be copied to a machine with the toolchain and built there with one command.

Precision (``--dtype``; the manifest's ``backend.precision`` and the package README say which was
used). The hand-off model keeps float32 inputs and outputs and the graph as qiao validated it;
the vendor compiler's own precision switch chooses the arithmetic (``precision_flag`` of each
backend), because both compilers lower to fp16 themselves and want to be told so rather than
handed a converted graph:

- default (float32): the vendor compiler is asked to keep the model's float32 arithmetic;
- ``float16`` (or a model whose float inputs are float16): the weights ``--dtype float16`` narrowed
  stay float16 initializers (each widened by a ``Cast`` where it is read, as ONNX Runtime runs
  it), and the compiler is told to compute in fp16;
- ``bfloat16``: where the compiler has a bfloat16 mode (ATC on Atlas A2, Ascend910B*); the
  bfloat16 weights are written as the float32 numbers they are (exact: parsers read float32
  initializers everywhere) and the compiler's bf16 mode rounds them back. Elsewhere one error
  names the fix (``--dtype float16``), before anything is written.

Quantized weights (``--quantize``, or ``com.microsoft`` ``MatMulNBits`` / ``GatherBlockQuantized``
/ ``QMoE`` and constant ``DequantizeLinear`` in the model): neither vendor parser reads ONNX
Runtime's contrib ops, so ``dequantize_weights`` replaces them by standard ops over dequantized
weights (``MatMul`` (+ ``Add``), ``Gather``, a ``com.microsoft::MoE`` that ``moe_op`` then
decomposes, a plain initializer), dequantized exactly with qiao's importer helpers
(``convert_quant``) or, for ``DequantizeLinear``, ONNX's reference evaluator. They are stored in
float16 when the hand-off is float16 (the one rounding of an exact dequantized weight) and in
float32 otherwise. The vendor compiler then sees float weights: no int4/int8 memory or speed
benefit; the README, the manifest (``backend.dequantized``) and a one-line warning say so."""

from __future__ import annotations

import abc
import os
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
        self,
        package_dir: str,
        target: Mapping[str, Any],
        shapes: list[InputShape],
        precision: str = "float32",
    ) -> list[str]:
        """Write the build script/config into ``package_dir``; return the exact command (argv, run
        from ``package_dir``) that turns ``model.onnx`` into ``../<output_file>``, with the
        compiler's switch for ``precision`` (``precision_flag``)."""

    @abc.abstractmethod
    def precision_flag(self, target: Mapping[str, Any], precision: str) -> str:
        """The vendor compiler's setting for ``precision`` (``"float32"``, ``"float16"``,
        ``"bfloat16"``) on ``target``, as written into the build command/config; ``CompileError``
        naming the fix when the compiler has none for it there."""

    def toolchain_env(self, toolchain: str) -> dict[str, str]:
        """Extra environment for running the toolchain."""
        return {}

    # -- shared ----------------------------------------------------------------------------------
    def build(self, model, arch, workdir, options):
        target = self.target(arch)
        precision = handoff_precision(options.get("dtype"), model.proto)
        flag = self.precision_flag(target, precision)  # refuses before anything is written
        shapes = input_shapes(model.inputs, options.get("static_dims"), options.get("dim_ranges"))
        weights = "float16" if precision == "float16" else "float32"
        proto, dequantized = dequantize_weights(model.proto, weights)
        if precision == "bfloat16":
            proto = widen_weights(proto)
        moe_nodes = moe_op.count_nodes(proto)
        proto = prepare_onnx(proto, self.opset_range, shapes)
        package = os.path.join(workdir, PACKAGE_DIR)
        os.makedirs(package)
        save_proto(proto, os.path.join(package, PACKAGE_MODEL))
        command = self.write_build_files(package, target, shapes, precision)
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
            "moe_decomposed": moe_nodes,
            "precision": {
                "compute": precision,
                "flag": flag,
                "weights": _weights_note(precision),
                "io": "as the model declares (float32 unless the model's inputs are float16)",
            },
            "dequantized": dequantized,
        }
        self._write_readme(package, target, command, section)
        if dequantized is not None:
            ops = ", ".join(dequantized["ops"])
            print(
                f"qiao: warning: {self.name} hand-off: quantized weights ({ops}) dequantized to "
                f"{dequantized['dtype']}; the vendor compiler cannot read them packed, so no "
                "int4/int8 memory or speed benefit (handoff/README.md)",
                file=sys.stderr,
            )
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
        p = section["precision"]
        precision = (
            f"Precision: {p['compute']} arithmetic, set by `{p['flag']}` in the build command "
            f"below. Weights: {p['weights']}. Inputs and outputs: {p['io']}.\n"
        )
        deq = section["dequantized"]
        quant = (
            f"\nQuantized weights: {deq['note']} Dequantized: "
            + ", ".join(f"{n} {op}" for op, n in deq["ops"].items())
            + f" ({deq['dtype']}).\n"
            if deq
            else ""
        )
        with open(os.path.join(package, "README.md"), "w") as f:
            f.write(
                f"# qiao hand-off package for {self.vendor} ({self.name})\n\n"
                f"Target: `{dict(target)}`\n\n"
                f"`{PACKAGE_MODEL}` is the model as {self.vendor}'s parser reads it: ai.onnx opset "
                f"{section['opset']}.\n{moe}\n{precision}{quant}\n"
                f"Input shapes (ranges `a~b`, `-1` any size):\n{shapes}\n\n"
                f"Build, from this directory (`build.sh` does exactly this):\n\n"
                f"    {shlex.join(command)}\n\n"
                f"It writes `../{self.output_file}`.\n"
            )


# -- precision -------------------------------------------------------------------------------------
PRECISIONS = ("float32", "float16", "bfloat16")
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def handoff_precision(dtype: str | None, proto: onnx.ModelProto) -> str:
    """The arithmetic the vendor compiler is asked for: ``--dtype`` when given, else
    ``"float16"`` for a model whose float inputs are all float16, else ``"float32"``."""
    if dtype is not None:
        if dtype not in PRECISIONS:
            raise QiaoError(f"dtype {dtype!r} is not supported. fix: use float16 or bfloat16")
        return dtype
    inits = {t.name for t in proto.graph.initializer}
    floats = [
        vi.type.tensor_type.elem_type
        for vi in proto.graph.input
        if vi.name not in inits and vi.type.tensor_type.elem_type in _FLOAT_TYPES
    ]
    return "float16" if floats and all(t == TensorProto.FLOAT16 for t in floats) else "float32"


def _weights_note(precision: str) -> str:
    return {
        "float32": "as the model stores them (float32)",
        "float16": "float16 initializers (a Cast widens each where a float32 op reads it)",
        "bfloat16": "bfloat16-rounded values stored as float32 initializers (exact)",
    }[precision]


def widen_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with every ``Cast`` of a bfloat16 initializer to float32 (``--dtype bfloat16``'s
    narrowed weights) folded: the initializer holds the same numbers as float32 (exact)."""
    inits = {t.name: t for t in proto.graph.initializer}
    folds = {
        n.output[0]: n
        for n in proto.graph.node
        if n.op_type == "Cast"
        and n.domain in ("", "ai.onnx")
        and n.input[0] in inits
        and inits[n.input[0]].data_type == TensorProto.BFLOAT16
        and helper.get_attribute_value(n.attribute[0]) == TensorProto.FLOAT
    }
    if not folds:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    widened = []
    for name, node in folds.items():
        t = inits[node.input[0]]
        bits = np.frombuffer(t.raw_data, np.uint16) if t.raw_data else np.array(t.int32_data)
        value = (bits.astype(np.uint32) << 16).view(np.float32).reshape(tuple(t.dims))
        widened.append(numpy_helper.from_array(value, name))
    keep = [n for n in out.graph.node if n.output[0] not in folds or n.op_type != "Cast"]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(widened)
    _drop_unused_initializers(out.graph)
    return out


# -- quantized weights -----------------------------------------------------------------------------
MS_DOMAIN = "com.microsoft"
QUANT_CONTRIB_OPS = ("MatMulNBits", "GatherBlockQuantized", "QMoE")
DEQUANTIZED_NOTE = (
    "the quantized weights were dequantized into {dtype} initializers, because the vendor parser "
    "reads neither ONNX Runtime's contrib ops (MatMulNBits, GatherBlockQuantized, QMoE) nor "
    "blocked/int4 DequantizeLinear: the vendor compiler gets float weights, so there is no "
    "int4/int8 memory or speed benefit (the numbers are those of the quantized model)."
)


def dequantize_weights(
    proto: onnx.ModelProto, dtype: str = "float32"
) -> tuple[onnx.ModelProto, dict | None]:
    """``proto`` with its quantized weights as standard ops over float initializers.

    ``MatMulNBits`` becomes ``MatMul`` (+ ``Add`` of its bias) with the ``[K, N]`` weight of
    ``convert_quant.dequantize_nbits``; ``GatherBlockQuantized`` a ``Gather`` of the table of
    ``convert_quant.dequantize_table``; ``QMoE`` (integer experts) the ``com.microsoft::MoE`` it
    quantizes, over the experts of ``convert_quant.quant_experts(...).dequantized()`` (``moe_op``
    decomposes it afterwards); a ``DequantizeLinear`` of constants (blocked, int4, ...) its value,
    by ONNX's reference evaluator. Dequantization is exact in float32; ``dtype="float16"`` stores
    each weight rounded once to float16 (with a ``Cast`` to float32 where a float32 op reads it).

    Returns the model (``proto`` itself when it has nothing quantized) and the manifest's
    ``dequantized`` section (None then). ``CompileError`` for a form that cannot be mapped (its
    quantized inputs not constants, a layout qiao does not read), naming the fix.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}

    def quantized(n: onnx.NodeProto) -> bool:
        if n.domain == MS_DOMAIN and n.op_type in QUANT_CONTRIB_OPS:
            return True
        return (
            n.domain in ("", "ai.onnx")
            and n.op_type == "DequantizeLinear"
            and all(i in inits for i in n.input if i)
        )

    if not any(quantized(n) for n in graph.node):
        return proto, None
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    rewriter = _Dequantizer(out, dtype)
    nodes = []
    for node in out.graph.node:
        nodes.extend(rewriter.rewrite(node) if quantized(node) else [node])
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(rewriter.inits)
    out.graph.value_info.extend(rewriter.value_info)
    _drop_unused_initializers(out.graph)
    # com.microsoft stays imported only for what remains of it (a QMoE's MoE, other contrib ops)
    opsets = [o for o in out.opset_import if o.domain != MS_DOMAIN]
    if any(n.domain == MS_DOMAIN for n in out.graph.node):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    del out.opset_import[:]
    out.opset_import.extend(opsets)
    return out, {
        "ops": dict(sorted(rewriter.counts.items())),
        "dtype": dtype,
        "note": DEQUANTIZED_NOTE.format(dtype=dtype),
    }


class _Dequantizer:
    def __init__(self, proto: onnx.ModelProto, dtype: str):
        self.graph, self.dtype = proto.graph, dtype
        self.by_name = {t.name: t for t in proto.graph.initializer}
        self.names = set(self.by_name) | {o for n in proto.graph.node for o in n.output}
        self.names |= {i.name for i in proto.graph.input}
        self.inits: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.counts: Counter = Counter()

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def const(self, node: onnx.NodeProto, i: int, what: str) -> np.ndarray | None:
        if len(node.input) <= i or not node.input[i]:
            return None
        t = self.by_name.get(node.input[i])
        if t is None:
            raise CompileError(
                f"{node.op_type} node {node.name!r}: {what} ({node.input[i]!r}) is not an "
                "initializer; the hand-off dequantizes quantized weights ahead of time. fix: "
                "store the quantized weights, scales and zero points as initializers"
            )
        return numpy_helper.to_array(t)

    def weight(
        self, value: np.ndarray, base: str, read_as: int, out: str | None = None
    ) -> tuple[str, list]:
        """A float initializer holding ``value`` (float32, exact) in ``self.dtype`` (float16 also
        when it is read as float16), read as ONNX type ``read_as`` under the name returned (``out``
        when given): with a ``Cast`` node when the stored and the read type differ."""
        half = self.dtype == "float16" or read_as == TensorProto.FLOAT16
        stored = np.ascontiguousarray(value.astype(np.float16 if half else np.float32))
        cast = helper.np_dtype_to_tensor_dtype(stored.dtype) != read_as
        name = self.fresh(f"{base}.dequantized") if cast or out is None else out
        self.inits.append(numpy_helper.from_array(stored, name))
        if not cast:
            return name, []
        wide = out or self.fresh(f"{name}.widened")
        self.value_info.append(helper.make_tensor_value_info(wide, read_as, list(value.shape)))
        return wide, [helper.make_node("Cast", [name], [wide], to=read_as, name=f"{wide}.cast")]

    def rewrite(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        self.counts[node.op_type] += 1
        return getattr(self, node.op_type)(node)

    def MatMulNBits(self, node):  # noqa: N802
        from qiao.compiler.frontend.convert_quant import check_nbits_shapes, dequantize_nbits

        attr = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n = int(attr["K"]), int(attr["N"])
        bits, block = int(attr.get("bits", 4)), int(attr["block_size"])
        b, scales = self.const(node, 1, "B"), self.const(node, 2, "scales")
        zp, g_idx = self.const(node, 3, "zero_points"), self.const(node, 4, "g_idx")
        if (
            bits not in (2, 4, 8)
            or block < 16
            or block & (block - 1)
            or b is None
            or scales is None
        ):
            raise CompileError(
                f"MatMulNBits node {node.name!r} (bits={bits}, block_size={block}): qiao reads "
                "2-, 4- or 8-bit codes in blocks of a power of 2 >= 16, with B and scales given. "
                "fix: re-quantize with ONNX Runtime's matmul_nbits_quantizer"
            )
        check_nbits_shapes(b, scales, zp, k, n, bits, block)
        w = dequantize_nbits(b, scales, zp, g_idx, k, n, bits, block)
        act = helper.np_dtype_to_tensor_dtype(scales.dtype)  # scales have A's type
        name, cast = self.weight(w, node.input[1], act)
        has_bias = len(node.input) > 5 and node.input[5]
        y = self.fresh(f"{node.output[0]}.matmul") if has_bias else node.output[0]
        nodes = [*cast, helper.make_node("MatMul", [node.input[0], name], [y], name=node.name)]
        if has_bias:
            nodes.append(helper.make_node("Add", [y, node.input[5]], [node.output[0]]))
        return nodes

    def GatherBlockQuantized(self, node):  # noqa: N802
        from qiao.compiler.frontend.convert_quant import dequantize_table

        attr = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        data, scales = self.const(node, 0, "data"), self.const(node, 2, "scales")
        zp = self.const(node, 3, "zero_points")
        bits, block = int(attr.get("bits", 4)), int(attr.get("block_size", 128))
        if bits not in (4, 8) or data.dtype != np.uint8:
            raise CompileError(
                f"GatherBlockQuantized node {node.name!r}: bits={bits} with {data.dtype} data "
                "is not read by qiao (uint8 data, 4-bit packed or 8-bit). fix: re-quantize the "
                "table to that layout"
            )
        q_axis = int(attr.get("quantize_axis", -1)) % data.ndim
        table = dequantize_table(data, scales, zp, bits, block, q_axis).astype(np.float32)
        name, cast = self.weight(
            table, node.input[0], helper.np_dtype_to_tensor_dtype(scales.dtype)
        )
        gather = helper.make_node(
            "Gather",
            [name, node.input[1]],
            list(node.output),
            name=node.name,
            axis=int(attr.get("gather_axis", 0)),
        )
        return [*cast, gather]

    def QMoE(self, node):  # noqa: N802
        from qiao.compiler.frontend.convert_quant import QMOE_ONLY_ATTRS, quant_experts

        attr = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        what = f"QMoE node {node.name!r}"
        quant_type = attr.get("quant_type", b"int")
        quant_type = quant_type.decode() if isinstance(quant_type, bytes) else str(quant_type)
        if quant_type != "int" or int(attr.get("weights_prepacked", -1)) == 1:
            raise CompileError(
                f"{what}: quant_type={quant_type!r}, weights_prepacked="
                f"{attr.get('weights_prepacked', -1)} is not read by qiao (integer experts, raw "
                "[E, N, K*bits/8] rows). fix: export with quant_type='int', weights_prepacked=0"
            )
        if any(i for i in node.input[14:]):
            raise CompileError(
                f"{what}: router_weights (or fp8/fp4 scale inputs) are not read by qiao. fix: "
                "export without router_weights (router_probs both selects and weighs)"
            )
        bits = int(attr.get("expert_weight_bits", 4))
        block = int(attr.get("block_size", 0) or 0)
        experts: dict[str, np.ndarray] = {}
        act = TensorProto.FLOAT
        slots = {"fc1": (2, 3, 11), "fc2": (5, 6, 12), "fc3": (8, 9, 13)}  # weights, scales, zp
        for fc, (w_i, s_i, zp_i) in slots.items():
            w = self.const(node, w_i, f"{fc}_experts_weights")
            if w is None:
                continue
            scales = self.const(node, s_i, f"{fc}_scales")
            if scales is None:
                raise CompileError(f"{what}: {fc}_scales is missing. fix: add the scales")
            fc_bits = int(attr.get(f"{fc}_expert_weight_bits", bits))
            if fc_bits not in (2, 4, 8) or w.ndim != 3:
                raise CompileError(
                    f"{what}: {fc} holds {fc_bits}-bit experts {list(w.shape)}; qiao reads 2, 4 "
                    "or 8 bits as [E, N, K*bits/8]. fix: re-quantize the experts"
                )
            zp = self.const(node, zp_i, f"{fc}_zero_points")
            k = w.shape[2] * 8 // fc_bits  # hidden size (fc1/fc3), intermediate size (fc2)
            experts[fc] = quant_experts(w, scales, zp, fc_bits, block, k, fc).dequantized()
            act = helper.np_dtype_to_tensor_dtype(scales.dtype)  # scales have the input's type
        inputs = [node.input[0], node.input[1]]
        nodes = []
        for fc, bias_i in (("fc1", 4), ("fc2", 7), ("fc3", 10)):
            if fc not in experts:
                inputs += ["", ""]
                continue
            name, cast = self.weight(experts[fc], f"{node.name or 'qmoe'}.{fc}", act)
            nodes += cast
            inputs += [name, node.input[bias_i] if len(node.input) > bias_i else ""]
        while inputs and not inputs[-1]:
            inputs.pop()
        moe_attrs = {k: v for k, v in attr.items() if k not in QMOE_ONLY_ATTRS}
        nodes.append(
            helper.make_node(
                "MoE", inputs, list(node.output), name=node.name, domain=MS_DOMAIN, **moe_attrs
            )
        )
        return nodes

    def DequantizeLinear(self, node):  # noqa: N802
        from onnx.reference import ReferenceEvaluator

        consts = [self.by_name[i] for i in node.input if i]
        out_vi = helper.make_tensor_value_info(node.output[0], TensorProto.UNDEFINED, None)
        single = helper.make_model(
            helper.make_graph([node], "dq", [], [out_vi], consts),
            opset_imports=[helper.make_opsetid("", 21)],  # DequantizeLinear's newest form
        )
        try:
            (value,) = ReferenceEvaluator(single).run(None, {})
        except Exception as err:
            raise CompileError(
                f"DequantizeLinear node {node.name!r}: ONNX's reference cannot evaluate it: "
                f"{str(err).strip().splitlines()[0]}. fix: re-export the model's quantized "
                "weights as standard DequantizeLinear (opset 21)"
            ) from err
        value = np.asarray(value)
        read_as = helper.np_dtype_to_tensor_dtype(value.dtype)
        _, cast = self.weight(value.astype(np.float32), node.output[0], read_as, node.output[0])
        return cast


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:  # names read inside subgraphs
        for a in n.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                used |= {i for sub in g.node for i in sub.input}
    dropped = {t.name for t in graph.initializer if t.name not in used}
    if dropped:
        keep = [t for t in graph.initializer if t.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        inputs = [i for i in graph.input if i.name not in dropped]  # initializers listed as inputs
        del graph.input[:]
        graph.input.extend(inputs)


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
        {
            f"{n.domain or 'ai.onnx'}::{n.op_type}"
            for n in proto.graph.node
            if n.domain not in ("", "ai.onnx") or n.op_type in ORT_DEFAULT_DOMAIN_OPS
        }
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


# ONNX Runtime's own ops in the default domain (``frontend.contrib_schemas`` registers their
# schemas with onnx, so the checker passes them): no vendor parser reads them.
ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


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
