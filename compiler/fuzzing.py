"""Differential fuzzing: random valid ONNX graphs compiled by qiao for the CPU vs ONNX Runtime.

``fuzz_cases()`` is a ``hypothesis`` strategy of ``FuzzCase`` objects: a small random DAG (2-8
operators by default) over operators qiao converts, with its inputs. ``check_case`` compiles a case
with ``qiao.compiler.driver.compile`` for the CPU, runs it on every input binding and compares each
output with ONNX Runtime (graph optimisations off: the reference is the plain kernels).
``tests/test_fuzz.py`` runs a fixed-seed budget; ``python -m qiao.compiler.fuzzing`` runs a campaign
and saves every failing graph.

What the generator draws
------------------------
- **Operators**: elementwise unary (Relu, Sigmoid, Tanh, Exp, Log, Sqrt, Abs, Neg, Erf, Reciprocal,
  Softplus, Sin, Cos, LeakyRelu, Elu, Selu, HardSigmoid, HardSwish, Floor, Ceil, Round, Sign, Gelu),
  broadcasting binary (Add, Sub, Mul, Div, Pow, variadic Min/Max; integer Div and Mod by
  ``Abs(y) + 1``), comparisons, Not/And/Or/Xor/Equal of masks, Where, Clip,
  reductions (ReduceSum/Mean/Max/Min/Prod/L1/L2/SumSquare/LogSumExp with axes and keepdims,
  ArgMax/ArgMin), MatMul and Gemm, Softmax/LogSoftmax/LayerNormalization, Reshape/Flatten/
  Transpose/Concat/Slice/Gather/Squeeze/Unsqueeze/Expand/Tile/Split, Conv/MaxPool/AveragePool/
  GlobalAveragePool/GlobalMaxPool (1-D and 2-D, small), Cast.
- **Shapes**: rank 0-4, broadcasting partners drawn from a value's shape (dims dropped or set to 1);
  some input dims are symbolic (``dim_param``) and every case runs with two bindings of them.
- **Dtypes**: float32 mostly, float16 for about one graph in ten, int32/int64 inputs and casts where
  the operators allow them, bool from comparisons.
- **Opsets** 13, 17, 18 and 21 (axes as attributes or inputs, as each opset spells them).
- Every model passes ``onnx.checker.check_model(full_check=True)`` (strict shape inference).

Tolerances (per operator family; a graph uses the loosest of its operators' families)
-------------------------------------------------------------------------------------
=================  =======  =======  ==================================================
family             rtol     atol     operators
=================  =======  =======  ==================================================
exact              0        0        data movement, Relu/Abs/Neg/Min/Max/Where, compare,
                                     Floor/Ceil/Round/Sign, ArgMax, Cast, int arithmetic
arith              1e-5     1e-6     Add/Sub/Mul/Div/Pow/Reciprocal/Clip (float)
transcendental     1e-4     1e-5     Exp/Log/Sqrt/Tanh/Sigmoid/Erf/Sin/Cos/Softplus/...
accumulate         1e-4     1e-4     reductions, MatMul, Gemm, Conv, pools, Softmax,
                                     LayerNormalization
float16 (any)      1e-2     1e-2     the family's figures raised to these floors
=================  =======  =======  ==================================================

``atol`` is multiplied by the largest finite magnitude among the graph's float inputs and
intermediates (at least 1): a sum of two large numbers that cancel keeps their rounding error
(``1e30 + x - 1e30`` is ``x`` or 0 by the order of the sum). NaN positions must agree exactly
and infinities must agree in position and sign (``qiao.compiler.validate.compare``).

To keep the comparison meaningful the generator never feeds an operator where rounding differences
are amplified without bound: discontinuous operators (Floor, Ceil, Round, Sign, comparisons, ArgMax,
Cast to an integer) and ill-conditioned ones (Log, Sqrt, Reciprocal, Div's divisor, Pow) take only
*exact* operands (graph inputs, or values computed from them by exact operators), or operands moved
away from the singular point (``Abs(x) + 0.5``) by nodes added for that purpose.

NaN and infinities do occur (Log or Sqrt of a negative input, a division by an exact 0, Exp or Pow
overflowing) and must come out where ONNX Runtime has them. The generator tracks which values may
hold them (*wild*) and keeps those away from MaxPool, GlobalMaxPool, ReduceMax, ReduceMin and
ReduceLogSumExp, and gives their Clips both bounds: ONNX Runtime's MaxPool skips NaN, its
ReduceMax keeps a NaN only in a row's first element, and its Clip without a bound turns ±inf into
±3.4e38, while its Max, Min, Relu and Clip propagate NaN; qiao propagates NaN through all of them
and keeps infinities, as NumPy and PyTorch do (``tests/test_fuzz_regressions.py`` checks the
reductions against NumPy). Two wild values are never added or subtracted: TVM's arithmetic
simplifier applies ring identities to floats once operators are fused (``Cast(x) - x`` becomes 0,
``(x + y) - x`` becomes ``y``), where ONNX Runtime has ``inf - inf = NaN``. That is a known
deviation of qiao (TVM), not something qiao works around. A wild float32 value is never cast
to float16: ONNX Runtime computes the float16 operators it has no CPU kernel for (Log, Exp, ...)
in float32 and drops the Cast pair, so ``Log(Cast(1e30))`` is 69 there, ``inf`` in qiao; for the
same reason a float32 value cast to float16 is not exact (``Greater(Cast(1.0041), 1.004)`` is
true there: compared in float32).

Inputs are drawn from a standard normal (integers from [-5, 5]); about one float input in ten
has 30% of its elements replaced by NaN, ±inf, ±0, ±1e30 or a denormal (such inputs are wild, and
never reach ArgMax or a Cast to an integer). Symbolic dims take two sizes in [1, 4].

A campaign (``python -m qiao.compiler.fuzzing``) merges several graphs of one opset into one model
per compile (``merge``): compiling is most of the cost.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# (rtol, atol) per family; a graph's tolerance is the loosest of its operators'.
TOLERANCES = {
    "exact": (0.0, 0.0),
    "arith": (1e-5, 1e-6),
    "transcendental": (1e-4, 1e-5),
    "accumulate": (1e-4, 1e-4),
}
FLOAT16_FLOOR = (1e-2, 1e-2)

OPSETS = (13, 17, 18, 21)

# What a "special" float input mixes into its normal values (about 30% of its elements).
SPECIAL_VALUES = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 1e-40], np.float64)

_NP_TO_ONNX = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "bool": TensorProto.BOOL,
}
_FLOATS = ("float32", "float16")
_INTS = ("int32", "int64")


@dataclasses.dataclass
class Value:
    """A tensor of the graph being built: dims are ints or symbolic names (``sizes`` binds them)."""

    name: str
    dtype: str
    dims: tuple
    exact: bool  # computed without rounding from the graph inputs: both sides agree bit for bit
    wild: bool = False  # may hold NaN or an infinity

    @property
    def rank(self) -> int:
        return len(self.dims)

    def static(self, axes=None) -> bool:
        axes = range(self.rank) if axes is None else axes
        return all(isinstance(self.dims[a], int) for a in axes)


@dataclasses.dataclass
class FuzzCase:
    """A random model and the inputs it runs on (one dict per binding of its symbolic dims)."""

    model: onnx.ModelProto
    bindings: list
    families: frozenset
    ops: tuple
    float16: bool  # some value is float16: the float16 floors apply

    @property
    def tolerance(self) -> tuple[float, float]:
        rtol = max(TOLERANCES[f][0] for f in self.families)
        atol = max(TOLERANCES[f][1] for f in self.families)
        if self.float16:
            rtol, atol = max(rtol, FLOAT16_FLOOR[0]), max(atol, FLOAT16_FLOOR[1])
        return rtol, atol

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return f"FuzzCase(ops={list(self.ops)})\n{onnx.printer.to_text(self.model.graph)}"


class _Builder:
    """Grows one graph: ``draw`` is hypothesis's draw function, every choice goes through it."""

    def __init__(self, draw, st, opset: int, float_dtype: str):
        self.draw, self.st = draw, st
        self.opset, self.fdt = opset, float_dtype
        self.nodes, self.inits, self.inputs, self.values = [], [], [], []
        self.families, self.ops = set(), []
        self.syms = {}  # symbolic input dim name -> its two runtime sizes
        self.derived = {}  # dim computed from symbolic ones -> function of the sizes dict
        self.counter = 0
        self.last_wild = False

    # -- drawing helpers ------------------------------------------------------------------
    def integers(self, lo, hi):
        return self.draw(self.st.integers(lo, hi))

    def choice(self, seq):
        return self.draw(self.st.sampled_from(list(seq)))

    def boolean(self, p: float = 0.5) -> bool:
        return self.draw(self.st.integers(0, 999)) < int(p * 1000)

    def fresh(self, prefix="t") -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    # -- graph pieces -----------------------------------------------------------------------
    def new_input(self, dtype: str, dims: tuple) -> Value:
        # about one float input in ten holds NaN, infinities, signed zeros, huge and tiny values
        special = dtype in _FLOATS and self.boolean(0.1)
        v = Value(self.fresh("x"), dtype, tuple(dims), exact=True, wild=special)
        self.inputs.append(v)
        self.values.append(v)
        return v

    def const(self, array, name_prefix="c") -> str:
        name = self.fresh(name_prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def const_value(self, dtype: str, dims: tuple) -> Value:
        """An initializer of static ``dims`` (symbolic dims become 1) with random contents."""
        shape = tuple(d if isinstance(d, int) else 1 for d in dims)
        seed = self.integers(0, 2**16)
        rng = np.random.default_rng(seed)
        if dtype in _FLOATS:
            arr = rng.standard_normal(shape).astype(dtype)
        else:
            arr = rng.integers(-4, 5, shape).astype(dtype)
        return Value(self.const(arr), dtype, shape, exact=True)

    def node(self, op, inputs, attrs=None, family="exact", n_out=1, wild=False):
        """Add a node; its outputs (``add``) are wild when ``wild`` or when an input is."""
        outs = [self.fresh("t") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, **(attrs or {})))
        self.families.add(family)
        self.ops.append(op)
        self.last_wild = wild or any(v.wild for v in self.values if v.name in inputs)
        return outs

    def add(self, name, dtype, dims, exact) -> Value:
        v = Value(name, dtype, tuple(dims), exact, self.last_wild)
        self.values.append(v)
        return v

    def axes_arg(self, op_since_inputs: int, axes, attrs: dict, inputs: list):
        """Axes as an input (opset >= ``op_since_inputs``) or as an attribute."""
        if self.opset >= op_since_inputs:
            inputs.append(self.const(np.array(axes, np.int64), "axes"))
        else:
            attrs["axes"] = list(axes)

    # -- shapes -----------------------------------------------------------------------------
    def derive(self, fn) -> str:
        """A dim computed from symbolic ones (``fn(sizes)`` gives its runtime size)."""
        name = self.fresh("D")
        self.derived[name] = fn
        return name

    def size(self, d, sizes: dict) -> int:
        if isinstance(d, int):
            return d
        return sizes[d] if d in sizes else self.derived[d](sizes)

    def random_dims(self, rank=None) -> tuple:
        rank = self.integers(0, 4) if rank is None else rank
        dims = []
        for _ in range(rank):
            if self.boolean(0.2):
                name = self.choice(["N", "M"])
                if name not in self.syms:
                    self.syms[name] = (self.integers(1, 4), self.integers(1, 4))
                dims.append(name)
            else:
                dims.append(self.integers(1, 5))
        return tuple(dims)

    def broadcast_partner(self, dims: tuple) -> tuple:
        """A shape that broadcasts with ``dims`` to exactly ``dims``."""
        drop = self.integers(0, len(dims))
        out = list(dims[drop:])
        for i in range(len(out)):
            if self.boolean(0.3) or out[i] in self.derived:  # inputs never take derived dims
                out[i] = 1
        return tuple(out)

    def pick(self, pred=lambda v: True):
        cands = [v for v in self.values if pred(v)]
        if not cands:
            return None
        # prefer recent values: deeper graphs
        i = self.integers(0, len(cands) - 1)
        j = self.integers(0, len(cands) - 1)
        return cands[max(i, j)]

    def operand_like(self, x: Value, dtype=None) -> Value:
        """A second operand that broadcasts against ``x``: an existing value, a new input or a
        new constant."""
        dtype = dtype or x.dtype
        existing = [
            v
            for v in self.values
            if v is not x and v.dtype == dtype and _broadcasts_to(v.dims, x.dims)
        ]
        if existing and self.boolean(0.4):
            return self.choice(existing)
        dims = self.broadcast_partner(x.dims)
        if self.boolean(0.3) and all(isinstance(d, int) for d in dims):
            return self.const_value(dtype, dims)
        return self.new_input(dtype, dims)

    def safe_positive(self, x: Value, force: bool = False) -> Value:
        """``x`` itself when exact (unless ``force``), else ``Abs(x) + 0.5`` (away from
        Log/Sqrt/1/x's singularity)."""
        if x.dtype in _INTS:  # integer divisors: Abs(x) + 1, never 0
            (a,) = self.node("Abs", [x.name])
            (b,) = self.node("Add", [a, self.const(np.array(1, x.dtype))], wild=x.wild)
            return self.add(b, x.dtype, x.dims, exact=x.exact)
        if x.exact and not force:
            return x
        (a,) = self.node("Abs", [x.name])
        half = self.const(np.array(0.5, x.dtype))
        # Abs(x) is no Value of its own: the Add says that inf stays inf (|inf| + 0.5)
        (b,) = self.node("Add", [a, half], family="arith", wild=x.wild)
        return self.add(b, x.dtype, x.dims, exact=False)


def _broadcasts_to(small: tuple, big: tuple) -> bool:
    if len(small) > len(big):
        return False
    return all(s == 1 or s == b for s, b in zip(small[::-1], big[::-1]))


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(out[::-1])


# -- operator generators: each takes the builder and returns True when it added a node ----------

_UNARY_EXACT = ("Relu", "Abs", "Neg", "Identity")
_UNARY_SMOOTH = (
    "Sigmoid",
    "Tanh",
    "Exp",
    "Erf",
    "Softplus",
    "Sin",
    "Cos",
    "LeakyRelu",
    "Elu",
    "Selu",
    "HardSigmoid",
    "HardSwish",
    "Gelu",
)
_UNARY_SINGULAR = ("Log", "Sqrt", "Reciprocal")
_UNARY_DISCONTINUOUS = ("Floor", "Ceil", "Round", "Sign")


def _gen_unary(b: _Builder) -> bool:
    x = b.pick(lambda v: v.dtype in _FLOATS + _INTS)
    if x is None:
        return False
    if x.dtype in _INTS:
        ops = ["Abs", "Neg", "Identity", "Sign"]  # ONNX Runtime has no integer Relu kernel
        op = b.choice(ops)
        (o,) = b.node(op, [x.name])
        b.add(o, x.dtype, x.dims, exact=True)
        return True
    ops = list(_UNARY_EXACT + _UNARY_SMOOTH + _UNARY_SINGULAR + _UNARY_DISCONTINUOUS)
    if b.opset < 20:
        ops.remove("Gelu")
    if b.opset < 14:
        ops.remove("HardSwish")
    op = b.choice(ops)
    attrs = {}
    if op == "LeakyRelu":
        attrs["alpha"] = b.choice([0.01, 0.2, 1.5])
    elif op == "Elu":
        attrs["alpha"] = b.choice([1.0, 0.5])
    elif op == "HardSigmoid":
        attrs.update(alpha=b.choice([0.2, 0.5]), beta=b.choice([0.5, 0.1]))
    elif op == "Gelu":
        attrs["approximate"] = b.choice(["none", "tanh"])
    if op in _UNARY_DISCONTINUOUS and not x.exact:
        return False
    wild = op == "Exp"  # overflows to inf
    if op in _UNARY_SINGULAR:
        guarded = b.safe_positive(x, force=b.boolean(0.7))
        wild, x = guarded is x, guarded  # NaN or inf from a negative or zero exact operand
    family = "exact" if op in _UNARY_EXACT + _UNARY_DISCONTINUOUS else "transcendental"
    if op == "Reciprocal":
        family = "arith"
    (o,) = b.node(op, [x.name], attrs, family=family, wild=wild)
    b.add(o, x.dtype, x.dims, exact=x.exact and family == "exact")
    return True


def _gen_binary(b: _Builder) -> bool:
    x = b.pick(lambda v: v.dtype in _FLOATS + _INTS)
    if x is None:
        return False
    if x.dtype in _INTS:
        op = b.choice(["Add", "Sub", "Mul", "Min", "Max", "Div", "Mod"])
    else:
        op = b.choice(["Add", "Sub", "Mul", "Div", "Pow", "Min", "Max"])
    y = b.operand_like(x)
    if b.boolean(0.5):
        x, y = y, x  # the broadcast partner on either side
    wild = op == "Pow"  # overflows
    if op in ("Div", "Mod"):
        guarded = b.safe_positive(y, force=b.boolean(0.7))
        wild, y = guarded is y, guarded  # an exact float divisor may be 0
    if op in ("Add", "Sub") and x.wild and y.wild and x.dtype in _FLOATS:
        # TVM's simplifier applies ring identities to floats once kernels are fused: Cast(x) - x
        # is 0 and (x + y) - x is y, where ONNX Runtime has inf - inf = NaN (a known deviation)
        return False
    if op == "Pow":
        if not y.exact:
            return False
        x = b.safe_positive(x, force=b.boolean(0.7))  # a float power of a negative base is NaN
    operands = [x, y]
    if op in ("Min", "Max") and b.boolean(0.3):
        operands.append(b.operand_like(x))
    dims = x.dims
    for v in operands:
        dims = _broadcast(dims, v.dims)
    exact_op = op in ("Min", "Max") or x.dtype in _INTS
    family = "exact" if exact_op else "arith"
    (o,) = b.node(op, [v.name for v in operands], family=family, wild=wild)
    b.add(o, x.dtype, dims, exact=exact_op and all(v.exact for v in operands))
    return True


def _gen_compare_where(b: _Builder) -> bool:
    x = b.pick(lambda v: v.exact and v.dtype in _FLOATS + _INTS)
    if x is None:
        return False
    y = b.operand_like(x)
    if not y.exact:
        return False
    op = b.choice(["Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual"])
    (c,) = b.node(op, [x.name, y.name])
    dims = _broadcast(x.dims, y.dims)
    cond = b.add(c, "bool", dims, exact=True)
    if b.boolean(0.2):
        (n,) = b.node(b.choice(["Not", "Identity"]), [c])
        cond = b.add(n, "bool", dims, exact=True)
    other = b.pick(
        lambda v: v.dtype == "bool" and v is not cond and _broadcast(v.dims, dims) is not None
    )
    if other is not None and b.boolean(0.4):  # boolean logic between two masks
        (n,) = b.node(b.choice(["And", "Or", "Xor", "Equal"]), [cond.name, other.name])
        dims = _broadcast(dims, other.dims)
        cond = b.add(n, "bool", dims, exact=True)
    if b.boolean(0.8):
        a = b.pick(lambda v: v.dtype in _FLOATS + _INTS and _broadcast(v.dims, dims) is not None)
        if a is None:
            return True
        other = b.operand_like(a)
        (o,) = b.node("Where", [cond.name, a.name, other.name])
        b.add(o, a.dtype, _broadcast(_broadcast(dims, a.dims), other.dims), a.exact and other.exact)
    else:
        (o,) = b.node("Cast", [cond.name], {"to": _NP_TO_ONNX[b.fdt]})
        b.add(o, b.fdt, dims, exact=True)
    return True


def _gen_clip(b: _Builder) -> bool:
    x = b.pick(lambda v: v.dtype in _FLOATS)
    if x is None:
        return False
    lo, hi = sorted([b.choice([-2.0, -0.5, 0.0]), b.choice([0.0, 0.5, 2.0])])
    ins = [x.name]
    # ONNX Runtime's missing bound is the largest finite float: its Clip turns ±inf into ±3.4e38
    both = x.wild
    if both or b.boolean(0.8):
        ins.append(b.const(np.array(lo, x.dtype)))
    if both or b.boolean(0.8):
        if len(ins) == 1:
            ins.append("")
        ins.append(b.const(np.array(hi, x.dtype)))
    (o,) = b.node("Clip", ins)
    b.add(o, x.dtype, x.dims, x.exact)
    return True


_REDUCE = (
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceSumSquare",
    "ReduceLogSumExp",
)


def _gen_reduce(b: _Builder) -> bool:
    x = b.pick(lambda v: v.dtype in _FLOATS + _INTS and v.rank >= 1)
    if x is None:
        return False
    if x.dtype in _INTS:
        op = b.choice(["ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean"])
    else:
        # ONNX Runtime's ReduceMax/Min keep a NaN only in a row's first element (its LogSumExp
        # starts from that max)
        nan_blind = ("ReduceMax", "ReduceMin", "ReduceLogSumExp")
        op = b.choice([r for r in _REDUCE if not (x.wild and r in nan_blind)])
    k = b.integers(0, x.rank)
    axes = sorted(b.draw(b.st.permutations(range(x.rank)))[:k]) if k else []
    if axes and b.boolean(0.3):
        axes = [a - x.rank for a in axes]  # negative axes
    keep = b.boolean(0.5)
    attrs = {"keepdims": int(keep)}
    ins = [x.name]
    if axes:
        b.axes_arg(13 if op == "ReduceSum" else 18, axes, attrs, ins)
    norm = {a % x.rank for a in axes} if axes else set(range(x.rank))
    dims = tuple(1 if i in norm else d for i, d in enumerate(x.dims) if keep or i not in norm)
    exact_op = op in ("ReduceMax", "ReduceMin") or x.dtype in _INTS
    (o,) = b.node(op, ins, attrs, family="exact" if exact_op else "accumulate")
    b.add(o, x.dtype, dims, exact=exact_op and x.exact)
    return True


def _gen_argmax(b: _Builder) -> bool:
    x = b.pick(lambda v: v.exact and not v.wild and v.dtype in _FLOATS + _INTS and v.rank >= 1)
    if x is None:
        return False
    axis = b.integers(-x.rank, x.rank - 1)
    keep = b.boolean(0.5)
    op = b.choice(["ArgMax", "ArgMin"])
    (o,) = b.node(op, [x.name], {"axis": axis, "keepdims": int(keep)})
    a = axis % x.rank
    dims = tuple(1 if i == a else d for i, d in enumerate(x.dims) if keep or i != a)
    b.add(o, "int64", dims, exact=True)
    return True


def _gen_matmul(b: _Builder) -> bool:
    x = b.pick(lambda v: v.dtype in _FLOATS and v.rank >= 1)
    if x is None:
        return False
    if b.boolean(0.3) and x.rank == 2:  # Gemm
        ta, tb = b.boolean(), b.boolean()
        m, k = (x.dims[1], x.dims[0]) if ta else x.dims
        if not isinstance(k, int):
            return False
        n = b.integers(1, 6)
        w = b.const_value(x.dtype, (n, k) if tb else (k, n))
        ins = [x.name, w.name]
        attrs = {"transA": int(ta), "transB": int(tb)}
        if b.boolean(0.5):
            attrs["alpha"] = b.choice([0.5, 2.0])
        if b.boolean(0.7):
            cdims = b.choice([(n,), (1, n), (m, n) if isinstance(m, int) else (1, n), ()])
            ins.append(b.const_value(x.dtype, cdims).name)
            if b.boolean(0.5):
                attrs["beta"] = b.choice([0.5, 2.0])
        (o,) = b.node("Gemm", ins, attrs, family="accumulate")
        b.add(o, x.dtype, (m, n), exact=False)
        return True
    k = x.dims[-1]
    if not isinstance(k, int):
        return False
    n = b.integers(1, 6)
    if x.rank == 1 or b.boolean(0.2):
        wdims = (k,) if b.boolean(0.3) else (k, n)
    else:
        batch = b.broadcast_partner(x.dims[:-2]) if b.boolean(0.4) else ()
        wdims = batch + (k, n)
    w = b.const_value(x.dtype, wdims) if b.boolean(0.6) else b.new_input(x.dtype, wdims)
    if x.rank == 1 and len(wdims) == 1:
        dims = ()
    elif x.rank == 1:
        dims = wdims[:-2] + wdims[-1:]
    elif len(wdims) == 1:
        dims = x.dims[:-1]
    else:
        dims = _broadcast(x.dims[:-2], wdims[:-2]) + (x.dims[-2], wdims[-1])
    (o,) = b.node("MatMul", [x.name, w.name], family="accumulate")
    b.add(o, x.dtype, dims, exact=False)
    return True


def _gen_softmax_norm(b: _Builder) -> bool:
    x = b.pick(lambda v: v.dtype in _FLOATS and v.rank >= 1)
    if x is None:
        return False
    axis = b.integers(-x.rank, x.rank - 1)
    ops = ["Softmax", "LogSoftmax"]
    if b.opset >= 17 and x.static(range(axis % x.rank, x.rank)):
        ops.append("LayerNormalization")
    op = b.choice(ops)
    if op == "LayerNormalization":
        nd = x.dims[axis % x.rank :]
        ins = [x.name, b.const_value(x.dtype, nd).name]
        if b.boolean(0.6):
            ins.append(b.const_value(x.dtype, nd).name)
        attrs = {"axis": axis, "epsilon": b.choice([1e-5, 1e-3])}
    else:
        ins, attrs = [x.name], {"axis": axis}
    (o,) = b.node(op, ins, attrs, family="accumulate")
    b.add(o, x.dtype, x.dims, exact=False)
    return True


def _gen_reshape(b: _Builder) -> bool:
    x = b.pick(lambda v: True)
    if x is None:
        return False
    if b.boolean(0.3) and x.rank >= 1:
        axis = b.integers(-x.rank, x.rank)
        a = axis + x.rank if axis < 0 else axis
        left, right = x.dims[:a], x.dims[a:]
        if not (all(isinstance(d, int) for d in left) or all(isinstance(d, int) for d in right)):
            return False
        (o,) = b.node("Flatten", [x.name], {"axis": axis})
        b.add(o, x.dtype, (_prod_dim(left, b), _prod_dim(right, b)), x.exact)
        return True
    sym = [i for i, d in enumerate(x.dims) if not isinstance(d, int)]
    if len(sym) > 1:
        return False
    static = int(np.prod([d for d in x.dims if isinstance(d, int)], dtype=np.int64))
    factors = _factorize(b, static)
    target, dims = [], []
    for f in factors:
        target.append(f)
        dims.append(f)
    if sym:
        pos = b.integers(0, len(target))
        if b.boolean(0.5) and pos == sym[0]:
            target.insert(pos, 0)  # 0 copies the input's dim
        else:
            target.insert(pos, -1)
        dims.insert(pos, x.dims[sym[0]])
    elif target and b.boolean(0.3):
        pos = b.integers(0, len(target) - 1)
        target[pos] = -1
    (o,) = b.node("Reshape", [x.name, b.const(np.array(target, np.int64), "shape")])
    b.add(o, x.dtype, tuple(dims), x.exact)
    return True


def _prod_dim(dims, b):
    if all(isinstance(d, int) for d in dims):
        return int(np.prod(dims, dtype=np.int64))
    if len(dims) == 1:
        return dims[0]
    return b.derive(lambda sizes: int(np.prod([b.size(d, sizes) for d in dims])))


def _factorize(b: _Builder, n: int) -> list:
    out = []
    while n > 1 and len(out) < 3:
        divs = [d for d in range(1, n + 1) if n % d == 0]
        d = b.choice(divs)
        out.append(d)
        n //= d
    if n > 1:
        out.append(n)
    if b.boolean(0.2):
        out.insert(b.integers(0, len(out)), 1)
    return out


def _gen_transpose(b: _Builder) -> bool:
    x = b.pick(lambda v: v.rank >= 2)
    if x is None:
        return False
    perm = list(b.draw(b.st.permutations(range(x.rank))))
    attrs = {"perm": perm} if b.boolean(0.85) else {}
    perm = perm if attrs else list(range(x.rank))[::-1]
    (o,) = b.node("Transpose", [x.name], attrs)
    b.add(o, x.dtype, tuple(x.dims[p] for p in perm), x.exact)
    return True


def _gen_concat(b: _Builder) -> bool:
    x = b.pick(lambda v: v.rank >= 1)
    if x is None:
        return False
    axis = b.integers(-x.rank, x.rank - 1)
    a = axis % x.rank
    parts, total = [x], x.dims[a]
    if any(d in b.derived for i, d in enumerate(x.dims) if i != a):
        return False  # a new input cannot spell a derived dim
    for _ in range(b.integers(1, 2)):
        n = b.integers(1, 3)
        dims = x.dims[:a] + (n,) + x.dims[a + 1 :]
        same = [v for v in b.values if v.dtype == x.dtype and v.dims == dims]
        part = same[0] if same and b.boolean(0.5) else b.new_input(x.dtype, dims)
        parts.append(part)
    if not isinstance(total, int):
        sizes_of = [p.dims[a] for p in parts]
        total = b.derive(lambda sizes: sum(b.size(d, sizes) for d in sizes_of))
    else:
        total = sum(p.dims[a] for p in parts)
    (o,) = b.node("Concat", [p.name for p in parts], {"axis": axis})
    b.add(o, x.dtype, x.dims[:a] + (total,) + x.dims[a + 1 :], all(p.exact for p in parts))
    return True


def _gen_slice(b: _Builder) -> bool:
    x = b.pick(lambda v: any(isinstance(d, int) for d in v.dims))
    if x is None:
        return False
    static_axes = [i for i, d in enumerate(x.dims) if isinstance(d, int)]
    k = b.integers(1, len(static_axes))
    axes = list(b.draw(b.st.permutations(static_axes)))[:k]
    starts, ends, steps, dims = [], [], [], list(x.dims)
    for a in axes:
        n = x.dims[a]
        step = b.choice([1, 1, 2, -1, -2])
        if step > 0:
            s = b.integers(-n - 1, n)
            e = b.choice([b.integers(-n, n + 1), 2**31, -(2**31)])
        else:
            s = b.choice([b.integers(-n, n), 2**31])
            e = b.choice([b.integers(-n - 1, n), -(2**31)])
        starts.append(s)
        ends.append(e)
        steps.append(step)
        dims[a] = len(range(n)[slice(s, e, step)])
        if dims[a] == 0:
            return False
    ins = [x.name, b.const(np.array(starts, np.int64)), b.const(np.array(ends, np.int64))]
    ins.append(b.const(np.array([a - x.rank if b.boolean(0.3) else a for a in axes], np.int64)))
    ins.append(b.const(np.array(steps, np.int64)))
    (o,) = b.node("Slice", ins)
    b.add(o, x.dtype, tuple(dims), x.exact)
    return True


def _gen_gather(b: _Builder) -> bool:
    x = b.pick(lambda v: any(isinstance(d, int) for d in v.dims))
    if x is None:
        return False
    static_axes = [i for i, d in enumerate(x.dims) if isinstance(d, int)]
    a = b.choice(static_axes)
    n = x.dims[a]
    ishape = tuple(b.integers(1, 3) for _ in range(b.integers(0, 2)))
    rng = np.random.default_rng(b.integers(0, 2**16))
    idx = rng.integers(-n, n, ishape).astype(b.choice([np.int64, np.int32]))
    axis = a - x.rank if b.boolean(0.3) else a
    (o,) = b.node("Gather", [x.name, b.const(idx, "idx")], {"axis": axis})
    b.add(o, x.dtype, x.dims[:a] + ishape + x.dims[a + 1 :], x.exact)
    return True


def _gen_squeeze_unsqueeze(b: _Builder) -> bool:
    x = b.pick(lambda v: v.rank <= 4)
    if x is None:
        return False
    ones = [i for i, d in enumerate(x.dims) if d == 1]
    if ones and b.boolean(0.5):
        k = b.integers(1, len(ones))
        axes = sorted(b.draw(b.st.permutations(ones))[:k])
        attrs, ins = {}, [x.name]
        b.axes_arg(13, [a - x.rank if b.boolean(0.3) else a for a in axes], attrs, ins)
        (o,) = b.node("Squeeze", ins, attrs)
        b.add(o, x.dtype, tuple(d for i, d in enumerate(x.dims) if i not in axes), x.exact)
        return True
    k = b.integers(1, 2)
    r = x.rank + k
    axes = sorted(b.draw(b.st.permutations(range(r)))[:k])
    dims, it = [], iter(x.dims)
    for i in range(r):
        dims.append(1 if i in axes else next(it))
    attrs, ins = {}, [x.name]
    b.axes_arg(13, [a - r if b.boolean(0.3) else a for a in axes], attrs, ins)
    (o,) = b.node("Unsqueeze", ins, attrs)
    b.add(o, x.dtype, tuple(dims), x.exact)
    return True


def _gen_expand_tile(b: _Builder) -> bool:
    x = b.pick(lambda v: v.rank <= 3)
    if x is None:
        return False
    if b.boolean(0.6):
        extra = tuple(b.integers(1, 3) for _ in range(b.integers(0, 1)))
        target, dims = list(extra), list(extra)
        for d in x.dims:
            if d == 1 and b.boolean(0.5):
                n = b.integers(1, 3)
                target.append(n)
                dims.append(n)
            else:
                target.append(1 if b.boolean(0.5) or not isinstance(d, int) else d)
                dims.append(d)
        (o,) = b.node("Expand", [x.name, b.const(np.array(target, np.int64), "shape")])
        b.add(o, x.dtype, tuple(dims), x.exact)
        return True
    if x.rank == 0 or not x.static():
        return False
    reps = [b.integers(1, 2) for _ in x.dims]
    (o,) = b.node("Tile", [x.name, b.const(np.array(reps, np.int64), "reps")])
    b.add(o, x.dtype, tuple(d * r for d, r in zip(x.dims, reps)), x.exact)
    return True


def _gen_split(b: _Builder) -> bool:
    x = b.pick(lambda v: v.rank >= 1 and any(isinstance(d, int) and d >= 2 for d in v.dims))
    if x is None:
        return False
    a = b.choice([i for i, d in enumerate(x.dims) if isinstance(d, int) and d >= 2])
    n = x.dims[a]
    cut = b.integers(1, n - 1)
    sizes = [cut, n - cut]
    ins, attrs = [x.name], {"axis": a - x.rank if b.boolean(0.3) else a}
    if b.opset >= 13:
        ins.append(b.const(np.array(sizes, np.int64), "split"))
    outs = b.node("Split", ins, attrs, n_out=2)
    for o, s in zip(outs, sizes):
        b.add(o, x.dtype, x.dims[:a] + (s,) + x.dims[a + 1 :], x.exact)
    return True


def _gen_conv_pool(b: _Builder) -> bool:
    x = b.pick(lambda v: v.dtype in _FLOATS and v.rank in (3, 4) and v.static(range(1, v.rank)))
    if x is None:
        # make one: a fresh NCHW/NCW input (batch maybe symbolic)
        rank = b.integers(3, 4)
        dims = b.random_dims(1) + tuple(b.integers(1, 5) for _ in range(rank - 1))
        x = b.new_input(b.fdt, dims)
    spatial = x.dims[2:]
    nsp = len(spatial)
    ops = ["Conv", "Conv", "AveragePool", "GlobalAveragePool"]
    if not x.wild:  # ONNX Runtime's MaxPool skips NaN (qiao keeps it, as PyTorch does)
        ops += ["MaxPool", "GlobalMaxPool"]
    op = b.choice(ops)
    if op.startswith("Global"):
        (o,) = b.node(op, [x.name], family="exact" if op == "GlobalMaxPool" else "accumulate")
        b.add(o, x.dtype, x.dims[:2] + (1,) * nsp, x.exact and op == "GlobalMaxPool")
        return True
    kernel = [b.integers(1, min(3, s + 2)) for s in spatial]
    strides = [b.integers(1, 2) for _ in spatial]
    dil = [b.integers(1, 2) for _ in spatial] if op == "Conv" else [1] * nsp
    pads = [b.integers(0, k - 1) if k > 1 else 0 for k in kernel] * 2
    out_sp = []
    for i, s in enumerate(spatial):
        eff = (kernel[i] - 1) * dil[i] + 1
        span = s + pads[i] + pads[i + nsp] - eff
        if span < 0:
            return False
        out_sp.append(span // strides[i] + 1)
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads}
    if op == "Conv":
        c = x.dims[1]
        group = b.choice([g for g in (1, 2, c) if c % g == 0])
        m = group * b.integers(1, 2)
        attrs.update(dilations=dil, group=group)
        ins = [x.name, b.const_value(x.dtype, (m, c // group, *kernel)).name]
        if b.boolean(0.6):
            ins.append(b.const_value(x.dtype, (m,)).name)
        (o,) = b.node("Conv", ins, attrs, family="accumulate")
        b.add(o, x.dtype, (x.dims[0], m, *out_sp), exact=False)
        return True
    if op == "AveragePool":
        attrs["count_include_pad"] = int(b.boolean(0.3))
    (o,) = b.node(op, [x.name], attrs, family="exact" if op == "MaxPool" else "accumulate")
    b.add(o, x.dtype, x.dims[:2] + tuple(out_sp), x.exact and op == "MaxPool")
    return True


def _gen_cast(b: _Builder) -> bool:
    x = b.pick(lambda v: v.dtype in _FLOATS + _INTS + ("bool",))
    if x is None:
        return False
    if x.dtype in _FLOATS:
        # NaN or inf to an integer is undefined: only exact, tame values
        targets = ["float32", "float16"] + (list(_INTS) if x.exact and not x.wild else [])
        if x.wild and x.dtype == "float32":
            # ONNX Runtime runs float16 ops it has no CPU kernel for (Log, Exp...) in float32
            # and drops the Cast pair around them: Log(Cast(1e30 to float16)) is 69 there, inf
            # in qiao (and NumPy); 1e30 and 1e-40 do not survive float16
            targets.remove("float16")
    else:
        targets = [b.fdt] + [t for t in _INTS if t != x.dtype]
    to = b.choice(targets)
    (o,) = b.node("Cast", [x.name], {"to": _NP_TO_ONNX[to]})
    # float32 -> float16 rounds to nearest even in qiao, but ONNX Runtime drops the Cast pair
    # around a float16 op it runs in float32 (Greater, Log...): the rounding may not happen there,
    # so the result is not exact (no comparison or Floor takes it)
    narrowed = x.dtype == "float32" and to == "float16"
    b.add(o, to, x.dims, x.exact and not narrowed)
    return True


GENERATORS = {
    "unary": (_gen_unary, 6),
    "binary": (_gen_binary, 6),
    "compare": (_gen_compare_where, 2),
    "clip": (_gen_clip, 1),
    "reduce": (_gen_reduce, 3),
    "argmax": (_gen_argmax, 1),
    "matmul": (_gen_matmul, 3),
    "softmax": (_gen_softmax_norm, 2),
    "reshape": (_gen_reshape, 2),
    "transpose": (_gen_transpose, 2),
    "concat": (_gen_concat, 2),
    "slice": (_gen_slice, 2),
    "gather": (_gen_gather, 2),
    "squeeze": (_gen_squeeze_unsqueeze, 2),
    "expand": (_gen_expand_tile, 2),
    "split": (_gen_split, 1),
    "conv": (_gen_conv_pool, 2),
    "cast": (_gen_cast, 1),
}


def _value_info(v: Value) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, int) else (d if d in ("N", "M") else None) for d in v.dims]
    return helper.make_tensor_value_info(v.name, _NP_TO_ONNX[v.dtype], dims)


def fuzz_cases(min_ops: int = 2, max_ops: int = 8):
    """A hypothesis strategy of ``FuzzCase``: random valid models over qiao's operators."""
    from hypothesis import assume
    from hypothesis import strategies as st

    names = list(GENERATORS)
    weights = [GENERATORS[n][1] for n in names]
    weighted = [n for n, w in zip(names, weights) for _ in range(w)]

    @st.composite
    def strategy(draw):
        opset = draw(st.sampled_from(OPSETS))
        fdt = "float16" if draw(st.integers(0, 9)) == 0 else "float32"
        b = _Builder(draw, st, opset, fdt)
        first_dt = fdt if draw(st.integers(0, 5)) else draw(st.sampled_from(_INTS))
        b.new_input(first_dt, b.random_dims())
        target = draw(st.integers(min_ops, max_ops))
        tries = 0
        while len(b.nodes) < target and tries < 4 * max_ops:
            tries += 1
            gen = GENERATORS[draw(st.sampled_from(weighted))][0]
            gen(b)
        assume(len(b.nodes) >= min_ops)
        return _finish(b)

    return strategy()


def _finish(b: _Builder) -> FuzzCase:
    used = {i for n in b.nodes for i in n.input}
    produced = [v for v in b.values if v not in b.inputs]
    outputs = [v for v in produced if v.name not in used]
    if produced and produced[-1] not in outputs:
        outputs.append(produced[-1])
    inputs = [v for v in b.inputs if v.name in used]
    graph = helper.make_graph(
        b.nodes,
        "fuzz",
        [_value_info(v) for v in inputs],
        [_value_info(v) for v in outputs],
        initializer=b.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", b.opset)], producer_name="qiao-fuzz"
    )
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model, full_check=True)  # the generator's bug if this fails
    bindings = []
    seed = b.integers(0, 2**31 - 1)
    for k in range(2 if b.syms else 1):
        rng = np.random.default_rng(seed + k)
        sizes = {s: v[k] for s, v in b.syms.items()}
        feeds = {}
        for v in inputs:
            shape = tuple(b.size(d, sizes) for d in v.dims)
            if v.dtype in _FLOATS:
                feeds[v.name] = rng.standard_normal(shape).astype(v.dtype)
                if v.wild:
                    mask = rng.random(shape) < 0.3
                    with np.errstate(over="ignore"):  # 1e30 is inf in float16
                        picks = rng.choice(SPECIAL_VALUES, size=shape).astype(v.dtype)
                    feeds[v.name] = np.where(mask, picks, feeds[v.name])
            else:
                feeds[v.name] = rng.integers(-5, 6, shape).astype(v.dtype)
        bindings.append(feeds)
    float16 = any(v.dtype == "float16" for v in b.values)
    return FuzzCase(model, bindings, frozenset(b.families), tuple(b.ops), float16)


# -- running a case -------------------------------------------------------------------------


class ReferenceUnavailable(Exception):
    """ONNX Runtime has no CPU kernel for some operator/dtype of the case: nothing to compare."""


def onnxruntime_outputs(model: onnx.ModelProto, feeds: dict, intermediates: bool = False):
    """ONNX Runtime's outputs (graph optimisations off); with ``intermediates`` every float
    node output too (for the magnitude that scales ``atol``)."""
    import onnxruntime as ort

    if intermediates:
        model = _with_all_outputs(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as err:  # noqa: BLE001 - NOT_IMPLEMENTED kernels: no reference
        raise ReferenceUnavailable(str(err).splitlines()[0]) from err
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _with_all_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {o.name for o in model.graph.output}
    extra = [
        vi
        for vi in inferred.graph.value_info
        if vi.name not in known
        and vi.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
    ]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(extra)
    return out


def magnitude(values) -> float:
    """The largest finite absolute value among float arrays (at least 1)."""
    m = 1.0
    for v in values:
        v = np.asarray(v)
        if v.dtype.kind == "f" and v.size:
            finite = np.abs(v[np.isfinite(v)].astype(np.float64))
            if finite.size:
                m = max(m, float(finite.max()))
    return m


def _references(case: FuzzCase) -> list:
    """Per binding: (feeds, ORT's outputs, the magnitude that scales ``atol``)."""
    refs = []
    for feeds in case.bindings:
        everything = onnxruntime_outputs(case.model, feeds, intermediates=True)
        outs = {o.name: everything[o.name] for o in case.model.graph.output}
        # the inputs count too: a sum of 1e30 and -1e30 cancels to whatever order leaves
        refs.append((feeds, outs, magnitude([*everything.values(), *feeds.values()])))
    return refs


def _mismatch(case: FuzzCase, references: list, run, prefix: str = "") -> str | None:
    """The first output of ``case`` (under ``prefix`` in a merged model) that differs from ONNX
    Runtime, described; ``run(k)`` gives the artifact's outputs for binding ``k``."""
    from qiao.compiler.validate import compare

    rtol, atol = case.tolerance
    for k, (_, expected, scale) in enumerate(references):
        actual = run(k)
        for name, want in expected.items():
            got = actual[prefix + name]
            c = compare(name, "onnxruntime", got, want, rtol, atol * scale)
            if not c.ok:
                return (
                    f"binding {k}, output {name!r}: {c.note or 'values differ'} "
                    f"(max abs {c.max_abs:.3e}, rtol {rtol}, atol {atol * scale:.3e}); "
                    f"shapes {np.shape(got)} vs {np.shape(want)}, dtypes "
                    f"{np.asarray(got).dtype} vs {np.asarray(want).dtype}"
                )
    return None


def check_case(case: FuzzCase, workdir: str | None = None) -> None:
    """Compile ``case`` for the CPU and compare every output of every binding with ONNX Runtime.
    Raises ``ReferenceUnavailable`` when ORT cannot run it, ``AssertionError`` on a mismatch; a
    compile error propagates as it is."""
    from qiao.compiler.driver import compile as qiao_compile

    references = _references(case)
    with tempfile.TemporaryDirectory(prefix="qiao-fuzz-", dir=workdir) as tmp:
        artifact = qiao_compile(case.model, "cpu", os.path.join(tmp, "a"))
        problem = _mismatch(case, references, lambda k: artifact.run(case.bindings[k]))
    if problem:
        raise AssertionError(problem)


def merge(cases: list) -> tuple[onnx.ModelProto, list]:
    """One model holding ``cases`` side by side (names and symbolic dims prefixed ``g<i>_``; all
    cases of one opset), and its bindings: a campaign compiles once for several graphs."""
    nodes, inputs, outputs, inits = [], [], [], []
    for i, case in enumerate(cases):
        g, pre = case.model.graph, f"g{i}_"
        for n in g.node:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.input[:] = [pre + x if x else x for x in n.input]
            m.output[:] = [pre + x for x in n.output]
            nodes.append(m)
        for src, dst in ((g.input, inputs), (g.output, outputs), (g.initializer, inits)):
            for item in src:
                c = type(item)()
                c.CopyFrom(item)
                c.name = pre + item.name
                if hasattr(c, "type"):
                    for d in c.type.tensor_type.shape.dim:
                        if d.dim_param:
                            d.dim_param = pre + d.dim_param
                dst.append(c)
    model = helper.make_model(
        helper.make_graph(nodes, "fuzz", inputs, outputs, initializer=inits),
        opset_imports=list(cases[0].model.opset_import),
        producer_name="qiao-fuzz",
    )
    model.ir_version = cases[0].model.ir_version
    bindings = []
    for k in range(max(len(c.bindings) for c in cases)):
        feeds = {}
        for i, c in enumerate(cases):
            feeds.update(
                {f"g{i}_{n}": v for n, v in c.bindings[min(k, len(c.bindings) - 1)].items()}
            )
        bindings.append(feeds)
    return model, bindings


def check_cases(cases: list, workdir: str | None = None) -> list:
    """Check several cases of one opset with one compile (``merge``). Returns ``(case, error)``
    for each failing case: a mismatch's description, or the exception a case's own compile
    raised (a merged compile that fails is retried case by case). Cases ONNX Runtime cannot run
    are left out."""
    from qiao.compiler.driver import compile as qiao_compile

    checked = []
    for case in cases:
        try:
            checked.append((case, _references(case)))
        except ReferenceUnavailable:
            pass
    if not checked:
        return []
    model, bindings = merge([c for c, _ in checked])
    failures = []
    with tempfile.TemporaryDirectory(prefix="qiao-fuzz-", dir=workdir) as tmp:
        try:
            artifact = qiao_compile(model, "cpu", os.path.join(tmp, "a"))
        except Exception:  # noqa: BLE001 - find which case breaks the compile
            artifact = None
        if artifact is not None:
            outputs = [artifact.run(b) for b in bindings]
    for i, (case, refs) in enumerate(checked):
        if artifact is None:
            try:
                check_case(case, workdir)
            except Exception as err:  # noqa: BLE001
                failures.append((case, err))
            continue
        problem = _mismatch(case, refs, lambda k: outputs[k], prefix=f"g{i}_")
        if problem:
            try:  # alone too? (a mismatch only merged would be a bug of its own)
                check_case(case, workdir)
                problem = "only when merged with other graphs: " + problem
            except Exception as err:  # noqa: BLE001
                problem = err
            failures.append((case, problem))
    return failures


# -- campaign -------------------------------------------------------------------------------


def _flat_bindings(case: FuzzCase) -> dict:
    """Every binding's inputs for ``np.savez``: input ``x`` of binding ``k`` as ``"k/x"``."""
    return {f"{k}/{name}": v for k, feeds in enumerate(case.bindings) for name, v in feeds.items()}


def campaign(examples: int, seed: int, log_dir: str, batch: int = 6) -> dict:
    """Fuzz ``examples`` graphs without stopping at failures, ``batch`` graphs of one opset per
    compile (``check_cases``). Each failing model is saved as ``<log_dir>/fail-<seed>-<n>.onnx``
    with its error and inputs beside it; a line per batch goes to ``<log_dir>/log.txt``. A crash
    of the process (a segfault in a kernel) leaves the batch it was running as
    ``<log_dir>/inflight-<seed>-<i>.onnx`` / ``.npz`` (binding ``k``'s input ``x`` as ``k/x``).
    Returns counts by outcome."""
    import time
    import traceback

    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hyp_seed

    os.makedirs(log_dir, exist_ok=True)
    counts = {"graphs": 0, "fail": 0}
    pending: dict[int, list] = {}
    log = open(os.path.join(log_dir, "log.txt"), "a", buffering=1)  # noqa: SIM115

    def flush(cases):
        t0 = time.time()
        # a crash (segfault) ends the campaign: the batch it ran stays as inflight-<seed>-<i>
        inflight = [os.path.join(log_dir, f"inflight-{seed}-{i}") for i in range(len(cases))]
        for stem, case in zip(inflight, cases):
            onnx.save(case.model, stem + ".onnx")
            np.savez(stem + ".npz", **_flat_bindings(case))
        failures = check_cases(cases)
        for stem in inflight:
            for ext in (".onnx", ".npz"):
                os.remove(stem + ext)
        counts["graphs"] += len(cases)
        for case, err in failures:
            n = counts["fail"]
            counts["fail"] += 1
            stem = os.path.join(log_dir, f"fail-{seed}-{n}")
            onnx.save(case.model, stem + ".onnx")
            np.savez(stem + ".npz", **case.bindings[0])
            detail = err if isinstance(err, str) else "".join(traceback.format_exception(err))
            with open(stem + ".txt", "w") as f:
                f.write(f"{detail}\n{case!r}\n")
            first = detail if isinstance(err, str) else traceback.format_exception_only(err)[-1]
            log.write(f"FAIL {stem}: {' '.join(case.ops)} :: {first.strip()[:300]}\n")
        log.write(f"{time.time() - t0:6.2f}s {len(cases)} graphs, {len(failures)} failing\n")

    @hyp_seed(seed)
    @settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(fuzz_cases())
    def draw(case):
        opset = case.model.opset_import[0].version
        pending.setdefault(opset, []).append(case)
        if len(pending[opset]) >= batch:
            flush(pending.pop(opset))

    draw()
    for cases in pending.values():
        flush(cases)
    log.write(f"seed {seed}: {counts}\n")
    log.close()
    return counts


def main(argv=None) -> int:
    """``python -m qiao.compiler.fuzzing [--examples N] [--seed S] [--log-dir DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="seeds seed, seed+1, ...")
    parser.add_argument("--log-dir", default="fuzz-log")
    parser.add_argument("--batch", type=int, default=6, help="graphs per compile")
    args = parser.parse_args(argv)
    for r in range(args.rounds):
        print(campaign(args.examples, args.seed + r, args.log_dir, args.batch), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
