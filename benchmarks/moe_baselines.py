"""What the MoE benchmark compares, built once per run on the same weights and inputs:

- ``QiaoMoE``: the ``com.microsoft::MoE`` node compiled by qiao for the CPU (symbolic token count,
  one build for every T), timed with TVM's evaluator on the VM;
- ``OrtMoE``: ONNX Runtime's ``com.microsoft::MoE`` CPU kernel on the same node;
- ``TorchEagerMoE``: the loop transformers uses (per hit expert: gather its tokens, SwiGLU,
  ``index_add_``) — ``qiao.compiler.export_moe.moe_reference``;
- ``Roofline``: active FLOPs at the sgemm rate and routed experts' weight bytes at the read
bandwidth,
  both measured in the same run.

Weights are the expert layers of one block in ONNX's layout (``fc1`` [E, 2I, H] gate/up interleaved,
``fc2`` [E, H, I]); the router is outside the op (every engine gets the same router logits).
Run ``python benchmarks/test_moe.py`` for the table, or the pytest suite.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass

import numpy as np

from qiao.compiler.bench import OnnxRuntimeEngine, RunnerEngine, time_until

QWEN3_30B_A3B_BLOCK = dict(num_experts=128, hidden=2048, inter=768, top_k=8)
SMOKE_BLOCK = dict(num_experts=8, hidden=64, inter=32, top_k=2)


@dataclass
class MoEWeights:
    num_experts: int
    hidden: int
    inter: int
    top_k: int
    fc1: np.ndarray  # (E, 2I, H) float32, gate/up rows interleaved
    fc2: np.ndarray  # (E, H, I) float32
    router: np.ndarray  # (E, H) float32

    @property
    def expert_bytes(self) -> int:
        return (self.fc1[0].size + self.fc2[0].size) * 4

    def inputs(self, tokens: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Seeded tokens (T, H) and their router logits (T, E)."""
        x = np.random.default_rng(seed).standard_normal((tokens, self.hidden), dtype=np.float32)
        return x, x @ self.router.T

    def hit_experts(self, logits: np.ndarray) -> int:
        """Distinct experts the tokens route to (ties aside)."""
        top = np.argpartition(-logits, self.top_k - 1, axis=1)[:, : self.top_k]
        return int(np.unique(top).size)

    def active_flops(self, tokens: int) -> float:
        return 2.0 * tokens * self.top_k * 3 * self.hidden * self.inter


def make_weights(
    num_experts: int, hidden: int, inter: int, top_k: int, seed: int = 0
) -> MoEWeights:
    """Seeded block weights, scaled to unit-size activations (generated in float32 directly)."""
    rng = np.random.default_rng(seed)
    fc1 = rng.standard_normal((num_experts, 2 * inter, hidden), dtype=np.float32)
    fc1 *= np.float32(1 / np.sqrt(hidden))
    fc2 = rng.standard_normal((num_experts, hidden, inter), dtype=np.float32)
    fc2 *= np.float32(1 / np.sqrt(inter))
    router = rng.standard_normal((num_experts, hidden), dtype=np.float32)
    router *= np.float32(1 / np.sqrt(hidden))
    return MoEWeights(num_experts, hidden, inter, top_k, fc1, fc2, router)


def moe_onnx(w: MoEWeights):
    """The MoE node (``qiao.compiler.moe_op``: interleaved SwiGLU, renormalised top-k) with the
    weights as graph inputs (nothing large serialised)."""
    from qiao.compiler import moe_op

    spec = moe_op.MoESpec(
        k=w.top_k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1
    )
    return moe_op.make_model(spec, {"fc1": w.fc1, "fc2": w.fc2}, weights_as_inputs=True)


# Seconds per call, ``repeat`` samples, each sample lasting ``min_time``: the shared timing loop.
timed = time_until


class QiaoMoE(RunnerEngine):
    """The node compiled by qiao's CPU backend, loaded by its ``TVMRunner`` with the expert weights
    on the device as its parameters; ``run`` returns y, ``time`` uses TVM's evaluator."""

    def __init__(self, w: MoEWeights, target: str = "cpu", arch: str | None = None):
        from qiao.backends import TVMRunner, get_backend
        from qiao.backends.tvm_backend import weight_tensor
        from qiao.compiler.frontend import import_onnx

        class WeightsRunner(TVMRunner):
            # main(x, logits, fc1, fc2) takes the weights as its last inputs, which is where the
            # runner appends its parameters; they are copied as they are (no lifted packing),
            # onto huge pages as the runner's own weights are (``weight_tensor``).
            def prepare_params(self, params):
                return [weight_tensor(p, self.device) for p in params]

        backend = get_backend(target)
        self.tvm_target = backend.target(arch)
        imported = import_onnx(moe_onnx(w))
        executable = backend.compile_module(imported.mod, self.tvm_target, {})
        with tempfile.TemporaryDirectory(prefix="qiao-moe-") as tmp:
            library = os.path.join(tmp, "moe.so")
            executable.export_library(library)
            runner = WeightsRunner(library, [w.fc1, w.fc2], backend.device())
        super().__init__(runner, ["x", "logits"], ["y"], name="qiao")

    def run(self, x, logits) -> np.ndarray:
        return self.outputs({"x": x, "logits": logits})["y"]

    def prepared(self, x, logits):
        """A zero-argument call on ``x``, ``logits`` converted once (``interleaved`` times it)."""
        return self.prepare({"x": x, "logits": logits})

    def time(self, x, logits, repeat: int, warmup: bool = True) -> list[float]:
        feeds = {"x": x, "logits": logits}
        number = 1 if x.shape[0] >= 16 else 5
        if warmup:
            self.benchmark(feeds, repeat, number)  # first touch of the weights, thread pool start
        return self.benchmark(feeds, repeat, number)


class OrtMoE(OnnxRuntimeEngine):
    """ONNX Runtime's ``com.microsoft::MoE`` CPU kernel."""

    def __init__(self, w: MoEWeights, threads: int | None = None):
        super().__init__(moe_onnx(w).SerializeToString(), threads=threads)
        self.name = "onnxruntime"
        self.fc1, self.fc2 = w.fc1, w.fc2

    def _feeds(self, x, logits) -> dict[str, np.ndarray]:
        return {"x": x, "logits": logits, "fc1": self.fc1, "fc2": self.fc2}

    def run(self, x, logits) -> np.ndarray:
        return self.outputs(self._feeds(x, logits))["y"]

    def prepared(self, x, logits):
        return self.prepare(self._feeds(x, logits))

    def time(self, x, logits, repeat: int, warmup: bool = True) -> list[float]:
        call = self.prepare(self._feeds(x, logits))
        return time_until(call, repeat, warmup=int(warmup), min_time=0.05)


class TorchEagerMoE:
    """PyTorch eager with the transformers loop (``qiao.compiler.export_moe.moe_reference``)."""

    name = "torch"

    def __init__(self, w: MoEWeights):
        import torch

        self.torch = torch
        self.fc1, self.fc2 = torch.from_numpy(w.fc1), torch.from_numpy(w.fc2)
        self.top_k = w.top_k

    def run(self, x, logits) -> np.ndarray:
        from qiao.compiler.export_moe import moe_reference

        with self.torch.no_grad():
            return moe_reference(
                self.torch.from_numpy(x),
                self.torch.from_numpy(logits),
                self.fc1,
                self.fc2,
                self.top_k,
                True,
            ).numpy()

    def prepared(self, x, logits):
        return lambda: self.run(x, logits)

    def time(self, x, logits, repeat: int, warmup: bool = True) -> list[float]:
        return time_until(lambda: self.run(x, logits), repeat, warmup=int(warmup), min_time=0.05)


@dataclass
class MachineRates:
    sgemm_flops: float  # FLOP/s of a large float32 GEMM (PyTorch/oneDNN, all threads)
    read_bytes: float  # bytes/s streaming a large float32 array (all threads)


def rate_probes(w: MoEWeights) -> dict[str, tuple]:
    """The two roofline probes as ``{name: (zero-argument call, work per call)}``: ``sgemm`` (a
    PyTorch GEMM of the block's own gate/up shape at T = 512; FLOPs) and ``read`` (a PyTorch sum
    over every expert's fc1; bytes). Timed among the engines, each round gives a rate."""
    import torch

    a = torch.randn(512, w.hidden)
    b = torch.randn(w.hidden, 2 * w.inter)
    weights = torch.from_numpy(w.fc1)
    return {
        "sgemm": (lambda: a @ b, 2.0 * 512 * w.hidden * 2 * w.inter),
        "read": (lambda: weights.sum(), weights.numel() * 4.0),
    }


def measure_rates(w: MoEWeights, repeat: int = 5) -> MachineRates:
    """sgemm rate on the block's own GEMM shape, and read bandwidth over the expert weights."""
    probes = rate_probes(w)
    (gemm, flops), (read, nbytes) = probes["sgemm"], probes["read"]
    gemm_s = statistics.median(time_until(gemm, repeat, min_time=0.05))
    read_s = statistics.median(time_until(read, max(3, repeat // 2)))
    return MachineRates(flops / gemm_s, nbytes / read_s)


def roofline_seconds(w: MoEWeights, tokens: int, logits: np.ndarray, rates: MachineRates) -> float:
    """max(active FLOPs / sgemm rate, routed experts' weight bytes / read bandwidth)."""
    return max(
        w.active_flops(tokens) / rates.sgemm_flops,
        w.hit_experts(logits) * w.expert_bytes / rates.read_bytes,
    )


def is_smoke() -> bool:
    return os.environ.get("QIAO_BENCH_SMOKE") == "1"


__all__ = [
    "MachineRates",
    "MoEWeights",
    "OrtMoE",
    "QWEN3_30B_A3B_BLOCK",
    "QiaoMoE",
    "SMOKE_BLOCK",
    "TorchEagerMoE",
    "is_smoke",
    "make_weights",
    "measure_rates",
    "moe_onnx",
    "rate_probes",
    "roofline_seconds",
    "timed",
]
