"""Converters for the recurrent layers RNN, GRU and LSTM; TVM's Relax importer has none.

The recurrence is unrolled over the sequence axis, whose length must be static (it is in exported
models with a fixed sequence length, and in every ONNX node case). The input projection of all
steps is one matmul; each step then adds the recurrent projection of the previous hidden state.
Every attribute of the ONNX operators is honoured: ``direction`` (forward, reverse, bidirectional),
``activations`` with ``activation_alpha``/``activation_beta``, ``clip``, ``layout``,
``linear_before_reset`` (GRU), ``input_forget`` (LSTM), the optional bias, ``sequence_lens``,
``initial_h``/``initial_c`` and peepholes ``P``.
"""

from __future__ import annotations

from collections.abc import Callable

from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from qiao.compiler.errors import CompileError
from qiao.compiler.frontend import register_converter
from qiao.compiler.frontend.convert_common import const, static_dims

# Activations whose ONNX definition takes ``alpha`` / ``beta``, with their defaults.
_ALPHA = {
    "affine": 1.0,
    "leakyrelu": 0.01,
    "thresholdedrelu": 1.0,
    "scaledtanh": 1.0,
    "hardsigmoid": 0.2,
    "elu": 1.0,
}
_BETA = {"affine": 0.0, "scaledtanh": 1.0, "hardsigmoid": 0.5}


def _name(value) -> str:
    return (value.decode() if isinstance(value, bytes) else str(value)).lower()


def activation(name: str, alpha: float | None, beta: float | None, dtype: str) -> Callable:
    """The ONNX recurrent-layer activation ``name`` as a function of a Relax expression.

    Parameters
    ----------
    name : str
        One of the activations the ONNX RNN/GRU/LSTM specification lists (case-insensitive).
    alpha, beta : float or None
        The activation's parameters; ``None`` takes the ONNX default.
    dtype : str
        The element type of the tensors the activation is applied to.

    Returns
    -------
    callable
        ``f(expr) -> expr``.
    """
    key = name.lower()
    a = _ALPHA.get(key, 0.0) if alpha is None else alpha
    b = _BETA.get(key, 0.0) if beta is None else beta

    def c(v):
        return const(v, dtype)

    op = relax.op
    table = {
        "relu": op.nn.relu,
        "tanh": op.tanh,
        "sigmoid": op.sigmoid,
        "affine": lambda x: op.add(op.multiply(x, c(a)), c(b)),
        "leakyrelu": lambda x: op.where(op.greater_equal(x, c(0)), x, op.multiply(x, c(a))),
        "thresholdedrelu": lambda x: op.where(op.greater(x, c(a)), x, c(0)),
        "scaledtanh": lambda x: op.multiply(op.tanh(op.multiply(x, c(b))), c(a)),
        "hardsigmoid": lambda x: op.clip(op.add(op.multiply(x, c(a)), c(b)), 0.0, 1.0),
        "elu": lambda x: op.where(
            op.greater(x, c(0)), x, op.multiply(op.subtract(op.exp(x), c(1)), c(a))
        ),
        "softsign": lambda x: op.divide(x, op.add(op.abs(x), c(1))),
        "softplus": lambda x: op.log(op.add(op.exp(x), c(1))),
    }
    if key not in table:
        raise CompileError(
            f"recurrent layer activation {name!r} is not an ONNX RNN activation. fix: use one "
            f"of {', '.join(sorted(table))}"
        )
    return table[key]


class _Recurrent(tvm_onnx.OnnxOpConverter):
    """Shared unrolling for RNN / GRU / LSTM; subclasses define the cell."""

    op_name = ""
    gates = 1
    default_activations: tuple[str, ...] = ()

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        x, w, r = inputs[0], inputs[1], inputs[2]
        bias = inputs[3] if len(inputs) > 3 else None
        seq_lens = inputs[4] if len(inputs) > 4 else None
        init_h = inputs[5] if len(inputs) > 5 else None
        init_c = inputs[6] if len(inputs) > 6 else None
        peep = inputs[7] if len(inputs) > 7 else None
        layout = int(attr.get("layout", 0))
        dtype = str(x.ty.dtype)
        dims = static_dims(x)
        if dims is None or len(dims) != 3:
            raise CompileError(
                f"{cls.op_name}: the input X must have a static 3-D shape to unroll the "
                f"recurrence, got {x.ty}. fix: give the model's inputs static shapes "
                "(qiao compile --shape NAME=D1,D2,D3)"
            )
        if layout == 1:  # [batch, seq, input] -> [seq, batch, input]
            x = bb.normalize(relax.op.permute_dims(x, [1, 0, 2]))
            dims = [dims[1], dims[0], dims[2]]
        seq_len, batch = dims[0], dims[1]
        hidden = int(attr.get("hidden_size", 0)) or static_dims(r)[-1]
        direction = _name(attr.get("direction", b"forward"))
        directions = 2 if direction == "bidirectional" else 1
        acts = [_name(a) for a in attr.get("activations", ())] or list(
            cls.default_activations * directions
        )
        funcs = cls._activations(acts, attr, dtype)
        per_dir = len(cls.default_activations)
        clip = attr.get("clip")

        def per_direction(t, d):
            """``t[d]`` of a [num_directions, ...] tensor."""
            return _step(bb, t, d)

        def initial(t):
            if t is None:
                return [None] * directions
            if layout == 1:  # [batch, num_directions, hidden]
                t = bb.normalize(relax.op.permute_dims(t, [1, 0, 2]))
            return [per_direction(t, d) for d in range(directions)]

        hs, cs = initial(init_h), initial(init_c)
        mask = None
        if seq_lens is not None:
            mask = bb.normalize(relax.op.astype(seq_lens, "int64"))
        ys, last_h, last_c = [], [], []
        for d in range(directions):
            reverse = direction == "reverse" or d == 1
            wd, rd = per_direction(w, d), per_direction(r, d)
            gh = cls.gates * hidden
            wb = rb = None
            if bias is not None:
                bd = per_direction(bias, d)
                wb = bb.normalize(relax.op.strided_slice(bd, [0], [0], [gh]))
                rb = bb.normalize(relax.op.strided_slice(bd, [0], [gh], [2 * gh]))
            # The input projection of every step at once: [seq, batch, gates * hidden].
            xw = bb.normalize(relax.op.matmul(x, relax.op.permute_dims(wd)))
            if wb is not None:
                xw = bb.normalize(relax.op.add(xw, wb))
            h = hs[d] if hs[d] is not None else const(0, dtype)
            h = bb.normalize(relax.op.broadcast_to(h, (batch, hidden)))
            c = cs[d] if cs[d] is not None else const(0, dtype)
            c = bb.normalize(relax.op.broadcast_to(c, (batch, hidden)))
            pd = per_direction(peep, d) if peep is not None else None
            fs = funcs[d * per_dir : (d + 1) * per_dir]
            outs = [None] * seq_len
            order = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
            for t in order:
                xt = _step(bb, xw, t)
                new_h, new_c = cls._cell(bb, xt, h, c, rd, rb, pd, fs, clip, hidden, attr)
                if mask is not None:
                    # Steps at or past a sequence's length keep its state and output zeros.
                    valid = bb.normalize(
                        relax.op.expand_dims(relax.op.less(const(t, "int64"), mask), -1)
                    )
                    outs[t] = bb.normalize(relax.op.where(valid, new_h, const(0, dtype)))
                    new_h = relax.op.where(valid, new_h, h)
                    if new_c is not None:
                        new_c = bb.normalize(relax.op.where(valid, new_c, c))
                else:
                    outs[t] = new_h
                h = bb.normalize(new_h)
                c = new_c if new_c is not None else c
            ys.append(bb.normalize(relax.op.stack(outs, axis=0)))  # [seq, batch, hidden]
            last_h.append(h)
            last_c.append(c)
        y = bb.normalize(relax.op.stack(ys, axis=1))  # [seq, num_directions, batch, hidden]
        y_h = bb.normalize(relax.op.stack(last_h, axis=0))  # [num_directions, batch, hidden]
        y_c = bb.normalize(relax.op.stack(last_c, axis=0))
        if layout == 1:
            y = relax.op.permute_dims(y, [2, 0, 1, 3])
            y_h = relax.op.permute_dims(y_h, [1, 0, 2])
            y_c = relax.op.permute_dims(y_c, [1, 0, 2])
        outputs = [y, y_h, y_c] if cls.op_name == "LSTM" else [y, y_h]
        return relax.Tuple([bb.normalize(o) for o in outputs])

    @classmethod
    def _activations(cls, names: list[str], attr: dict, dtype: str) -> list[Callable]:
        # ONNX: alphas and betas are consumed in order by the activations that take them
        # (ONNX Runtime reads them the same way).
        alphas = list(attr.get("activation_alpha", ()))
        betas = list(attr.get("activation_beta", ()))
        funcs = []
        for name in names:
            a = alphas.pop(0) if name in _ALPHA and alphas else None
            b = betas.pop(0) if name in _BETA and betas else None
            funcs.append(activation(name, a, b, dtype))
        return funcs

    @staticmethod
    def _clip(x, clip):
        return x if clip is None else relax.op.clip(x, -float(clip), float(clip))

    @classmethod
    def _cell(cls, bb, xt, h, c, r, rb, p, fs, clip, hidden, attr):
        raise NotImplementedError


def _step(bb, x, i: int):
    """``x[i]``: one index of the leading axis, removed."""
    return bb.normalize(relax.op.squeeze(relax.op.strided_slice(x, [0], [i], [i + 1]), [0]))


def _gate(bb, x, k: int, hidden: int):
    """Gate ``k`` (a [batch, hidden] slice) of a [batch, gates * hidden] projection."""
    return bb.normalize(relax.op.strided_slice(x, [1], [k * hidden], [(k + 1) * hidden]))


def _recurrent_projection(bb, h, r, rb):
    out = relax.op.matmul(h, relax.op.permute_dims(r))
    return bb.normalize(relax.op.add(out, rb) if rb is not None else out)


@register_converter("RNN")
class RNN(_Recurrent):
    """Elman RNN: ``H = f(X W^T + H R^T + Wb + Rb)``."""

    op_name = "RNN"
    gates = 1
    default_activations = ("tanh",)

    @classmethod
    def _cell(cls, bb, xt, h, c, r, rb, p, fs, clip, hidden, attr):
        pre = relax.op.add(xt, _recurrent_projection(bb, h, r, rb))
        return bb.normalize(fs[0](cls._clip(pre, clip))), None


@register_converter("GRU")
class GRU(_Recurrent):
    """GRU with gates z, r, h (ONNX order), ``linear_before_reset`` either way."""

    op_name = "GRU"
    gates = 3
    default_activations = ("sigmoid", "tanh")

    @classmethod
    def _cell(cls, bb, xt, h, c, r, rb, p, fs, clip, hidden, attr):
        f, g = fs
        hr = _recurrent_projection(bb, h, r, rb)
        z = f(cls._clip(relax.op.add(_gate(bb, xt, 0, hidden), _gate(bb, hr, 0, hidden)), clip))
        rt = f(cls._clip(relax.op.add(_gate(bb, xt, 1, hidden), _gate(bb, hr, 1, hidden)), clip))
        z, rt = bb.normalize(z), bb.normalize(rt)
        if int(attr.get("linear_before_reset", 0)):
            rec = relax.op.multiply(rt, _gate(bb, hr, 2, hidden))
        else:
            rh = bb.normalize(relax.op.strided_slice(r, [0], [2 * hidden], [3 * hidden]))
            rbh = (
                bb.normalize(relax.op.strided_slice(rb, [0], [2 * hidden], [3 * hidden]))
                if rb is not None
                else None
            )
            rec = _recurrent_projection(bb, bb.normalize(relax.op.multiply(rt, h)), rh, rbh)
        ht = bb.normalize(g(cls._clip(relax.op.add(_gate(bb, xt, 2, hidden), rec), clip)))
        one = const(1, str(h.ty.dtype))
        new_h = relax.op.add(
            relax.op.multiply(relax.op.subtract(one, z), ht), relax.op.multiply(z, h)
        )
        return bb.normalize(new_h), None


@register_converter("LSTM")
class LSTM(_Recurrent):
    """LSTM with gates i, o, f, c (ONNX order), peepholes and ``input_forget``."""

    op_name = "LSTM"
    gates = 4
    default_activations = ("sigmoid", "tanh", "tanh")

    @classmethod
    def _cell(cls, bb, xt, h, c, r, rb, p, fs, clip, hidden, attr):
        f, g, hf = fs
        pre = bb.normalize(relax.op.add(xt, _recurrent_projection(bb, h, r, rb)))
        gi, go, gf, gc = (_gate(bb, pre, k, hidden) for k in range(4))
        pi = po = pf = None
        if p is not None:
            pi, po, pf = (
                bb.normalize(relax.op.strided_slice(p, [0], [k * hidden], [(k + 1) * hidden]))
                for k in range(3)
            )
        if pi is not None:
            gi = relax.op.add(gi, relax.op.multiply(pi, c))
            gf = relax.op.add(gf, relax.op.multiply(pf, c))
        i = bb.normalize(f(cls._clip(gi, clip)))
        if int(attr.get("input_forget", 0)):
            ft = relax.op.subtract(const(1, str(c.ty.dtype)), i)
        else:
            ft = f(cls._clip(gf, clip))
        ct = g(cls._clip(gc, clip))
        new_c = bb.normalize(relax.op.add(relax.op.multiply(ft, c), relax.op.multiply(i, ct)))
        if po is not None:
            go = relax.op.add(go, relax.op.multiply(po, new_c))
        o = f(cls._clip(go, clip))
        new_h = bb.normalize(relax.op.multiply(o, hf(new_c)))
        return new_h, new_c
