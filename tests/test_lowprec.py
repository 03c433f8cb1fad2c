"""Low-precision emulation (``qiao.compiler.frontend.lowprec``): float8, float4e2m1, int4/int2.

Every check compares with an independent reference: ml_dtypes' conversions (what onnx's reference
implementation calls) and ``onnx.numpy_helper.saturate_cast`` / ``to_float8e8m0`` (the functions
that compute the expected outputs of onnx's Cast node tests), bit for bit, over every code of each
format and over the rounding edge cases between codes. The compiled checks go through the whole
user path: ``qiao.compiler.compile`` to a CPU artifact, then ``Artifact.run``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qiao.compiler.frontend import lowprec
from qiao.compiler.testing import assert_close

FLOATS = [t for t in lowprec.LOW_PRECISION.values() if t.is_float]
INTS = [t for t in lowprec.LOW_PRECISION.values() if not t.is_float]
OPSET = [helper.make_opsetid("", 25)]


def _codes(t) -> np.ndarray:
    return np.arange(1 << t.bits, dtype=np.uint8)


def _equal_bits(got: np.ndarray, want: np.ndarray, x: np.ndarray, what: str) -> None:
    """Bit-exact comparison that names the first inputs that differ."""
    g, w = got.view(np.uint8), want.view(np.uint8)
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, (
        f"{what}: {bad.size} of {g.size} differ, e.g. x={x[bad[:5]]} got bits {g[bad[:5]]} "
        f"want {w[bad[:5]]}"
    )


# --- decoding: the lookup table against ml_dtypes -------------------------------------------------
@pytest.mark.parametrize("t", FLOATS, ids=lambda t: t.name)
def test_decode_table_matches_ml_dtypes(t):
    want = _codes(t).view(lowprec.ml_dtype(t.name)).astype(np.float32)
    got = lowprec.decode_table(t)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=t.name)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want), err_msg=t.name)
    finite = ~np.isnan(want)
    # array_equal treats 0.0 == -0.0, so compare the float32 bits for signed zeros too.
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


@pytest.mark.parametrize("t", FLOATS + INTS, ids=lambda t: t.name)
def test_storage_round_trip(t):
    dtype = lowprec.ml_dtype(t.name)
    values = _codes(t).view(dtype) if t.is_float else np.arange(-8, 8).astype(dtype)
    stored = lowprec.to_storage(values, t.name)
    assert stored.dtype == np.dtype(t.storage)
    back = lowprec.from_storage(stored, t.name)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back.view(np.uint8), values.view(np.uint8))
    if not t.is_float:  # integer storage holds the value itself
        np.testing.assert_array_equal(stored, values.astype(np.int64))


def test_random_inputs_cover_low_precision():
    from qiao.compiler.driver import random_inputs

    specs = [{"name": t.name, "dtype": t.name, "shape": [200]} for t in FLOATS + INTS]
    got = random_inputs(specs, seed=0)
    for t in FLOATS + INTS:
        values = got[t.name]
        assert values.dtype == lowprec.ml_dtype(t.name)
        wide = values.astype(np.float32)
        assert np.isfinite(wide).all(), t.name
        assert len(np.unique(wide)) > 2, t.name


# --- encoding: compiled Cast against onnx's reference functions -----------------------------------
def _probe_values(t) -> np.ndarray:
    """Inputs (float64) that exercise every rounding decision of float format ``t``: each code's
    value, the exact midpoints between neighbours (ties), one float32 ulp either side of them, the
    region past the largest value, tiny and subnormal inputs, random values, ±0, ±inf, NaN."""
    table = lowprec.decode_table(t).astype(np.float64)
    finite = np.unique(table[np.isfinite(table)])
    mids64 = (finite[1:] + finite[:-1]) / 2  # exact: few significant bits
    mids = mids64.astype(np.float32)
    big = finite.max()
    extra = np.array(
        [
            big * 1.03,
            big * 1.0625,
            big * 1.07,
            big * 1.125,
            big * 1.2,
            big * 4,
            1e6,
            3e38,
            1e-7,
            1e-30,
            1e-40,
            2.0**-149,
        ]  # fmt: skip
    )
    rng = np.random.default_rng(0)
    random = rng.standard_normal(2000) * np.exp2(rng.integers(-20, 20, 2000))
    x = np.concatenate(
        [
            finite,
            mids,
            np.nextafter(mids, np.float32(np.inf)).astype(np.float64),
            np.nextafter(mids, np.float32(-np.inf)).astype(np.float64),
            extra,
            -extra,
            random,
            # Off the ties by less than a float32 ulp: from float64, onnx's reference (like ONNX
            # Runtime) rounds through float32, which makes them ties; qiao must agree.
            mids64 * (1 + 2.0**-40),
            mids64 * (1 - 2.0**-40),
        ]
    )
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan])
    return np.concatenate([x, specials])


def _reference(x: np.ndarray, t, saturate: bool, mode: str = "up") -> np.ndarray:
    """What onnx's reference Cast gives (onnx.reference.ops.op_cast.cast_to), float64 inputs
    rounded to float32 first: qiao does so, as ONNX Runtime does and ml_dtypes did before 0.7
    (0.7 rounds float64 to float8 once, so a value just off a float8 tie can land elsewhere)."""
    dtype = lowprec.ml_dtype(t.name)
    if x.dtype == np.float64:
        x = x.astype(np.float32)
    with np.errstate(all="ignore"):
        if t.special == "e8m0":
            return numpy_helper.to_float8e8m0(x, saturate, mode).astype(dtype)
        if t.special != "none" and saturate:
            return numpy_helper.saturate_cast(x, dtype)
        return x.astype(dtype)


def _cast_model(x: np.ndarray, casts: list[tuple[str, int, dict]]) -> onnx.ModelProto:
    nodes = [helper.make_node("Cast", ["x"], [name], to=to, **attrs) for name, to, attrs in casts]
    outputs = [helper.make_tensor_value_info(n, to, x.shape) for n, to, _ in casts]
    x_type = helper.np_dtype_to_tensor_dtype(x.dtype)
    graph = helper.make_graph(
        nodes, "casts", [helper.make_tensor_value_info("x", x_type, x.shape)], outputs
    )
    return helper.make_model(graph, opset_imports=OPSET)


@pytest.fixture(scope="module")
def compile_model(tmp_path_factory):
    from qiao.compiler import compile as qiao_compile

    root = tmp_path_factory.mktemp("lowprec")
    counter = iter(range(1000))

    def run(model: onnx.ModelProto, inputs: dict):
        artifact = qiao_compile(model, "cpu", root / f"m{next(counter)}")
        return artifact, artifact.run(inputs)

    return run


@pytest.mark.parametrize("source", [np.float32, np.float16, np.float64])
def test_encode_floats_bit_exact(compile_model, source):
    """Cast float32/float16/float64 → every float format, saturating or not, e8m0 in each round
    mode."""
    cases = {}
    for t in FLOATS:
        x = _probe_values(t)
        modes = ["up", "down", "nearest"] if t.special == "e8m0" else ["up"]
        for saturate in (1, 0):
            for mode in modes:
                cases[f"{t.name}_s{saturate}_{mode}"] = (t, x, saturate, mode)
    # One model per format family would do; one input keeps the compile count at one.
    with np.errstate(over="ignore"):  # the large probes become inf in float16/float32
        x = np.concatenate([c[1] for c in cases.values()]).astype(source)
    casts = []
    for name, (t, _, saturate, mode) in cases.items():
        attrs = {"saturate": saturate}
        if t.special == "e8m0":
            attrs["round_mode"] = mode
        casts.append((name, t.onnx_type, attrs))
    artifact, got = compile_model(_cast_model(x, casts), {"x": x})
    specs = {o["name"]: o["dtype"] for o in artifact.outputs}
    for name, (t, _, saturate, mode) in cases.items():
        assert specs[name] == t.name  # the manifest keeps the ONNX type
        assert got[name].dtype == lowprec.ml_dtype(t.name)
        want = _reference(x, t, saturate, mode)
        _equal_bits(got[name], want, x, name)


def test_decode_compiled_all_codes(compile_model):
    """Cast every code of every float format (graph inputs of that type) to float32/float16;
    IsNaN and IsInf of every code."""
    inputs, nodes, in_vi, out_vi, want = {}, [], [], [], {}
    for t in FLOATS:
        codes = _codes(t).view(lowprec.ml_dtype(t.name))
        inputs[t.name] = codes
        in_vi.append(helper.make_tensor_value_info(t.name, t.onnx_type, codes.shape))
        for to, np_to in ((TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16)):
            out = f"{t.name}_to_{np.dtype(np_to).name}"
            nodes.append(helper.make_node("Cast", [t.name], [out], to=to))
            out_vi.append(helper.make_tensor_value_info(out, to, codes.shape))
            with np.errstate(over="ignore"):
                want[out] = codes.astype(np.float32).astype(np_to)
        if t.bits != 8 or t.special == "e8m0":  # IsNaN/IsInf take the four float8 formats
            continue
        for op in ("IsNaN", "IsInf"):  # decoded values, so each format's own NaN/inf codes
            nodes.append(helper.make_node(op, [t.name], [f"{t.name}_{op}"]))
            out_vi.append(helper.make_tensor_value_info(f"{t.name}_{op}", TensorProto.BOOL, [256]))
            want[f"{t.name}_{op}"] = (np.isnan if op == "IsNaN" else np.isinf)(
                codes.astype(np.float32)
            )
    model = helper.make_model(helper.make_graph(nodes, "d", in_vi, out_vi), opset_imports=OPSET)
    artifact, got = compile_model(model, inputs)
    assert [i["dtype"] for i in artifact.inputs] == [t.name for t in FLOATS]
    for name, ref in want.items():
        assert_close(got[name], ref, rtol=0, atol=0, name=name)
        if ref.dtype != bool:
            np.testing.assert_array_equal(np.signbit(got[name]), np.signbit(ref), err_msg=name)


def test_integers_compiled(compile_model):
    """float32 → int4/uint4/int2/uint2 truncates toward zero and wraps modulo 2**bits (NaN and
    infinities give 0), as ml_dtypes did before 0.7 (0.7 gives 0 out of range; ONNX leaves it
    undefined): NumPy's wrap for every value, and ml_dtypes for the in-range ones; every value of
    each type decodes exactly to float32 and int32."""
    x = np.concatenate(
        [np.arange(-40, 40, 0.25), [2.5, -2.5, 7.99, -8.01, 1e3, -1e3, np.nan, np.inf, -np.inf]]
    ).astype(np.float32)
    casts = [(f"to_{t.name}", t.onnx_type, {}) for t in INTS]
    _, got = compile_model(_cast_model(x, casts), {"x": x})
    with np.errstate(invalid="ignore"):
        for name, to, _ in casts:
            t = lowprec.LOW_PRECISION[to]
            dtype = lowprec.ml_dtype(t.name)
            assert got[name].dtype == dtype
            finite = np.isfinite(x)
            wrapped = np.where(finite, np.trunc(np.where(finite, x, 0)), 0).astype(np.int64)
            wrapped &= (1 << t.bits) - 1
            if t.signed:
                wrapped = (wrapped ^ (1 << (t.bits - 1))) - (1 << (t.bits - 1))
            np.testing.assert_array_equal(got[name].astype(np.int64), wrapped, err_msg=name)
            half = 1 << (t.bits - 1)
            lo, hi = (-half, half - 1) if t.signed else (0, 2 * half - 1)
            inside = finite & (np.trunc(np.where(finite, x, 0)) >= lo)
            inside &= np.trunc(np.where(finite, x, 0)) <= hi
            np.testing.assert_array_equal(
                got[name].astype(np.int64)[inside], x[inside].astype(dtype).astype(np.int64)
            )

    inputs, nodes, in_vi, out_vi = {}, [], [], []
    for t in INTS:
        lo, hi = (-(1 << (t.bits - 1)), 1 << (t.bits - 1)) if t.signed else (0, 1 << t.bits)
        inputs[t.name] = np.arange(lo, hi).astype(lowprec.ml_dtype(t.name))
        in_vi.append(helper.make_tensor_value_info(t.name, t.onnx_type, [hi - lo]))
        for to in (TensorProto.FLOAT, TensorProto.INT32):
            nodes.append(helper.make_node("Cast", [t.name], [f"{t.name}_{to}"], to=to))
            out_vi.append(helper.make_tensor_value_info(f"{t.name}_{to}", to, [hi - lo]))
    model = helper.make_model(helper.make_graph(nodes, "i", in_vi, out_vi), opset_imports=OPSET)
    _, got = compile_model(model, inputs)
    for t in INTS:
        for to, np_to in ((TensorProto.FLOAT, np.float32), (TensorProto.INT32, np.int32)):
            ref = inputs[t.name].astype(np_to)
            assert_close(got[f"{t.name}_{to}"], ref, rtol=0, atol=0, name=f"{t.name}->{np_to}")


# --- blocked quantisation with a short last block, against onnx's ReferenceEvaluator -------------
@pytest.mark.parametrize("zp_type", [TensorProto.INT4, TensorProto.UINT8, TensorProto.FLOAT8E4M3FN])
def test_blocked_quantize_dequantize(compile_model, zp_type):
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(1)
    shape, axis, block = (3, 10), 1, 4  # 10 = 4 + 4 + 2: a short last block
    x = (rng.standard_normal(shape) * 20).astype(np.float32)
    scale = rng.uniform(0.5, 4.0, (3, 3)).astype(np.float32)
    zp_np = helper.tensor_dtype_to_np_dtype(zp_type)
    zp = (np.zeros if zp_type == TensorProto.FLOAT8E4M3FN else np.ones)((3, 3)).astype(zp_np)
    zp_init = numpy_helper.from_array(zp, "zp")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], axis=axis, block_size=block),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=axis, block_size=block),
    ]
    graph = helper.make_graph(
        nodes,
        "blocked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("q", zp_type, shape),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, shape),
        ],
        initializer=[numpy_helper.from_array(scale, "s"), zp_init],
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    want_q, want_y = ReferenceEvaluator(model).run(None, {"x": x})
    _, got = compile_model(model, {"x": x})
    assert got["q"].dtype == want_q.dtype
    _equal_bits(got["q"], want_q, x.ravel(), "q")
    assert_close(got["y"], want_y, rtol=1e-6, atol=0, name="y")


def test_models_without_low_precision_are_untouched():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=10)], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=OPSET)
    assert lowprec.lower_low_precision(model) is model


def test_quantised_weights_through_data_movement(compile_model):
    """The weight-only pattern: int4 and float8 initializers (int4 packed two to a byte in the
    file), moved by Transpose/Reshape on their storage, dequantised per axis, then MatMul."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(2)
    w4 = rng.integers(-8, 8, (16, 6)).astype(lowprec.ml_dtype("int4"))  # stored as (N, K)
    zp4 = rng.integers(-2, 3, (16,)).astype(lowprec.ml_dtype("int4"))
    w8 = (rng.standard_normal((6, 16)) * 3).astype(lowprec.ml_dtype("float8_e4m3fn"))
    s4 = rng.uniform(0.1, 1.0, (16,)).astype(np.float32)
    s8 = np.float32(0.25)
    nodes = [
        helper.make_node("Transpose", ["w4"], ["w4t"], perm=[1, 0]),
        helper.make_node("DequantizeLinear", ["w4t", "s4", "zp4"], ["d4"], axis=1),
        helper.make_node("Reshape", ["w8", "shape"], ["w8r"]),
        helper.make_node("DequantizeLinear", ["w8r", "s8"], ["d8"]),
        helper.make_node("MatMul", ["x", "d4"], ["h"]),
        helper.make_node("MatMul", ["x", "d8"], ["g"]),
        helper.make_node("Add", ["h", "g"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w4, "w4"),
        numpy_helper.from_array(zp4, "zp4"),
        numpy_helper.from_array(w8, "w8"),
        numpy_helper.from_array(s4, "s4"),
        numpy_helper.from_array(s8, "s8"),
        numpy_helper.from_array(np.array([6, 16], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 16])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    (want,) = ReferenceEvaluator(model).run(None, {"x": x})
    _, got = compile_model(model, {"x": x})
    assert_close(got["y"], want, rtol=1e-5, atol=1e-5, name="y")
