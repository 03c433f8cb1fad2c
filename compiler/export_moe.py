"""MoE blocks in PyTorch → one ``com.microsoft::MoE`` ONNX node each.

A MoE block calls the custom op ``torch.ops.qiao.moe`` (eager: the loop transformers uses — per hit
expert, gather its tokens, SwiGLU, ``index_add_``); the dynamo exporter maps that op to ONNX
Runtime's ``com.microsoft::MoE`` through ``translation_table()``, so the exported graph holds the
whole block as one node that ORT executes (an independent reference) and qiao lowers to its own
kernels.

``prepare_for_export`` swaps blocks qiao did not define for ``MoEBlock``: Hugging Face transformers'
``Qwen3MoeSparseMoeBlock`` (5.x stacked expert weights) — the user's model is not modified
(ancestors
of swapped blocks are shallow-copied; weights are shared except the re-laid-out gate/up tensor).

ONNX contract (checked against ONNX Runtime 1.2x's CPU kernel): ``router_probs`` are router logits
(softmax over all experts inside the op, then top-k), ``normalize_routing_weights=1`` is Qwen3's
``norm_topk_prob``, ``activation_type="swiglu"`` with ``swiglu_fusion=1`` wants fc1 [E, 2I, H] with
rows interleaved (2i gate_i, 2i+1 up_i), fc2 [E, H, I].
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor, nn

OP_NAMESPACE = "qiao"


# ------------------------------------------------------------------------------------------------
# The custom op
# ------------------------------------------------------------------------------------------------
def moe_reference(
    x: Tensor, router_logits: Tensor, fc1: Tensor, fc2: Tensor, top_k: int, normalize: bool
) -> Tensor:
    """Eager MoE as transformers computes it (softmax, ``torch.topk``, per-expert gather/SwiGLU/
    ``index_add_``).

    Parameters
    ----------
    x : (T, H) tokens
    router_logits : (T, E)
    fc1 : (E, 2I, H), gate/up rows interleaved
    fc2 : (E, H, I)
    top_k : int
    normalize : bool
        Renormalise the k routing weights (``norm_topk_prob``).

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
        h = nn.functional.linear(x[token], fc1[e])
        act = nn.functional.silu(h[:, 0::2]) * h[:, 1::2]
        y = nn.functional.linear(act, fc2[e]) * weights[token, slot, None]
        out.index_add_(0, token, y)
    return out


@functools.cache
def _define_op() -> None:
    lib_name = f"{OP_NAMESPACE}::moe"

    @torch.library.custom_op(lib_name, mutates_args=())
    def moe(
        x: Tensor, router_logits: Tensor, fc1: Tensor, fc2: Tensor, top_k: int, normalize: bool
    ) -> Tensor:
        return moe_reference(x, router_logits, fc1, fc2, top_k, normalize)

    @moe.register_fake
    def _(x, router_logits, fc1, fc2, top_k, normalize):
        return torch.empty_like(x)


def moe_op():
    """``torch.ops.qiao.moe`` (defined on first use)."""
    _define_op()
    return getattr(torch.ops, OP_NAMESPACE).moe


def _moe_schema():
    from onnx.defs import OpSchema

    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    names = (
        "input",
        "router_probs",
        "fc1_experts_weights",
        "fc1_experts_bias",
        "fc2_experts_weights",
        "fc2_experts_bias",
        "fc3_experts_weights",
        "fc3_experts_bias",
    )
    optional = {"fc1_experts_bias", "fc2_experts_bias", "fc3_experts_weights", "fc3_experts_bias"}
    attrs = {
        "k": OpSchema.AttrType.INT,
        "activation_type": OpSchema.AttrType.STRING,
        "swiglu_fusion": OpSchema.AttrType.INT,
        "normalize_routing_weights": OpSchema.AttrType.INT,
        "activation_alpha": OpSchema.AttrType.FLOAT,
        "activation_beta": OpSchema.AttrType.FLOAT,
        "use_sparse_mixer": OpSchema.AttrType.INT,
    }
    return OpSchema(
        "MoE",
        "com.microsoft",
        1,
        inputs=[fp(n, "T", param_option=opt) if n in optional else fp(n, "T") for n in names],
        outputs=[fp("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in attrs.items()],
    )


def _moe_onnx(x, router_logits, fc1, fc2, top_k: int, normalize: bool):
    """onnxscript translation of ``qiao::moe``: one ``com.microsoft::MoE`` node."""
    from onnxscript._internal.values import Op, Opset

    moe = Op(Opset("com.microsoft", 1), "MoE", _moe_schema())
    return moe(
        x,
        router_logits,
        fc1,
        None,
        fc2,
        k=top_k,
        activation_type="swiglu",
        swiglu_fusion=1,
        normalize_routing_weights=int(bool(normalize)),
        activation_alpha=1.0,
        activation_beta=0.0,
    )


def translation_table() -> dict:
    """Custom-op translations for ``torch.onnx.export(..., custom_translation_table=...)``."""
    return {moe_op().default: _moe_onnx}


# ------------------------------------------------------------------------------------------------
# The block
# ------------------------------------------------------------------------------------------------
class MoEBlock(nn.Module):
    """Sparse MoE block (Qwen3 style): router linear → softmax over all experts → top-k →
    renormalise when ``normalize`` → SwiGLU experts → routing-weighted sum.

    Parameters
    ----------
    hidden, inter, num_experts, top_k : int
    normalize : bool
        Qwen3's ``norm_topk_prob``.

    Attributes
    ----------
    gate : nn.Linear
        Router, weight (E, H).
    fc1 : nn.Parameter
        (E, 2I, H) expert gate/up weights, rows interleaved (2i gate_i, 2i+1 up_i).
    fc2 : nn.Parameter
        (E, H, I) expert down weights.
    """

    def __init__(
        self, hidden: int, inter: int, num_experts: int, top_k: int, normalize: bool = True
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.hidden, self.inter, self.num_experts, self.top_k = hidden, inter, num_experts, top_k
        self.normalize = normalize
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.fc1 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.fc2 = nn.Parameter(torch.empty(num_experts, hidden, inter))

    @staticmethod
    def interleave(gate: Tensor, up: Tensor) -> Tensor:
        """(E, I, H) gate and up weights → (E, 2I, H) interleaved fc1."""
        return torch.stack((gate, up), dim=2).reshape(
            gate.shape[0], 2 * gate.shape[1], gate.shape[2]
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden)
        y = moe_op()(x, self.gate(x), self.fc1, self.fc2, self.top_k, self.normalize)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, inter={self.inter}, experts={self.num_experts}, "
            f"top_k={self.top_k}, normalize={self.normalize}"
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


# ------------------------------------------------------------------------------------------------
# Recognising other people's MoE blocks
# ------------------------------------------------------------------------------------------------
def _is_hf_qwen3_moe_block(module: nn.Module) -> bool:
    cls = type(module)
    return (
        cls.__name__ == "Qwen3MoeSparseMoeBlock"
        and cls.__module__.startswith("transformers.")
        and hasattr(getattr(module, "experts", None), "gate_up_proj")
        and hasattr(getattr(module, "gate", None), "weight")
    )


def find_moe_blocks(module: nn.Module) -> list[str]:
    """Qualified names of the submodules ``prepare_for_export`` replaces."""
    return [name for name, m in module.named_modules() if _is_hf_qwen3_moe_block(m)]


def prepare_for_export(module):
    """Return ``module`` with recognised third-party MoE blocks replaced by ``MoEBlock``.

    The argument is left untouched: each ancestor of a replaced block is shallow-copied (parameters
    shared), so the caller's model keeps working as before.
    """
    if not isinstance(module, nn.Module):
        return module
    names = find_moe_blocks(module)
    if not names:
        return module
    if names == [""]:  # the module is a block itself
        return MoEBlock.from_hf_qwen3(module).train(module.training)
    root = _copy_node(module)
    for name in names:
        parent, attr = root, name.split(".")
        for part in attr[:-1]:
            child = parent._modules[part]
            if not getattr(child, "_qiao_copy", False):
                child = _copy_node(child)
                parent._modules[part] = child
            parent = child
        original = parent._modules[attr[-1]]
        parent._modules[attr[-1]] = MoEBlock.from_hf_qwen3(original).train(original.training)
    return root


def _copy_node(module: nn.Module) -> nn.Module:
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._qiao_copy = True
    return new


__all__ = [
    "MoEBlock",
    "find_moe_blocks",
    "moe_op",
    "moe_reference",
    "prepare_for_export",
    "translation_table",
]
