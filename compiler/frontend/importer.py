"""qiao's subclass of TVM's ONNX graph importer: qiao converters, weights split from constants.

Weights are NumPy arrays from the import on, never TVM tensors: TVM's function attribute views
them (DLPack), ``detach_params`` hands back those same arrays, so the import holds no second copy;
a weight still in an external data file (``load_onnx(..., keep_external=True)``) is a
copy-on-write map of that file, so it holds none at all.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from qiao.compiler.errors import InvalidModel


class QiaoImporter(onnx_frontend.ONNXGraphImporter):
    """Import with a given converter map; float initializers of ``min_param_elements`` or more
    become parameters of ``main`` (after the inputs), everything else a constant."""

    def __init__(
        self,
        convert_map: dict,
        input_shapes: dict,
        min_param_elements: int,
        external_dir: str | None = None,
    ):
        super().__init__(shape_dict=None, dtype_dict={}, keep_params_in_input=True, sanitize=True)
        self._convert_map = convert_map
        self._input_shapes = input_shapes
        self._min_param_elements = min_param_elements
        self._external_dir = external_dir  # where weights kept as external data are mapped from
        self._bfloat16: set[str] = set()  # weights held as uint16 bits during the import

    def run(self, proto: onnx.ModelProto, opset: int):
        # A copy of the graph to set input shapes in, without the initializers (weights: one
        # more copy of each), which are read from ``proto`` itself.
        graph = onnx.GraphProto()
        for field, value in proto.graph.ListFields():
            if field.name == "initializer":
                continue
            if isinstance(value, (str, bytes)):
                setattr(graph, field.name, value)
            else:
                getattr(graph, field.name).extend(value)
        self._initializers = proto.graph.initializer
        for vi in graph.input:
            shape = self._input_shapes.get(vi.name)
            if shape is None:
                continue
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shape:
                dim = dims.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = int(d)
        with warnings.catch_warnings():
            # TVM warns for every sanitised name ("fc1.weight" → "fc1_weight"); the manifest keeps
            # the ONNX names, so the renaming is invisible to users.
            warnings.filterwarnings("ignore", message="Renaming name")
            mod = self.from_onnx(graph, opset)
        mod, _ = relax.frontend.detach_params(mod)  # views of the arrays below: dropped
        params = {
            name: _as_bfloat16(array) if name in self._bfloat16 else array
            for name, (_, array) in self._params.items()
        }
        for array in params.values():
            if isinstance(array, np.memmap):  # read-only from here on: never written to the file
                array.flags.writeable = False
        return mod, params

    def _parse_graph_initializers(self, graph: onnx.GraphProto):
        for init_tensor in self._initializers:  # ``run``'s copy of the graph has none
            if not init_tensor.name.strip():
                raise ValueError("Tensor's name is required.")
            array = self._initializer_array(init_tensor)
            np_dtype = np.dtype(array.dtype)
            is_float = np_dtype.kind == "f" or np_dtype.name == "bfloat16"  # ml_dtypes: kind "V"
            if is_float and int(np.prod(array.shape)) >= self._min_param_elements:
                var_name = self._sanitize_name(init_tensor.name.removeprefix("onnx::"))
                init_var = self._new_var(var_name, shape=array.shape, dtype=str(np_dtype))
                self._nodes[init_tensor.name] = init_var
                if np_dtype.name == "bfloat16":  # DLPack (TVM's view of the weights) has no
                    array = array.view(np.uint16)  # bfloat16: its bits until ``run`` returns
                    self._bfloat16.add(var_name)
                self._params[var_name] = (init_var, array)
            else:  # a TVM tensor: relax.const would narrow a NumPy int64/float64 array
                self._nodes[init_tensor.name] = relax.const(tvm.runtime.tensor(np.asarray(array)))

    def _initializer_array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """A writable NumPy array of an initializer (TVM's DLPack view of a parameter needs
        one): a copy-on-write map of its external data file, or the proto's data."""
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data

        if not uses_external_data(tensor):
            array = onnx_frontend.get_numpy(tensor).reshape(tuple(tensor.dims))
            return array if array.flags.writeable else array.copy()
        if self._external_dir is None:
            raise InvalidModel(
                f"initializer {tensor.name!r} keeps its data in an external file but the model "
                "was given without its folder. fix: pass the .onnx path, or load the ModelProto "
                "with its external data (onnx.load(path))"
            )
        info = ExternalDataInfo(tensor)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        shape = tuple(int(d) for d in tensor.dims)
        nbytes, offset = math.prod(shape) * dtype.itemsize, int(info.offset or 0)
        path = os.path.join(self._external_dir, info.location)
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if offset + nbytes > size or (info.length is not None and int(info.length) != nbytes):
            raise InvalidModel(
                f"initializer {tensor.name!r}: {info.location!r} in {self._external_dir} does not "
                f"hold its {nbytes} bytes at offset {offset}. fix: keep the data files the model "
                "names beside it, complete and unrenamed"
            )
        if nbytes == 0:
            return np.zeros(shape, dtype)
        # "c": pages stay the file's (shared, never written) unless written to
        return np.memmap(path, dtype, "c", offset, shape)

    def _sanitize_name(self, name: str) -> str:
        # Names reach generated source as identifiers (CUDA kernel parameters are named after the
        # graph inputs): TVM's own sanitiser only replaces "."; Caffe2/TensorFlow names such as
        # "gpu_0/data_0", and any non-ASCII name, must become C identifiers on every backend.
        return super()._sanitize_name(re.sub(r"[^0-9A-Za-z_]", "_", name) if name else name)

    def _check_for_unsupported_ops(self, graph):
        # qiao.compiler.frontend.find_unsupported_ops already scanned the whole graph.
        return

    def _convert_operator(self, op_name, inputs, attrs, opset):
        converter = self._convert_map[op_name].get_converter(opset)
        sym = converter(self.bb, inputs, attrs, [self._nodes, self._params])
        if isinstance(sym, relax.Expr):
            sym = self.bb.normalize(sym)
        return sym


def _as_bfloat16(array: np.ndarray) -> np.ndarray:
    """A bfloat16 weight held as its ``uint16`` bits during the import, viewed as bfloat16."""
    import ml_dtypes

    return array.view(ml_dtypes.bfloat16)
