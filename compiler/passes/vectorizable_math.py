"""VectorizableMath: rewrite float32 ``exp``, ``sigmoid``, ``tanh``, ``erf`` and ``pow`` by a
constant non-integer exponent in TIR as polynomial expressions that LLVM vectorises.

TVM lowers these intrinsics to libm calls, which LLVM cannot vectorise: a vectorised softmax or SiLU
loop becomes one scalar ``expf`` call per lane, and that dominates small transformer layers. The
replacements are the classic single-precision approximations (``expf`` with Cody-Waite range
reduction, Eigen's rational ``erf``), accurate to a few ulp over the whole float range; ``exp``
saturates below ``-88.38`` (about ``1e-38`` instead of ``0``, which no softmax can tell apart) and
above ``88.38``.

``exp``'s polynomial is of degree 5 (``1 + r + r²·P(r)``, ``P`` cubic, a near-minimax fit of the
relative error on ``|r| <= ln 2 / 2``: least squares on Chebyshev nodes, reweighted towards the
largest errors; 1.1e-7 in exact arithmetic, under one float32 ulp), two multiply-adds fewer
than Cephes' degree 7 for little accuracy a float32 can hold (evaluated in float32: 2.3e-7
relative, 1.7e-7 before; ``tests/test_schedules.py`` bounds the polynomial and the kernels).
NaN stays NaN at no cost: each clamp takes its constant first, ``min(c, x)`` being
``c < x ? c : x``, which is ``x`` for a NaN ``x`` (one ``minps``, as ``passes.propagate_nan``
writes ``max(c, x)``); the NaN then runs through the arithmetic. A select on the float's bits
had cost three of the ~25 instructions per SiLU vector.

``pow(x, c)`` for a constant non-integer ``c`` (local response normalisation's ``(k + a·Σx²)^0.75``
in AlexNet and GoogLeNet exports) is ``exp(c · log(x))`` with Cephes' ``logf`` (exponent and
mantissa from the float's bits, a degree-8 polynomial) and the ``exp`` above: an LRN node over
96x55x55, AMD Zen 5 VM, 2026-12-07, 1.25 -> 0.70 ms (one ``powf`` call per element before).
Integer exponents stay ``pow`` (LLVM turns small ones into products).
"""

from __future__ import annotations

from typing import Any

_EXP_HI = 88.3762626647950
_EXP_LO = -88.3762626647949
_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
# P(r), highest power first (the fit above, rounded to float32)
_EXP_POLY = (8.31255130469799e-3, 4.189014807343483e-2, 1.6667114198207855e-1, 4.99992311000824e-1)
_TANH_P = (
    -5.70498872745e-3,
    2.06390887954e-2,
    -5.37397155531e-2,
    1.33314422036e-1,
    -3.33332819422e-1,
)
# Eigen's generic_fast_erf_float: erf(x) ≈ x·P(x²)/Q(x²) on [-4, 4], ±1 outside.
_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def _c(value: float):
    from tvm import tirx

    return tirx.const(value, "float32")


def _horner(x, coefficients):
    acc = _c(coefficients[0])
    for coef in coefficients[1:]:
        acc = acc * x + _c(coef)
    return acc


def _let(value, body_fn, name: str):
    """``body_fn(v)`` with ``v`` bound to ``value`` once (values are used several times)."""
    from tvm import tirx

    var = tirx.Var(name, "float32")
    return tirx.Let(var, value, body_fn(var))


def _clamp(x, lo: float, hi: float):
    """``x`` clamped to ``[lo, hi]``, NaN kept: the constants come first (see the module
    docstring). Not ``tirx.isnan`` around it: TVM's vectorizer scalarises a loop over it and then
    fails on the Lets around it ("Let cannot bind the same var to two different values")."""
    from tvm import tirx

    return tirx.Max(_c(lo), tirx.Min(_c(hi), x))


def fast_exp(x):
    """``exp(x)`` for a float32 TIR expression, as vectorisable arithmetic."""
    from tvm import tirx

    def body(x_in):
        v = _clamp(x_in, _EXP_LO, _EXP_HI)

        def reduced(clamped):
            n = tirx.floor(clamped * _c(_LOG2E) + _c(0.5))

            def with_n(fn):
                r = clamped - fn * _c(_LN2_HI) - fn * _c(_LN2_LO)

                def poly(rv):
                    y = _horner(rv, _EXP_POLY) * (rv * rv) + rv + _c(1.0)
                    exponent = tirx.Cast("int32", fn) + tirx.const(127, "int32")
                    scale = tirx.reinterpret(
                        "float32", tirx.shift_left(exponent, tirx.const(23, "int32"))
                    )
                    return y * scale

                return _let(r, poly, "exp_r")

            return _let(n, with_n, "exp_n")

        return _let(v, reduced, "exp_x")

    return _let(x, body, "exp_in")


def fast_sigmoid(x):
    """``1 / (1 + exp(-x))`` with ``fast_exp``."""
    return _c(1.0) / (_c(1.0) + fast_exp(_c(0.0) - x))


def fast_tanh(x):
    """Cephes ``tanhf``: an odd polynomial for ``|x| < 0.625``, else
    ``sign(x)·(1 - e)/(1 + e)`` with ``e = exp(-2|x|)`` (no overflow for large ``|x|``)."""
    from tvm import tirx

    def body(v):
        def with_e(e):
            magnitude = (_c(1.0) - e) / (_c(1.0) + e)
            large = tirx.Select(v < _c(0.0), _c(0.0) - magnitude, magnitude)
            small = v + v * (v * v) * _horner(v * v, _TANH_P)
            return tirx.Select(tirx.Max(v, _c(0.0) - v) < _c(0.625), small, large)

        return _let(fast_exp(_c(-2.0) * tirx.Max(v, _c(0.0) - v)), with_e, "tanh_e")

    return _let(x, body, "tanh_in")


def fast_erf(x):
    """Eigen's rational ``erf`` approximation, clamped to [-4, 4] (where erf is ±1 in float32)."""

    def body(x_in):
        v = _clamp(x_in, -4.0, 4.0)

        def with_clamped(c):
            def with_sq(x2):
                return c * _horner(x2, _ERF_P) / _horner(x2, _ERF_Q)

            return _let(c * c, with_sq, "erf_x2")

        return _let(v, with_clamped, "erf_x")

    return _let(x, body, "erf_in")


# Cephes logf: log(1 + m) ≈ m - m²/2 + m³·P(m) for m in [sqrt(1/2) - 1, sqrt(2) - 1]
_LOG_P = (
    7.0376836292e-2,
    -1.1514610310e-1,
    1.1676998740e-1,
    -1.2420140846e-1,
    1.4249322787e-1,
    -1.6668057665e-1,
    2.0000714765e-1,
    -2.4999993993e-1,
    3.3333331174e-1,
)
_SQRT_HALF = 0.707106781186547524
_FLT_MIN = 1.17549435e-38


def fast_log(x):
    """Cephes ``logf`` for a float32 TIR expression, as vectorisable arithmetic: the exponent
    and mantissa taken from the float's bits, a polynomial in the mantissa. ``log(0) = -inf``,
    ``log(inf) = inf``, NaN for negative or NaN inputs; subnormal inputs are taken as 0."""
    from tvm import tirx

    def body(v):
        bits = tirx.reinterpret("int32", v)
        exponent = tirx.Cast(
            "float32", tirx.shift_right(bits, tirx.const(23, "int32")) - tirx.const(126, "int32")
        )
        mantissa = tirx.reinterpret(
            "float32",
            tirx.bitwise_or(
                tirx.bitwise_and(bits, tirx.const(0x007FFFFF, "int32")),
                tirx.const(0x3F000000, "int32"),
            ),
        )  # in [0.5, 1)

        def with_parts(m, e):
            low = m < _c(_SQRT_HALF)
            e2 = tirx.Select(low, e - _c(1.0), e)
            r = tirx.Select(low, m + m - _c(1.0), m - _c(1.0))

            def poly(rv):
                z = rv * rv
                y = rv * z * _horner(rv, _LOG_P) + e2 * _c(_LN2_LO) - _c(0.5) * z
                return rv + y + e2 * _c(_LN2_HI)

            return _let(r, poly, "log_r")

        finite = _let(
            mantissa, lambda m: _let(exponent, lambda e: with_parts(m, e), "log_e"), "log_m"
        )
        inf = _c(float("inf"))
        return tirx.Select(
            v < _c(_FLT_MIN),
            tirx.Select(v < _c(0.0), _c(float("nan")), _c(0.0) - inf),
            tirx.Select(v < inf, finite, v),
        )

    return _let(x, body, "log_in")


def fast_pow(x, exponent: float):
    """``x ** exponent`` for a constant non-integer ``exponent``: ``exp(exponent · log(x))``
    with ``fast_exp`` and ``fast_log``; 0 and inf at the ends, NaN for negative ``x`` (as
    ``powf`` gives for a non-integer exponent)."""
    from tvm import tirx

    def body(v):
        inside = fast_exp(_c(exponent) * fast_log(v))
        zero, inf = (_c(0.0), _c(float("inf"))) if exponent > 0 else (_c(float("inf")), _c(0.0))
        return tirx.Select(v == _c(0.0), zero, tirx.Select(v == _c(float("inf")), inf, inside))

    return _let(x, body, "pow_in")


REWRITES = {
    "tirx.exp": fast_exp,
    "tirx.sigmoid": fast_sigmoid,
    "tirx.tanh": fast_tanh,
    "tirx.erf": fast_erf,
}


def _bool_compare(node):
    """``0 < int(b)`` / ``int(b) != 0`` for a boolean ``b`` → ``b`` (the ONNX importer's masks
    compare casts of booleans; the casts to 64-bit integers make LLVM split every vector)."""
    from tvm import tirx

    def cast_of_bool(e):
        return isinstance(e, tirx.Cast) and str(e.value.ty) == "bool"

    def is_zero(e):
        return isinstance(e, tirx.IntImm) and int(e.value) == 0

    if isinstance(node, tirx.LT) and is_zero(node.a) and cast_of_bool(node.b):
        return node.b.value
    if isinstance(node, tirx.GT) and is_zero(node.b) and cast_of_bool(node.a):
        return node.a.value
    if isinstance(node, tirx.NE) and is_zero(node.b) and cast_of_bool(node.a):
        return node.a.value
    return None


def rewrite_math(func):
    """``func`` with every float32 ``exp``/``sigmoid``/``tanh``/``erf`` call and ``pow`` by a
    constant non-integer exponent rewritten, and
    comparisons of boolean casts with zero folded to the boolean."""
    import tvm_ffi
    from tvm import tirx
    from tvm.ir.expr import Call

    def on_call(value, mutator):
        new = mutator.default_mutate(value)
        op = getattr(new, "op", None)
        name = getattr(op, "name", None)
        if name == "tirx.pow" and str(new.ty) == "float32" and len(new.args) == 2:
            power = new.args[1]
            if isinstance(power, tirx.FloatImm) and float(power.value) != round(power.value):
                return fast_pow(new.args[0], float(power.value))
            return new
        rewrite = REWRITES.get(name)
        if rewrite is None or len(new.args) != 1 or str(new.ty) != "float32":
            return new
        return rewrite(new.args[0])

    def on_compare(value, mutator):
        new = mutator.default_mutate(value)
        folded = _bool_compare(new)
        return new if folded is None else folded

    return tvm_ffi.structural_mutate(
        func, [(Call, on_call), (tirx.LT, on_compare), (tirx.GT, on_compare), (tirx.NE, on_compare)]
    )


def VectorizableMath() -> Any:  # noqa: N802 - a pass constructor, named like TVM's
    """Module pass applying ``rewrite_math`` to every PrimFunc.

    Returns
    -------
    tvm.transform.Pass
    """
    from qiao.compiler.passes.apply_schedule_rules import primfunc_rewrite_pass

    return primfunc_rewrite_pass("VectorizableMath", rewrite_math)
