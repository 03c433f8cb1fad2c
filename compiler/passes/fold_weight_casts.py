"""FoldWeightCasts: GEMMs read float16/bfloat16 weights as they are stored, widening in registers.

A model with half-precision weights (``--dtype bfloat16|float16``, whose rewrite
``qiao.compiler.frontend.cast_dtype`` inserts ``Cast(weight) -> float32``, or an ONNX model
that casts its fp16 initializers itself) reaches Relax as ``matmul(x, astype(w, "float32"))``.
Left so, ``astype`` is its own kernel (Relax's FuseOps does not fuse a producer into a GEMM): the
widened fp32 copy of the weight is what the GEMM reads, so the narrow storage saves nothing at run
time. This pass folds the cast into its consumer instead:

- ``matmul(x, astype(w))`` (``w`` float16/bfloat16, ``x`` float32, the cast possibly under a
  ``permute_dims``) becomes ``matmul(x, w, out_dtype="float32")``: the legalized block reads ``w``
  and computes ``x * float32(w)`` with float32 accumulation, so the CPU GEMM schedule packs ``w``
  in its own dtype (``qiao.compiler.schedules.cpu_gemm``) and converts in the micro-kernel;
- ``take(astype(table), ids)`` (an embedding lookup) becomes ``astype(take(table, ids))``: only
  the rows looked up are widened, not the whole table at every call;
- the ``qiao.moe`` placeholder's expert weights ``astype(fc1)``, ``astype(fc2)`` are replaced by
  ``fc1``, ``fc2`` and the MoE config's ``weight_dtype`` set, so the grouped GEMM reads the narrow
  experts in place (on a GPU only for a dtype its tensor cores take; other GPUs keep the cast).

On a CUDA target with tensor cores for the weights' dtype (``schedules.gpu.tensor_core_dtypes``:
float16 from sm_70, bfloat16 from sm_80) the GEMM's float32 activation is cast to that dtype at
its input as well, ``matmul(astype(x, "float16"), w, out_dtype="float32")``: both operands half,
products accumulated in float32, as cuBLAS and ONNX Runtime's CUDA provider compute a half GEMM.
dlight's ``Matmul`` (float16) and ``schedules.gpu.BF16MatmulTensorization`` then schedule it on
tensor cores; the cast usually fuses into the producer's epilogue. CPU targets keep float32
activations.

A matmul of two float16/bfloat16 operands (a model in half precision, e.g. ONNX Runtime GenAI's
``-p fp16``) accumulates in float32 and rounds its result once: ``astype(matmul(a, b,
out_dtype="float32"), dtype)``, so such a model reads its weights narrow too.

Everything else (norms, softmax, reductions, activations) stays float32. Casts left without users
are dropped.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qiao.compiler.passes.placeholders import rewrite_functions
from qiao.compiler.passes.relax_util import is_op, static_dims, tensor_dtype

NARROW_FLOATS = ("float16", "bfloat16")


def _product(dims: list) -> int | None:
    """The product of ``dims``; ``None`` when one is symbolic."""
    out = 1
    for d in dims:
        if d is None:
            return None
        out *= d
    return out


@mutator
class _CastFolder(PyExprMutator):
    def __init__(self, mod, gpu: bool, tensor_cores: tuple[str, ...] = ()):
        super().__init__(mod)
        self.gpu = gpu
        self.tensor_cores = tensor_cores

    def half_input(self, x, w, dtype: str, x_first: bool = True):
        """``x`` cast to ``dtype`` where the target multiplies ``dtype`` on tensor cores (the
        GEMM then reads two ``dtype`` operands and accumulates in float32), else ``x``. A GEMM
        that would not tensorize (a static M, N or K of at most 64, dlight's threshold) keeps its
        float32 activation."""
        if dtype not in self.tensor_cores or tensor_dtype(x) != "float32":
            return x
        from qiao.compiler.schedules.gpu import TC_MIN_EXTENT

        xs, ws = static_dims(x), static_dims(w)
        if xs is None or ws is None or len(xs) < 2 or len(ws) < 2:
            return x
        if x_first:  # x[..., M, K] @ w[..., K, N]
            dims = [xs[-1], ws[-1], _product(xs[:-1])]
        else:  # w[..., M, K] @ x[..., K, N]
            dims = [xs[-2], ws[-2], _product([d for i, d in enumerate(xs) if i != len(xs) - 2])]
        if any(d is not None and d <= TC_MIN_EXTENT for d in dims):
            return x
        return self.builder_.emit(relax.op.astype(x, dtype))

    def _binding(self, expr):
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is not None:
                return bound
        return expr

    def narrow_source(self, expr):
        """``w`` when ``expr`` is ``astype(w, "float32")`` of a float16/bfloat16 ``w``."""
        value = self._binding(expr)
        if is_op(value, "astype") and tensor_dtype(value) == "float32":
            inner = value.args[0]
            if tensor_dtype(inner) in NARROW_FLOATS:
                return inner
        return None

    def narrow_operand(self, expr):
        """``expr`` read as its narrow source: ``astype(w)`` → ``w``, ``permute_dims(astype(w))``
        → ``permute_dims(w)``; ``None`` when ``expr`` is not a widened narrow tensor."""
        source = self.narrow_source(expr)
        if source is not None:
            return source
        value = self._binding(expr)
        if is_op(value, "permute_dims"):
            source = self.narrow_source(value.args[0])
            if source is not None:
                return self.builder_.emit(relax.op.permute_dims(source, value.attrs.axes))
        return None

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator hook
        call = super().visit_call_(call)
        if is_op(call, "matmul") and tensor_dtype(call) in NARROW_FLOATS:
            # a half-precision model's GEMM: float32 accumulation, one rounding at the end
            # (TVM's legalized float16 matmul would accumulate in float16)
            a, b = call.args
            if tensor_dtype(a) == tensor_dtype(b) == tensor_dtype(call):
                wide = self.builder_.emit(relax.op.matmul(a, b, out_dtype="float32"))
                return relax.op.astype(wide, tensor_dtype(call))
            return call
        if is_op(call, "matmul") and tensor_dtype(call) == "float32":
            a, b = call.args
            narrow_b = self.narrow_operand(b) if tensor_dtype(a) == "float32" else None
            narrow_a = self.narrow_operand(a) if tensor_dtype(b) == "float32" else None
            if narrow_b is not None:
                a = self.half_input(a, narrow_b, tensor_dtype(narrow_b))
                return relax.op.matmul(a, narrow_b, out_dtype="float32")
            if narrow_a is not None:
                b = self.half_input(b, narrow_a, tensor_dtype(narrow_a), x_first=False)
                return relax.op.matmul(narrow_a, b, out_dtype="float32")
            return call
        if is_op(call, "take"):
            # an embedding lookup: gather the narrow rows, widen only those
            table = self.narrow_source(call.args[0])
            if table is not None:
                rows = self.builder_.emit(
                    relax.op.take(table, call.args[1], call.attrs.axis, call.attrs.mode)
                )
                return relax.op.astype(rows, "float32")
            return call
        from qiao.compiler.passes.lower_moe import is_moe_placeholder

        if is_moe_placeholder(call):
            return self.fold_moe(call)
        return call

    def fold_moe(self, call):
        fields = list(call.args[1].fields)
        fc1, fc2 = self.narrow_source(fields[2]), self.narrow_source(fields[4])
        if fc1 is None or fc2 is None or tensor_dtype(fc1) != tensor_dtype(fc2):
            return call
        if self.gpu and tensor_dtype(fc1) not in self.tensor_cores:
            return call  # GPUs without tensor cores for it: float32 experts
        config = json.loads(fields[-1].value)
        config["weight_dtype"] = tensor_dtype(fc1)
        fields[2], fields[4] = fc1, fc2
        fields[-1] = tvm.ir.StringImm(json.dumps(config, sort_keys=True))
        return relax.Call(
            call.op, [call.args[0], relax.Tuple(fields)], call.attrs, call.ty_args, call.span
        )


@tvm.transform.module_pass(opt_level=0, name="FoldWeightCasts")
class FoldWeightCasts:
    """Fold ``astype(float16/bfloat16 weight) -> float32`` into the GEMMs and MoE experts that
    read it (see the module docstring).

    Parameters
    ----------
    gpu : bool, optional
        The backend's ``is_gpu``: MoE experts keep their cast there. Default: whether the current
        target's keys say ``gpu``.
    """

    def __init__(self, gpu: bool | None = None, tensor_cores: tuple[str, ...] | None = None):
        self.gpu = gpu
        self.tensor_cores = tensor_cores

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not any(_has_narrow(func) for _, func in mod.functions_items() if _is_relax(func)):
            return mod
        gpu = self.gpu
        target = tvm.target.Target.current(allow_none=True)
        if gpu is None:
            gpu = target is not None and "gpu" in target.keys
        tensor_cores = self.tensor_cores
        if tensor_cores is None:
            from qiao.compiler.schedules.gpu import tensor_core_dtypes

            tensor_cores = tensor_core_dtypes(target) if gpu else ()
        mod = rewrite_functions(mod, _CastFolder(mod, gpu, tuple(tensor_cores)))
        return relax.transform.DeadCodeElimination()(mod)


def _is_relax(func) -> bool:
    return isinstance(func, relax.Function)


def _has_narrow(func) -> bool:
    """Whether ``func`` widens a float16/bfloat16 tensor or multiplies two of them."""
    found = []

    def visit(expr):
        if found or not isinstance(expr, relax.Call):
            return
        if (is_op(expr, "astype") or is_op(expr, "matmul")) and any(
            tensor_dtype(a) in NARROW_FLOATS for a in expr.args
        ):
            found.append(expr)

    relax.analysis.post_order_visit(func, visit)
    return bool(found)


__all__ = ["FoldWeightCasts"]
