"""MoE blocks in PyTorch → one ``com.microsoft::MoE`` ONNX node each.

A MoE block calls the custom op ``torch.ops.qiao.moe`` (eager: the loop transformers uses — per hit
expert, gather its tokens, SwiGLU, ``index_add_``); the dynamo exporter maps that op to ONNX
Runtime's ``com.microsoft::MoE`` through ``translation_table()``, so the exported graph holds the
whole block as one node that ORT executes (an independent reference) and qiao lowers to its own
kernels.

``prepare_for_export`` swaps blocks qiao did not define for ``MoEBlock``: Hugging Face transformers'
top-k MoE blocks — Qwen3-MoE, Mixtral, Qwen2-MoE and Qwen3-Next (sigmoid-gated shared expert beside
the node, as ordinary ops), OLMoE, FlexOlmo, MiniMax, GraniteMoe(Shared/Hybrid), JetMoe (output
bias), GPT-OSS (router bias, expert biases, clamped SwiGLU), Aria and any block of the same shape
(a router linear + transformers 5.x stacked experts) whose rebuilt form reproduces it on a probe
input. Routing one node cannot express (PhiMoE's sparse mixer, DeepSeek's sigmoid / group-limited
routing...) is left as ordinary ops, with a warning. The user's model is not modified (ancestors of
swapped blocks are shallow-copied; weights are shared except re-laid-out expert tensors).

ONNX contract (checked against ONNX Runtime 1.32's CPU kernel): ``router_probs`` are router logits
(softmax over all experts inside the op, then top-k; top-k then softmax is the renormalised case),
``normalize_routing_weights`` is ``norm_topk_prob``, ``activation_type="swiglu"`` with
``swiglu_fusion=1`` wants fc1 [E, 2I, H] with rows interleaved (2i gate_i, 2i+1 up_i), fc2
[E, H, I]; ``activation_alpha``/``activation_beta``/``swiglu_limit`` and the fc1/fc2 biases carry
GPT-OSS's experts.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from qiao.compiler import moe_op as moe_def  # the ONNX op's definition

# The block and its custom op are torch-only and live in models/ (models must not import the
# compiler); re-exported here, where the exporter and its tests have always found them.
from qiao.models.moe import ACTIVATIONS, MoEBlock, moe_op, moe_reference


def _moe_onnx(
    x,
    router_logits,
    fc1,
    fc2,
    top_k: int,
    normalize: bool,
    fc1_bias=None,
    fc2_bias=None,
    activation: str = "swiglu",
    alpha: float = 1.0,
    beta: float = 0.0,
    limit: float | None = None,
):
    """onnxscript translation of ``qiao::moe``: one ``com.microsoft::MoE`` node, its attributes
    written by ``qiao.compiler.moe_op`` (SwiGLU fc1 rows interleaved: ``swiglu_fusion=1``)."""
    from onnxscript._internal.values import Op, Opset

    spec = moe_def.MoESpec(
        k=top_k,
        activation_type=activation,
        normalize_routing_weights=int(bool(normalize)),
        swiglu_fusion=1 if activation == "swiglu" else 0,
        activation_alpha=float(alpha),
        activation_beta=float(beta),
        swiglu_limit=None if limit is None or activation != "swiglu" else float(limit),
        fc1_bias=fc1_bias is not None,
        fc2_bias=fc2_bias is not None,
    )
    moe = Op(Opset(moe_def.DOMAIN, 1), moe_def.OP_TYPE, moe_def.onnx_schema())
    return moe(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, **spec.attributes())


def translation_table() -> dict:
    """Custom-op translations for ``torch.onnx.export(..., custom_translation_table=...)``."""
    return {moe_op().default: _moe_onnx}


class HFMoEBlock(MoEBlock):
    """``MoEBlock`` plus what a transformers MoE block adds around its routed experts, computed by
    the block's own submodules (ordinary ONNX ops beside the MoE node): a shared expert, optionally
    scaled by ``sigmoid(shared_gate(x))`` (Qwen2-MoE, Qwen3-Next), and an output bias (JetMoe).

    ``returns_router_scores``: return ``(y, router_scores)`` like GPT-OSS's MLP, the scores (T, k)
    being the routing weights of the top-k experts.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shared: nn.Module | None = None
        self.shared_gate: nn.Module | None = None
        self.output_bias: nn.Parameter | None = None
        self.returns_router_scores = False
        self.source = ""

    def router_scores(self, logits: Tensor) -> Tensor:
        """The (T, k) routing weights of the chosen experts."""
        weights = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1).values
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype)

    def forward(self, hidden_states: Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden)
        logits = self.gate(x)
        y = self._moe(x, logits)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            y = y + s
        if self.output_bias is not None:
            y = y + self.output_bias
        y = y.reshape(shape)
        return (y, self.router_scores(logits)) if self.returns_router_scores else y

    def extra_repr(self) -> str:
        extra = ", shared expert" if self.shared is not None else ""
        extra += " (sigmoid-gated)" if self.shared_gate is not None else ""
        extra += ", output bias" if self.output_bias is not None else ""
        return f"{self.source}: {super().extra_repr()}{extra}"


# ------------------------------------------------------------------------------------------------
# Recognising transformers' MoE blocks
# ------------------------------------------------------------------------------------------------
# A candidate is a module with a router child (``gate`` / ``router``: a linear (E, H) weight,
# ``top_k``) beside expert weights (transformers 5.x's stacked ``experts`` module, or JetMoe's
# ``input_linear``/``output_linear``). Its weights are re-laid out for the MoE node, and the
# rebuilt block is accepted only when it reproduces the original block's output on a probe input
# (fp32: relative error below PROBE_RTOL): routing the node cannot express (sigmoid scores,
# score-correction biases, group-limited or sparse-mixer routing...) never gets through. Refused
# blocks stay ordinary ops (their experts switched to transformers' exportable ``batched_mm``
# implementation), with a warning that says why.
ROUTER_NAMES = ("gate", "router")
PROBE_TOKENS = 64  # enough tokens that routing differences show on some
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6}
PROBE_RTOL_LOW = 2e-2  # fp16 / bf16


class NotExpressible(Exception):
    """The block computes something one ``com.microsoft::MoE`` node cannot express."""


def _is_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _router(block: nn.Module):
    """(name, router module, weight, bias) of the block's router linear, or None."""
    for name in ROUTER_NAMES:
        router = block._modules.get(name)
        if router is None:
            continue
        for lin in (router, router._modules.get("layer"), router._modules.get("linear")):
            w = getattr(lin, "weight", None) if lin is not None else None
            if isinstance(w, Tensor) and w.dim() == 2:
                b = getattr(lin, "bias", None)
                return name, router, w, b if isinstance(b, Tensor) else None
    return None


def _top_k(block: nn.Module, router: nn.Module) -> int:
    for owner in (router, block):
        for attr in ("top_k", "num_experts_per_tok"):
            k = getattr(owner, attr, None)
            if isinstance(k, int):
                return k
    raise NotExpressible("no top_k on the router or the block")


def _is_silu(act) -> bool:
    from transformers.activations import ACT2FN

    return type(act) in (type(ACT2FN["silu"]), nn.SiLU) or act is nn.functional.silu


def _stacked_experts(block: nn.Module):
    """(fc1 [E, 2I, H] interleaved, fc1_bias, fc2 [E, H, I], fc2_bias, activation kwargs) of
    transformers 5.x's stacked experts module or JetMoe's parallel experts, or None."""
    experts = block._modules.get("experts")
    if experts is not None and isinstance(getattr(experts, "down_proj", None), Tensor):
        return _hf_experts(experts)
    up, down = block._modules.get("input_linear"), block._modules.get("output_linear")
    if up is not None and down is not None and hasattr(block, "activation"):  # JetMoe
        if not _is_silu(block.activation):
            raise NotExpressible(f"expert activation {type(block.activation).__name__}")
        gate_up = up.weight.detach()
        inter = gate_up.shape[1] // 2
        fc1 = MoEBlock.interleave(gate_up[:, :inter], gate_up[:, inter:])
        return fc1, None, down.weight.detach(), None, {}
    return None


def _hf_experts(experts: nn.Module):
    from transformers.integrations import moe as hf_moe

    if not getattr(experts, "has_gate", True) or not hasattr(experts, "gate_up_proj"):
        raise NotExpressible("experts without a gate/up projection")
    if getattr(experts, "has_post_expert_norm", False):
        raise NotExpressible("a norm after each expert")
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    b1 = b2 = None
    if getattr(experts, "has_bias", False):
        b1, b2 = experts.gate_up_proj_bias.detach(), experts.down_proj_bias.detach()
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    inter = gate_up.shape[1] // 2
    act: dict = {}
    if type(experts)._apply_gate is not hf_moe._default_apply_gate:
        # GPT-OSS's clamped SwiGLU on interleaved rows: (clamp(up) + 1) * G * sigmoid(alpha * G)
        alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
        if not isinstance(alpha, (int, float)) or not isinstance(limit, (int, float)):
            raise NotExpressible(f"its own gate function {type(experts).__name__}._apply_gate")
        return gate_up, b1, down, b2, dict(alpha=float(alpha), beta=1.0, limit=float(limit))
    if not _is_silu(getattr(experts, "act_fn", None)):
        raise NotExpressible(f"expert activation {type(experts.act_fn).__name__} (not SiLU)")
    if getattr(experts, "is_concatenated", True):
        gate_up = MoEBlock.interleave(gate_up[:, :inter], gate_up[:, inter:])
        if b1 is not None:
            b1 = MoEBlock.interleave(b1[:, :inter], b1[:, inter:])
    return gate_up, b1, down, b2, act


def _candidate(block: nn.Module) -> bool:
    """Whether ``block`` looks like a transformers top-k MoE block (router + stacked experts)."""
    if not _is_transformers(block) or _router(block) is None:
        return False
    if isinstance(getattr(block._modules.get("experts"), "down_proj", None), Tensor):
        return True
    return {"input_linear", "output_linear"} <= set(block._modules) and hasattr(block, "activation")


def _build(block: nn.Module, normalize: bool) -> HFMoEBlock:
    _, router, weight, bias = _router(block)
    parts = _stacked_experts(block)
    if parts is None:
        raise NotExpressible("no stacked expert weights")
    fc1, b1, fc2, b2, act = parts
    num_experts, rows, hidden = fc1.shape
    inter = fc2.shape[2]
    if weight.shape != (num_experts, hidden) or rows != 2 * inter:
        raise NotExpressible(
            f"router {tuple(weight.shape)} / experts {tuple(fc1.shape)} {tuple(fc2.shape)} shapes"
        )
    new = HFMoEBlock(
        hidden, inter, num_experts, _top_k(block, router), normalize,
        expert_bias=b1 is not None or b2 is not None, router_bias=bias is not None, **act,
    )  # fmt: skip
    frozen = lambda t: nn.Parameter(t.contiguous(), requires_grad=False)  # noqa: E731
    new.gate.weight = frozen(weight.detach())
    if bias is not None:
        new.gate.bias = frozen(bias.detach())
    new.fc1, new.fc2 = frozen(fc1), frozen(fc2)
    if b1 is not None or b2 is not None:
        new.fc1_bias = frozen(b1 if b1 is not None else fc1.new_zeros(fc1.shape[:2]))
        new.fc2_bias = frozen(b2 if b2 is not None else fc2.new_zeros(fc2.shape[:2]))
    mods = block._modules
    if "shared_expert" in mods:  # Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE
        new.shared = mods["shared_expert"]
        new.shared_gate = mods.get("shared_expert_gate")
    elif "shared_experts" in mods:  # Aria, DeepSeek-V2 (greedy routing)
        new.shared = mods["shared_experts"]
    output_bias = getattr(block, "bias", None)
    if isinstance(output_bias, Tensor) and output_bias.shape == (hidden,):  # JetMoe
        new.output_bias = output_bias
    new.source = type(block).__name__
    return new.to(fc1.dtype)


def _probe(block: nn.Module, new: HFMoEBlock) -> float:
    """Relative max error of ``new`` against ``block`` on seeded random tokens (eval mode)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, PROBE_TOKENS, new.hidden, generator=gen)
    x = x.to(device=new.fc1.device, dtype=new.fc1.dtype)
    modes = [(m, m.training) for m in block.modules()]
    try:
        block.eval()
        with torch.no_grad():
            ref = block(x.clone())
            new.returns_router_scores = isinstance(ref, tuple)
            got = new(x.clone())
    finally:
        for m, mode in modes:
            m.train(mode)
    if isinstance(ref, tuple):
        if not isinstance(ref[0], Tensor) or ref[0].shape != x.shape:
            raise NotExpressible("its output is not (hidden states, ...)")
        ref, got = ref[0], got[0]
    if not isinstance(ref, Tensor) or ref.shape != got.shape:
        raise NotExpressible("its output is not the hidden states")
    scale = ref.abs().max().clamp_min(1e-30)
    return float((got.float() - ref.float()).abs().max() / scale)


def convert_block(block: nn.Module) -> HFMoEBlock:
    """The ``HFMoEBlock`` equivalent to a transformers MoE ``block``.

    Raises
    ------
    NotExpressible
        With the reason, when no single ``com.microsoft::MoE`` node computes what ``block`` does.
    """
    found = _router(block)
    if found is None:
        raise NotExpressible("no router linear (a `gate` or `router` child with an (E, H) weight)")
    first = getattr(found[1], "norm_topk_prob", True)
    errors = []
    rtol = PROBE_RTOL.get(_dtype(block), PROBE_RTOL_LOW)
    new = _build(block, bool(first))
    for normalize in (bool(first), not first):
        new.normalize = normalize
        err = _probe(block, new)
        if err <= rtol:
            return new.train(block.training)
        errors.append(err)
    raise NotExpressible(
        "its routing is not softmax → top-k (renormalised or not): rebuilt as one MoE node it "
        f"differs from the block by {min(errors):.2e} (relative) on a probe input"
    )


def _dtype(block: nn.Module):
    for p in block.parameters():
        return p.dtype
    return torch.float32


def _plan(module: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Recognised blocks (qualified name → replacement) and refused ones (name → reason)."""
    done, refused = {}, {}
    for name, m in module.named_modules():
        if any(name.startswith(p + ".") or p == "" for p in (*done, *refused)):
            continue
        if _is_hf_qwen3_moe_block(m) and _plain_qwen3(m):
            done[name] = MoEBlock.from_hf_qwen3(m).train(m.training)
        elif _candidate(m):
            try:
                with torch.random.fork_rng(devices=[]):  # candidates' throwaway initialisation
                    done[name] = convert_block(m)
            except NotExpressible as why:
                refused[name] = f"{type(m).__name__}: {why}"
            except NotImplementedError:
                continue  # e.g. JetMoe's attention experts (map/reduce, no forward): not a block
            except Exception as err:  # forward needs other inputs...: cannot check, so not swapped
                refused[name] = f"{type(m).__name__}: probing it failed ({type(err).__name__})"
    return done, refused


def _is_hf_qwen3_moe_block(module: nn.Module) -> bool:
    cls = type(module)
    return (
        cls.__name__ == "Qwen3MoeSparseMoeBlock"
        and cls.__module__.startswith("transformers.")
        and hasattr(getattr(module, "experts", None), "gate_up_proj")
        and hasattr(getattr(module, "gate", None), "weight")
    )


def _plain_qwen3(block: nn.Module) -> bool:
    """A Qwen3 block ``MoEBlock.from_hf_qwen3`` takes as is (others go through the probe)."""
    experts = block.experts
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    return (
        not (getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False))
        and act == "silu"
    )


def find_moe_blocks(module: nn.Module) -> list[str]:
    """Qualified names of the submodules ``prepare_for_export`` replaces with one MoE node each."""
    with torch.random.fork_rng(devices=[]):  # a query: the caller's random stream stays as it was
        return list(_plan(module)[0])


def refused_moe_blocks(module: nn.Module) -> dict[str, str]:
    """MoE blocks ``prepare_for_export`` leaves as ordinary ops: qualified name → why."""
    with torch.random.fork_rng(devices=[]):
        return _plan(module)[1]


def _exportable_experts(block: nn.Module) -> nn.Module:
    """``block`` with its stacked experts switched to transformers' ``batched_mm`` implementation
    (gathers each token's expert weights: ordinary ops that export), the user's block untouched."""
    experts = block._modules.get("experts")
    config = getattr(experts, "config", None)
    if config is None or getattr(config, "_experts_implementation", None) == "batched_mm":
        return block
    new_experts = copy.copy(experts)
    new_experts.config = copy.copy(config)
    new_experts.config._experts_implementation = "batched_mm"
    new = _copy_node(block)
    new._modules["experts"] = new_experts
    return new


def prepare_for_export(module):
    """Return ``module`` with recognised third-party MoE blocks replaced by ``MoEBlock``.

    Refused blocks (routing one MoE node cannot express) stay ordinary ops, with a warning.
    The argument is left untouched: each ancestor of a replaced block is shallow-copied (parameters
    shared), so the caller's model keeps working as before.
    """
    if not isinstance(module, nn.Module):
        return module
    done, refused = _plan(module)
    for name, why in refused.items():
        warnings.warn(
            f"MoE block {name or type(module).__name__!r} ({why}) is exported as ordinary ONNX "
            "ops, not as one com.microsoft::MoE node",
            stacklevel=3,
        )
    swaps = dict(done)
    for name in refused:
        original = module.get_submodule(name)
        replacement = _exportable_experts(original)
        if replacement is not original:
            swaps[name] = replacement
    if not swaps:
        return module
    if "" in swaps:  # the module is a block itself
        return swaps[""]
    root = _copy_node(module)
    for name, replacement in swaps.items():
        parent, attr = root, name.split(".")
        for part in attr[:-1]:
            child = parent._modules[part]
            if not getattr(child, "_qiao_copy", False):
                child = _copy_node(child)
                parent._modules[part] = child
            parent = child
        parent._modules[attr[-1]] = replacement
    return root


def _copy_node(module: nn.Module) -> nn.Module:
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._qiao_copy = True
    return new


__all__ = [
    "ACTIVATIONS",
    "HFMoEBlock",
    "MoEBlock",
    "NotExpressible",
    "convert_block",
    "find_moe_blocks",
    "moe_op",
    "moe_reference",
    "prepare_for_export",
    "refused_moe_blocks",
    "translation_table",
]
