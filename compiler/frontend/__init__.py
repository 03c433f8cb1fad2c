"""ONNX → Relax: TVM's ONNX importer with qiao's converters and qiao's parameter handling.

``import_onnx`` is the only entry point. It loads and checks the model, scans the whole graph for
unsupported operators first (one error listing all of them), keeps ``dim_param`` dimensions
symbolic, and separates large float initializers (weights) from the graph as parameters, so that
artifacts for big models keep weights in a file beside the library instead of inside it.

qiao's own converters live in sibling modules, one per op family, and register with
``register_converter``; they take precedence over TVM's for the same op type.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from qiao.compiler.errors import CompileError, InvalidModel, QiaoError, UnsupportedOps
from qiao.compiler.options import INITIALIZER_INPUT_MODES

# Initializers with at least this many elements and a float dtype become run-time parameters;
# smaller ones (shapes, axes, scalars, tiny biases) stay constants so TVM can fold and shape-infer.
PARAM_MIN_ELEMENTS = 64

_CONVERTERS: dict[str, Any] = {}
_DOMAINS: dict[str, tuple[str, ...]] = {}  # op type -> the domains its qiao converter is for
_PROTOBUF_LIMIT = (1 << 31) - 1
# Modules whose import registers converters (kept lazy: importing them pulls in TVM).
_CONVERTER_MODULES = (
    "qiao.compiler.frontend.converters",
    "qiao.compiler.frontend.moe",
    "qiao.compiler.frontend.convert_lowprec",
)

# Operators whose domain is not the default ONNX one but which qiao understands.
KNOWN_DOMAINS = {"", "ai.onnx", "com.microsoft", "ai.onnx.preview"}


def register_converter(op_type: str, domain: str | tuple[str, ...] = ""):
    """Class decorator: use this ``OnnxOpConverter`` subclass for ``op_type`` instead of TVM's.

    TVM's importer keys converters by op type alone; ``domain`` records which domain qiao supports
    the op in, so a converter for ai.onnx ``Attention`` does not admit ``com.microsoft::Attention``.
    """

    def wrap(cls):
        _CONVERTERS[op_type] = cls
        _DOMAINS[op_type] = (domain,) if isinstance(domain, str) else tuple(domain)
        return cls

    return wrap


@dataclass
class TensorSpec:
    """Name, dtype and shape of a graph input or output; symbolic dims are strings."""

    name: str
    dtype: str
    shape: list  # int for static dims, str for symbolic ones, None when unknown

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], list(d["shape"]))


@dataclass
class ImportedModel:
    """The result of importing: a Relax module whose ``main`` takes inputs then params."""

    mod: Any  # tvm.IRModule, or None when imported with ``to_relax=False``
    params: dict[str, np.ndarray]  # in the order ``main`` takes them after the inputs
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    proto: onnx.ModelProto
    op_types: list[str] = field(default_factory=list)
    # Initializers that the graph also lists as inputs (ONNX IR < 4 style) and how they were taken:
    # "constants" (weights, folded and packed like any initializer) or "inputs" (fed at run time).
    initializer_inputs: list[str] = field(default_factory=list)
    initializer_inputs_as: str = "constants"
    # The default-domain opset the Relax import used (``opset`` upgraded by onnx's version
    # converter when the model's is older than TVM's converters understand; see upgrade_opset).
    imported_opset: int | None = None
    # The folder ``proto``'s weights still live in as external data (``load_onnx(...,
    # keep_external=True)``): ``params`` map those files, ``save_proto`` copies them.
    external_dir: str | None = None


def proto_size(proto: onnx.ModelProto) -> int:
    """Serialised size of ``proto`` in bytes; over 2 GB protobuf cannot even count it (its
    ``ByteSize`` raises), so the size is then the sum of the tensors' bytes, which exceeds it."""
    try:
        return proto.ByteSize()
    except Exception:  # google.protobuf.message.EncodeError: "Failed to serialize proto"
        return sum(len(t.raw_data) for t in iter_tensors(proto.graph)) or _PROTOBUF_LIMIT + 1


def fits_protobuf(proto: onnx.ModelProto) -> bool:
    """Whether ``proto`` can be serialised as one message (under protobuf's 2 GB limit)."""
    return proto_size(proto) < _PROTOBUF_LIMIT


def save_proto(proto: onnx.ModelProto, path: str, external_dir: str | None = None) -> None:
    """Save ``proto`` to ``path``; a model near protobuf's 2 GB limit keeps its weights as external
    data in ``<file name>.data`` beside it.

    Weights ``proto`` still keeps as external data (read from ``external_dir``, see ``load_onnx``'s
    ``keep_external``) are not read into memory: their files are copied by the kernel beside
    ``path`` as ``<file name>.data`` (``.data1``, ``.data2``... for a model with several). Not
    hard-linked: ONNX's checker refuses a data file with several links."""
    import shutil

    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    locations = sorted(
        {ExternalDataInfo(t).location for t in iter_tensors(proto.graph) if uses_external_data(t)}
    )
    if locations:
        if external_dir is None:
            raise ValueError("save_proto: the model keeps external data; pass external_dir")
        name = os.path.basename(path) + ".data"
        renamed = {loc: name + (str(i) if i else "") for i, loc in enumerate(locations)}
        out = onnx.ModelProto()
        out.CopyFrom(proto)  # only the graph: the weights are not in it
        for tensor in iter_tensors(out.graph):
            for entry in tensor.external_data if uses_external_data(tensor) else ():
                if entry.key == "location":
                    entry.value = renamed[entry.value]
        for loc, new in renamed.items():  # sendfile: no pass through this process' memory
            shutil.copyfile(
                os.path.join(external_dir, loc), os.path.join(os.path.dirname(path), new)
            )
        onnx.save(out, path)
        return
    if proto_size(proto) > (1 << 31) - (64 << 20):
        onnx.save(
            proto, path, save_as_external_data=True, location=os.path.basename(path) + ".data"
        )
    else:
        onnx.save(proto, path)


def load_onnx(model, keep_external: bool = False) -> onnx.ModelProto:
    """Read an ONNX model from a path (or take a ``ModelProto``) and check it is well formed.

    ``keep_external``: weights a file keeps as external data (float initializers that become
    parameters, see ``keeps_external``) stay there: the proto holds their locations only, and
    the importer maps them from the files beside ``model`` (``import_onnx``'s ``external_dir``)
    instead of holding one more copy of every weight. Everything else is read as usual.
    """
    from qiao.compiler.frontend.contrib_schemas import register_ort_default_domain_schemas

    register_ort_default_domain_schemas()  # before the checker sees ORT GenAI's decoders
    if isinstance(model, onnx.ModelProto):
        proto = model
        where = "the given ModelProto"
    else:
        path = os.fspath(model)
        where = path
        if not os.path.isfile(path):
            raise InvalidModel(
                f"{path}: no such file. fix: pass the path to an existing .onnx file"
            )
        try:
            # The graph first, without external data: a model with external data over 2 GB
            # cannot be serialised (not even sized) by protobuf once its tensors are loaded.
            proto = onnx.load(path, load_external_data=False)
        except Exception as err:  # protobuf raises DecodeError, RuntimeError, ...
            raise InvalidModel(
                f"{path} is not a readable ONNX model ({type(err).__name__}: {err}). "
                "fix: re-export it, or check the file is complete (truncated copies fail this way)"
            ) from err
    if not proto.graph.node and not proto.graph.output:
        raise InvalidModel(
            f"{where} holds no ONNX graph (empty or not an ONNX file). fix: pass a model exported "
            "with torch.onnx.export or another ONNX exporter"
        )
    from qiao.compiler.frontend.guards import (
        check_constant_sizes,
        check_external_data,
        check_graph,
    )

    if not isinstance(model, onnx.ModelProto):
        check_external_data(proto, os.fspath(model))  # before the checker opens any of them
    try:
        if not isinstance(model, onnx.ModelProto):
            # By path: the checker reads the file and finds external data beside it; nothing
            # over 2 GB is ever serialised.
            onnx.checker.check_model(os.fspath(model))
        elif fits_protobuf(proto):
            onnx.checker.check_model(proto)
        # An in-memory model over 2 GB cannot be serialised for the checker; it came from qiao's
        # own exporter (or the caller), and the importer still rejects anything malformed.
    except Exception as err:
        raise InvalidModel(
            f"{where} fails the ONNX checker: {str(err).strip().splitlines()[0]}. "
            "fix: re-export the model; a truncated or hand-edited file fails this way"
        ) from err
    check_graph(proto, where)
    check_constant_sizes(proto, where)
    if not isinstance(model, onnx.ModelProto):
        _load_external_data(proto, os.fspath(model), keep_external)
    return proto


def keeps_external(tensor: onnx.TensorProto, min_elements: int = PARAM_MIN_ELEMENTS) -> bool:
    """Whether a graph initializer is a weight (a float16/32/64 tensor of ``min_elements`` or
    more: a parameter of ``main``) that ``load_onnx(keep_external=True)`` leaves in its file."""
    try:
        kind = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).kind
    except (KeyError, ValueError, TypeError):  # not a tensor type: read it, the checks judge it
        return False
    return kind == "f" and math.prod(tensor.dims) >= min_elements


def _load_external_data(proto: onnx.ModelProto, path: str, keep_weights: bool = False) -> None:
    """Read the tensors a model keeps in external files (beside ``path``) into ``proto``; with
    ``keep_weights``, all but the graph's weights (``keeps_external``)."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    graph = proto.graph
    initializers = [t for t in graph.initializer if not (keep_weights and keeps_external(t))]
    # iter_tensors yields the graph's initializers first, then node attributes and subgraphs
    nested = itertools.islice(iter_tensors(graph), len(graph.initializer), None)
    tensors = [t for t in (*initializers, *nested) if uses_external_data(t)]
    base = os.path.dirname(os.path.abspath(path))
    try:
        for tensor in tensors:  # what onnx's load_external_data_for_model does, per tensor
            load_external_data_for_tensor(tensor, base)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    except Exception as err:  # missing/short data file, a location outside the folder, ...
        raise InvalidModel(
            f"{path}: cannot read its external data ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'}). "
            "fix: keep the data files the model names beside it, complete and unrenamed"
        ) from err


def iter_tensors(graph: onnx.GraphProto):
    """Every tensor of a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_tensors(g)


def _convert_map():
    from tvm.relax.frontend.onnx import onnx_frontend

    for mod in _CONVERTER_MODULES:
        importlib.import_module(mod)
    return {**onnx_frontend._get_convert_map(), **_CONVERTERS}


def _iter_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


def find_unsupported_ops(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """``{op_type: [node names]}`` for every node qiao cannot convert (subgraphs included)."""
    convert_map = _convert_map()
    handled = {"If", "Constant"}
    bad: dict[str, list[str]] = {}
    for i, node in enumerate(_iter_nodes(proto.graph)):
        domain = node.domain or ""
        key = node.op_type if domain in ("", "ai.onnx") else f"{domain}::{node.op_type}"
        ok = domain in KNOWN_DOMAINS and (node.op_type in convert_map or node.op_type in handled)
        if domain in ("com.microsoft", "ai.onnx.preview") and domain not in _DOMAINS.get(
            node.op_type, ()
        ):
            ok = False
        if not ok:
            bad.setdefault(key, []).append(node.name or f"<unnamed node #{i}>")
    return bad


def _elem_dtype(elem_type: int) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _value_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    shape: list = []
    if tt.HasField("shape"):
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(None)
    dtype = _elem_dtype(tt.elem_type) if tt.elem_type else "float32"
    return TensorSpec(vi.name, dtype, shape)


def split_initializer_inputs(proto: onnx.ModelProto, mode: str) -> tuple[onnx.ModelProto, list]:
    """Resolve initializers that are also listed in ``graph.input`` (allowed before IR version 4,
    and what Caffe2-converted zoo files do for every weight).

    ``mode="constants"`` drops them from the inputs (the initializer is the value; the graph's
    weights then fold and pack like any other), ``"inputs"`` drops the floating-point initializers
    instead, so the caller feeds those weights at run time; integer ones (shapes, axes, indices)
    stay constants either way, since a shape fed at run time would make every shape after it
    data-dependent. Returns the (possibly new) proto and the names taken as ``mode`` says.
    """
    if mode not in INITIALIZER_INPUT_MODES:
        raise QiaoError(
            f"initializer_inputs={mode!r} is not a mode. fix: use one of "
            + ", ".join(INITIALIZER_INPUT_MODES)
        )
    init = {t.name: t for t in proto.graph.initializer}
    listed = [vi.name for vi in proto.graph.input if vi.name in init]
    if not listed:
        return proto, []

    def is_float(name: str) -> bool:
        return onnx.helper.tensor_dtype_to_np_dtype(init[name].data_type).kind == "f"

    fed = [n for n in listed if is_float(n)] if mode == "inputs" else []
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    as_constants = set(listed) - set(fed)
    kept_inputs = [vi for vi in graph.input if vi.name not in as_constants]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    # Before IR version 4 every initializer must also be an input: onnx's version converter
    # (upgrade_opset) rejects the result as using undefined inputs, and the import then stayed at
    # the old opset (Pad-2 in AlexNet's LRN failed as "dynamic pads").
    out.ir_version = max(out.ir_version, 4)
    if fed:
        kept_init = [t for t in graph.initializer if t.name not in set(fed)]
        del graph.initializer[:]
        graph.initializer.extend(kept_init)
    return out, (fed if mode == "inputs" else listed)


# Opsets below this have operators whose old form TVM's importer lacks (it then silently picks a
# newer converter): Slice 1-9 (attributes), Upsample, Resize 10, Pad 2-10, TopK 1-9.
UPGRADE_BELOW_OPSET = 11


def upgrade_opset(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The model at opset ``UPGRADE_BELOW_OPSET`` if it is older, through onnx's version converter
    (which knows every operator's semantic changes), and the opset the result has.

    Models the converter cannot take (experimental operators without a schema, such as
    ImageScaler; protos over 2 GB) stay as they are: qiao's converters then see the old opset.
    """
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset >= UPGRADE_BELOW_OPSET or not fits_protobuf(proto):
        return proto, opset
    if opset < 9 and any(n.op_type == "Scan" for n in _iter_nodes(proto.graph)):
        # onnx's Scan 8 -> 9 adapter drops the batch axis' meaning (the scan then runs over the
        # batch); qiao's Scan converter implements the batched opset-8 form itself.
        return proto, opset
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(proto, UPGRADE_BELOW_OPSET)
    except Exception:  # noqa: BLE001 - an op without an adapter: import at the original opset
        return proto, opset
    # Upsample (any opset) and Resize-10 sample at asymmetric coordinates (x_in = x_out / scale;
    # nearest rounds down, or up when shrinking, as ONNX Runtime does); the converter's Resize-11
    # keeps the new default, half_pixel, which differs for linear modes and non-integer scales.
    constants = {t.name: t for t in proto.graph.initializer}
    rounding = {}
    for n in _iter_nodes(proto.graph):
        if n.op_type in ("Upsample", "Resize"):
            scales = constants.get(n.input[1]) if len(n.input) > 1 else None
            shrink = scales is not None and bool(
                (onnx.numpy_helper.to_array(scales) < 1).any()
                and (onnx.numpy_helper.to_array(scales) <= 1).all()
            )
            rounding[n.output[0]] = "ceil" if shrink else "floor"
    for node in _iter_nodes(upgraded.graph):
        if node.op_type == "Resize" and node.output[0] in rounding:
            kept = [
                a
                for a in node.attribute
                if a.name not in ("coordinate_transformation_mode", "nearest_mode")
            ]
            del node.attribute[:]
            node.attribute.extend(kept)
            node.attribute.extend(
                [
                    onnx.helper.make_attribute("coordinate_transformation_mode", "asymmetric"),
                    onnx.helper.make_attribute("nearest_mode", rounding[node.output[0]]),
                ]
            )
    return upgraded, UPGRADE_BELOW_OPSET


def import_onnx(
    model,
    shape_dict: dict | None = None,
    to_relax: bool = True,
    initializer_inputs: str = "constants",
    kv_cache: str | None = None,
    external_dir: str | None = None,
) -> ImportedModel:
    """Import an ONNX model (path or ``ModelProto``) into Relax.

    Parameters
    ----------
    model : str, os.PathLike or onnx.ModelProto
    shape_dict : dict, optional
        ``{input_name: shape}`` overriding the model's input shapes (ints or symbolic names).
    to_relax : bool
        False for hand-off backends that consume ONNX themselves: check and describe the model only.
    initializer_inputs : {"constants", "inputs"}
        How initializers also listed as graph inputs are taken (see ``split_initializer_inputs``).
    kv_cache : {"copy", "inplace"}, optional
        ``GroupQueryAttention``'s cache update (``convert_genai.gqa_lowering``; default copy).
    external_dir : str, optional
        For a ``ModelProto`` read with ``load_onnx(path, keep_external=True)``: the folder of
        ``path``, where its weights are mapped from. A path ``model`` is read that way itself
        (``to_relax``): ``params`` are then read-only maps of its external data files, not copies.

    Returns
    -------
    ImportedModel
    """
    if isinstance(model, onnx.ModelProto) and external_dir is not None:
        proto = model  # checked by load_onnx when it was read from its file
        if not to_relax:  # hand-off backends read the weights from the proto itself
            _load_external_data(proto, os.path.join(external_dir, "model.onnx"))
            external_dir = None
    else:
        proto = load_onnx(model, keep_external=to_relax)
        lazy = to_relax and not isinstance(model, onnx.ModelProto)
        external_dir = os.path.dirname(os.path.abspath(os.fspath(model))) if lazy else None
    proto, init_inputs = split_initializer_inputs(proto, initializer_inputs)
    if to_relax:
        bad = find_unsupported_ops(proto)
        if bad:
            raise UnsupportedOps(bad)

    init_names = {t.name for t in proto.graph.initializer}
    inputs = [_value_spec(i) for i in proto.graph.input if i.name not in init_names]
    outputs = [_value_spec(o) for o in proto.graph.output]
    for spec in inputs:
        if shape_dict and spec.name in shape_dict:
            spec.shape = list(shape_dict[spec.name])
        if any(d is None for d in spec.shape):
            # An unnamed dynamic dim: give it a name so it stays symbolic and shows in the manifest.
            spec.shape = [
                f"{spec.name}_dim{i}" if d is None else d for i, d in enumerate(spec.shape)
            ]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    op_types = sorted({n.op_type for n in _iter_nodes(proto.graph)})
    extra = {"initializer_inputs": init_inputs, "initializer_inputs_as": initializer_inputs}
    if not to_relax:
        return ImportedModel(None, {}, inputs, outputs, opset, proto, op_types, **extra)

    from qiao.compiler.frontend.convert_genai import gqa_lowering
    from qiao.compiler.frontend.importer import QiaoImporter
    from qiao.compiler.frontend.lowprec import lower_low_precision

    importer = QiaoImporter(
        _convert_map(), {s.name: s.shape for s in inputs}, PARAM_MIN_ELEMENTS, external_dir
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TVM prints "Error converting operator ..." itself
            # float8/float4/int4/int2 tensors in a storage type TVM has (the specs above keep the
            # ONNX dtypes; the runner converts at the boundary).
            relax_proto, imported_opset = upgrade_opset(lower_low_precision(proto))
            with gqa_lowering(kv_cache):
                mod, params = importer.run(relax_proto, imported_opset)
    except QiaoError:
        raise
    except Exception as err:
        _close_blocks(importer.bb)
        where = " ".join(log.getvalue().split())[:300] or "while importing"
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CompileError(
            f"TVM's ONNX importer failed: {where}: {detail}. "
            "fix: rerun with --debug for the trace; "
            "a converter in a qiao.compiler.frontend.convert_* module can override TVM's for the op"
        ) from err
    _correct_output_shapes(outputs, mod)
    _check_output_kinds(outputs, mod)
    return ImportedModel(
        mod,
        params,
        inputs,
        outputs,
        opset,
        proto,
        op_types,
        **extra,
        imported_opset=imported_opset,
        external_dir=external_dir,
    )


_PLAIN_DTYPES = frozenset(
    ["bool", "float16", "float32", "float64"]
    + [f"{s}int{b}" for s in ("", "u") for b in (8, 16, 32, 64)]
)


def _check_output_kinds(outputs: list[TensorSpec], mod) -> None:
    """Refuse a model whose declared output type is of another kind (float vs integer or bool)
    than what the graph computes: the manifest would lie about what ``run`` returns."""
    from tvm import relax

    ty = mod["main"].ret_ty
    types = list(ty.fields) if isinstance(ty, relax.TupleType) else [ty]
    if len(types) != len(outputs):
        return
    for spec, out_ty in zip(outputs, types):
        derived = getattr(out_ty, "dtype", "")
        if not isinstance(out_ty, relax.TensorType) or not derived:
            continue
        if spec.dtype not in _PLAIN_DTYPES or str(derived) not in _PLAIN_DTYPES:
            continue  # float8/int4/bfloat16...: stored as another type, converted by the runner
        kinds = np.dtype(spec.dtype).kind, np.dtype(str(derived)).kind
        if (kinds[0] == "f") != (kinds[1] == "f"):
            raise InvalidModel(
                f"output {spec.name!r} is declared {spec.dtype} but the graph computes {derived}. "
                "fix: correct the output's type in the model (re-export it)"
            )


def _close_blocks(bb) -> None:
    """End the binding blocks a failed import left open: TVM otherwise prints "BlockBuilder
    destroyed with remaining blocks!" on stderr when the builder is collected."""
    for _ in range(16):
        try:
            bb._end_block()
        except Exception:  # noqa: BLE001 - none left open
            return


def _correct_output_shapes(outputs: list[TensorSpec], mod) -> None:
    """Give each output spec the shape the import derived where the model's declaration is wrong
    (a different rank or static size: hand-edited files, stale value_info) or unknown, so the
    manifest tells the truth. Symbolic names of the declaration are kept where they fit."""
    from tvm import relax, tirx

    ty = mod["main"].ret_ty
    types = list(ty.fields) if isinstance(ty, relax.TupleType) else [ty]
    if len(types) != len(outputs):
        return
    for spec, out_ty in zip(outputs, types):
        shape = getattr(out_ty, "shape", None)
        if not isinstance(out_ty, relax.TensorType) or not isinstance(shape, relax.ShapeExpr):
            continue
        derived = [int(d) if isinstance(d, tirx.IntImm) else str(d) for d in shape.values]
        declared = spec.shape
        wrong = len(declared) != len(derived) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(declared, derived)
        )
        if wrong:
            spec.shape = derived
        else:
            spec.shape = [
                b if a is None or (isinstance(b, int) and not isinstance(a, int)) else a
                for a, b in zip(declared, derived)
            ]


__all__ = [
    "ImportedModel",
    "TensorSpec",
    "find_unsupported_ops",
    "fits_protobuf",
    "import_onnx",
    "iter_tensors",
    "load_onnx",
    "proto_size",
    "register_converter",
    "split_initializer_inputs",
    "upgrade_opset",
]
