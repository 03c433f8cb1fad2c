"""Converters for signal and image operators TVM's importer lacks: DFT, STFT, the Blackman,
Hamming and Hann windows, MelWeightMatrix, Col2Im, CenterCropPad, DeformConv and Det.

Most are written as TE computes (``bb.emit_te``): several take sizes as run-time tensors (window
length, STFT frame step, Col2Im image shape, CenterCropPad shape), which become symbolic dims bound
to the tensor's value, and a TE compute indexes with those dims directly. Each follows the ONNX
reference implementation (``onnx.reference.ops``) and its intermediate precision.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.errors import CompileError
from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import const, runtime_shape, scalar, static_dims


def _dtype(x) -> str:
    return str(x.ty.dtype)


def _runtime_ints(bb, x, prefix: str) -> list:
    """The values of a small integer tensor as ints when constant, else as symbolic dims bound to
    its run-time value (one per element; the element count must be static)."""
    if isinstance(x, tvm.ir.GenericConst):
        return [int(v) for v in np.asarray(x.data.numpy()).reshape(-1)]
    dims = static_dims(x)
    if dims is None:
        raise CompileError(
            f"{prefix}: a size tensor of unknown length. fix: give the size input a static shape"
        )
    count = int(np.prod(dims))
    flat = bb.normalize(relax.op.reshape(relax.op.astype(x, "int64"), (count,)))
    return list(runtime_shape(bb, flat, count, prefix).values)


def _i64(v):
    return tirx.Cast("int64", v) if not isinstance(v, int) else tirx.IntImm("int64", v)


def _out_dtype(attr: dict, default: int = onnx.TensorProto.FLOAT) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(attr.get("output_datatype", default)))


# --- windows --------------------------------------------------------------------------------------
class _Window(tvm_onnx.OnnxOpConverter):
    """``sum_m coefficient_m * cos(2 pi m n / N)`` for n < size; N = size (periodic, the default)
    or size - 1 (symmetric). Computed in float64, as NumPy does, then cast."""

    coefficients: tuple[float, ...] = ()

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        (size,) = _runtime_ints(bb, inputs[0], "window_size")
        dtype = _out_dtype(attr)
        periodic = int(attr.get("periodic", 1))
        coefficients = cls.coefficients

        def window():
            length = _i64(size)
            denominator = tirx.Cast("float64", length if periodic else length - 1)

            def at(n):
                phase = tirx.const(2 * math.pi, "float64") * tirx.Cast("float64", n) / denominator
                total = tirx.const(coefficients[0], "float64")
                for m, c in enumerate(coefficients[1:], start=1):
                    total = total + tirx.const(c, "float64") * tirx.cos(
                        phase * tirx.const(m, "float64")
                    )
                return tirx.Cast(dtype, total)

            return te.compute((length,), at, name=cls.__name__.lower())

        return bb.emit_te(window)


@register_converter("BlackmanWindow")
class BlackmanWindow(_Window):
    """Blackman window: 0.42 - 0.5 cos(2 pi n / N) + 0.08 cos(4 pi n / N)."""

    coefficients = (0.42, -0.5, 0.08)


@register_converter("HammingWindow")
class HammingWindow(_Window):
    """Hamming window with ONNX's alpha = 25/46: alpha - (1 - alpha) cos(2 pi n / N)."""

    coefficients = (25.0 / 46.0, -(1 - 25.0 / 46.0))


@register_converter("HannWindow")
class HannWindow(_Window):
    """Hann window: sin^2(pi n / N) = 0.5 - 0.5 cos(2 pi n / N)."""

    coefficients = (0.5, -0.5)


@register_converter("MelWeightMatrix")
class MelWeightMatrix(tvm_onnx.OnnxOpConverter):
    """Triangular mel filter bank of shape (dft_length // 2 + 1, num_mel_bins), as the ONNX
    reference: band edges ``floor((dft_length + 1) * hz / sample_rate)`` of mel-spaced frequencies
    (mel scale in float32, frequencies in float64, as NumPy promotes them there)."""

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        (bins,) = _runtime_ints(bb, inputs[0], "mel_bins")
        (length,) = _runtime_ints(bb, inputs[1], "dft_length")
        rate, low, high = (bb.normalize(relax.op.reshape(x, ())) for x in inputs[2:5])
        dtype = _out_dtype(attr)

        def mel(rate, low, high):
            f32, f64 = "float32", "float64"
            ln10 = tirx.const(math.log(10), f32)

            def to_mel(hz):
                hz = tirx.Cast(f32, hz)
                return tirx.const(2595, f32) * tirx.log1p(hz / tirx.const(700, f32)) / ln10

            low_mel, high_mel = to_mel(low()), to_mel(high())
            step = tirx.Cast(f64, (high_mel - low_mel) / tirx.Cast(f32, _i64(bins) + 2))

            def edge(i):
                m = tirx.Cast(f64, i) * step + tirx.Cast(f64, low_mel)
                hz = tirx.const(700, f64) * (
                    tirx.exp(m / tirx.const(2595, f64) * tirx.const(math.log(10), f64)) - 1
                )
                scaled = tirx.Cast(f64, _i64(length) + 1) * hz / tirx.Cast(f64, rate())
                return tirx.Cast("int64", tirx.floor(scaled))

            def at(j, i):
                left, center, right = edge(i), edge(i + 1), edge(i + 2)
                j = tirx.Cast("int64", j)
                zero, one = tirx.const(0, f64), tirx.const(1, f64)
                rise = tirx.Cast(f64, j - left) / tirx.Cast(f64, tirx.max(center - left, 1))
                value = tirx.Select(
                    tirx.And(center > left, tirx.And(j >= left, j <= center)),
                    rise,
                    tirx.Select(tirx.And(center == left, j == center), one, zero),
                )
                fall = tirx.Cast(f64, right - j) / tirx.Cast(f64, tirx.max(right - center, 1))
                value = tirx.Select(
                    tirx.And(right > center, tirx.And(j >= center, j < right)), fall, value
                )
                return tirx.Cast(dtype, value)

            return te.compute((_i64(length) // 2 + 1, _i64(bins)), at, name="mel_weight_matrix")

        return bb.emit_te(mel, rate, low, high)


# --- DFT and STFT ---------------------------------------------------------------------------------
def _dft_along(bb, x, axis: int, length: int | None, inverse: bool, onesided: bool):
    """DFT of ``x`` (..., 1 or 2: real or complex) along ``axis`` as float64 matmuls with cos/sin
    matrices; returns the (..., 2) result (or (..., 1) for an inverse one-sided transform)."""
    dims = static_dims(x)
    rank = len(dims)
    size = dims[axis]
    if length is None:
        length = 2 * (size - 1) if inverse and onesided else size
    dtype = _dtype(x)
    wide = bb.normalize(relax.op.astype(x, "float64"))
    # (..., signal, 1|2) -> (..., 1|2, signal) with the signal axis last, for the matmul.
    order = [d for d in range(rank - 1) if d != axis] + [rank - 1, axis]
    moved = bb.normalize(relax.op.permute_dims(wide, order))
    used = min(size, length if not (inverse and onesided) else length // 2 + 1)
    moved = bb.normalize(relax.op.strided_slice(moved, [rank - 1], [0], [used]))
    re = relax.op.squeeze(relax.op.strided_slice(moved, [rank - 2], [0], [1]), [rank - 2])
    complex_in = dims[-1] == 2
    im = (
        relax.op.squeeze(relax.op.strided_slice(moved, [rank - 2], [1], [2]), [rank - 2])
        if complex_in
        else None
    )
    t = np.arange(used)[:, None]
    if inverse and onesided:  # Hermitian extension of the one-sided spectrum (np.fft.irfft)
        k = t
        n = np.arange(length)[None, :]
        weight = np.where((k == 0) | (2 * k == length), 1.0, 2.0) / length
        cos = const(weight * np.cos(2 * np.pi * k * n / length), "float64")
        sin = const(weight * np.sin(2 * np.pi * k * n / length), "float64")
        real = relax.op.matmul(re, cos)
        if im is not None:
            real = relax.op.subtract(real, relax.op.matmul(im, sin))
        outs = [real]
    else:
        bins = length // 2 + 1 if onesided else length
        k = np.arange(bins)[None, :]
        angle = 2 * np.pi * t * k / length
        scale = 1.0 / length if inverse else 1.0
        sign = 1.0 if inverse else -1.0
        cos = const(scale * np.cos(angle), "float64")
        sin = const(scale * sign * np.sin(angle), "float64")
        real = relax.op.matmul(re, cos)
        imag = relax.op.matmul(re, sin)
        if im is not None:
            real = relax.op.subtract(real, relax.op.matmul(im, sin))
            imag = relax.op.add(imag, relax.op.matmul(im, cos))
        outs = [real, imag]
    stacked = bb.normalize(relax.op.stack([bb.normalize(o) for o in outs], axis=rank - 2))
    back = [0] * rank
    for position, d in enumerate(order):
        back[d] = position
    out = relax.op.permute_dims(stacked, back)
    return bb.normalize(relax.op.astype(out, dtype))


@register_converter("DFT")
class DFT(tvm_onnx.OnnxOpConverter):
    """Discrete Fourier transform (opsets 17 and 20; forward, inverse, one-sided, irfft).

    Opset 20 takes ``axis`` as an input; a run-time axis is handled by transforming along every
    candidate axis and selecting the one asked for, which needs all candidates to give the same
    output shape.
    """

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        return cls._convert(
            bb, inputs[0], inputs[1] if len(inputs) > 1 else None, attr.get("axis", 1), attr
        )

    @classmethod
    def _impl_v20(cls, bb, inputs, attr, params):
        axis = inputs[2] if len(inputs) > 2 and inputs[2] is not None else -2
        return cls._convert(bb, inputs[0], inputs[1] if len(inputs) > 1 else None, axis, attr)

    @classmethod
    def _convert(cls, bb, x, length, axis, attr):
        inverse, onesided = bool(attr.get("inverse", 0)), bool(attr.get("onesided", 0))
        rank = x.ty.ndim
        if length is not None:
            value = scalar(length)
            if not isinstance(value, (int, np.integer)):
                raise CompileError(
                    "DFT: dft_length must be a constant. fix: make it an initializer or constant"
                )
            length = int(value)
        if isinstance(axis, relax.Expr):
            value = scalar(axis)
            axis = int(value) if isinstance(value, (int, np.integer)) else axis
        if isinstance(axis, int):
            return _dft_along(bb, x, axis % rank, length, inverse, onesided)
        dims = static_dims(x)
        # Axes whose default length would be empty (an irfft over a size-1 axis) cannot be meant.
        usable = [d for d in range(rank - 1) if length or not (inverse and onesided) or dims[d] > 1]
        candidates = {d: _dft_along(bb, x, d, length, inverse, onesided) for d in usable}
        axis = bb.normalize(relax.op.astype(relax.op.reshape(axis, ()), "int64"))
        axis = bb.normalize(
            relax.op.where(
                relax.op.less(axis, const(0, "int64")),
                relax.op.add(axis, const(rank, "int64")),
                axis,
            )
        )
        out = candidates[usable[-1]]
        shapes = {tuple(static_dims(c)) for c in candidates.values()}
        for d in reversed(usable[:-1]):
            pick = bb.normalize(relax.op.equal(axis, const(d, "int64")))
            if len(shapes) == 1:
                out = relax.op.where(pick, candidates[d], out)
            else:  # the output shape depends on the axis (one-sided): branch at run time
                out = bb.emit(
                    relax.If(pick, relax.SeqExpr([], candidates[d]), relax.SeqExpr([], out))
                )
        return out


@register_converter("STFT")
class STFT(tvm_onnx.OnnxOpConverter):
    """Short-time Fourier transform (opset 17): out[b, f, k] = sum_t signal[b, f * step + t] *
    window[t] * exp(-2 pi i k t / frame_length), k < frame_length // 2 + 1 when one-sided.
    Frame step and length may be run-time values (symbolic dims)."""

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        signal, step = inputs[0], inputs[1]
        window = inputs[2] if len(inputs) > 2 else None
        frame = inputs[3] if len(inputs) > 3 else None
        onesided = bool(attr.get("onesided", 1))
        (step,) = _runtime_ints(bb, step, "frame_step")
        if frame is not None:
            (frame_length,) = _runtime_ints(bb, frame, "frame_length")
        elif window is not None:
            frame_length = static_dims(window)[0]
        else:
            raise CompileError("STFT needs a window or a frame_length. fix: give either input")
        dtype = _dtype(signal)
        if window is None:
            window = relax.op.ones(relax.ShapeExpr([_i64(frame_length)]), dtype)
            window = bb.normalize(window)
        complex_in = static_dims(signal)[-1] == 2

        def stft(signal, window):
            batch, samples = signal.shape[0], signal.shape[1]
            length, hop = _i64(frame_length), _i64(step)
            frames = (tirx.Cast("int64", samples) - length) // hop + 1
            bins = length // 2 + 1 if onesided else length
            t = te.reduce_axis((0, length), name="t")
            f64 = "float64"

            def at(b, f, k, c):
                pos = tirx.Cast("int64", f) * hop + t
                angle = (
                    tirx.const(-2 * math.pi, f64)
                    * tirx.Cast(f64, tirx.Cast("int64", k) * t % length)
                    / tirx.Cast(f64, length)
                )
                w = tirx.Cast(f64, window[t])
                re = tirx.Cast(f64, signal[b, pos, 0]) * w
                im = tirx.Cast(f64, signal[b, pos, 1]) * w if complex_in else tirx.const(0, f64)
                # (re + i im)(cos + i sin): real part for c = 0, imaginary for c = 1
                term = tirx.Select(
                    c == 0,
                    re * tirx.cos(angle) - im * tirx.sin(angle),
                    re * tirx.sin(angle) + im * tirx.cos(angle),
                )
                return te.sum(term, axis=t)

            out = te.compute((batch, frames, bins, 2), at, name="stft")
            return te.compute(out.shape, lambda *i: tirx.Cast(dtype, out(*i)), name="stft_cast")

        return bb.emit_te(stft, signal, window)


# --- image ops ------------------------------------------------------------------------------------
@register_converter("Col2Im")
class Col2Im(tvm_onnx.OnnxOpConverter):
    """Col2Im (opset 18): sums column blocks (N, C * prod(block), L) back into an image
    (N, C, *image_shape), with pads, strides and dilations; image and block shapes may be run-time
    values."""

    @classmethod
    def _impl_v18(cls, bb, inputs, attr, params):
        x = inputs[0]
        image = _runtime_ints(bb, inputs[1], "col2im_image")
        block = _runtime_ints(bb, inputs[2], "col2im_block")
        spatial = len(image)
        strides = list(attr.get("strides", [1] * spatial))
        dilations = list(attr.get("dilations", [1] * spatial))
        pads = list(attr.get("pads", [0] * 2 * spatial))
        dtype = _dtype(x)

        def col2im(x):
            img = [_i64(v) for v in image]
            blk = [_i64(v) for v in block]
            # number of block positions along each spatial axis
            counts = [
                (img[d] + pads[d] + pads[d + spatial] - dilations[d] * (blk[d] - 1) - 1)
                // strides[d]
                + 1
                for d in range(spatial)
            ]
            kernel = 1
            for b in blk:
                kernel = kernel * b
            channels = tirx.Cast("int64", x.shape[1]) // kernel
            taps = [te.reduce_axis((0, blk[d]), name=f"k{d}") for d in range(spatial)]

            def at(n, c, *pos):
                valid = []
                column = tirx.IntImm("int64", 0)
                row = tirx.Cast("int64", c)
                for d in range(spatial):
                    shifted = tirx.Cast("int64", pos[d]) + pads[d] - taps[d] * dilations[d]
                    valid += [shifted >= 0, tirx.floormod(shifted, strides[d]) == 0]
                    block_pos = tirx.floordiv(shifted, strides[d])
                    valid.append(block_pos < counts[d])
                    column = column * counts[d] + tirx.max(block_pos, 0)
                    row = row * blk[d] + taps[d]
                inside = tirx.all(*valid)
                zero64 = tirx.IntImm("int64", 0)
                value = tirx.if_then_else(
                    inside,
                    x[n, tirx.Select(inside, row, zero64), tirx.Select(inside, column, zero64)],
                    tirx.const(0, dtype),
                )
                return te.sum(value, axis=taps)

            return te.compute((x.shape[0], channels, *img), at, name="col2im")

        return bb.emit_te(col2im, x)


@register_converter("CenterCropPad")
class CenterCropPad(tvm_onnx.OnnxOpConverter):
    """Crop or zero-pad the ``axes`` of ``x`` around the centre to ``shape`` (opset 18); the
    target shape may be a run-time value."""

    @classmethod
    def _impl_v18(cls, bb, inputs, attr, params):
        x = inputs[0]
        target = _runtime_ints(bb, inputs[1], "center_crop_pad")
        rank = x.ty.ndim
        axes = [a % rank for a in attr.get("axes", range(rank))]
        if len(axes) != len(target):
            raise CompileError(
                "CenterCropPad: shape must have one value per axis. fix: match shape to axes"
            )
        wanted = dict(zip(axes, target))

        def crop_pad(x):
            out_shape = [_i64(wanted[d]) if d in wanted else x.shape[d] for d in range(rank)]

            def at(*idx):
                src, valid = [], []
                for d in range(rank):
                    if d not in wanted:
                        src.append(idx[d])
                        continue
                    have, want = tirx.Cast("int64", x.shape[d]), out_shape[d]
                    # crop: start (have - want) // 2 in the input; pad: (want - have) // 2 zeros
                    offset = tirx.Select(have >= want, (have - want) // 2, -((want - have) // 2))
                    pos = tirx.Cast("int64", idx[d]) + offset
                    valid += [pos >= 0, pos < have]
                    src.append(pos)
                inside = tirx.all(*valid) if valid else tirx.const(True, "bool")
                safe = [tirx.Select(inside, s, tirx.IntImm(str(s.ty), 0)) for s in src]
                return tirx.if_then_else(inside, x(*safe), tirx.const(0, str(x.dtype)))

            return te.compute(out_shape, at, name="center_crop_pad")

        return bb.emit_te(crop_pad, x)


@register_converter("DeformConv")
class DeformConv(tvm_onnx.OnnxOpConverter):
    """Deformable convolution (opset 19, 2-D): each kernel tap samples the input bilinearly at its
    grid position plus a learned offset (zero outside the image), optionally scaled by ``mask``."""

    @classmethod
    def _impl_v19(cls, bb, inputs, attr, params):
        x, w, offset = inputs[0], inputs[1], inputs[2]
        bias = inputs[3] if len(inputs) > 3 else None
        mask = inputs[4] if len(inputs) > 4 else None
        if x.ty.ndim != 4:
            raise CompileError(
                "DeformConv: only 2-D inputs (N, C, H, W) are supported. fix: use a 2-D "
                "deformable convolution"
            )
        _, channels, _, _ = static_dims(x)
        out_channels, group_channels, kh, kw = static_dims(w)
        _, _, oh, ow = static_dims(offset)
        group = int(attr.get("group", 1))
        offset_group = int(attr.get("offset_group", 1))
        sh, sw = attr.get("strides", (1, 1))
        dh, dw = attr.get("dilations", (1, 1))
        ph, pw = attr.get("pads", (0, 0, 0, 0))[:2]
        dtype = _dtype(x)
        if mask is None:
            mask = bb.normalize(
                relax.op.ones(
                    relax.ShapeExpr(static_dims(offset)[:1] + [offset_group * kh * kw, oh, ow]),
                    dtype,
                )
            )
        per_group_out = out_channels // group
        channels_per_offset = channels // offset_group

        def deform(x, w, offset, mask):
            height, width = x.shape[2], x.shape[3]
            ic = te.reduce_axis((0, group_channels), name="ic")
            ry = te.reduce_axis((0, kh), name="ry")
            rx = te.reduce_axis((0, kw), name="rx")
            zero = tirx.const(0, dtype)

            def pixel(n, c, y, xx):
                inside = tirx.all(y >= 0, y < height, xx >= 0, xx < width)
                return tirx.if_then_else(
                    inside,
                    x[n, c, tirx.Select(inside, y, 0), tirx.Select(inside, xx, 0)],
                    zero,
                )

            def at(n, oc, oy, ox):
                c = (oc // per_group_out) * group_channels + ic
                og = c // channels_per_offset
                tap = ry * kw + rx
                off_y = offset[n, og * 2 * kh * kw + 2 * tap, oy, ox]
                off_x = offset[n, og * 2 * kh * kw + 2 * tap + 1, oy, ox]
                y = tirx.Cast(dtype, oy * sh - ph + ry * dh) + off_y
                xx = tirx.Cast(dtype, ox * sw - pw + rx * dw) + off_x
                y0, x0 = tirx.floor(y), tirx.floor(xx)
                ly, lx = y - y0, xx - x0
                iy, ix = tirx.Cast("int32", y0), tirx.Cast("int32", x0)
                one = tirx.const(1, dtype)
                sample = (
                    (one - ly) * (one - lx) * pixel(n, c, iy, ix)
                    + (one - ly) * lx * pixel(n, c, iy, ix + 1)
                    + ly * (one - lx) * pixel(n, c, iy + 1, ix)
                    + ly * lx * pixel(n, c, iy + 1, ix + 1)
                )
                weight = w[oc, ic, ry, rx] * mask[n, og * kh * kw + tap, oy, ox]
                return te.sum(weight * sample, axis=[ic, ry, rx])

            return te.compute((x.shape[0], out_channels, oh, ow), at, name="deform_conv")

        out = bb.emit_te(deform, x, w, offset, mask)
        if bias is not None:
            out = relax.op.add(out, relax.op.reshape(bias, (1, -1, 1, 1)))
        return out


@register_converter("Det")
class Det(tvm_onnx.OnnxOpConverter):
    """Determinant of the trailing (n, n) matrices (opset 11) by Gaussian elimination with
    partial pivoting, unrolled over the (static) n, in float64."""

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        x = inputs[0]
        dims = static_dims(x)
        if dims is None or dims[-1] != dims[-2]:
            raise CompileError(
                "Det is unrolled over the matrix size and needs static square trailing dims. "
                "fix: compile with static input shapes (shape_dict)"
            )
        n = dims[-1]
        dtype = _dtype(x)
        a = bb.normalize(relax.op.astype(x, "float64"))
        det = None
        rows = const(np.arange(n).reshape(n, 1), "int64")  # row index, broadcast over columns
        for k in range(n):
            column = bb.normalize(relax.op.strided_slice(a, [a.ty.ndim - 1], [k], [k + 1]))
            # pivot: the row >= k with the largest |a[row, k]| (rows above k masked out)
            magnitude = relax.op.where(
                relax.op.less(rows, const(k, "int64")),
                const(-1.0, "float64"),
                relax.op.abs(column),
            )
            pivot = bb.normalize(relax.op.argmax(magnitude, axis=-2, keepdims=True))  # (..,1,1)
            pivot = bb.normalize(relax.op.astype(pivot, "int64"))
            kk = const(k, "int64")
            order = relax.op.where(
                relax.op.equal(rows, kk),
                pivot,
                relax.op.where(relax.op.equal(rows, pivot), kk, rows),
            )
            order = bb.normalize(relax.op.broadcast_to(order, a.ty.shape))
            a = bb.normalize(relax.op.gather_elements(a, order, axis=-2))
            sign = relax.op.where(
                relax.op.equal(pivot, kk), const(1.0, "float64"), const(-1.0, "float64")
            )
            head = bb.normalize(
                relax.op.strided_slice(a, [a.ty.ndim - 2, a.ty.ndim - 1], [k, k], [k + 1, k + 1])
            )  # (..,1,1)
            factor = relax.op.multiply(sign, head)
            det = factor if det is None else relax.op.multiply(det, factor)
            safe = relax.op.where(
                relax.op.equal(head, const(0.0, "float64")), const(1.0, "float64"), head
            )
            pivot_row = bb.normalize(relax.op.strided_slice(a, [a.ty.ndim - 2], [k], [k + 1]))
            column = bb.normalize(relax.op.strided_slice(a, [a.ty.ndim - 1], [k], [k + 1]))
            below = relax.op.greater(rows, kk)
            ratio = relax.op.where(below, relax.op.divide(column, safe), const(0.0, "float64"))
            a = bb.normalize(relax.op.subtract(a, relax.op.multiply(ratio, pivot_row)))
        det = relax.op.reshape(det, dims[:-2])
        return relax.op.astype(det, dtype)


# --- fixes of TVM's image-op converters -----------------------------------------------------------
@register_converter("MaxPool")
class MaxPool(tvm_onnx.OnnxOpConverter):
    """MaxPool; with its second output (``Indices``, opset 8+) computed here, since TVM's converter
    returns the pooled values only. Without it, TVM's converter.

    The index of each window's first maximum is flattened over (N, C, H, W) (row-major, or
    column-major within a plane for ``storage_order=1``), as the ONNX reference; padding never
    wins. 2-D only.
    """

    @classmethod
    def get_converter(cls, opset):
        tvm_convert = tvm_onnx.MaxPool.get_converter(opset)

        def convert(bb, inputs, attr, params):
            if attr["tvm_custom"]["num_outputs"] < 2:
                return tvm_convert(bb, inputs, attr, params)
            values = bb.normalize(tvm_convert(bb, inputs, dict(attr), params))
            return relax.Tuple([values, cls._indices(bb, inputs[0], values, attr)])

        return convert

    @classmethod
    def _indices(cls, bb, x, values, attr):
        if x.ty.ndim != 4:
            raise CompileError(
                "MaxPool with an Indices output: only 2-D pooling is supported. fix: drop the "
                "Indices output or pool in 2-D"
            )
        kh, kw = attr["kernel_shape"]
        sh, sw = attr.get("strides", (1, 1))
        dh, dw = attr.get("dilations", (1, 1))
        pads = attr.get("pads", (0, 0, 0, 0))
        if _attr_bytes(attr, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise CompileError(
                "MaxPool with an Indices output: auto_pad SAME_* is not supported. fix: re-export "
                "with explicit pads"
            )
        column_major = int(attr.get("storage_order", 0)) == 1
        out_h, out_w = static_dims(values)[2:]

        def argmax_pool(x, values):
            channels, height, width = x.shape[1], x.shape[2], x.shape[3]
            ky = te.reduce_axis((0, kh), name="ky")
            kx = te.reduce_axis((0, kw), name="kx")
            never = tirx.max_value("int64")

            def at(n, c, oy, ox):
                # the first tap (row-major over the window) holding the window's maximum
                y = oy * sh - pads[0] + ky * dh
                xx = ox * sw - pads[1] + kx * dw
                inside = tirx.all(y >= 0, y < height, xx >= 0, xx < width)
                value = x[n, c, tirx.Select(inside, y, 0), tirx.Select(inside, xx, 0)]
                hit = tirx.And(inside, value == values[n, c, oy, ox])
                tap = tirx.Cast("int64", ky * kw + kx)
                return te.min(tirx.Select(hit, tap, never), axis=[ky, kx])

            first = te.compute((x.shape[0], channels, out_h, out_w), at, name="max_pool_tap")

            def index(n, c, oy, ox):
                tap = first[n, c, oy, ox]
                y = tirx.Cast("int64", oy * sh - pads[0]) + tap // kw * dh
                xx = tirx.Cast("int64", ox * sw - pads[1]) + tap % kw * dw
                plane = tirx.Cast("int64", n * channels + c) * height * width
                return plane + (xx * height + y if column_major else y * width + xx)

            return te.compute(first.shape, index, name="max_pool_indices")

        return bb.emit_te(argmax_pool, x, values)


def _attr_bytes(attr: dict, name: str, default: str) -> str:
    value = attr.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


@register_converter("ConvTranspose")
class ConvTranspose(tvm_onnx.OnnxOpConverter):
    """ConvTranspose; with ``output_shape`` handled here (TVM's converter ignores it).

    The full transposed convolution (no padding) is computed by TVM's converter, then cut or
    zero-extended to ``output_shape`` as the ONNX spec's padding rule says: total padding
    ``full - output_shape`` split per ``auto_pad`` (SAME_UPPER puts the extra at the end, others
    at the start); a negative total extends the end (positions only the bias reaches).
    """

    @classmethod
    def get_converter(cls, opset):
        tvm_convert = tvm_onnx.ConvTranspose.get_converter(opset)

        def convert(bb, inputs, attr, params):
            if "output_shape" not in attr:
                return tvm_convert(bb, inputs, attr, params)
            return cls._with_output_shape(bb, inputs, attr, params, tvm_convert)

        return convert

    @classmethod
    def _with_output_shape(cls, bb, inputs, attr, params, tvm_convert):
        x, w = inputs[0], inputs[1]
        bias = inputs[2] if len(inputs) > 2 else None
        spatial = x.ty.ndim - 2
        wanted = list(attr["output_shape"])[-spatial:]
        auto_pad = _attr_bytes(attr, "auto_pad", "NOTSET")
        plain = {k: v for k, v in attr.items() if k not in ("output_shape", "pads", "auto_pad")}
        plain["output_padding"] = [0] * spatial
        full = bb.normalize(tvm_convert(bb, tvm_onnx.onnx_input([x, w]), plain, params))
        dims = static_dims(full)
        output_padding = list(attr.get("output_padding", [0] * spatial))
        out = full
        for d in range(spatial):
            axis = 2 + d
            total = dims[axis] + output_padding[d] - wanted[d]
            if total >= 0:
                begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
                out = relax.op.strided_slice(out, [axis], [begin], [begin + wanted[d]])
            else:
                pad = [0] * (2 * x.ty.ndim)
                pad[2 * axis + 1] = -total
                out = relax.op.nn.pad(out, pad)
            out = bb.normalize(out)
        if bias is not None:
            out = relax.op.add(out, relax.op.reshape(bias, [1, -1] + [1] * spatial))
        return out


@register_converter("RoiAlign")
class RoiAlign(tvm_onnx.OnnxOpConverter):
    """RoiAlign; ``max`` mode computed here as the ONNX reference defines it (per sample the
    largest of the four weighted corner values ``w_i * v_i``, then the largest over samples),
    where TVM's kernel takes the largest interpolated value. ``avg`` mode: TVM's converter.
    Max mode needs a positive ``sampling_ratio`` (the sample grid is unrolled)."""

    @classmethod
    def get_converter(cls, opset):
        tvm_convert = tvm_onnx.RoiAlign.get_converter(opset)

        def convert(bb, inputs, attr, params):
            if _attr_bytes(attr, "mode", "avg") != "max":
                return tvm_convert(bb, inputs, attr, params)
            default = "half_pixel" if opset >= 16 else "output_half_pixel"
            return cls._max(
                bb, inputs, attr, _attr_bytes(attr, "coordinate_transformation_mode", default)
            )

        return convert

    @classmethod
    def _max(cls, bb, inputs, attr, transform: str):
        data, rois, batch_indices = inputs[0], inputs[1], inputs[2]
        pooled_h = int(attr.get("output_height", 1))
        pooled_w = int(attr.get("output_width", 1))
        ratio = int(attr.get("sampling_ratio", 0))
        if ratio <= 0:
            raise CompileError(
                "RoiAlign max mode needs a positive sampling_ratio (the sample grid is unrolled). "
                "fix: set sampling_ratio, e.g. 2"
            )
        spatial_scale = float(attr.get("spatial_scale", 1.0))
        half_pixel = transform == "half_pixel"
        dtype = _dtype(data)

        def roi_align_max(data, rois, batch_indices):
            height, width = data.shape[2], data.shape[3]
            f = "float32"
            fh, fw = tirx.Cast(f, height), tirx.Cast(f, width)

            def at(r, c, ph, pw):
                shift = tirx.const(0.5 if half_pixel else 0.0, f)
                scale = tirx.const(spatial_scale, f)
                start_w = tirx.Cast(f, rois[r, 0]) * scale - shift
                start_h = tirx.Cast(f, rois[r, 1]) * scale - shift
                roi_w = tirx.Cast(f, rois[r, 2]) * scale - shift - start_w
                roi_h = tirx.Cast(f, rois[r, 3]) * scale - shift - start_h
                if not half_pixel:
                    roi_w = tirx.max(roi_w, tirx.const(1.0, f))
                    roi_h = tirx.max(roi_h, tirx.const(1.0, f))
                bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
                n = batch_indices[r]
                best = None
                for iy in range(ratio):
                    for ix in range(ratio):
                        y = start_h + tirx.Cast(f, ph) * bin_h + (iy + 0.5) * bin_h / ratio
                        x = start_w + tirx.Cast(f, pw) * bin_w + (ix + 0.5) * bin_w / ratio
                        value = cls._corner_max(data, n, c, y, x, fh, fw, height, width)
                        best = value if best is None else tirx.max(best, value)
                return tirx.Cast(dtype, best)

            shape = (rois.shape[0], data.shape[1], pooled_h, pooled_w)
            return te.compute(shape, at, name="roi_align_max")

        return bb.emit_te(roi_align_max, data, rois, batch_indices)

    @staticmethod
    def _corner_max(data, n, c, y, x, fh, fw, height, width):
        f = "float32"
        zero, one = tirx.const(0.0, f), tirx.const(1.0, f)
        outside = tirx.Or(tirx.Or(y < -one, y > fh), tirx.Or(x < -one, x > fw))
        y, x = tirx.max(y, zero), tirx.max(x, zero)
        y_low, x_low = tirx.Cast("int64", tirx.floor(y)), tirx.Cast("int64", tirx.floor(x))
        last_y, last_x = tirx.Cast("int64", height) - 1, tirx.Cast("int64", width) - 1
        y_edge, x_edge = y_low >= last_y, x_low >= last_x
        y_low, x_low = tirx.Select(y_edge, last_y, y_low), tirx.Select(x_edge, last_x, x_low)
        y_high = tirx.Select(y_edge, last_y, y_low + 1)
        x_high = tirx.Select(x_edge, last_x, x_low + 1)
        y = tirx.Select(y_edge, tirx.Cast(f, y_low), y)
        x = tirx.Select(x_edge, tirx.Cast(f, x_low), x)
        ly, lx = y - tirx.Cast(f, y_low), x - tirx.Cast(f, x_low)
        hy, hx = one - ly, one - lx

        def v(yy, xx):
            return tirx.Cast(f, data[n, c, yy, xx])

        value = tirx.max(
            tirx.max(hy * hx * v(y_low, x_low), hy * lx * v(y_low, x_high)),
            tirx.max(ly * hx * v(y_high, x_low), ly * lx * v(y_high, x_high)),
        )
        return tirx.Select(outside, zero, value)
