"""qiao's ONNX converters (``compiler/frontend/convert_*.py``), each checked numerically against
ONNX Runtime through the real compile path (``qiao.compiler.compile`` → ``Artifact.run``).

Every model here is a small hand-built ONNX graph that TVM's own importer rejects or gets wrong;
the docstring of each converter says why.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper
from onnx.reference import ReferenceEvaluator

from qiao.compiler import compile
from qiao.compiler.frontend import import_onnx
from qiao.compiler.testing import assert_close

RNG = np.random.default_rng(0)


def make_model(nodes, inputs, outputs, opset=18, initializers=()):
    """A model from (name, elem type, shape) triples; an int shape = that rank, dims unknown."""

    def info(name, elem_type, shape):
        shape = [None] * shape if isinstance(shape, int) else shape
        return helper.make_tensor_value_info(name, elem_type, shape)

    graph = helper.make_graph(
        nodes,
        "g",
        [info(*i) for i in inputs],
        [info(*o) for o in outputs],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model


def reference_run(model, feeds, reference="ort"):
    """ONNX Runtime, or onnx's own NumPy reference implementation where ORT has no kernel."""
    if reference == "onnx":
        return ReferenceEvaluator(model).run(None, feeds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check(model, feeds_list, tmp_path, rtol=1e-5, atol=1e-5, reference="ort"):
    """Compile once, then match the reference for every feed dict (several sizes for symbolic
    dims)."""
    artifact = compile(model, "cpu", tmp_path / "artifact")
    names = [o.name for o in model.graph.output]
    for feeds in feeds_list:
        got = artifact.run(feeds)
        assert_close([got[n] for n in names], reference_run(model, feeds, reference), rtol, atol)
    return artifact


def randn(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def const(name, value, dtype=np.int64):
    return onnx.numpy_helper.from_array(np.asarray(value, dtype), name)


# --- symbolic shape values ------------------------------------------------------------------------
def test_reshape_of_symbolic_scalar_keeps_dims_symbolic(tmp_path):
    """The MultiheadAttention pattern: Shape → Gather → Mul → Reshape([1]) → Concat → Reshape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Mul", ["batch", "two"], ["batch2"]),
        helper.make_node("Reshape", ["batch2", "one"], ["batch2_1d"]),
        helper.make_node("Concat", ["batch2_1d", "minus_one", "four"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["y"]),
    ]
    inits = [
        const("zero", 0),
        const("two", 2),
        const("one", [1]),
        const("minus_one", [-1]),
        const("four", [4]),
    ]
    model = make_model(
        nodes,
        [("x", TP.FLOAT, ["b", "s", 8])],
        [("y", TP.FLOAT, 3)],
        initializers=inits,
    )
    check(model, [{"x": randn(2, 3, 8)}, {"x": randn(5, 7, 8)}], tmp_path)


def test_failed_conversion_retried_with_symbolic_values_as_tensors(tmp_path):
    """Sqrt of a symbolic dim: TVM's Sqrt converter takes tensors only (``_SymbolicTolerant``)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], start=1, end=2),
        helper.make_node("Squeeze", ["shape"], ["seq"]),
        helper.make_node("Cast", ["seq"], ["seq_f"], to=TP.FLOAT),
        helper.make_node("Sqrt", ["seq_f"], ["root"]),
        helper.make_node("Div", ["x", "root"], ["y"]),
    ]
    model = make_model(nodes, [("x", TP.FLOAT, ["b", "s"])], [("y", TP.FLOAT, ["b", "s"])])
    check(model, [{"x": randn(2, 9)}, {"x": randn(3, 4)}], tmp_path)


def test_static_shape_is_a_foldable_constant(tmp_path):
    """Shape of static dims → constant, so ``Cast → Sqrt`` folds (TVM: ShapeExpr, refused)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], start=-1),
        helper.make_node("Cast", ["shape"], ["dim"], to=TP.FLOAT),
        helper.make_node("Sqrt", ["dim"], ["root"]),
        helper.make_node("Div", ["x", "root"], ["y"]),
    ]
    model = make_model(nodes, [("x", TP.FLOAT, ["b", 16])], [("y", TP.FLOAT, ["b", 16])])
    check(model, [{"x": randn(3, 16)}], tmp_path)


def test_constant_shape_arithmetic_folds_at_import(tmp_path):
    """Not/Where on constants feeding Expand are folded, so the output shape stays static."""
    nodes = [
        helper.make_node("Not", ["flags"], ["not_flags"]),
        helper.make_node("Where", ["not_flags", "big", "small"], ["shape"]),
        helper.make_node("Expand", ["x", "shape"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array([False, True, False]), "flags"),
        const("big", [5, 5, 5]),
        const("small", [1, 3, 1]),
    ]
    model = make_model(
        nodes, [("x", TP.FLOAT, [1, 3, 1])], [("y", TP.FLOAT, 3)], initializers=inits
    )
    imported = import_onnx(model)
    assert [int(d) for d in imported.mod["main"].ret_ty.shape.values] == [5, 3, 5]
    check(model, [{"x": randn(1, 3, 1)}], tmp_path)


def test_constant_value_attributes(tmp_path):
    nodes = [
        helper.make_node("Constant", [], ["i"], value_int=3),
        helper.make_node("Constant", [], ["fs"], value_floats=[0.5, -1.0, 2.0]),
        helper.make_node("Cast", ["i"], ["f"], to=TP.FLOAT),
        helper.make_node("Mul", ["x", "fs"], ["xs"]),
        helper.make_node("Add", ["xs", "f"], ["y"]),
    ]
    model = make_model(nodes, [("x", TP.FLOAT, [2, 3])], [("y", TP.FLOAT, [2, 3])])
    check(model, [{"x": randn(2, 3)}], tmp_path)


def test_reshape_to_run_time_shape(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(
        nodes, [("x", TP.FLOAT, [2, 3, 4]), ("shape", TP.INT64, [3])], [("y", TP.FLOAT, 3)]
    )
    x = randn(2, 3, 4)
    feeds = [{"x": x, "shape": np.array(s, np.int64)} for s in ([0, -1, 2], [4, 0, 2], [-1, 1, 1])]
    check(model, feeds, tmp_path)


def test_expand_to_run_time_shape_broadcasts_both_ways(tmp_path):
    """Data (3, 1) to shape (2, 1, 6) is (2, 3, 6); TVM's converter gives (2, 1, 6)."""
    nodes = [helper.make_node("Expand", ["x", "shape"], ["y"])]
    model = make_model(
        nodes, [("x", TP.FLOAT, [3, 1]), ("shape", TP.INT64, [3])], [("y", TP.FLOAT, 3)]
    )
    check(model, [{"x": randn(3, 1), "shape": np.array([2, 1, 6], np.int64)}], tmp_path)


def test_constant_of_shape_from_if_branch(tmp_path):
    """An If yielding a shape gives a run-time shape tensor: its dims must be bound to names."""
    branches = [
        helper.make_graph(
            [helper.make_node("Shape", ["x"], [f"s{i}"])],
            f"branch{i}",
            [],
            [helper.make_tensor_value_info(f"s{i}", TP.INT64, [2])],
        )
        for i in range(2)
    ]
    value = helper.make_tensor("v", TP.FLOAT, [1], [1.5])
    nodes = [
        helper.make_node(
            "If", ["cond"], ["shape"], then_branch=branches[0], else_branch=branches[1]
        ),
        helper.make_node("ConstantOfShape", ["shape"], ["y"], value=value),
    ]
    model = make_model(
        nodes, [("cond", TP.BOOL, [1]), ("x", TP.FLOAT, [2, 3])], [("y", TP.FLOAT, 2)]
    )
    check(model, [{"cond": np.array([True]), "x": randn(2, 3)}], tmp_path)


def test_range_with_integer_valued_float_bounds(tmp_path):
    """``torch.arange(seq, dtype=float)``: the length stays ``seq``, so the Add broadcasts."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], start=0, end=1),
        helper.make_node("Squeeze", ["shape"], ["seq"]),
        helper.make_node("Cast", ["seq"], ["seq_f"], to=TP.FLOAT),
        helper.make_node("Range", ["start", "seq_f", "delta"], ["positions"]),
        helper.make_node("Add", ["x", "positions"], ["y"]),
    ]
    inits = [const("start", 0.0, np.float32), const("delta", 1.0, np.float32)]
    model = make_model(
        nodes, [("x", TP.FLOAT, ["s"])], [("y", TP.FLOAT, ["s"])], initializers=inits
    )
    check(model, [{"x": randn(5)}, {"x": randn(11)}], tmp_path)


# --- Attention (opset 23/24) ----------------------------------------------------------------------
ATTENTION_CASES = {
    "4d-gqa-causal-past-boolmask-qk": dict(
        opset=23,
        # mode 3 (softmax output): for mode 2 ORT writes -FLT_MAX where the spec says -inf
        attrs={"is_causal": 1, "qk_matmul_output_mode": 3},
        shapes={
            "Q": [2, 4, 3, 8],
            "K": [2, 2, 3, 8],
            "V": [2, 2, 3, 6],
            "attn_mask": [3, 5],
            "past_key": [2, 2, 2, 8],
            "past_value": [2, 2, 2, 6],
        },
        outputs=4,
    ),
    "3d-heads-softcap-scale": dict(
        opset=23,
        attrs={"q_num_heads": 4, "kv_num_heads": 2, "softcap": 2.0, "scale": 0.2},
        shapes={"Q": [2, 3, 32], "K": [2, 5, 16], "V": [2, 5, 16]},
        outputs=1,
    ),
    "4d-nonpad-kv-seqlen-causal": dict(
        opset=24,
        attrs={"is_causal": 1},
        shapes={"Q": [2, 2, 1, 4], "K": [2, 2, 6, 4], "V": [2, 2, 6, 4]},
        nonpad=[3, 6],
        outputs=1,
    ),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention(case, tmp_path):
    spec = ATTENTION_CASES[case]
    names = list(spec["shapes"])
    feeds = {n: randn(*s) for n, s in spec["shapes"].items()}
    if "attn_mask" in feeds:
        feeds["attn_mask"] = RNG.integers(0, 2, spec["shapes"]["attn_mask"]).astype(bool)
        feeds["attn_mask"][:, 0] = True
    inputs = [(n, TP.BOOL if n == "attn_mask" else TP.FLOAT, s) for n, s in spec["shapes"].items()]
    node_inputs = names + [""] * (6 - len(names))
    if "nonpad" in spec:
        feeds["nonpad_kv_seqlen"] = np.array(spec["nonpad"], np.int64)
        inputs.append(("nonpad_kv_seqlen", TP.INT64, [len(spec["nonpad"])]))
        node_inputs.append("nonpad_kv_seqlen")
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    out_names = ["Y", "present_key", "present_value", "qk"][: spec["outputs"]]
    node = helper.make_node("Attention", node_inputs, out_names, **spec["attrs"])
    rank = len(spec["shapes"]["Q"])
    ranks = [rank, 4, 4, 4]
    outputs = [(n, TP.FLOAT, r) for n, r in zip(out_names, ranks)]
    model = make_model([node], inputs, outputs, spec["opset"])
    check(model, [feeds], tmp_path, rtol=1e-4, atol=1e-5)


# --- reductions with run-time axes ----------------------------------------------------------------
@pytest.mark.parametrize(
    "op,keepdims,dtype",
    [("ReduceSum", 0, TP.FLOAT), ("ReduceLogSumExp", 1, TP.FLOAT), ("ReduceMax", 0, TP.BOOL)],
)
def test_reduce_with_run_time_axes(op, keepdims, dtype, tmp_path):
    opset = 13 if op == "ReduceSum" else 18
    node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)
    model = make_model(
        [node],
        [("x", dtype, [2, 3, 4]), ("axes", TP.INT64, [2])],
        [("y", dtype, 3 - 2 * (1 - keepdims))],
        opset,
    )
    x = randn(2, 3, 4) if dtype == TP.FLOAT else RNG.integers(0, 2, (2, 3, 4)).astype(bool)
    feeds = [{"x": x, "axes": np.array(a, np.int64)} for a in ([0, 2], [-1, 1])]
    reference = "onnx" if dtype == TP.BOOL else "ort"  # ORT has no bool ReduceMax
    check(model, feeds, tmp_path, rtol=1e-5, atol=1e-5, reference=reference)


# --- normalisations -------------------------------------------------------------------------------
def test_layer_normalization_all_outputs(tmp_path):
    node = helper.make_node(
        "LayerNormalization", ["x", "w", "b"], ["y", "mean", "inv_std"], axis=1, epsilon=1e-3
    )
    model = make_model(
        [node],
        [("x", TP.FLOAT, [2, 3, 4]), ("w", TP.FLOAT, [3, 4]), ("b", TP.FLOAT, [3, 4])],
        [("y", TP.FLOAT, 3), ("mean", TP.FLOAT, 3), ("inv_std", TP.FLOAT, 3)],
        opset=17,
    )
    check(model, [{"x": randn(2, 3, 4), "w": randn(3, 4), "b": randn(3, 4)}], tmp_path)


def test_rms_normalization_over_all_axes_with_broadcast_scale(tmp_path):
    node = helper.make_node("RMSNormalization", ["x", "scale"], ["y"], axis=0)
    model = make_model(
        [node], [("x", TP.FLOAT, [2, 3, 4]), ("scale", TP.FLOAT, [4])], [("y", TP.FLOAT, 3)], 23
    )
    check(model, [{"x": randn(2, 3, 4), "scale": randn(4)}], tmp_path)


@pytest.mark.parametrize("p", [1, 2])
def test_lp_normalization(p, tmp_path):
    node = helper.make_node("LpNormalization", ["x"], ["y"], axis=1, p=p)
    model = make_model([node], [("x", TP.FLOAT, [3, 4])], [("y", TP.FLOAT, [3, 4])])
    x = randn(3, 4)
    x[1] = 0.0  # zero norm gives 0
    check(model, [{"x": x}], tmp_path)


# --- elementwise ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "base,exponent", [(TP.FLOAT, TP.INT64), (TP.INT32, TP.INT32), (TP.INT64, TP.FLOAT)]
)
def test_pow_mixed_and_integer_dtypes(base, exponent, tmp_path):
    node = helper.make_node("Pow", ["x", "e"], ["y"])
    model = make_model([node], [("x", base, [5]), ("e", exponent, [5])], [("y", base, [5])], 15)
    x = np.array([1, 2, 3, -2, 4], onnx.helper.tensor_dtype_to_np_dtype(base))
    e = np.array([0, 3, 2, 3, 1], onnx.helper.tensor_dtype_to_np_dtype(exponent))
    check(model, [{"x": x, "e": e}], tmp_path)


@pytest.mark.parametrize(
    "op,opset,attrs,dtype",
    [
        ("Celu", 12, {"alpha": 2.0}, TP.FLOAT),
        ("Elu", 6, {"alpha": 0.5}, TP.FLOAT16),
        ("Selu", 6, {}, TP.DOUBLE),
        ("Swish", 24, {"alpha": 1.5}, TP.FLOAT),
    ],
)
def test_activation(op, opset, attrs, dtype, tmp_path):
    model = make_model(
        [helper.make_node(op, ["x"], ["y"], **attrs)],
        [("x", dtype, [4, 5])],
        [("y", dtype, [4, 5])],
        opset,
    )
    x = randn(4, 5).astype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
    tol = 2e-3 if dtype == TP.FLOAT16 else 1e-5
    reference = "onnx" if dtype == TP.DOUBLE else "ort"  # ORT has no float64 Selu
    check(model, [{"x": x}], tmp_path, rtol=tol, atol=tol, reference=reference)


def test_cumsum_with_run_time_axis(tmp_path):
    node = helper.make_node("CumSum", ["x", "axis"], ["y"], exclusive=1, reverse=1)
    model = make_model(
        [node], [("x", TP.FLOAT, [3, 4]), ("axis", TP.INT64, [1])], [("y", TP.FLOAT, [3, 4])], 14
    )
    x = randn(3, 4)
    check(model, [{"x": x, "axis": np.array([a], np.int64)} for a in (0, -1)], tmp_path)


def test_cumprod(tmp_path):
    node = helper.make_node("CumProd", ["x", "axis"], ["y"], exclusive=1, reverse=1)
    model = make_model(
        [node],
        [("x", TP.FLOAT, [3, 4])],
        [("y", TP.FLOAT, [3, 4])],
        26,
        initializers=[const("axis", -1)],
    )
    # ORT has no CumProd kernel.
    check(model, [{"x": randn(3, 4)}], tmp_path, reference="onnx")


def test_reverse_sequence(tmp_path):
    node = helper.make_node("ReverseSequence", ["x", "lens"], ["y"], time_axis=0, batch_axis=1)
    model = make_model(
        [node],
        [("x", TP.FLOAT, [4, 3, 2]), ("lens", TP.INT64, [3])],
        [("y", TP.FLOAT, [4, 3, 2])],
        10,
    )
    check(model, [{"x": randn(4, 3, 2), "lens": np.array([4, 1, 2], np.int64)}], tmp_path)


# --- losses ---------------------------------------------------------------------------------------
def test_negative_log_likelihood_loss(tmp_path):
    node = helper.make_node(
        "NegativeLogLikelihoodLoss", ["x", "t", "w"], ["loss"], reduction="mean", ignore_index=1
    )
    model = make_model(
        [node],
        [("x", TP.FLOAT, [3, 5, 2]), ("t", TP.INT64, [3, 2]), ("w", TP.FLOAT, [5])],
        [("loss", TP.FLOAT, [])],
        13,
    )
    feeds = {"x": randn(3, 5, 2), "t": RNG.integers(0, 5, (3, 2)), "w": RNG.random(5, np.float32)}
    check(model, [feeds], tmp_path)


def test_softmax_cross_entropy_loss_with_log_prob(tmp_path):
    node = helper.make_node(
        "SoftmaxCrossEntropyLoss", ["s", "t"], ["loss", "log_prob"], reduction="none"
    )
    model = make_model(
        [node],
        [("s", TP.FLOAT, [3, 5]), ("t", TP.INT64, [3])],
        [("loss", TP.FLOAT, [3]), ("log_prob", TP.FLOAT, [3, 5])],
        13,
    )
    check(model, [{"s": randn(3, 5), "t": np.array([0, 4, 2], np.int64)}], tmp_path)


# --- run-time slicing parameters ------------------------------------------------------------------
def test_slice_with_run_time_parameters(tmp_path):
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])
    model = make_model(
        [node],
        [("x", TP.FLOAT, [5, 6])]
        + [(n, TP.INT64, [2]) for n in ("starts", "ends", "axes", "steps")],
        [("y", TP.FLOAT, 2)],
        13,
    )
    x = randn(5, 6)
    feeds = [
        dict(x=x, starts=[1, -1], ends=[100, -7], axes=[1, 0], steps=[2, -2]),
        dict(x=x, starts=[0, 4], ends=[3, 0], axes=[0, -1], steps=[1, -1]),
    ]
    feeds = [{k: np.asarray(v, np.int64) if k != "x" else v for k, v in f.items()} for f in feeds]
    check(model, feeds, tmp_path)


def test_split_with_run_time_sizes(tmp_path):
    node = helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=1)
    model = make_model(
        [node],
        [("x", TP.FLOAT, [2, 7]), ("sizes", TP.INT64, [3])],
        [(n, TP.FLOAT, 2) for n in "abc"],
        13,
    )
    x = randn(2, 7)
    check(
        model, [{"x": x, "sizes": np.array(s, np.int64)} for s in ([2, 0, 5], [3, 3, 1])], tmp_path
    )


def test_one_hot_with_run_time_depth(tmp_path):
    node = helper.make_node("OneHot", ["i", "depth", "values"], ["y"], axis=1)
    model = make_model(
        [node],
        [("i", TP.INT64, [2, 3]), ("depth", TP.INT64, [1]), ("values", TP.FLOAT, [2])],
        [("y", TP.FLOAT, 3)],
        11,
    )
    feeds = {
        "i": np.array([[0, 2, -1], [4, 1, 3]], np.int64),
        "depth": np.array([5], np.int64),
        "values": np.array([-1.0, 3.0], np.float32),
    }
    check(model, [feeds], tmp_path)


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "wrap"])
def test_pad_with_run_time_pads(mode, tmp_path):
    node = helper.make_node("Pad", ["x", "pads", "value"], ["y"], mode=mode)
    model = make_model(
        [node],
        [("x", TP.FLOAT, [3, 4]), ("pads", TP.INT64, [4]), ("value", TP.FLOAT, [1])],
        [("y", TP.FLOAT, 2)],
        19,
    )
    pads = [[1, 2, 2, 0], [0, -1, 2, 3]] if mode == "constant" else [[1, 2, 2, 0], [2, 0, 1, 3]]
    feeds = [
        {"x": randn(3, 4), "pads": np.array(p, np.int64), "value": np.array([1.5], np.float32)}
        for p in pads
    ]
    check(model, feeds, tmp_path)


@pytest.mark.parametrize("op", ["Cosh", "Sinh"])
def test_hyperbolic(op, tmp_path):
    model = make_model(
        [helper.make_node(op, ["x"], ["y"])], [("x", TP.FLOAT, [3, 4])], [("y", TP.FLOAT, [3, 4])]
    )
    check(model, [{"x": randn(3, 4)}], tmp_path)


def test_isinf_detect_one_sign(tmp_path):
    nodes = [
        helper.make_node("IsInf", ["x"], ["pos"], detect_negative=0),
        helper.make_node("IsInf", ["x"], ["neg"], detect_positive=0),
    ]
    model = make_model(
        nodes, [("x", TP.FLOAT, [4])], [("pos", TP.BOOL, [4]), ("neg", TP.BOOL, [4])]
    )
    check(model, [{"x": np.array([np.inf, -np.inf, 1.0, np.nan], np.float32)}], tmp_path)


def test_dropout_mask_is_bool(tmp_path):
    node = helper.make_node("Dropout", ["x"], ["y", "mask"])
    model = make_model(
        [node], [("x", TP.FLOAT, [3, 4])], [("y", TP.FLOAT, [3, 4]), ("mask", TP.BOOL, [3, 4])], 13
    )
    check(model, [{"x": randn(3, 4)}], tmp_path)


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_embedding(interleaved, tmp_path):
    node = helper.make_node(
        "RotaryEmbedding",
        ["x", "cos", "sin", "pos"],
        ["y"],
        interleaved=interleaved,
        rotary_embedding_dim=4,
    )
    model = make_model(
        [node],
        [
            ("x", TP.FLOAT, [2, 3, 5, 8]),
            ("cos", TP.FLOAT, [16, 2]),
            ("sin", TP.FLOAT, [16, 2]),
            ("pos", TP.INT64, [2, 5]),
        ],
        [("y", TP.FLOAT, [2, 3, 5, 8])],
        23,
    )
    feeds = {
        "x": randn(2, 3, 5, 8),
        "cos": randn(16, 2),
        "sin": randn(16, 2),
        "pos": RNG.integers(0, 16, (2, 5)),
    }
    check(model, [feeds], tmp_path)
