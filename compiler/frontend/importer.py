"""qiao's subclass of TVM's ONNX graph importer: qiao converters, weights split from constants."""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend


class QiaoImporter(onnx_frontend.ONNXGraphImporter):
    """Import with a given converter map; float initializers of ``min_param_elements`` or more
    become parameters of ``main`` (after the inputs), everything else a constant."""

    def __init__(self, convert_map: dict, input_shapes: dict, min_param_elements: int):
        super().__init__(shape_dict=None, dtype_dict={}, keep_params_in_input=True, sanitize=True)
        self._convert_map = convert_map
        self._input_shapes = input_shapes
        self._min_param_elements = min_param_elements

    def run(self, proto: onnx.ModelProto, opset: int):
        graph = onnx.GraphProto()
        graph.CopyFrom(proto.graph)
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
        mod, detached = relax.frontend.detach_params(mod)
        names = list(self._params)
        values = [a.numpy() for a in detached.get("main", [])]
        params = dict(zip(names, values))
        return mod, params

    def _parse_graph_initializers(self, graph: onnx.GraphProto):
        for init_tensor in graph.initializer:
            if not init_tensor.name.strip():
                raise ValueError("Tensor's name is required.")
            array = self._parse_array(init_tensor)
            np_dtype = np.dtype(array.dtype)
            if np_dtype.kind == "f" and int(np.prod(array.shape)) >= self._min_param_elements:
                var_name = self._sanitize_name(init_tensor.name.removeprefix("onnx::"))
                init_var = self._new_var(var_name, shape=array.shape, dtype=array.dtype)
                self._nodes[init_tensor.name] = init_var
                self._params[var_name] = (init_var, array)
            else:
                self._nodes[init_tensor.name] = relax.const(array)

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
