"""The one definition of ONNX Runtime's ``com.microsoft::MoE`` op in qiao.

Everything that reads, writes or computes the op goes through this module, so its semantics are
written once: ``MoESpec`` (a node's attributes with ONNX Runtime's defaults, and which optional
inputs it has), ``spec_from_node`` / ``spec_from_attributes`` (parse and validate), ``expert_dims``
(check the weight shapes), ``make_node`` / ``make_model`` / ``random_weights`` (build),
``to_standard_ops`` / ``decompose_model`` (the same computation as standard ``ai.onnx`` ops, for
the hand-off backends) and ``reference`` (NumPy, float64). It imports neither TVM nor torch: the
hand-off backends and the exporter use it without the compiler's lowering.

The op (ONNX Runtime 1.32's schema and CPU kernel), for ``T`` tokens, ``E`` experts, hidden size
``H``, expert intermediate size ``I``::

    p    = softmax(router_probs[t, :])               # the input holds router logits
    top  = the k largest p (ties: the higher expert index first, as ONNX Runtime's CPU kernel)
    w    = p[top] / sum(p[top])  if normalize_routing_weights  else p[top]
    y[t] = sum_j w[j] * (fc2[e] @ act(x[t]) + b2[e]),  e = top[j]

``act`` is relu, gelu (tanh form), silu or identity of ``h = fc1[e] @ x + b1[e]``, or SwiGLU
``G * sigmoid(alpha * G) * (L + beta)`` with ``G = min(g, limit)``, ``L = clip(l, -limit, limit)``
(``swiglu_limit`` unset: no clamp; ``swiglu_limit_after_activation=1``: the limit applies to the
activated gate instead). Where ``g`` and ``l`` come from is ``swiglu_fusion``: 0 (ONNX Runtime's
default) ``g = fc1 x + b1``, ``l = fc3 x + b3``; 1 fc1 rows interleaved (``2i`` gate, ``2i+1`` up);
2 fc1 rows concatenated (``[gate | up]``). ``use_sparse_mixer`` and the CUDA-only ``relu2`` /
``geglu`` activations are refused here, with the fix; what qiao's kernels support on top of that
is the frontend's business (``qiao.compiler.frontend.moe``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qiao.compiler.errors import CompileError

DOMAIN = "com.microsoft"
OP_TYPE = "MoE"
INPUTS = (
    "input",
    "router_probs",
    "fc1_experts_weights",
    "fc1_experts_bias",
    "fc2_experts_weights",
    "fc2_experts_bias",
    "fc3_experts_weights",
    "fc3_experts_bias",
)
OPTIONAL_INPUTS = frozenset(INPUTS[i] for i in (3, 5, 6, 7))
# Keys of a weights mapping (``random_weights``, ``make_model``, ``reference``), in input order.
WEIGHT_KEYS = ("fc1", "b1", "fc2", "b2", "fc3", "b3")
ATTRIBUTE_TYPES = {
    "k": int,
    "activation_type": str,
    "normalize_routing_weights": int,
    "swiglu_fusion": int,
    "activation_alpha": float,
    "activation_beta": float,
    "swiglu_limit": float,
    "swiglu_limit_after_activation": int,
    "use_sparse_mixer": int,
}
# What qiao computes (reference, decomposition); ONNX Runtime's CUDA kernel also has relu2, geglu.
ACTIVATIONS = ("swiglu", "silu", "relu", "gelu", "identity")
CUDA_ONLY_ACTIVATIONS = ("relu2", "geglu")
LAYOUTS = {0: "separate", 1: "interleaved", 2: "concat"}  # swiglu_fusion → where gate/up live


@dataclass(frozen=True)
class MoESpec:
    """A ``com.microsoft::MoE`` node: its attributes, named and defaulted as in ONNX Runtime's
    schema, and which optional inputs it has. Plain data (so tests can build the nodes qiao
    refuses): ``validate`` says, with the fix, what the op does not define or qiao does not compute
    anywhere; the parsers, ``reference`` and ``to_standard_ops`` call it.

    Parameters
    ----------
    k : int
        Experts per token.
    activation_type : str
        One of ``ACTIVATIONS`` (ONNX Runtime's default: ``relu``).
    normalize_routing_weights : int
        1: the k routing weights are renormalised to sum to 1.
    swiglu_fusion : int
        SwiGLU gate/up layout (see ``LAYOUTS``); ignored by other activations, as ONNX Runtime's
        CPU kernel does. Default 0: separate fc1 (gate) and fc3 (up) weights.
    activation_alpha, activation_beta : float
        SwiGLU ``G * sigmoid(alpha * G) * (L + beta)``.
    swiglu_limit : float or None
        SwiGLU clamp (None: none).
    swiglu_limit_after_activation : int
        1: clamp the activated gate instead of the gate input.
    use_sparse_mixer : int
        Must be 0 (Phi-MoE's sparse mixer routing is not computed).
    fc1_bias, fc2_bias, fc3, fc3_bias : bool
        Whether the node has these optional inputs.
    name : str
        The node's name, for messages.
    """

    k: int = 1
    activation_type: str = "relu"
    normalize_routing_weights: int = 0
    swiglu_fusion: int = 0
    activation_alpha: float = 1.0
    activation_beta: float = 0.0
    swiglu_limit: float | None = None
    swiglu_limit_after_activation: int = 0
    use_sparse_mixer: int = 0
    fc1_bias: bool = False
    fc2_bias: bool = False
    fc3: bool = False
    fc3_bias: bool = False
    name: str = dataclasses.field(default="", compare=False)

    def validate(self) -> MoESpec:
        """``self`` when it is an op qiao computes, else ``CompileError`` with the fix."""
        where = self.where
        act = self.activation_type
        if act in CUDA_ONLY_ACTIVATIONS:
            raise CompileError(
                f"{where}: activation_type={act!r} is CUDA-only in ONNX Runtime and qiao does not "
                f"compute it. fix: export the experts with one of {ACTIVATIONS}, or as ordinary ops"
            )
        if act not in ACTIVATIONS:
            raise CompileError(
                f"{where}: activation_type={act!r} is not an activation of the op. fix: use one "
                f"of {ACTIVATIONS}"
            )
        if self.k < 1:
            raise CompileError(f"{where}: k={self.k}. fix: export with k >= 1")
        if self.use_sparse_mixer:
            raise CompileError(
                f"{where}: use_sparse_mixer={self.use_sparse_mixer} is not supported. fix: export "
                "with use_sparse_mixer=0 (softmax over all experts, then top-k)"
            )
        if self.swiglu_fusion not in LAYOUTS:
            raise CompileError(
                f"{where}: swiglu_fusion={self.swiglu_fusion} is not defined by the op. fix: use "
                "0 (separate fc1 gate / fc3 up weights), 1 (fc1 rows interleaved) or 2 (fc1 rows "
                "concatenated [gate | up])"
            )
        if self.fc3_bias and not self.fc3:
            raise CompileError(
                f"{where}: fc3_experts_bias without fc3_experts_weights. fix: drop it"
            )
        if not self.gated:
            if self.fc3:
                raise CompileError(
                    f"{where}: fc3_experts_weights with activation_type={act!r} (a gated "
                    "non-SwiGLU expert) is not supported. fix: use activation_type='swiglu' with "
                    "swiglu_fusion=0, or export without fc3"
                )
            if self.swiglu_limit_after_activation:
                raise CompileError(
                    f"{where}: swiglu_limit_after_activation=1 needs activation_type='swiglu'. "
                    "fix: drop the attribute"
                )
            return self
        if self.swiglu_fusion == 0 and not self.fc3:
            raise CompileError(
                f"{where}: swiglu with swiglu_fusion=0 (the default) takes the up projection "
                "from fc3_experts_weights, which the node does not have. fix: when fc1 holds gate "
                "and up rows, say how: swiglu_fusion=1 (interleaved) or 2 (concatenated)"
            )
        if self.swiglu_fusion != 0 and self.fc3:
            raise CompileError(
                f"{where}: fc3_experts_weights given with swiglu_fusion={self.swiglu_fusion}, "
                "whose fc1 already holds gate and up. fix: use swiglu_fusion=0 with separate fc3, "
                "or drop fc3"
            )
        return self

    @property
    def where(self) -> str:
        return f"com.microsoft::MoE node {self.name!r}" if self.name else "com.microsoft::MoE"

    @property
    def gated(self) -> bool:
        """SwiGLU: two projections (gate, up) per intermediate unit."""
        return self.activation_type == "swiglu"

    @property
    def layout(self) -> str | None:
        """``separate``, ``interleaved`` or ``concat`` for SwiGLU, else None."""
        return LAYOUTS[self.swiglu_fusion] if self.gated else None

    @property
    def normalize(self) -> bool:
        return bool(self.normalize_routing_weights)

    def fc1_rows(self, inter: int) -> int:
        """Rows of one expert's fc1: 2I when fc1 holds gate and up, else I."""
        return 2 * inter if self.gated and self.swiglu_fusion != 0 else inter

    def attributes(self) -> dict[str, Any]:
        """The node attributes: always ``k``, ``activation_type``, ``normalize_routing_weights``,
        ``activation_alpha``/``activation_beta`` and (SwiGLU) ``swiglu_fusion``; the others only
        when set (older ONNX Runtime versions do not know ``swiglu_limit_after_activation``)."""
        out: dict[str, Any] = dict(
            k=int(self.k),
            activation_type=self.activation_type,
            normalize_routing_weights=int(self.normalize_routing_weights),
            activation_alpha=float(self.activation_alpha),
            activation_beta=float(self.activation_beta),
        )
        if self.gated:
            out["swiglu_fusion"] = int(self.swiglu_fusion)
        if self.swiglu_limit is not None:
            out["swiglu_limit"] = float(self.swiglu_limit)
        if self.swiglu_limit_after_activation:
            out["swiglu_limit_after_activation"] = int(self.swiglu_limit_after_activation)
        if self.use_sparse_mixer:
            out["use_sparse_mixer"] = int(self.use_sparse_mixer)
        return out

    def with_inputs(self, weights: Mapping[str, Any]) -> MoESpec:
        """This spec with the optional-input flags of a weights mapping (keys ``WEIGHT_KEYS``)."""
        return dataclasses.replace(
            self,
            fc1_bias=weights.get("b1") is not None,
            fc2_bias=weights.get("b2") is not None,
            fc3=weights.get("fc3") is not None,
            fc3_bias=weights.get("b3") is not None,
        )


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------
def spec_from_attributes(
    attrs: Mapping[str, Any], present: Sequence[bool], name: str = ""
) -> MoESpec:
    """A ``MoESpec`` from an attribute mapping (values as ONNX's ``get_attribute_value`` or TVM's
    importer give them: strings may be bytes) and which of the node's inputs are present (in
    ``INPUTS`` order; missing trailing ones count as absent). Unknown attributes are an error."""
    unknown = sorted(set(attrs) - set(ATTRIBUTE_TYPES))
    where = f"com.microsoft::MoE node {name!r}" if name else "com.microsoft::MoE"
    if unknown:
        raise CompileError(
            f"{where}: unknown attribute(s) {unknown}. fix: export with only "
            f"{sorted(ATTRIBUTE_TYPES)}"
        )
    values: dict[str, Any] = {}
    for key, value in attrs.items():
        if value is None:
            continue
        kind = ATTRIBUTE_TYPES[key]
        if kind is str:
            values[key] = value.decode() if isinstance(value, bytes) else str(value)
        else:
            values[key] = kind(value)
    has = [bool(p) for p in present] + [False] * (len(INPUTS) - len(present))
    missing = [INPUTS[i] for i in (0, 1, 2, 4) if not has[i]]
    if missing:
        raise CompileError(
            f"{where} lacks {', '.join(missing)}. fix: re-export the MoE node with input, "
            "router_probs, fc1_experts_weights and fc2_experts_weights"
        )
    spec = MoESpec(
        **values, fc1_bias=has[3], fc2_bias=has[5], fc3=has[6], fc3_bias=has[7], name=name
    )
    return spec.validate()


def spec_from_node(node: onnx.NodeProto) -> MoESpec:
    """Parse and validate a ``com.microsoft::MoE`` node."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return spec_from_attributes(attrs, [bool(n) for n in node.input], node.name)


def expert_dims(
    spec: MoESpec,
    fc1_shape: Sequence[int],
    fc2_shape: Sequence[int],
    fc3_shape: Sequence[int] | None = None,
) -> tuple[int, int, int]:
    """``(E, H, I)`` from the expert weights' shapes, checked against each other and the spec:
    fc1 [E, fc1_rows, H], fc2 [E, H, I], fc3 [E, I, H]."""
    fc1_shape, fc2_shape = [int(d) for d in fc1_shape], [int(d) for d in fc2_shape]
    if len(fc1_shape) != 3 or len(fc2_shape) != 3:
        raise CompileError(
            f"{spec.where}: expert weights must be rank 3, got fc1 {fc1_shape}, fc2 {fc2_shape}. "
            "fix: export them as [num_experts, rows, cols]"
        )
    e, rows, h = fc1_shape
    e2, h2, inter = fc2_shape
    ok = e == e2 and h == h2 and rows == spec.fc1_rows(inter)
    if fc3_shape is not None:
        ok = ok and [int(d) for d in fc3_shape] == [e, inter, h]
    if not ok:
        two = "2*" if spec.fc1_rows(inter) != inter else ""
        raise CompileError(
            f"{spec.where}: weight shapes disagree: fc1 {fc1_shape}, fc2 {fc2_shape}"
            f"{'' if fc3_shape is None else f', fc3 {list(fc3_shape)}'} (activation "
            f"{spec.activation_type}). fix: fc1 must be [E, {two}I, H] and fc2 [E, H, I]"
            f"{' and fc3 [E, I, H]' if spec.fc3 else ''}"
        )
    return e, h, inter


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------
def make_node(
    spec: MoESpec,
    inputs: Sequence[str] = ("x", "logits", "fc1", "b1", "fc2", "b2", "fc3", "b3"),
    output: str = "y",
    name: str | None = None,
) -> onnx.NodeProto:
    """The node for ``spec``; ``inputs`` names all eight inputs (``INPUTS`` order), those the spec
    says are absent become empty."""
    present = (True, True, True, spec.fc1_bias, True, spec.fc2_bias, spec.fc3, spec.fc3_bias)
    names = [n if p else "" for n, p in zip(inputs, present)]
    while names and not names[-1]:
        names.pop()
    return helper.make_node(
        OP_TYPE,
        names,
        [output],
        name=spec.name if name is None else name,
        domain=DOMAIN,
        **spec.attributes(),
    )


def random_weights(
    spec: MoESpec, num_experts: int, hidden: int, inter: int, seed: int = 0, bias: bool = False
) -> dict[str, np.ndarray]:
    """Seeded float32 expert weights for ``spec`` (unit-scale activations): ``fc1``, ``fc2``,
    ``fc3`` for separate SwiGLU, and biases ``b1``, ``b2`` (``b3``) when ``bias``."""
    rng = np.random.default_rng(seed)
    rows = spec.fc1_rows(inter)
    w = {
        "fc1": (rng.standard_normal((num_experts, rows, hidden)) / np.sqrt(hidden)),
        "fc2": (rng.standard_normal((num_experts, hidden, inter)) / np.sqrt(inter)),
    }
    if bias:
        w["b1"] = 0.1 * rng.standard_normal((num_experts, rows))
        w["b2"] = 0.1 * rng.standard_normal((num_experts, hidden))
    if spec.gated and spec.swiglu_fusion == 0:
        w["fc3"] = rng.standard_normal((num_experts, inter, hidden)) / np.sqrt(hidden)
        if bias:
            w["b3"] = 0.1 * rng.standard_normal((num_experts, inter))
    return {k: v.astype(np.float32) for k, v in w.items()}


def make_model(
    spec: MoESpec,
    weights: Mapping[str, np.ndarray],
    *,
    rank: int = 2,
    weights_as_inputs: bool = False,
    opset: int = 18,
) -> onnx.ModelProto:
    """A model of one MoE node: inputs ``x`` ([tokens, H], or [batch, seq, H] when ``rank`` is 3)
    and ``logits`` ([tokens, E]), output ``y`` shaped as ``x``; the weights (``WEIGHT_KEYS``; the
    spec's optional-input flags follow them) are initializers, or graph inputs named as the keys
    when ``weights_as_inputs`` (nothing large serialised)."""
    spec = spec.with_inputs(weights)  # not validated: tests build the nodes qiao refuses too
    num_experts, _, hidden = np.shape(weights["fc1"])
    tokens = ["batch", "seq"] if rank == 3 else ["tokens"]
    elem = helper.np_dtype_to_tensor_dtype(np.asarray(weights["fc1"]).dtype)
    inputs = [
        helper.make_tensor_value_info("x", elem, [*tokens, hidden]),
        helper.make_tensor_value_info("logits", elem, ["tokens", num_experts]),
    ]
    present = {k: np.asarray(v) for k, v in weights.items() if k in WEIGHT_KEYS and v is not None}
    if weights_as_inputs:
        inputs += [
            helper.make_tensor_value_info(k, elem, list(v.shape)) for k, v in present.items()
        ]
        initializers = []
    else:
        initializers = [numpy_helper.from_array(v, k) for k, v in present.items()]
    graph = helper.make_graph(
        [make_node(spec, ("x", "logits", *WEIGHT_KEYS), "y")],
        "moe",
        inputs,
        [helper.make_tensor_value_info("y", elem, [*tokens, hidden])],
        initializer=initializers,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)]
    )


def _shape(a) -> tuple | None:
    return None if a is None else tuple(np.shape(a))


def onnx_schema():
    """The op's ``onnx.defs.OpSchema`` (for onnxscript, which wants one to call the op)."""
    from onnx.defs import OpSchema

    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    kinds = {
        int: OpSchema.AttrType.INT,
        float: OpSchema.AttrType.FLOAT,
        str: OpSchema.AttrType.STRING,
    }
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        1,
        inputs=[
            fp(n, "T", param_option=opt) if n in OPTIONAL_INPUTS else fp(n, "T") for n in INPUTS
        ],
        outputs=[fp("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[OpSchema.Attribute(n, kinds[t], "") for n, t in ATTRIBUTE_TYPES.items()],
    )


# ------------------------------------------------------------------------------------------------
# The NumPy reference
# ------------------------------------------------------------------------------------------------
def activate(spec: MoESpec, h: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """The expert activation (NumPy) of the first projection ``h`` ([..., I] gate for SwiGLU, with
    ``up`` the up projection)."""
    act = spec.activation_type
    if act == "swiglu":
        g, u, limit = h, up, spec.swiglu_limit
        if limit is not None and not spec.swiglu_limit_after_activation:
            g = np.minimum(g, limit)
        if limit is not None:
            u = np.clip(u, -limit, limit)
        a = g / (1.0 + np.exp(-spec.activation_alpha * g))
        if limit is not None and spec.swiglu_limit_after_activation:
            a = np.minimum(a, limit)
        return a * (u + spec.activation_beta)
    if act == "silu":
        return h / (1.0 + np.exp(-h))
    if act == "relu":
        return np.maximum(h, 0.0)
    if act == "gelu":  # tanh approximation, what ONNX Runtime's MoE computes
        return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    return h


def route(spec: MoESpec, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(experts [T, k], weights [T, k])``: softmax over all experts, top-k with ties to the higher
    expert index (ONNX Runtime's CPU kernel), renormalised when the spec says so (float64)."""
    logits = np.asarray(logits, np.float64).reshape(-1, np.shape(logits)[-1])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    num_experts = p.shape[1]
    # sort by probability descending, then by expert index descending
    order = np.lexsort((np.broadcast_to(-np.arange(num_experts), p.shape), -p), axis=1)
    experts = order[:, : spec.k]
    w = np.take_along_axis(p, experts, 1)
    if spec.normalize:
        w = w / w.sum(1, keepdims=True)
    return experts, w


def reference(
    spec: MoESpec, x: np.ndarray, logits: np.ndarray, weights: Mapping[str, np.ndarray]
) -> np.ndarray:
    """The op in NumPy (float64 inside): ``x`` [..., H], ``logits`` [T, E], ``weights`` keyed by
    ``WEIGHT_KEYS``. Returns ``x``'s shape and dtype."""
    spec = spec.with_inputs(weights).validate()
    w = {k: np.asarray(v, np.float64) for k, v in weights.items() if v is not None}
    _, hidden, inter = expert_dims(spec, w["fc1"].shape, w["fc2"].shape, _shape(w.get("fc3")))
    tokens = np.asarray(x, np.float64).reshape(-1, hidden)
    experts, routing = route(spec, logits)
    y = np.zeros_like(tokens)
    for e in np.unique(experts):
        t, slot = np.nonzero(experts == e)
        h = tokens[t] @ w["fc1"][e].T + (w["b1"][e] if "b1" in w else 0.0)
        up = None
        if spec.layout == "interleaved":
            h, up = h[:, 0::2], h[:, 1::2]
        elif spec.layout == "concat":
            h, up = h[:, :inter], h[:, inter:]
        elif spec.layout == "separate":
            up = tokens[t] @ w["fc3"][e].T + (w["b3"][e] if "b3" in w else 0.0)
        out = activate(spec, h, up) @ w["fc2"][e].T + (w["b2"][e] if "b2" in w else 0.0)
        np.add.at(y, t, routing[t, slot, None] * out)
    return y.reshape(np.shape(x)).astype(np.asarray(x).dtype)


# ------------------------------------------------------------------------------------------------
# Decomposition into standard ONNX ops
# ------------------------------------------------------------------------------------------------
def count_nodes(proto: onnx.ModelProto) -> int:
    """Top-level ``com.microsoft::MoE`` nodes of a model."""
    return sum(1 for n in proto.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE)


def decompose_model(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` with every top-level ``com.microsoft::MoE`` node replaced by standard
    ONNX ops (``to_standard_ops``); the ``com.microsoft`` opset import goes when unused. ``proto``
    itself is returned when it has no MoE node."""
    if not count_nodes(proto):
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 1)
    nodes = []
    for i, node in enumerate(out.graph.node):
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            dtype = _elem_type(out, node.input[2])
            nodes.extend(to_standard_ops(node, opset, dtype, prefix=f"{node.name or 'moe'}_{i}"))
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(n.domain == DOMAIN for n in out.graph.node):
        keep = [o for o in out.opset_import if o.domain != DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    return out


def _elem_type(proto: onnx.ModelProto, name: str) -> int:
    for init in proto.graph.initializer:
        if init.name == name:
            return init.data_type
    for vi in [*proto.graph.input, *proto.graph.value_info]:
        if vi.name == name and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    inferred = onnx.shape_inference.infer_shapes(proto)
    for vi in [*inferred.graph.input, *inferred.graph.value_info]:
        if vi.name == name and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    raise CompileError(f"cannot tell the dtype of MoE weights {name!r}. fix: add value_info for it")


def to_standard_ops(
    node: onnx.NodeProto, opset: int, dtype: int = TensorProto.FLOAT, prefix: str = "moe"
) -> list[onnx.NodeProto]:
    """Standard-ONNX nodes computing the ``com.microsoft::MoE`` ``node`` as the module docstring
    defines it (every ``MoESpec`` this module accepts: all three SwiGLU layouts, biases, limits).

    The graph is dense: every expert runs on every token and is weighted by its routing weight
    (zero when not chosen), which needs no data-dependent shapes, as static-graph compilers want;
    E/k times the FLOPs of the fused op.

    Parameters
    ----------
    node : onnx.NodeProto
        The ``com.microsoft::MoE`` node.
    opset : int
        The model's ``ai.onnx`` opset, 11 or newer (ReduceSum/Unsqueeze take axes as inputs from
        13 on, Split its output count from 18 on).
    dtype : int
        ONNX element type of the activations (for constants).
    prefix : str
        Unique prefix for the new value names.
    """
    spec = spec_from_node(node)
    if opset < 11:
        raise CompileError(
            f"{spec.where}: the model's opset {opset} is older than 11. fix: re-export at "
            "opset 11 or newer"
        )
    x, router, w1, b1, w2, b2, w3, b3 = (list(node.input) + [""] * 8)[:8]
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    nodes: list[onnx.NodeProto] = []
    counter = [0]

    def name(tag: str) -> str:
        counter[0] += 1
        return f"{prefix}/{tag}_{counter[0]}"

    def op(op_type: str, ins: list[str], tag: str | None = None, n_out: int = 1, **kw) -> Any:
        outs = [name(tag or op_type.lower()) for _ in range(n_out)]
        nodes.append(helper.make_node(op_type, ins, outs, name=outs[0], **kw))
        return outs if n_out > 1 else outs[0]

    def const(value, dt=None) -> str:
        arr = np.asarray(value, dtype=dt or np_dtype)
        out = name("const")
        nodes.append(
            helper.make_node("Constant", [], [out], name=out, value=numpy_helper.from_array(arr))
        )
        return out

    def unsqueeze(v: str, axes: list[int]) -> str:
        if opset >= 13:
            return op("Unsqueeze", [v, const(axes, np.int64)])
        return op("Unsqueeze", [v], axes=axes)

    def reduce_sum(v: str, axes: list[int], keepdims: int) -> str:
        if opset >= 13:
            return op("ReduceSum", [v, const(axes, np.int64)], keepdims=keepdims)
        return op("ReduceSum", [v], axes=axes, keepdims=keepdims)

    def linear(w: str, b: str, tag: str) -> str:
        """[T, H] @ [E, H, R] + [E, 1, R] -> [E, T, R]: every expert on every token."""
        out = op("MatMul", [tokens, op("Transpose", [w], perm=[0, 2, 1])], tag)
        return op("Add", [out, unsqueeze(b, [1])], f"{tag}_bias") if b else out

    # Routing: dense [T, E] weights, the top-k softmax probabilities and zero elsewhere.
    tokens = op("Flatten", [x], "tokens", axis=-1)  # [T, H]
    logits = op("Flatten", [router], "logits", axis=-1)  # [T, E]
    probs = op("Softmax", [logits], "probs", axis=1)
    top_values, top_index = op("TopK", [probs, const([spec.k], np.int64)], "topk", n_out=2, axis=1)
    if spec.normalize:
        top_values = op("Div", [top_values, reduce_sum(top_values, [1], 1)], "normalized")
    zeros = op("Sub", [probs, probs], "zeros")
    dense = op("ScatterElements", [zeros, top_index, top_values], "routing", axis=1)

    hidden = linear(w1, b1, "fc1")  # [E, T, fc1 rows]
    if spec.gated:
        if spec.layout == "interleaved":
            pairs = op("Reshape", [hidden, const([0, 0, -1, 2], np.int64)], "pairs")  # [E,T,I,2]
            gate = op("Gather", [pairs, const(0, np.int64)], "gate", axis=3)
            up = op("Gather", [pairs, const(1, np.int64)], "up", axis=3)
        elif spec.layout == "concat":  # [gate | up]: two equal halves of the rows
            kw = {"num_outputs": 2} if opset >= 18 else {}
            gate, up = op("Split", [hidden], "gate_up", n_out=2, axis=2, **kw)
        else:  # separate: the up projection is fc3
            gate, up = hidden, linear(w3, b3, "fc3")
        limit = spec.swiglu_limit
        clamp = limit is not None and math.isfinite(limit)
        if clamp and not spec.swiglu_limit_after_activation:
            gate = op("Min", [gate, const(limit)], "gate_limit")
        if clamp:
            up = op("Clip", [up, const(-limit), const(limit)], "up_limit")
        alpha, beta = spec.activation_alpha, spec.activation_beta
        scaled = gate if alpha == 1.0 else op("Mul", [gate, const(alpha)])
        swish = op("Mul", [gate, op("Sigmoid", [scaled])], "swish")
        if clamp and spec.swiglu_limit_after_activation:
            swish = op("Min", [swish, const(limit)], "swish_limit")
        if beta != 0.0:
            up = op("Add", [up, const(beta)])
        hidden = op("Mul", [swish, up], "swiglu")
    elif spec.activation_type == "relu":
        hidden = op("Relu", [hidden])
    elif spec.activation_type == "silu":
        hidden = op("Mul", [hidden, op("Sigmoid", [hidden])], "silu")
    elif spec.activation_type == "gelu":  # 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))
        cube = op("Mul", [op("Mul", [hidden, hidden]), hidden])
        inner = op("Add", [hidden, op("Mul", [cube, const(0.044715)])])
        tanh = op("Tanh", [op("Mul", [inner, const(math.sqrt(2.0 / math.pi))])])
        hidden = op("Mul", [op("Mul", [hidden, const(0.5)]), op("Add", [tanh, const(1.0)])], "gelu")

    # [E, T, I] @ [E, I, H] -> [E, T, H]; weight by routing [E, T, 1]; sum over experts.
    out = op("MatMul", [hidden, op("Transpose", [w2], perm=[0, 2, 1])], "fc2")
    if b2:
        out = op("Add", [out, unsqueeze(b2, [1])], "fc2_bias")
    weights = unsqueeze(op("Transpose", [dense], perm=[1, 0]), [2])
    combined = reduce_sum(op("Mul", [out, weights], "weighted"), [0], 0)  # [T, H]
    nodes.append(
        helper.make_node(
            "Reshape", [combined, op("Shape", [x])], [node.output[0]], name=f"{prefix}/output"
        )
    )
    return nodes


__all__ = [
    "ACTIVATIONS",
    "ATTRIBUTE_TYPES",
    "DOMAIN",
    "INPUTS",
    "LAYOUTS",
    "OP_TYPE",
    "WEIGHT_KEYS",
    "MoESpec",
    "activate",
    "count_nodes",
    "decompose_model",
    "expert_dims",
    "make_model",
    "make_node",
    "onnx_schema",
    "random_weights",
    "reference",
    "route",
    "spec_from_attributes",
    "spec_from_node",
    "to_standard_ops",
]
