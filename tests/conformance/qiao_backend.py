"""qiao's CPU path as an ``onnx.backend.base.Backend``, for the ONNX backend node conformance suite.

``prepare`` runs the code path ``qiao.compiler.compile(model, "cpu")`` runs — ``import_onnx`` (TVM's
importer plus qiao's converters, weights split into parameters), then the CPU backend's
``compile_module`` (qiao's named phases and ``tvm.compile``) — and runs the executable through a
``TVMRunner`` subclass, so weights are prepared as for an artifact. The one difference is that the
executable stays in memory: no ``model.so`` is linked and no ``manifest.json`` is written, about 30%
less time per case over the suite's ~1900 small models. ``QIAO_CONFORMANCE_ARTIFACT=1`` switches to
the full ``qiao.compiler.compile(...).run(...)`` round trip through an artifact directory instead.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep, Device, DeviceType


def _to_numpy(value: Any) -> Any:
    """A VM result as numpy: tensors as arrays, tuples (ONNX sequences) as lists, shapes int64."""
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return value.numpy()
    if isinstance(value, tvm.runtime.ShapeTuple):
        return np.array(list(value), dtype=np.int64)
    if isinstance(value, (bool, int, float, np.generic)):
        return np.array(value)
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__"):
        return [_to_numpy(v) for v in value]
    raise TypeError(f"unexpected VM result of type {type(value).__name__}")


def _to_vm_arg(value: Any, device) -> Any:
    import tvm

    if isinstance(value, (list, tuple)):  # an ONNX sequence input is a Relax tuple
        return [_to_vm_arg(v, device) for v in value]
    # np.ascontiguousarray would turn a 0-d input into shape (1,).
    return tvm.runtime.tensor(np.asarray(value, order="C"), device)


class QiaoBackendRep(BackendRep):
    """A model compiled by qiao for the CPU, ready to run repeatedly."""

    def __init__(self, run_ordered, input_names: Sequence[str], output_names: Sequence[str]):
        self._run_ordered = run_ordered
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Run once; ``inputs`` is a list in graph-input order or a dict by input name."""
        if isinstance(inputs, dict):
            inputs = [inputs[name] for name in self.input_names]
        elif not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}"
            )
        return tuple(self._run_ordered(list(inputs)))


class QiaoBackend(Backend):
    """ONNX backend wrapping qiao's CPU compile path. Only ``"CPU"`` is supported."""

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return Device(device).type == DeviceType.CPU

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> QiaoBackendRep:
        """Compile ``model`` for the CPU with qiao; raises ``QiaoError`` subclasses on failure."""
        if not cls.supports_device(device):
            raise ValueError(f"qiao's conformance adapter runs on the CPU only, not {device!r}")
        if os.environ.get("QIAO_CONFORMANCE_ARTIFACT") == "1":
            return _prepare_artifact(model)
        return _prepare_in_memory(model)

    @classmethod
    def run_node(
        cls,
        node: onnx.NodeProto,
        inputs: Any,
        device: str = "CPU",
        outputs_info: Sequence[tuple[np.dtype, tuple[int, ...]]] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, ...]:
        """Wrap one node in a model (input types from the arrays, outputs by shape inference) and
        run it."""
        arrays = [np.asarray(x) for x in inputs]
        graph_inputs = [
            onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape
            )
            for name, a in zip(node.input, arrays)
        ]
        if outputs_info is not None:
            graph_outputs = [
                onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape
                )
                for name, (dtype, shape) in zip(node.output, outputs_info)
            ]
        else:
            graph_outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in node.output]
        opset = kwargs.get("opset_version", onnx.defs.onnx_opset_version())
        model = onnx.helper.make_model(
            onnx.helper.make_graph([node], "run_node", graph_inputs, graph_outputs),
            opset_imports=[onnx.helper.make_opsetid("", opset)],
        )
        if outputs_info is None:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
            inferred = {vi.name: vi for vi in model.graph.value_info}
            for out in model.graph.output:
                if out.name in inferred:
                    out.CopyFrom(inferred[out.name])
        return cls.prepare(model, device).run(arrays)


def _graph_io(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in init_names]
    return inputs, [o.name for o in model.graph.output]


def _in_memory_runner(executable, params, device):
    """A ``TVMRunner`` around an executable that never went to disk, so weights are prepared
    exactly as for an artifact (``main_transform_params`` included)."""
    from tvm import relax

    from qiao.backends.tvm_backend import TVMRunner

    class InMemoryRunner(TVMRunner):
        def __init__(self):  # TVMRunner.__init__ loads a library file; the rest is shared
            self.device = device
            self.executable = executable
            self.vm = relax.VirtualMachine(executable, device)
            self.params = self.prepare_params(params)

        def _args(self, inputs):
            # Also 0-d and sequence inputs (TVMRunner turns 0-d arrays into shape (1,)).
            return [_to_vm_arg(x, self.device) for x in inputs] + list(self.params)

    return InMemoryRunner()


def _prepare_in_memory(model: onnx.ModelProto) -> QiaoBackendRep:
    from qiao.backends import get_backend
    from qiao.compiler.frontend import import_onnx, lowprec

    imported = import_onnx(model)
    backend = get_backend("cpu")
    executable = backend.compile_module(imported.mod, backend.target(), {})
    runner = _in_memory_runner(executable, list(imported.params.values()), backend.device())
    input_names, output_names = _graph_io(model)

    def run_ordered(inputs: list) -> list:
        # float8/int4/... arrays in as their storage, and back (as ``Artifact.run`` does).
        inputs = lowprec.inputs_to_storage(imported.inputs, inputs)
        result = runner.vm["main"](*runner._args(inputs))
        # One graph output comes back bare (a tensor, or a tuple for an ONNX sequence), several
        # as a tuple.
        if len(output_names) == 1:
            return lowprec.outputs_from_storage(imported.outputs, [_to_numpy(result)])
        return lowprec.outputs_from_storage(imported.outputs, [_to_numpy(r) for r in result])

    return QiaoBackendRep(run_ordered, input_names, output_names)


def _prepare_artifact(model: onnx.ModelProto) -> QiaoBackendRep:
    from qiao.compiler import compile as qiao_compile

    tmp = tempfile.TemporaryDirectory(prefix="qiao-conformance-")
    artifact = qiao_compile(model, "cpu", os.path.join(tmp.name, "artifact"))
    names = [o["name"] for o in artifact.outputs]

    def run_ordered(inputs: list) -> Any:
        result = artifact.run(dict(zip([i["name"] for i in artifact.inputs], inputs)))
        return [result[n] for n in names]

    rep = QiaoBackendRep(run_ordered, *_graph_io(model))
    rep._tmp = tmp  # the directory lives as long as the rep
    return rep


__all__ = ["QiaoBackend", "QiaoBackendRep"]
