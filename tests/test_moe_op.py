"""``com.microsoft::MoE``'s one definition (``qiao.compiler.moe_op``), every activation × gate/up
layout × bias, four ways: ONNX Runtime's CPU kernel (where it runs the form), qiao's CPU compile,
the standard-op decomposition the hand-off backends ship (run by ONNX Runtime) and the NumPy
reference (float64). The defaults are checked against ONNX Runtime's own schema.

Compile count: one. Every form qiao lowers is one node of a single model (shared ``x`` and router
logits, one output per form), compiled once for the CPU; ONNX Runtime and the decomposition run the
same nodes. Tolerances: float32 engines against each other and the float64 reference, rtol 1e-4,
atol 1e-5 (summation order differs; values are O(1)).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qiao.compiler import moe_op
from qiao.compiler.errors import CompileError
from qiao.compiler.moe_op import MoESpec
from qiao.compiler.testing import assert_close

RTOL, ATOL = 1e-4, 1e-5
E, H, INTER = 5, 16, 8
TOKENS = (1, 7)  # one artifact (symbolic token count) runs both

# name: (MoESpec fields, ONNX Runtime's CPU kernel runs it, qiao's kernels lower it)
FORMS = {
    "swiglu-interleaved": (dict(activation_type="swiglu", swiglu_fusion=1, k=2), True, True),
    "swiglu-interleaved-clamped": (
        dict(
            activation_type="swiglu",
            swiglu_fusion=1,
            k=2,
            activation_alpha=1.702,
            activation_beta=1.0,
            swiglu_limit=0.4,  # small enough that the clamps bite (checked below)
            normalize_routing_weights=1,
        ),
        True,
        True,
    ),
    "swiglu-concat": (
        dict(activation_type="swiglu", swiglu_fusion=2, k=3, swiglu_limit=0.4),
        False,  # ORT's CPU kernel: "only supports interleaved SwiGLU"
        True,
    ),
    "swiglu-separate-fc3": (
        dict(activation_type="swiglu", swiglu_fusion=0, fc3=True, k=2, activation_beta=0.5),
        False,  # ORT's CPU kernel: "FC3 is not implemented"
        False,
    ),
    "swiglu-limit-after-activation": (
        dict(
            activation_type="swiglu",
            swiglu_fusion=1,
            k=2,
            swiglu_limit=0.2,
            swiglu_limit_after_activation=1,
        ),
        False,  # CUDA-only in ORT
        False,
    ),
    "relu": (dict(activation_type="relu", k=2, normalize_routing_weights=1), True, True),
    "gelu": (dict(activation_type="gelu", k=3), True, True),
    "silu": (dict(activation_type="silu", k=1), True, True),
    "identity": (dict(activation_type="identity", k=E, normalize_routing_weights=1), True, True),
}
CASES = [(form, bias) for form in FORMS for bias in (False, True)]
IDS = [f"{form}-{'bias' if bias else 'nobias'}" for form, bias in CASES]


def _key(form: str, bias: bool) -> str:
    return f"{form}-{'bias' if bias else 'nobias'}".replace("-", "_")


def _spec(form: str) -> MoESpec:
    return MoESpec(**FORMS[form][0])


def _weights(form: str, bias: bool) -> dict[str, np.ndarray]:
    seed = list(FORMS).index(form) * 2 + bias
    return moe_op.random_weights(_spec(form), E, H, INTER, seed=seed, bias=bias)


def _model(cases) -> onnx.ModelProto:
    """One MoE node per (form, bias), all on the same ``x`` [tokens, H] and ``logits`` [tokens, E];
    output ``y_<form>_<bias>``, weights initializers prefixed by the same key."""
    return _layers_model([(_key(f, b), f, _weights(f, b)) for f, b in cases])


def _layers_model(layers) -> onnx.ModelProto:
    """One MoE node per (key, form, weights), all on ``x`` and ``logits``: output ``y_<key>``."""
    nodes, inits, outputs = [], [], []
    for key, form, weights in layers:
        spec = _spec(form).with_inputs(weights)
        names = ["x", "logits", *(f"{key}.{k}" for k in moe_op.WEIGHT_KEYS)]
        nodes.append(moe_op.make_node(spec, names, f"y_{key}", name=key))
        inits += [numpy_helper.from_array(v, f"{key}.{k}") for k, v in weights.items()]
        outputs.append(helper.make_tensor_value_info(f"y_{key}", TensorProto.FLOAT, ["tokens", H]))
    graph = helper.make_graph(
        nodes,
        "moe_forms",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", H]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["tokens", E]),
        ],
        outputs,
        initializer=inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )


def _inputs(tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + tokens)
    return {
        "x": rng.standard_normal((tokens, H)).astype(np.float32),
        "logits": (2 * rng.standard_normal((tokens, E))).astype(np.float32),
    }


def _ort(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, ["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def _per_tokens(run) -> dict[int, dict[str, np.ndarray]]:
    return {t: run(_inputs(t)) for t in TOKENS}


@pytest.fixture(scope="module")
def onnxruntime_outputs():
    model = _model([c for c in CASES if FORMS[c[0]][1]])
    return _per_tokens(lambda feeds: _ort(model, feeds))


@pytest.fixture(scope="module")
def decomposed_outputs():
    decomposed = moe_op.decompose_model(_model(CASES))
    onnx.checker.check_model(decomposed, full_check=True)
    assert {n.domain for n in decomposed.graph.node} == {""}
    assert [o.domain for o in decomposed.opset_import] == [""]
    return _per_tokens(lambda feeds: _ort(decomposed, feeds))


@pytest.fixture(scope="module")
def qiao_outputs(tmp_path_factory):
    from qiao.compiler import compile

    art = compile(_model([c for c in CASES if FORMS[c[0]][2]]), "cpu", tmp_path_factory.mktemp("a"))
    assert art.inputs[0]["shape"][0] == "tokens"  # one artifact for every token count
    return _per_tokens(art.run)


def _reference(form: str, bias: bool, tokens: int) -> np.ndarray:
    feeds = _inputs(tokens)
    return moe_op.reference(_spec(form), feeds["x"], feeds["logits"], _weights(form, bias))


# ------------------------------------------------------------------------------------------------
# Four ways, every form
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form, bias", [c for c in CASES if FORMS[c[0]][1]])
def test_reference_matches_onnxruntime(onnxruntime_outputs, form, bias):
    for t in TOKENS:
        got = onnxruntime_outputs[t][f"y_{_key(form, bias)}"]
        assert_close(_reference(form, bias, t), got, RTOL, ATOL, f"reference vs ORT, T={t}")


@pytest.mark.parametrize("form, bias", CASES, ids=IDS)
def test_decomposition_matches_reference_and_onnxruntime(
    decomposed_outputs, onnxruntime_outputs, form, bias
):
    for t in TOKENS:
        got = decomposed_outputs[t][f"y_{_key(form, bias)}"]
        assert_close(got, _reference(form, bias, t), RTOL, ATOL, f"decomposed vs NumPy, T={t}")
        if FORMS[form][1]:
            ort = onnxruntime_outputs[t][f"y_{_key(form, bias)}"]
            assert_close(got, ort, RTOL, ATOL, f"decomposed vs ORT, T={t}")


@pytest.mark.parametrize("form, bias", [c for c in CASES if FORMS[c[0]][2]])
def test_qiao_matches_reference_and_onnxruntime(qiao_outputs, onnxruntime_outputs, form, bias):
    for t in TOKENS:
        got = qiao_outputs[t][f"y_{_key(form, bias)}"]
        assert_close(got, _reference(form, bias, t), RTOL, ATOL, f"qiao vs NumPy, T={t}")
        if FORMS[form][1]:
            ort = onnxruntime_outputs[t][f"y_{_key(form, bias)}"]
            assert_close(got, ort, RTOL, ATOL, f"qiao vs ORT, T={t}")


def test_moe_layers_of_one_config_share_their_kernels(tmp_path, monkeypatch):
    """A model's MoE nodes of one config (each with its own weights) build each kernel once
    (``moe_common.add_kernel``) and still compute each with its own weights; a node of another
    config builds its own."""
    from qiao.compiler import compile
    from qiao.compiler.kernels import group_gemm

    built = []

    def counted(build):
        def wrapper(cfg, *args, **kwargs):
            built.append((build.__name__, cfg.activation))
            return build(cfg, *args, **kwargs)

        return wrapper

    for name in ("group_gemm_up", "group_gemm_down"):
        monkeypatch.setattr(group_gemm, name, counted(getattr(group_gemm, name)))
    layers = [("relu", 0), ("relu", 1), ("gelu", 2), ("relu", 3)]  # (form, weight seed)
    weights = [
        moe_op.random_weights(_spec(form), E, H, INTER, seed=60 + seed, bias=False)
        for form, seed in layers
    ]
    model = _layers_model(
        [(f"l{i}", form, w) for i, ((form, _), w) in enumerate(zip(layers, weights))]
    )
    art = compile(model, "cpu", tmp_path / "art")
    assert sorted(built) == sorted(
        [("group_gemm_up", "relu"), ("group_gemm_down", "relu")]
        + [("group_gemm_up", "gelu"), ("group_gemm_down", "gelu")]
    )
    for t in TOKENS:
        feeds = _inputs(t)
        got = art.run(feeds)
        for i, ((form, _), w) in enumerate(zip(layers, weights)):
            want = moe_op.reference(_spec(form), feeds["x"], feeds["logits"], w)
            assert_close(got[f"y_l{i}"], want, RTOL, ATOL, f"layer {i} ({form}) vs NumPy, T={t}")


@pytest.mark.parametrize(
    "form, message",
    [
        ("swiglu-separate-fc3", "fc3 weights"),
        ("swiglu-limit-after-activation", "swiglu_limit_after_activation=1"),
    ],
)
def test_qiao_names_the_forms_its_kernels_do_not_lower(tmp_path, form, message):
    from qiao.compiler import compile

    with pytest.raises(CompileError, match=message) as err:
        compile(_model([(form, False)]), "cpu", tmp_path / "art")
    assert "fix:" in str(err.value)
    assert not (tmp_path / "art").exists()


def test_the_forms_differ():
    """The attributes matter on these inputs (so the comparisons above can fail): the clamps, the
    layouts and fc3 each change the result."""
    feeds = _inputs(7)

    def ref(spec, weights):
        return moe_op.reference(spec, feeds["x"], feeds["logits"], weights)

    for form in ("swiglu-interleaved-clamped", "swiglu-concat", "swiglu-limit-after-activation"):
        spec, w = _spec(form), _weights(form, True)
        loose = MoESpec(**{**FORMS[form][0], "swiglu_limit": None})
        assert np.abs(ref(spec, w) - ref(loose, w)).max() > 1e-2, form
    w = _weights("swiglu-concat", False)
    interleaved = MoESpec(**{**FORMS["swiglu-concat"][0], "swiglu_fusion": 1})
    assert np.abs(ref(_spec("swiglu-concat"), w) - ref(interleaved, w)).max() > 1e-2
    w = _weights("swiglu-separate-fc3", False)
    other = dict(w, fc3=np.roll(w["fc3"], 1, axis=0))
    assert (
        np.abs(
            ref(_spec("swiglu-separate-fc3"), w) - ref(_spec("swiglu-separate-fc3"), other)
        ).max()
        > 1e-2
    )


# ------------------------------------------------------------------------------------------------
# Parsing: ONNX Runtime's defaults, what the op refuses
# ------------------------------------------------------------------------------------------------
def test_defaults_are_onnxruntimes():
    """``MoESpec``'s defaults and attribute names against the schema ONNX Runtime registers."""
    from onnxruntime.capi import _pybind_state as C

    (schema,) = [
        s for s in C.get_all_operator_schema() if s.name == "MoE" and s.domain == "com.microsoft"
    ]
    assert set(schema.attributes) == set(moe_op.ATTRIBUTE_TYPES)
    assert [i.name for i in schema.inputs] == list(moe_op.INPUTS)
    defaults = MoESpec()
    for name, attr in schema.attributes.items():
        if attr._default_value:
            want = helper.get_attribute_value(onnx.AttributeProto.FromString(attr._default_value))
            want = want.decode() if isinstance(want, bytes) else want
        else:
            want = None  # no default: unset (swiglu_limit: no clamp)
        assert getattr(defaults, name) == want, name
    node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft")
    assert moe_op.spec_from_node(node) == defaults


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(swiglu_fusion=3), "swiglu_fusion=3"),
        (dict(swiglu_fusion=0), "swiglu_fusion=0"),  # separate gate/up without fc3
        (dict(fc3=True), "fc3_experts_weights given with swiglu_fusion=1"),
        (dict(use_sparse_mixer=1), "use_sparse_mixer=1"),
        (dict(activation_type="relu2", swiglu_fusion=0), "relu2"),
        (dict(activation_type="geglu"), "geglu"),
        (dict(activation_type="tanh"), "'tanh'"),
        (dict(activation_type="relu", fc3=True), "fc3_experts_weights with activation_type"),
    ],
)
def test_refused_forms_name_the_value_and_the_fix(change, message):
    spec = MoESpec(**{"activation_type": "swiglu", "swiglu_fusion": 1, "k": 2, **change})
    with pytest.raises(CompileError, match=message) as err:
        spec.validate()
    assert "fix:" in str(err.value)
    node = moe_op.make_node(spec)  # the parsers refuse the same node
    with pytest.raises(CompileError, match=message):
        moe_op.spec_from_node(node)


def test_onnxruntime_refuses_swiglu_without_a_layout_too():
    """A SwiGLU node without ``swiglu_fusion`` (ORT's default 0) and without fc3: ORT's CPU kernel
    refuses it as qiao does (CUDA ORT reads it as interleaved for old GPT-OSS exports)."""
    w = moe_op.random_weights(_spec("swiglu-interleaved"), E, H, INTER)
    model = moe_op.make_model(MoESpec(activation_type="swiglu", k=2), w)
    node = model.graph.node[0]
    for attr in [a for a in node.attribute if a.name == "swiglu_fusion"]:
        node.attribute.remove(attr)
    with pytest.raises(Exception, match="swiglu_fusion=1"):
        _ort(model, _inputs(3))
    with pytest.raises(CompileError, match="swiglu_fusion=0"):
        moe_op.decompose_model(model)
