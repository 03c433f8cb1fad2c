"""Converters for operators whose output shape depends on input *values* given at run time:
TopK with a run-time ``k``, Resize/Upsample with run-time ``scales``/``sizes``/``roi``.

TVM's converters need those values at import time ("TopK k must be a constant"). Here the value
becomes a shape through ``tensor_to_shape`` and a ``match_cast`` to fresh symbolic dims, so the
compiled function has a data-dependent output shape. Constant values still go to TVM's converters,
whose kernels are faster for the shapes they know.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.errors import CompileError
from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import (
    is_symbolic_value,
    materialize,
    runtime_shape,
    static_dims,
)


def _constant(x, params):
    """``x`` as a NumPy array when it is a constant at import time, else ``None``."""
    if x is None:
        return None
    c = tvm_onnx.get_constant(x, params)
    return c.value.numpy() if isinstance(c, tvm.ir.GenericConst) else None


# --- TopK -----------------------------------------------------------------------------------------
@register_converter("TopK")
class TopK(tvm_onnx.OnnxOpConverter):
    """TopK whose ``k`` is a run-time input: sort the whole axis (TVM's ``topk`` with k = the axis
    length keeps ONNX's order for ties, lower index first), then keep the first ``k`` along the
    axis, ``k`` being a symbolic dim bound to the input's value."""

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        data, k_input = inputs[0], inputs[1]
        if _constant(k_input, params) is not None:
            return tvm_onnx.TopK._impl_v11(bb, inputs, {**attr, "sorted": 1}, params)
        dims = static_dims(data)
        rank = data.ty.ndim
        axis = int(attr.get("axis", -1))
        axis = axis + rank if axis < 0 else axis
        length = dims[axis] if dims is not None else None
        if length is None:
            raise CompileError(
                "TopK with a run-time k needs a static length of the sorted axis. fix: give the "
                "model's inputs static shapes, or make k a constant"
            )
        largest = int(attr.get("largest", 1))
        dtype = str(data.ty.dtype)
        key = data
        if dtype.startswith("uint"):
            # TVM's CPU sort kernel takes no unsigned types: sort an int64 key of the same order
            # (uint64 with its top bit flipped), then gather the values from the data.
            if dtype == "uint64":
                key = relax.op.bitwise_xor(data, relax.const(np.uint64(1 << 63), "uint64"))
            key = bb.normalize(relax.op.astype(key, "int64"))
        both = bb.emit(
            relax.op.topk(key, length, axis, ret_type="both", largest=bool(largest), dtype="int64")
        )
        if key is not data:
            order = bb.emit(relax.TupleGetItem(both, 1))
            values = relax.op.gather_elements(data, order, axis)
            both = bb.emit(relax.Tuple([bb.normalize(values), order]))
        k_tensor = bb.normalize(relax.op.reshape(relax.op.astype(k_input, "int64"), (1,)))
        (k,) = runtime_shape(bb, k_tensor, 1, "topk_k").values
        # ``take`` of ``arange(k)`` rather than ``strided_slice(..., end=k)``: the slice's shape
        # clamps ``k`` with an ``if_then_else`` that TVM's shape lowering cannot type.
        first = bb.normalize(relax.op.arange(0, k, 1, "int64"))
        outs = []
        for i in range(2):
            item = bb.emit(relax.TupleGetItem(both, i))
            outs.append(bb.normalize(relax.op.take(item, first, axis=axis)))
        return relax.Tuple(outs)

    _impl_v10 = _impl_v11
    _impl_v1 = tvm_onnx.TopK._impl_v1  # k is an attribute


# --- Resize / Upsample ----------------------------------------------------------------------------
def _f64(bb, x):
    return bb.normalize(relax.op.astype(x, "float64"))


def _item(bb, vec, i: int):
    """Element ``i`` of a 1-D tensor as a 0-d tensor."""
    return bb.normalize(relax.op.squeeze(relax.op.strided_slice(vec, [0], [i], [i + 1]), [0]))


def _source_coordinates(bb, mode: str, y, scale, in_len: int, out_len, roi):
    """The source coordinate of every output index ``y`` (float64 [n]) along one axis, as in
    onnx's reference ``_compute_x_ori``; also the extrapolation mask for tf_crop_and_resize."""
    op = relax.op
    f = relax.const
    width = bb.normalize(op.multiply(scale, f(float(in_len), "float64")))  # may be fractional
    centred = op.subtract(op.divide(op.add(y, f(0.5, "float64")), scale), f(0.5, "float64"))
    one_wide = op.equal(width, f(1.0, "float64"))
    if mode == "asymmetric":
        return op.divide(y, scale), None
    if mode == "half_pixel":
        return centred, None
    if mode == "pytorch_half_pixel":
        return op.where(one_wide, f(-0.5, "float64"), centred), None
    if mode == "half_pixel_symmetric":
        adjustment = op.divide(out_len, width)
        offset = op.multiply(f(in_len / 2, "float64"), op.subtract(f(1.0, "float64"), adjustment))
        return op.add(offset, centred), None
    if mode == "align_corners":
        ratio = op.divide(f(float(in_len - 1), "float64"), op.subtract(width, f(1.0, "float64")))
        return op.where(one_wide, f(0.0, "float64"), op.multiply(y, ratio)), None
    if mode == "tf_crop_and_resize":
        start, end = roi
        span = op.multiply(op.subtract(end, start), f(float(in_len - 1), "float64"))
        x = op.where(
            one_wide,
            op.divide(span, f(2.0, "float64")),
            op.divide(op.multiply(y, span), op.subtract(width, f(1.0, "float64"))),
        )
        x = bb.normalize(op.add(x, op.multiply(start, f(float(in_len - 1), "float64"))))
        outside = op.logical_or(
            op.less(x, f(0.0, "float64")), op.greater(x, f(float(in_len - 1), "float64"))
        )
        return x, bb.normalize(outside)
    raise CompileError(
        f"Resize: unknown coordinate_transformation_mode {mode!r}. fix: use one of the modes "
        "the ONNX specification lists"
    )


def _nearest_index(x, mode: str, downsampling=None):
    op = relax.op
    half = relax.const(0.5, "float64")
    if mode == "round_prefer_floor":
        return op.ceil(op.subtract(x, half))
    if mode == "round_prefer_ceil":
        return op.floor(op.add(x, half))
    if mode == "floor":
        return op.floor(x)
    if mode == "ceil":
        return op.ceil(x)
    if mode == "simple":  # Resize-10 / Upsample: truncate, but round up when downsampling
        return op.where(downsampling, op.ceil(x), op.floor(x))
    raise CompileError(
        f"Resize: unknown nearest_mode {mode!r}. fix: use round_prefer_floor, round_prefer_ceil, "
        "floor or ceil"
    )


def _kernel(t, mode: str, a: float):
    """Interpolation weight at distance ``t`` (float64): linear tent or Keys cubic."""
    op = relax.op
    f = relax.const
    t = op.abs(t)
    if mode == "linear":
        return op.maximum(op.subtract(f(1.0, "float64"), t), f(0.0, "float64"))
    t2 = op.multiply(t, t)
    t3 = op.multiply(t2, t)
    near = op.add(
        op.subtract(op.multiply(f(a + 2, "float64"), t3), op.multiply(f(a + 3, "float64"), t2)),
        f(1.0, "float64"),
    )
    far = op.add(
        op.subtract(op.multiply(f(a, "float64"), t3), op.multiply(f(5 * a, "float64"), t2)),
        op.subtract(op.multiply(f(8 * a, "float64"), t), f(4 * a, "float64")),
    )
    zero = f(0.0, "float64")
    return op.where(
        op.less_equal(t, f(1.0, "float64")),
        near,
        op.where(op.less(t, f(2.0, "float64")), far, zero),
    )


def _resize_axis(bb, data, axis: int, out_len, scale, roi, attr: dict):
    """Resize float64 ``data`` along ``axis`` to ``out_len`` (a symbolic dim)."""
    op = relax.op
    f = relax.const
    in_len = int(data.ty.shape.values[axis])  # static: each axis is resized once
    mode = attr["mode"]
    y = bb.normalize(op.astype(op.arange(0, out_len, 1, "int64"), "float64"))
    out_t = bb.normalize(op.astype(op.shape_to_tensor(relax.ShapeExpr([out_len])), "float64"))
    out_t = _item(bb, out_t, 0)
    x, outside = _source_coordinates(bb, attr["ctm"], y, scale, in_len, out_t, roi)
    x = bb.normalize(x)
    if mode == "nearest":
        down = op.less(scale, f(1.0, "float64"))
        idx = _nearest_index(x, attr["nearest_mode"], down)
        idx = op.clip(op.astype(idx, "int64"), 0, in_len - 1)
        out = bb.normalize(op.take(data, bb.normalize(idx), axis=axis))
    else:
        # Weights over "virtual" source positions p (the input edge-padded far enough for any
        # tap), folded onto the real positions by clamping p, as onnx's reference pads with
        # 'edge'. Antialiasing widens the kernel by 1/scale when downsampling.
        reach = 2 * in_len + 4
        virtual = np.arange(-reach, in_len + reach, dtype=np.float64)
        dist = op.subtract(op.expand_dims(f(virtual, "float64"), 0), op.expand_dims(x, 1))
        antialias = bool(attr["antialias"])
        if antialias:
            dist = op.multiply(dist, op.minimum(scale, f(1.0, "float64")))
        w = _kernel(dist, mode, attr["cubic_coeff_a"])
        if attr["exclude_outside"]:
            inside = ((virtual >= 0) & (virtual <= in_len - 1)).astype(np.float64)
            w = op.multiply(w, f(inside, "float64"))
        if antialias or attr["exclude_outside"]:
            total = op.sum(w, axis=[1], keepdims=True)
            total = op.where(op.equal(total, f(0.0, "float64")), f(1.0, "float64"), total)
            w = op.divide(w, total)
        fold = np.zeros((virtual.size, in_len), np.float64)
        fold[np.arange(virtual.size), np.clip(virtual, 0, in_len - 1).astype(np.int64)] = 1.0
        w = bb.normalize(op.matmul(w, f(fold, "float64")))  # [out, in]
        rank = data.ty.ndim
        perm = [d for d in range(rank) if d != axis] + [axis]
        moved = op.matmul(op.permute_dims(data, perm), op.permute_dims(w))
        back = [0] * rank
        for i, d in enumerate(perm):
            back[d] = i
        out = bb.normalize(op.permute_dims(moved, back))
    if outside is not None:
        shape = [1] * data.ty.ndim
        shape[axis] = -1
        mask = op.reshape(outside, [out_len if s == -1 else 1 for s in shape])
        out = bb.normalize(op.where(mask, f(float(attr["extrapolation_value"]), "float64"), out))
    return out


def resize_runtime(bb, data, roi, scales, sizes, attr: dict):
    """Resize ``data`` with ``scales``/``sizes``/``roi`` known only at run time (any of them may
    also be constants), following onnx's reference implementation: separable, one axis at a
    time, in float64, then cast back to the data type.

    Parameters
    ----------
    bb : relax.BlockBuilder
    data : relax.Expr
        The tensor to resize; its shape must be static.
    roi, scales, sizes : relax.Expr or None
        The Resize inputs (``None`` when absent or empty).
    attr : dict
        ``mode``, ``ctm`` (coordinate transformation mode), ``nearest_mode``, ``cubic_coeff_a``,
        ``exclude_outside``, ``extrapolation_value``, ``antialias``, ``axes`` (or ``None``),
        ``keep_aspect_ratio_policy``.

    Returns
    -------
    relax.Expr
        The resized tensor, with a symbolic dim for every resized axis.
    """
    op = relax.op
    f = relax.const
    dims = static_dims(data)
    if dims is None:
        raise CompileError(
            "Resize with run-time scales or sizes needs the data's shape static. fix: give the "
            "model's inputs static shapes"
        )
    rank = len(dims)
    axes = [a + rank if a < 0 else a for a in (attr["axes"] or range(rank))]
    in_lens = f(np.array([dims[a] for a in axes], np.float64), "float64")
    if sizes is not None:
        sizes = _f64(bb, sizes)
        factors = bb.normalize(op.divide(sizes, in_lens))
        policy = attr["keep_aspect_ratio_policy"]
        if policy in ("not_larger", "not_smaller"):
            reduce = op.min if policy == "not_larger" else op.max
            common = bb.normalize(reduce(factors, axis=[0], keepdims=True))
            factors = bb.normalize(op.broadcast_to(common, (len(axes),)))
            sizes = op.floor(op.add(op.multiply(factors, in_lens), f(0.5, "float64")))
        out = bb.normalize(op.astype(sizes, "int64"))
    else:
        factors = _f64(bb, scales)
        out = bb.normalize(op.astype(op.floor(op.multiply(factors, in_lens)), "int64"))
    out_lens = runtime_shape(bb, out, len(axes), "resize").values
    if roi is not None:
        roi = _f64(bb, roi)
    result = _f64(bb, data)
    for i, axis in enumerate(axes):
        pair = None
        if attr["ctm"] == "tf_crop_and_resize":
            if roi is None:
                raise CompileError(
                    "Resize: tf_crop_and_resize needs the roi input. fix: pass roi to the node"
                )
            pair = (_item(bb, roi, i), _item(bb, roi, len(axes) + i))
        result = _resize_axis(bb, result, axis, out_lens[i], _item(bb, factors, i), pair, attr)
    dtype = str(data.ty.dtype)
    if "int" in dtype:
        info = np.iinfo(dtype)
        result = op.clip(op.round(result), float(info.min), float(info.max))
    return bb.normalize(op.astype(result, dtype))


def _nonempty(x, params):
    """``x`` unless it is absent or a constant with no elements."""
    if x is None:
        return None
    value = _constant(x, params)
    if value is not None and value.size == 0:
        return None
    return x


def _text(value, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


@register_converter("Resize")
class Resize(tvm_onnx.OnnxOpConverter):
    """Resize with ``scales``, ``sizes`` or ``roi`` given at run time (any opset); TVM's
    converter still handles the all-constant case."""

    @classmethod
    def _run_time(cls, inputs, params) -> bool:
        return any(
            x is not None and not is_symbolic_value(x) and _constant(x, params) is None
            for x in inputs[1:]
        )

    @classmethod
    def _tvm_first(cls, bb, inputs, attr, params, tvm_impl):
        """TVM's converter for constants and symbolic sizes (a ``ShapeExpr`` keeps the output
        dims tied to the input's); ``None`` when the run-time path must take over, with symbolic
        values then as tensors."""
        if cls._run_time(inputs, params):
            return None
        try:
            return tvm_impl(bb, inputs, attr, params)
        except Exception:  # noqa: BLE001 - TVM refuses some symbolic sizes; ours takes them
            if not any(isinstance(x, relax.ShapeExpr) for x in inputs[1:]):
                raise
            return None

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        out = cls._tvm_first(bb, inputs, attr, params, tvm_onnx.Resize._impl_v10)
        if out is not None:
            return out
        inputs = tvm_onnx.onnx_input(materialize(bb, x) for x in inputs)
        opts = cls._options(attr, ctm="asymmetric", nearest_mode="simple")
        return resize_runtime(bb, inputs[0], None, inputs[1], None, opts)

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        out = cls._tvm_first(bb, inputs, attr, params, tvm_onnx.Resize._impl_v18)
        if out is not None:
            return out
        inputs = tvm_onnx.onnx_input(materialize(bb, x) for x in inputs)
        roi = _nonempty(inputs[1] if len(inputs) > 1 else None, params)
        scales = _nonempty(inputs[2] if len(inputs) > 2 else None, params)
        sizes = _nonempty(inputs[3] if len(inputs) > 3 else None, params)
        return resize_runtime(bb, inputs[0], roi, scales, sizes, cls._options(attr))

    _impl_v13 = _impl_v18 = _impl_v19 = _impl_v11

    @staticmethod
    def _options(attr: dict, ctm: str = "half_pixel", nearest_mode: str = "round_prefer_floor"):
        mode = _text(attr.get("mode"), "nearest")
        return {
            "mode": "linear" if mode in ("bilinear", "trilinear") else mode,
            "ctm": _text(attr.get("coordinate_transformation_mode"), ctm),
            "nearest_mode": _text(attr.get("nearest_mode"), nearest_mode),
            "cubic_coeff_a": float(attr.get("cubic_coeff_a", -0.75)),
            "exclude_outside": int(attr.get("exclude_outside", 0)),
            "extrapolation_value": float(attr.get("extrapolation_value", 0.0)),
            "antialias": int(attr.get("antialias", 0)),
            "axes": list(attr["axes"]) if "axes" in attr else None,
            "keep_aspect_ratio_policy": _text(attr.get("keep_aspect_ratio_policy"), "stretch"),
        }


@register_converter("Upsample")
class Upsample(tvm_onnx.OnnxOpConverter):
    """Upsample (opset 9) with run-time ``scales``: Resize-10 semantics (asymmetric
    coordinates, truncating nearest)."""

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        if _constant(inputs[1], params) is not None:
            return tvm_onnx.Upsample._impl_v9(bb, inputs, attr, params)
        return Resize._impl_v10(bb, inputs, attr, params)


# --- AffineGrid -----------------------------------------------------------------------------------
@register_converter("AffineGrid")
class AffineGrid(tvm_onnx.OnnxOpConverter):
    """AffineGrid with the output ``size`` given at run time: the normalised sampling coordinates
    of every spatial axis (a symbolic length each) combined with ``theta`` by broadcasting, as in
    onnx's reference (float64 coordinates, result in theta's type)."""

    @classmethod
    def _impl_v20(cls, bb, inputs, attr, params):
        theta, size = inputs[0], inputs[1]
        if _constant(size, params) is not None:
            return tvm_onnx.AffineGrid._impl_v20(bb, inputs, attr, params)
        op = relax.op
        f = relax.const
        n_size = static_dims(size)
        if n_size is None or n_size[0] not in (4, 5):
            raise CompileError(
                "AffineGrid: size must be an int64 tensor of length 4 or 5. fix: check the model"
            )
        spatial = n_size[0] - 2
        dims = runtime_shape(bb, bb.normalize(op.astype(size, "int64")), n_size[0], "grid")
        lengths = list(dims.values)[2:]
        align = int(attr.get("align_corners", 0))
        theta64 = _f64(bb, theta)  # [N, spatial, spatial + 1]
        out = None
        # Homogeneous coordinates are ordered (x, y[, z], 1): x runs along the last axis.
        for k in range(spatial + 1):
            coef = bb.normalize(op.strided_slice(theta64, [2], [k], [k + 1]))  # [N, spatial, 1]
            coef = bb.normalize(
                op.reshape(coef, [-1] + [1] * spatial + [spatial])
            )  # [N, 1.., spatial]
            if k == spatial:
                term = coef
            else:
                axis = spatial - 1 - k  # position among the spatial axes
                n = lengths[axis]
                i = bb.normalize(op.astype(op.arange(0, n, 1, "int64"), "float64"))
                n_vec = bb.normalize(op.astype(op.shape_to_tensor(relax.ShapeExpr([n])), "float64"))
                n_t = _item(bb, n_vec, 0)
                if align:
                    step = op.divide(
                        f(2.0, "float64"),
                        op.maximum(op.subtract(n_t, f(1.0, "float64")), f(1.0, "float64")),
                    )
                    coord = op.subtract(op.multiply(i, step), f(1.0, "float64"))
                    # One sample sits at the centre, 0, as in PyTorch and ONNX Runtime (onnx's
                    # reference puts it at -1).
                    coord = op.where(op.equal(n_t, f(1.0, "float64")), f(0.0, "float64"), coord)
                else:
                    coord = op.subtract(
                        op.divide(
                            op.add(op.multiply(i, f(2.0, "float64")), f(1.0, "float64")), n_t
                        ),
                        f(1.0, "float64"),
                    )
                shape = [1] * (spatial + 2)
                shape[1 + axis] = n
                term = op.multiply(coef, op.reshape(bb.normalize(coord), shape))
            out = bb.normalize(term if out is None else op.add(out, term))
        return bb.normalize(op.astype(out, str(theta.ty.dtype)))


# --- MaxUnpool ------------------------------------------------------------------------------------
@register_converter("MaxUnpool")
class MaxUnpool(tvm_onnx.OnnxOpConverter):
    """MaxUnpool with ``output_shape`` given at run time. The indices address the default
    unpooled shape (what MaxPool's input was, from kernel, strides and pads); each value goes to
    the same (n, c, spatial...) position of the requested, possibly larger, output."""

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        data, indices = inputs[0], inputs[1]
        out_shape = inputs[2] if len(inputs) > 2 else None
        if out_shape is None or _constant(out_shape, params) is not None:
            return tvm_onnx.MaxUnpool._impl_v9(bb, inputs, attr, params)
        op = relax.op
        dims = static_dims(data)
        if dims is None:
            raise CompileError(
                "MaxUnpool with a run-time output_shape needs the input's shape static. fix: give "
                "the model's inputs static shapes"
            )
        rank = len(dims)
        spatial = rank - 2
        kernel = list(attr["kernel_shape"])
        strides = list(attr.get("strides", [1] * spatial))
        pads = list(attr.get("pads", [0] * (2 * spatial)))
        default = dims[:2] + [
            (dims[2 + i] - 1) * strides[i] + kernel[i] - pads[i] - pads[spatial + i]
            for i in range(spatial)
        ]
        out_shape = bb.normalize(op.astype(out_shape, "int64"))
        sym = runtime_shape(bb, out_shape, rank, "unpool")
        flat = bb.normalize(op.reshape(bb.normalize(op.astype(indices, "int64")), [-1]))
        # Unravel over the default shape, ravel over the requested one.
        target = relax.const(0, "int64")
        rest = flat
        coords = []
        for d in reversed(default):
            coords.append(bb.normalize(op.floor_mod(rest, relax.const(d, "int64"))))
            rest = bb.normalize(op.floor_divide(rest, relax.const(d, "int64")))
        coords.reverse()
        for k in range(rank):
            target = bb.normalize(op.add(op.multiply(target, _item(bb, out_shape, k)), coords[k]))
        target = bb.normalize(target)
        zeros = bb.normalize(op.reshape(bb.normalize(op.zeros(sym, str(data.ty.dtype))), [-1]))
        values = bb.normalize(op.reshape(data, [-1]))
        out = bb.normalize(op.scatter_elements(zeros, target, values, axis=0))
        return op.reshape(out, sym)
