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
import tvm_ffi
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
            if op_name in BROADCASTING_OPS:
                sym = _unify_broadcast(self.bb, sym)
            elif op_name == "Concat":
                sym = _unify_concat(self.bb, sym, attrs.get("axis", 0))
            if isinstance(sym, relax.ShapeExpr) and all(
                isinstance(d, tvm.tirx.IntImm) for d in sym.values
            ):
                # A shape that became static (a symbolic shape's known dims gathered, unsqueezed,
                # sliced): a constant, as qiao's Shape converter gives, folds through any op,
                # where TVM's importer refuses ShapeExpr inputs to most ops (`Mul(dim, 2)` in the
                # GenAI fp16 builder's repeat_kv).
                sym = relax.const(np.array([int(d.value) for d in sym.values], "int64"), "int64")
        return sym


# Element-wise ops whose output shape is the multidirectional broadcast of their inputs' shapes.
BROADCASTING_OPS = frozenset(
    "Add Sub Mul Div Pow Mod Where Equal Less LessOrEqual Greater GreaterOrEqual And Or Xor "
    "Max Min Sum Mean BitwiseAnd BitwiseOr BitwiseXor BitShift PRelu".split()
)


def _shape_lost(sym) -> bool:
    """Whether ``sym`` is an op call whose result has a known rank but no inferred shape."""
    ty = getattr(sym, "ty", None)
    return (
        isinstance(sym, relax.Call)
        and isinstance(ty, relax.TensorType)
        and ty.shape is None
        and ty.ndim >= 0
    )


def _unify_broadcast(bb, sym):
    """Re-emit a broadcasting op whose result shape Relax could not infer (see
    ``convert_common.unify_broadcast_args``); anything else is returned as it is."""
    if not _shape_lost(sym):
        return sym
    from qiao.compiler.frontend.convert_common import unify_broadcast_args

    args = unify_broadcast_args(bb, list(sym.args))
    if args is None:
        return sym
    return bb.normalize(relax.Call(sym.op, args, sym.attrs, sym.ty_args))


def _unify_concat(bb, sym, axis: int):
    """Re-emit a Concat whose result shape Relax could not infer: the inputs' other dims must be
    equal, so a static one wins over a symbolic one (the GenAI fp16 builder declares the cache's
    head dim as ``kv_cache_dim`` and concatenates the new keys, head 16, to it); ``match_cast``
    checks the rest at run time."""
    ty = getattr(sym, "ty", None)
    if not _shape_lost(sym) or len(sym.args) != 1 or not isinstance(sym.args[0], relax.Tuple):
        return sym
    parts = list(sym.args[0].fields)
    shapes = [getattr(getattr(x, "ty", None), "shape", None) for x in parts]
    if not all(isinstance(s, relax.ShapeExpr) and len(s.values) == ty.ndim for s in shapes):
        return sym
    shapes = [list(s.values) for s in shapes]
    axis = axis + ty.ndim if axis < 0 else axis
    for a in range(ty.ndim):
        if a == axis:
            continue
        column = [s[a] for s in shapes]
        static = {int(d.value) for d in column if isinstance(d, tvm.tirx.IntImm)}
        if len(static) > 1:
            return sym
        plain = [d for d in column if isinstance(d, tvm.tirx.Var)]
        want = tvm.tirx.IntImm("int64", static.pop()) if static else (plain or column)[0]
        for s in shapes:
            s[a] = want
    parts = [
        x
        if all(tvm_ffi.structural_equal(a, b) for a, b in zip(x.ty.shape.values, s))
        else bb.match_cast(x, relax.TensorType(s, x.ty.dtype))
        for x, s in zip(parts, shapes)
    ]
    return bb.normalize(relax.Call(sym.op, [relax.Tuple(parts)], sym.attrs, sym.ty_args))


def _as_bfloat16(array: np.ndarray) -> np.ndarray:
    """A bfloat16 weight held as its ``uint16`` bits during the import, viewed as bfloat16."""
    import ml_dtypes

    return array.view(ml_dtypes.bfloat16)
