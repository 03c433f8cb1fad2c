"""The MoE block in PyTorch and its custom op ``torch.ops.qiao.moe`` (torch only: no qiao.compiler).

``MoEBlock`` (Qwen3 style: router linear, softmax over all experts, top-k, experts, routing-weighted
sum) computes its experts through ``torch.ops.qiao.moe``, whose eager body ``moe_reference`` is the
loop transformers uses (per hit expert: gather its tokens, SwiGLU, ``index_add_``). The exporter
(``qiao.compiler.export_moe``) maps the op to one ``com.microsoft::MoE`` ONNX node; the op's
arguments are that node's (``fc1`` [E, 2I, H] with gate/up rows interleaved for SwiGLU, ``fc2``
[E, H, I], optional biases, ``activation``/``alpha``/``beta``/``limit``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

OP_NAMESPACE = "qiao"


# ------------------------------------------------------------------------------------------------
# The custom op
# ------------------------------------------------------------------------------------------------
def _activate(h: Tensor, activation: str, alpha: float, beta: float, limit: float | None) -> Tensor:
    """The expert activation on fc1's output, as ``com.microsoft::MoE`` defines it (fc1 rows of a
    SwiGLU interleaved: 2i gate_i, 2i+1 up_i)."""
    if activation == "swiglu":
        g, u = h[:, 0::2], h[:, 1::2]
        if limit is not None:
            g = g.clamp(max=limit)
            u = u.clamp(min=-limit, max=limit)
        if alpha == 1.0 and beta == 0.0:
            return nn.functional.silu(g) * u
        return g * torch.sigmoid(alpha * g) * (u + beta)
    if activation == "silu":
        return nn.functional.silu(h)
    if activation == "relu":
        return nn.functional.relu(h)
    if activation == "gelu":
        return nn.functional.gelu(h, approximate="tanh")  # what ORT's MoE computes
    if activation == "identity":
        return h
    raise ValueError(f"MoE activation {activation!r} is not one of {ACTIVATIONS}")


ACTIVATIONS = ("swiglu", "silu", "relu", "gelu", "identity")


def moe_reference(
    x: Tensor,
    router_logits: Tensor,
    fc1: Tensor,
    fc2: Tensor,
    top_k: int,
    normalize: bool,
    fc1_bias: Tensor | None = None,
    fc2_bias: Tensor | None = None,
    activation: str = "swiglu",
    alpha: float = 1.0,
    beta: float = 0.0,
    limit: float | None = None,
) -> Tensor:
    """Eager MoE as transformers computes it (softmax, ``torch.topk``, per-expert gather/SwiGLU/
    ``index_add_``).

    Parameters
    ----------
    x : (T, H) tokens
    router_logits : (T, E)
    fc1 : (E, 2I, H), gate/up rows interleaved (SwiGLU), or (E, I, H) for the other activations
    fc2 : (E, H, I)
    top_k : int
    normalize : bool
        Renormalise the k routing weights (``norm_topk_prob``).
    fc1_bias, fc2_bias : (E, rows of fc1) and (E, H), optional
        Expert biases.
    activation : str
        ``swiglu`` (``G * sigmoid(alpha * G) * (L + beta)``, ``G``/``L`` clamped by ``limit``),
        ``silu``, ``relu``, ``gelu`` (tanh approximation) or ``identity``.
    alpha, beta, limit : float
        SwiGLU parameters (``limit`` None: no clamp).

    Returns
    -------
    (T, H) tensor.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    hit = torch.unique(experts)
    for e in hit.tolist():
        token, slot = torch.where(experts == e)
        h = nn.functional.linear(x[token], fc1[e], None if fc1_bias is None else fc1_bias[e])
        act = _activate(h, activation, alpha, beta, limit)
        y = nn.functional.linear(act, fc2[e], None if fc2_bias is None else fc2_bias[e])
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


@functools.cache
def _define_op() -> None:
    lib_name = f"{OP_NAMESPACE}::moe"

    @torch.library.custom_op(lib_name, mutates_args=())
    def moe(
        x: Tensor,
        router_logits: Tensor,
        fc1: Tensor,
        fc2: Tensor,
        top_k: int,
        normalize: bool,
        fc1_bias: Tensor | None = None,
        fc2_bias: Tensor | None = None,
        activation: str = "swiglu",
        alpha: float = 1.0,
        beta: float = 0.0,
        limit: float | None = None,
    ) -> Tensor:
        return moe_reference(
            x, router_logits, fc1, fc2, top_k, normalize, fc1_bias, fc2_bias, activation, alpha,
            beta, limit,
        )  # fmt: skip

    @moe.register_fake
    def _(x, router_logits, fc1, fc2, top_k, normalize, *rest):
        return torch.empty_like(x)


def moe_op():
    """``torch.ops.qiao.moe`` (defined on first use)."""
    _define_op()
    return getattr(torch.ops, OP_NAMESPACE).moe


# ------------------------------------------------------------------------------------------------
# The block
# ------------------------------------------------------------------------------------------------
class MoEBlock(nn.Module):
    """Sparse MoE block (Qwen3 style): router linear → softmax over all experts → top-k →
    renormalise when ``normalize`` → experts (SwiGLU by default) → routing-weighted sum.

    Parameters
    ----------
    hidden, inter, num_experts, top_k : int
    normalize : bool
        Qwen3's ``norm_topk_prob``.
    activation : str
        ``swiglu`` (gated; fc1 holds interleaved gate/up rows), ``silu``, ``relu``, ``gelu``
        (tanh approximation) or ``identity``.
    alpha, beta, limit : float
        SwiGLU ``G * sigmoid(alpha * G) * (L + beta)``, ``G``/``L`` clamped by ``limit`` (None:
        no clamp; GPT-OSS uses 1.702, 1.0, 7.0).
    expert_bias : bool
        Experts carry fc1/fc2 biases.
    router_bias : bool
        The router linear has a bias.

    Attributes
    ----------
    gate : nn.Linear
        Router, weight (E, H).
    fc1 : nn.Parameter
        (E, 2I, H) expert gate/up weights, rows interleaved (2i gate_i, 2i+1 up_i), or (E, I, H).
    fc2 : nn.Parameter
        (E, H, I) expert down weights.
    fc1_bias, fc2_bias : nn.Parameter or None
        (E, rows of fc1) and (E, H).
    """

    def __init__(
        self,
        hidden: int,
        inter: int,
        num_experts: int,
        top_k: int,
        normalize: bool = True,
        *,
        activation: str = "swiglu",
        alpha: float = 1.0,
        beta: float = 0.0,
        limit: float | None = None,
        expert_bias: bool = False,
        router_bias: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.hidden, self.inter, self.num_experts, self.top_k = hidden, inter, num_experts, top_k
        self.normalize = normalize
        self.activation, self.alpha, self.beta, self.limit = activation, alpha, beta, limit
        rows = 2 * inter if activation == "swiglu" else inter
        self.gate = nn.Linear(hidden, num_experts, bias=router_bias)
        self.fc1 = nn.Parameter(torch.empty(num_experts, rows, hidden))
        self.fc2 = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, rows)) if expert_bias else None
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, hidden)) if expert_bias else None

    @staticmethod
    def interleave(gate: Tensor, up: Tensor) -> Tensor:
        """(E, I, ...) gate and up weights (or biases) → (E, 2I, ...) interleaved fc1."""
        return torch.stack((gate, up), dim=2).reshape(
            gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]
        )

    def _moe(self, x: Tensor, logits: Tensor) -> Tensor:
        args = (x, logits, self.fc1, self.fc2, self.top_k, self.normalize)
        plain = (
            self.fc1_bias is None
            and self.fc2_bias is None
            and (self.activation, self.alpha, self.beta, self.limit) == ("swiglu", 1.0, 0.0, None)
        )
        if plain:  # Qwen3's block: the op's short form
            return moe_op()(*args)
        return moe_op()(
            *args, self.fc1_bias, self.fc2_bias, self.activation, self.alpha, self.beta,
            self.limit,
        )  # fmt: skip

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden)
        return self._moe(x, self.gate(x)).reshape(shape)

    def extra_repr(self) -> str:
        extra = "" if self.activation == "swiglu" else f", activation={self.activation}"
        if (self.alpha, self.beta, self.limit) != (1.0, 0.0, None):
            extra += f", alpha={self.alpha}, beta={self.beta}, limit={self.limit}"
        if self.fc1_bias is not None:
            extra += ", expert_bias=True"
        return (
            f"hidden={self.hidden}, inter={self.inter}, experts={self.num_experts}, "
            f"top_k={self.top_k}, normalize={self.normalize}{extra}"
        )

    @classmethod
    def from_hf_qwen3(cls, block: nn.Module) -> MoEBlock:
        """An equivalent block from a transformers 5.x ``Qwen3MoeSparseMoeBlock``."""
        experts, router = block.experts, block.gate
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
            raise ValueError("expert biases / transposed expert weights are not supported")
        act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"expert activation {act!r} is not SiLU")
        gate_up = experts.gate_up_proj.detach()
        num_experts, rows, hidden = gate_up.shape
        inter = rows // 2
        if getattr(experts, "is_concatenated", True):
            fc1 = cls.interleave(gate_up[:, :inter], gate_up[:, inter:])
        else:
            fc1 = gate_up
        new = cls(hidden, inter, num_experts, int(router.top_k), bool(router.norm_topk_prob))
        new.gate.weight = nn.Parameter(router.weight.detach(), requires_grad=False)
        new.fc1 = nn.Parameter(fc1.contiguous(), requires_grad=False)
        new.fc2 = nn.Parameter(experts.down_proj.detach(), requires_grad=False)
        return new.to(gate_up.dtype)


__all__ = ["ACTIVATIONS", "OP_NAMESPACE", "MoEBlock", "moe_op", "moe_reference"]
