"""``qiao bench``: time compiled artifacts against ONNX Runtime and PyTorch eager, on the same
inputs.

One artifact per target serves every size: ``--tokens`` / ``--batch`` bind the model's symbolic
token or batch dimension, so nothing is recompiled between sizes. The artifact is timed with TVM's
evaluator (device-synchronised, host conversion excluded; on a remote device through
``qiao.compiler.rpc``), the baselines with ``time.perf_counter`` around calls that take inputs
already in the engine's format. Each case also checks the outputs against every baseline, so a
figure is never the speed of a wrong answer.

A result is a JSON document (``SCHEMA``, ``SCHEMA_VERSION``) carrying the machine fingerprint, the
software versions, the settings and one entry per (target, size); ``qiao report`` merges many of
them.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qiao.compiler.errors import QiaoError, ToolchainMissing

SCHEMA = "qiao-bench"
SCHEMA_VERSION = 1
BASELINES = ("onnxruntime", "torch")
# Symbolic dimension names that --tokens binds (LLM blocks) and that --batch binds.
TOKEN_DIMS = (
    "tokens",
    "num_tokens",
    "n_tokens",
    "seq",
    "seq_len",
    "sequence",
    "sequence_length",
    "seqlen",
)
BATCH_DIMS = ("batch", "batch_size", "n", "N")
DEFINITIONS = {
    "latency": "seconds per call; each sample is the mean of `number` back-to-back calls, "
    "`repeat` samples per engine and case; std is the population standard deviation of the "
    "samples; p90/p99 interpolate linearly between samples",
    "qiao_timing": "TVM's time evaluator on the Relax VM (device-synchronised; inputs already on "
    "the device, so host-side conversion is excluded; one discarded call before the samples)",
    "baseline_timing": "time.perf_counter around calls on inputs already in the engine's format "
    "(numpy for ONNX Runtime CPU, device OrtValues with IO binding for its GPU providers, torch "
    "tensors on the device with a synchronise after each call for PyTorch)",
    "throughput": "items per second = items per call / mean latency (sustained rate)",
    "speedup": "baseline median latency / qiao median latency (>1: qiao is faster)",
    "compile_s": "wall time of qiao.compiler.compile (includes the ONNX export of built-in models)",
    "memory": "host process peak RSS during one engine's warm-up and timed runs of one case, "
    "minus the RSS before them (Linux VmHWM, reset per case); device memory is not included",
    "flops": "estimate from the ONNX graph with the case's sizes: 2*M*N*K per "
    "MatMul/Gemm/FusedMatMul, 2*outputs*(Cin/groups)*kernel per Conv/ConvTranspose, "
    "2*tokens*k*expert weights per com.microsoft MoE; other operators are not counted",
    "bytes": "estimate: weights + graph inputs + outputs, each moved once (MoE: only the experts "
    "that tokens*k routes can reach)",
}


# --------------------------------------------------------------------------------------------------
# statistics
def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already-sorted samples, interpolating linearly between
    the two nearest ranks (numpy's default ``method="linear"``)."""
    if not sorted_samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(sorted_samples) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


def latency_stats(samples: Sequence[float]) -> dict[str, float | int]:
    """Summary of latency samples (seconds): ``mean median p90 p99 min max std n``.

    ``std`` is the population standard deviation (``ddof=0``, as TVM's ``BenchmarkResult``)."""
    values = sorted(float(s) for s in samples)
    if not values:
        raise QiaoError("no latency samples were taken. fix: pass --repeat 1 or more")
    n = len(values)
    mean = math.fsum(values) / n
    return {
        "mean": mean,
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "min": values[0],
        "max": values[-1],
        "std": math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n),
        "n": n,
    }


def choose_number(single_call_s: float, repeat: int, min_time: float, cap: int = 100_000) -> int:
    """Calls per sample so that ``repeat`` samples take at least ``min_time`` seconds in total."""
    if min_time <= 0 or single_call_s <= 0:
        return 1
    return int(min(cap, max(1, math.ceil(min_time / (repeat * single_call_s)))))


def time_callable(fn: Callable[[], Any], repeat: int, number: int) -> list[float]:
    """``repeat`` samples of the mean time of ``number`` calls of ``fn`` (garbage collector off)."""
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - start) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


# Idle time before an engine's timed block: longer than the worker threads of ONNX Runtime, OpenBLAS
# and TVM spin-wait after a call (measured here: ONNX Runtime's still slow a TVM call 10 ms later,
# not 100 ms later). Without it the engine timed second shares the cores with the first's spinners.
SETTLE_S = 0.2


def settle(seconds: float = SETTLE_S) -> None:
    """Leave the machine idle so that the previous engine's worker threads go to sleep."""
    if seconds > 0:
        time.sleep(seconds)


def calibrate(fn: Callable[[], Any], warmup: int, repeat: int, min_time: float, pause: float = 0.0):
    """Warm ``fn`` up (caches, thread pools, allocators), leave the machine idle for ``pause``
    seconds, and return the calls per sample that make ``repeat`` samples last ``min_time``."""
    for _ in range(warmup):
        fn()
    settle(pause)
    return choose_number(min(time_callable(fn, 3, 1)), repeat, min_time)


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int,
    min_time: float,
    warmup: int = 3,
    pause: float = SETTLE_S,
    smoke: bool = False,
) -> dict[str, list[float]]:
    """Per-call seconds of several engines doing the same work, ``rounds`` samples each.

    Rounds alternate the engines so that all see the same machine load over the run; each timed
    block (calls enough to last ``min_time``) follows ``pause`` seconds of idle time and one untimed
    call, so each engine is measured as if it ran alone. ``smoke``: every engine runs once, no
    warm-up, no pause (one sample each)."""
    if smoke:
        rounds, min_time, warmup, pause = 1, 0.0, 0, 0.0
    number = {name: calibrate(fn, warmup, 1, min_time, pause) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            settle(pause)
            if pause > 0:
                fn()
            samples[name].append(min(time_callable(fn, 1, number[name])))
    return samples


def round_ratios(samples: Mapping[str, list[float]], baseline: str, engine: str = "qiao"):
    """Per round of ``interleaved`` samples: the baseline's time over ``engine``'s (above 1
    ``engine`` is faster)."""
    return [b / a for a, b in zip(samples[engine], samples[baseline])]


# --------------------------------------------------------------------------------------------------
# sizes: which symbolic dimension --tokens / --batch binds
def parse_sizes(text: str | Sequence[int] | None, flag: str) -> list[int] | None:
    """``"1,16,128"`` → ``[1, 16, 128]`` (sorted, unique); ``None`` stays ``None``."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        sizes = sorted({int(str(i).strip()) for i in items if str(i).strip()})
    except ValueError as err:
        raise QiaoError(
            f"bad {flag} {text!r}. fix: give positive integers separated by commas, e.g. 1,16,128"
        ) from err
    if not sizes or sizes[0] < 1:
        raise QiaoError(f"bad {flag} {text!r}. fix: give positive integers, e.g. 1,16,128")
    return sizes


def symbolic_dims(specs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Symbolic dimension names of the inputs, in order of first appearance."""
    names: list[str] = []
    for spec in specs:
        for d in spec["shape"]:
            if isinstance(d, str) and d not in names:
                names.append(d)
    return names


def _find_dim(names: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {n.lower(): n for n in names}
    for c in candidates:
        if c.lower() in lowered:
            return lowered[c.lower()]
    return None


@dataclass(frozen=True)
class SizePlan:
    """How sizes map onto the model: ``mode`` (tokens / batch / static), the dimension it binds,
    the sizes, the other symbolic dims' values, and the token / batch dimensions found."""

    mode: str
    dim: str | None
    sizes: tuple[int, ...]
    fixed: Mapping[str, int]
    token_dim: str | None
    batch_dim: str | None

    def dims(self, size: int) -> dict[str, int]:
        out = dict(self.fixed)
        if self.dim is not None:
            out[self.dim] = size
        return out

    def items(self, size: int, specs: Sequence[Mapping[str, Any]]) -> tuple[int, int | None]:
        """(samples, tokens) processed by one call at ``size``."""
        dims = self.dims(size)
        tokens = None
        if self.token_dim is not None:
            tokens = dims[self.token_dim] * (dims[self.batch_dim] if self.batch_dim else 1)
        if self.batch_dim is not None:
            samples = dims[self.batch_dim]
        elif self.token_dim is not None:
            samples = tokens
        else:  # static model: its leading dimension
            shape = specs[0]["shape"] if specs else []
            samples = int(shape[0]) if shape and isinstance(shape[0], int) else 1
        return samples, tokens


def plan_sizes(
    specs: Sequence[Mapping[str, Any]],
    tokens: Sequence[int] | None = None,
    batch: Sequence[int] | None = None,
    dims: Mapping[str, int] | None = None,
) -> SizePlan:
    """Decide which symbolic dim each size binds; every other symbolic dim takes ``dims`` or 1.

    ``--tokens`` binds a dim named like a sequence/token count (``seq``, ``tokens``...); ``--batch``
    binds ``batch`` (or the only symbolic dim). Without either: size 1 of the token dim if there is
    one, else of the batch dim; a model without symbolic dims runs once at its static shape."""
    if tokens is not None and batch is not None:
        raise QiaoError("pass either --tokens or --batch, not both. fix: drop one of them")
    names = symbolic_dims(specs)
    dims = dict(dims or {})
    unknown = sorted(set(dims) - set(names))
    if unknown:
        raise QiaoError(
            f"--dim {', '.join(unknown)}: the model has no such symbolic dimension. fix: use one "
            f"of {', '.join(names) or '(none: all shapes are static)'}"
        )
    token_dim = _find_dim(names, TOKEN_DIMS)
    batch_dim = _find_dim([n for n in names if n != token_dim], BATCH_DIMS)
    signature = "; ".join(f"{s['name']}: {s['dtype']}{list(s['shape'])}" for s in specs)
    if tokens is not None:
        if token_dim is None:
            raise QiaoError(
                "--tokens needs a symbolic token dimension (named one of "
                f"{', '.join(TOKEN_DIMS)}); the model's inputs are {signature}. fix: use --batch, "
                "or --dim NAME=SIZE"
            )
        mode, dim, sizes = "tokens", token_dim, tokens
    elif batch is not None:
        if batch_dim is None and len(names) == 1 and token_dim is None:
            batch_dim = names[0]
        if batch_dim is None:
            raise QiaoError(
                f"--batch needs a symbolic batch dimension (named {', '.join(BATCH_DIMS)}); the "
                f"model's inputs are {signature}. fix: use --tokens or --dim NAME=SIZE, or "
                "re-export the model with a dynamic batch axis"
            )
        mode, dim, sizes = "batch", batch_dim, batch
    elif token_dim is not None or batch_dim is not None or names:
        dim = token_dim or batch_dim or names[0]
        mode, sizes = ("tokens" if dim == token_dim else "batch"), [dims.pop(dim, 1)]
        if dim not in (token_dim, batch_dim):
            batch_dim = dim
    else:
        mode, dim, sizes = "static", None, [1]
    if dim is not None and dim in dims:
        raise QiaoError(f"--dim {dim} clashes with --{mode}. fix: drop one of them")
    fixed = {n: int(dims.get(n, 1)) for n in names if n != dim}
    return SizePlan(mode, dim, tuple(sizes), fixed, token_dim, batch_dim)


# --------------------------------------------------------------------------------------------------
# FLOPs and bytes, estimated from the ONNX graph
def shape_only(proto):
    """A copy of ``proto`` whose large initializers keep their shape but not their data: all that
    ``estimate_cost`` needs (small ones stay, shape inference reads them as constants)."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for init in model.graph.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) > 4096 or init.external_data:
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                init.ClearField(field)
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
    return model


def _bind_dims(proto, dims: Mapping[str, int]):
    """A shape-only copy of ``proto`` with symbolic input/output dims replaced by ``dims``."""
    model = shape_only(proto)
    del model.graph.value_info[:]
    for value in list(model.graph.input) + list(model.graph.output):
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = int(dims[d.dim_param])
    return model


def estimate_cost(proto, dims: Mapping[str, int]) -> dict[str, Any] | None:
    """Estimated FLOPs and bytes of one call with ``dims`` bound (see ``DEFINITIONS``).

    Returns ``{"flops", "bytes", "counted_nodes", "unknown_nodes"}`` or ``None`` when shape
    inference fails or no node could be counted. Pass ``shape_only(model)`` when calling it for
    many sizes of a large model: only shapes are read."""
    from onnx import helper, shape_inference

    try:
        inferred = shape_inference.infer_shapes(_bind_dims(proto, dims), data_prop=True)
    except Exception:  # custom domains or >2 GiB protos: no estimate rather than a wrong one
        return None
    graph = inferred.graph
    shapes: dict[str, list[int] | None] = {}
    itemsize: dict[str, int] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = value.type.tensor_type
        dims_ = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        shapes[value.name] = None if (not t.HasField("shape") or None in dims_) else dims_
        if t.elem_type:
            itemsize[value.name] = helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
    weights: dict[str, int] = {}
    for init in proto.graph.initializer:  # the original proto: full sizes
        shapes[init.name] = list(init.dims)
        weights[init.name] = int(np.prod(init.dims, dtype=np.int64)) * (
            helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        )

    def numel(name: str) -> int | None:
        s = shapes.get(name)
        return None if s is None else int(np.prod(s, dtype=np.int64))

    flops, counted, unknown = 0, 0, 0
    weight_scale: dict[str, float] = {}
    for node in graph.node:
        op = node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.domain in ("", "ai.onnx") and op == "Constant" and "value" in attrs:
            t = attrs["value"]
            weights[node.output[0]] = int(np.prod(t.dims, dtype=np.int64)) * (
                helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            )
        cost = None
        if op in ("MatMul", "FusedMatMul"):
            a, out = shapes.get(node.input[0]), numel(node.output[0])
            if a and out is not None:
                k = a[-2] if op == "FusedMatMul" and attrs.get("transA") and len(a) > 1 else a[-1]
                cost = 2 * out * k
        elif op == "Gemm":
            a, out = shapes.get(node.input[0]), numel(node.output[0])
            if a and out is not None and len(a) == 2:
                cost = 2 * out * (a[0] if attrs.get("transA") else a[1])
        elif op == "Conv":
            w, out = shapes.get(node.input[1]), numel(node.output[0])
            if w and out is not None:
                cost = 2 * out * int(np.prod(w[1:], dtype=np.int64))
        elif op == "ConvTranspose":
            # W is (Cin, Cout/groups, *kernel): every input element meets Cout/groups*kernel weights
            x, w = numel(node.input[0]), shapes.get(node.input[1])
            if w and x is not None:
                cost = 2 * x * w[1] * int(np.prod(w[2:], dtype=np.int64))
        elif op == "MoE" and node.domain == "com.microsoft":
            x = shapes.get(node.input[0])
            if x:
                tokens, k = int(np.prod(x[:-1], dtype=np.int64)), int(attrs.get("k", 1))
                cost = 0
                for idx in (2, 4, 6):  # fc1, fc2, fc3 expert weights
                    if len(node.input) > idx and node.input[idx] and shapes.get(node.input[idx]):
                        w = shapes[node.input[idx]]
                        cost += 2 * tokens * k * int(np.prod(w[1:], dtype=np.int64))
                        weight_scale[node.input[idx]] = min(1.0, tokens * k / max(1, w[0]))
        else:
            continue
        if cost is None:
            unknown += 1
        else:
            flops += int(cost)
            counted += 1
    if counted == 0:
        return None
    io_bytes = 0
    for value in list(graph.input) + list(graph.output):
        if value.name in weights:
            continue
        n = numel(value.name)
        if n is None:
            return None
        io_bytes += n * itemsize.get(value.name, 4)
    weight_bytes = sum(b * weight_scale.get(name, 1.0) for name, b in weights.items())
    return {
        "flops": int(flops),
        "bytes": int(io_bytes + weight_bytes),
        "counted_nodes": counted,
        "unknown_nodes": unknown,
    }


# --------------------------------------------------------------------------------------------------
# memory
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(match.group(1)) if match else None
    except OSError:
        return None


class PeakRSS:
    """Context manager: ``delta_mib`` is the host peak RSS inside the block minus the RSS before it.

    Uses Linux's resettable high-water mark (``/proc/self/clear_refs`` ← 5, then ``VmHWM``); where
    that is unavailable ``delta_mib`` stays ``None``: a lifetime peak must not pass as this case's.
    """

    def __init__(self) -> None:
        self.delta_mib: float | None = None
        self._before: int | None = None

    @staticmethod
    def supported() -> bool:
        return os.access(_CLEAR_REFS, os.W_OK) and _status_kib("VmHWM") is not None

    def __enter__(self) -> PeakRSS:
        if self.supported():
            try:
                with open(_CLEAR_REFS, "w") as f:
                    f.write("5")
                self._before = _status_kib("VmRSS")
            except OSError:
                self._before = None
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM")
        if self._before is not None and peak is not None:
            self.delta_mib = max(0, peak - self._before) / 1024.0


# --------------------------------------------------------------------------------------------------
# engines: qiao's artifact and the baselines, behind one small interface
class Engine:
    """Something that runs the model: ``prepare`` turns numpy inputs into a zero-argument callable
    (inputs already in the engine's format), ``measure`` times it, ``outputs`` returns numpy arrays.
    """

    name: str = "engine"
    info: Mapping[str, Any] = {}  # how the engine runs (provider, threads...), recorded per target

    def prepare(self, inputs: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        raise NotImplementedError

    def outputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def measure(
        self, inputs: Mapping[str, np.ndarray], warmup: int, repeat: int, min_time: float
    ) -> tuple[list[float], int]:
        """Warm up, choose ``number`` for ``min_time``, and return (samples, number)."""
        fn = self.prepare(inputs)
        number = calibrate(fn, warmup, repeat, min_time)
        return time_callable(fn, repeat, number), number


class QiaoEngine(Engine):
    """A compiled artifact (local or remote runner); timed with TVM's evaluator."""

    def __init__(self, artifact, runner=None):
        self.name = "qiao"
        self.artifact = artifact
        self.runner = runner if runner is not None else artifact.runner
        self.info = {
            "runner": type(self.runner).__name__,
            "threads": os.environ.get("TVM_NUM_THREADS", "TVM default"),
        }

    def _ordered(self, inputs):
        return self.artifact.check_inputs(inputs)

    def prepare(self, inputs):
        from qiao.backends.tvm_backend import TVMRunner

        ordered = self._ordered(inputs)
        if isinstance(self.runner, TVMRunner):
            main, args, device = (
                self.runner.vm["main"],
                self.runner._args(ordered),
                self.runner.device,
            )

            def call():
                main(*args)
                device.sync()

            return call
        return lambda: self.runner.run(ordered)

    def outputs(self, inputs):
        values = self.runner.run(self._ordered(inputs))
        return dict(zip([o["name"] for o in self.artifact.outputs], values))

    def measure(self, inputs, warmup, repeat, min_time):
        ordered = self._ordered(inputs)
        for _ in range(warmup):
            self.runner.run(ordered)
        single = min(self.runner.benchmark(ordered, repeat=3, number=1))
        number = choose_number(single, repeat, min_time)
        return self.runner.benchmark(ordered, repeat=repeat, number=number), number


ORT_PROVIDERS = {  # device → (engine suffix, provider names to try in order)
    "cpu": ("cpu", ["CPUExecutionProvider"]),
    "cuda": ("cuda", ["CUDAExecutionProvider"]),
    "rocm": ("rocm", ["ROCMExecutionProvider", "MIGraphXExecutionProvider"]),
}


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime on the provider for ``device`` (IO binding keeps GPU inputs on the device)."""

    def __init__(self, model_path: str, device: str = "cpu"):
        import onnxruntime as ort

        suffix, wanted = ORT_PROVIDERS[device]
        available = ort.get_available_providers()
        provider = next((p for p in wanted if p in available), None)
        if provider is None:
            raise ToolchainMissing(
                f"onnxruntime has no {' or '.join(wanted)} here (it has {', '.join(available)}). "
                "fix: install onnxruntime-gpu (CUDA) or onnxruntime-rocm"
            )
        self.name = f"onnxruntime-{suffix}"
        self.provider = provider
        self.on_device = provider != "CPUExecutionProvider"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model_path, opts, providers=[provider])
        self.info = {"provider": provider, "version": ort.__version__}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def prepare(self, inputs):
        if not self.on_device:
            feeds, names, run = dict(inputs), self.output_names, self.session.run
            return lambda: run(names, feeds)
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self._binding = binding
        return lambda: self.session.run_with_iobinding(binding)

    def outputs(self, inputs):
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(inputs))))


class TorchEngine(Engine):
    """PyTorch eager on a built-in model (rebuilt from its seed), under ``torch.inference_mode``."""

    def __init__(self, source: Mapping[str, Any], device: str = "cpu"):
        import torch

        from qiao.models import get_model

        if device != "cpu" and not torch.cuda.is_available():
            raise ToolchainMissing(
                f"this torch ({torch.__version__}) has no {device} device. fix: install a CUDA or "
                "ROCm build of torch"
            )
        self.name = f"torch-{'cpu' if device == 'cpu' else device}"
        self.torch = torch
        self.device = torch.device("cpu" if device == "cpu" else "cuda")
        spec = get_model(source["name"], **source.get("options", {}))
        self.module = spec.module.eval().to(self.device)
        self.info = {"device": str(self.device), "threads": torch.get_num_threads()}
        self.input_names, self.output_names = list(spec.input_names), list(spec.output_names)

    def _args(self, inputs):
        return [
            self.torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device)
            for n in self.input_names
        ]

    def prepare(self, inputs):
        args, module, torch = self._args(inputs), self.module, self.torch
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def call():
            with torch.inference_mode():
                module(*args)
            sync()

        return call

    def outputs(self, inputs):
        with self.torch.inference_mode():
            out = self.module(*self._args(inputs))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().cpu().numpy() for n, o in zip(self.output_names, outs)}


# --------------------------------------------------------------------------------------------------
# roofs of the local CPU, for the roofline view
def measure_cpu_roofs(n: int = 1024, copy_mib: int = 64, trials: int = 3) -> dict[str, Any]:
    """Attainable ceilings of this CPU measured with numpy: float32 GEMM (BLAS) and a large copy.

    Not datasheet peaks: what a well-tuned library reaches here, which is what the roofline view
    compares qiao's kernels with."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    gemm_s = min(time_callable(lambda: a @ b, trials, 1))
    src = np.ones(copy_mib * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    copy_s = min(time_callable(lambda: np.copyto(dst, src), trials, 1))
    return {
        "peak_gflops": 2.0 * n**3 / gemm_s / 1e9,
        "bandwidth_gbs": 2.0 * src.nbytes / copy_s / 1e9,  # read + write
        "method": f"numpy float32 GEMM {n}^3 (BLAS) and a {copy_mib} MiB copy (read + write), "
        f"best of {trials}: attainable ceilings, not datasheet peaks",
    }


# --------------------------------------------------------------------------------------------------
# the benchmark
def parse_targets(text: str | Sequence[str], arch: str | None) -> list[tuple[str, str | None]]:
    """``"cpu,cuda:sm_90"`` → ``[("cpu", arch), ("cuda", "sm_90")]``; each checked against the
    registry (``UnknownTarget`` / bad arch before any slow work)."""
    from qiao.backends import get_backend

    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not items:
        raise QiaoError("no target given. fix: pass --target cpu (see `qiao targets`)")
    if arch is not None and len(items) > 1:
        raise QiaoError(
            "--arch applies to one target. fix: give each target its arch as TARGET:ARCH, e.g. "
            "--target cpu,cuda:sm_90"
        )
    out = []
    for item in items:
        name, _, item_arch = item.partition(":")
        item_arch = item_arch or arch
        backend = get_backend(name)
        if item_arch is not None:
            backend.target(item_arch)
        out.append((name, item_arch))
    return out


def _device_of(manifest: Mapping[str, Any]) -> str | None:
    kind = manifest.get("target", {}).get("kind")
    return {"llvm": "cpu", "c": "cpu", "cuda": "cuda", "rocm": "rocm"}.get(kind)


def _baseline_engines(artifact, names: Sequence[str], notes: list[str]) -> list[Engine]:
    """The requested baselines on the artifact's device, falling back to the CPU with a note."""
    from qiao.compiler import artifact as art

    device = _device_of(artifact.manifest)
    source = artifact.manifest.get("source", {})
    builders = {
        "onnxruntime": lambda d: OnnxRuntimeEngine(
            os.path.join(artifact.directory, art.SOURCE_MODEL), d
        ),
        "torch": lambda d: TorchEngine(source, d),
    }
    engines: list[Engine] = []
    for name in names:
        if name == "torch" and source.get("kind") != "builtin":
            notes.append("torch: only built-in models have a PyTorch module to time")
            continue
        if device is None:
            notes.append(
                f"{name}: no baseline device for target kind "
                f"{artifact.manifest.get('target', {}).get('kind')!r}"
            )
            continue
        try:
            engines.append(builders[name](device))
        except ToolchainMissing as err:
            if device == "cpu":
                notes.append(f"{name}: {err}")
                continue
            notes.append(f"{name} on {device}: {err}; timed on the CPU instead")
            try:
                engines.append(builders[name]("cpu"))
            except Exception as cpu_err:
                notes.append(f"{name}: {cpu_err}")
        except Exception as err:  # an engine that cannot load this model: say so, keep going
            notes.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return engines


def _is_artifact_dir(model) -> bool:
    from qiao.compiler import artifact as art

    return isinstance(model, (str, os.PathLike)) and os.path.isfile(
        os.path.join(os.fspath(model), art.MANIFEST)
    )


def _check(artifact, actual, expected, reference: str) -> dict[str, Any]:
    from qiao.compiler.validate import compare, tolerances

    rtol, atol = tolerances(artifact, None, None)
    rows = [
        compare(n, reference, actual[n], expected[n], rtol, atol) for n in actual if n in expected
    ]
    if not rows:
        return {"ok": False, "max_abs": None, "note": "no output names in common"}
    return {
        "ok": all(r.ok for r in rows),
        "max_abs": max(r.max_abs for r in rows),
        "rtol": rtol,
        "atol": atol,
    }


def _engine_result(samples, number, samples_per_call, tokens_per_call, cost, memory) -> dict:
    stats = latency_stats(samples)
    out: dict[str, Any] = {
        "latency_s": stats,
        "samples_s": [float(s) for s in samples],
        "number": number,
        "throughput": {"samples_per_s": samples_per_call / stats["mean"]},
        "peak_rss_delta_mib": memory,
    }
    if tokens_per_call is not None:
        out["throughput"]["tokens_per_s"] = tokens_per_call / stats["mean"]
    if cost is not None:
        out["achieved_gflops"] = cost["flops"] / stats["median"] / 1e9
    return out


def bench(
    model,
    targets: str | Sequence[str] | None = None,
    *,
    arch: str | None = None,
    baselines: Sequence[str] = BASELINES,
    tokens: Sequence[int] | None = None,
    batch: Sequence[int] | None = None,
    dims: Mapping[str, int] | None = None,
    warmup: int = 3,
    repeat: int = 30,
    min_time: float = 0.5,
    seed: int = 0,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    artifact_dir: str | None = None,
    label: str | None = None,
    roofs: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark ``model`` on each target against the baselines; returns the result document.

    Parameters
    ----------
    model : str or os.PathLike
        Built-in model name, ``.onnx`` path, or an artifact directory (then ``targets`` must be the
        artifact's backend or omitted).
    targets : str or list of str, optional
        ``"cpu,cuda:sm_90"``; ``TARGET:ARCH`` picks a device preset per target. Default: ``cpu``, or
        the artifact's own target.
    arch : str, optional
        Device preset when there is one target.
    baselines : list of str
        Any of ``onnxruntime``, ``torch``; empty for qiao alone.
    tokens, batch : list of int, optional
        Sizes for the token or batch dimension (see ``plan_sizes``); at most one of the two.
    dims : dict, optional
        Values of the other symbolic dims (default 1).
    warmup, repeat, min_time
        Untimed calls, timed samples per engine and case, and the minimum total seconds of timed
        calls per engine and case (``number`` calls per sample is chosen to reach it).
    rpc_tracker, rpc_key : str, optional
        Run the artifact on a remote device through TVM's RPC tracker (both or neither).
    artifact_dir : str, optional
        Keep the compiled artifacts here (default: a temporary directory, removed afterwards).
    label : str, optional
        Name of this machine in reports (default: the host name, or the RPC key).
    roofs : bool
        Measure this CPU's attainable GEMM and copy ceilings for the roofline view (CPU targets).
    progress : callable, optional
        Called with one line of text at each step.

    Returns
    -------
    dict
        The result document (schema ``SCHEMA`` version ``SCHEMA_VERSION``).
    """
    from qiao.compiler.driver import __version__, compile, load
    from qiao.compiler.fingerprint import machine_fingerprint, software_versions

    say = progress or (lambda _msg: None)
    if (rpc_tracker is None) != (rpc_key is None):
        raise QiaoError("--rpc-tracker and --rpc-key go together. fix: pass both or neither")
    if warmup < 0 or repeat < 1 or min_time < 0:
        raise QiaoError("need --warmup >= 0, --repeat >= 1 and --min-time >= 0. fix: adjust them")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise QiaoError(
            f"unknown baseline(s) {', '.join(unknown)}. fix: use any of {', '.join(BASELINES)}"
        )
    if rpc_tracker is not None:
        from qiao.compiler import rpc

        say(f"checking RPC tracker {rpc_tracker} for key {rpc_key}")
        rpc.probe(rpc_tracker, rpc_key)  # fail before compiling; the device is requested later

    existing = load(model) if _is_artifact_dir(model) else None
    if existing is not None:
        own = existing.manifest["backend"]["name"]
        wanted = parse_targets(targets, arch) if targets else [(own, None)]
        if len(wanted) != 1 or wanted[0][0] != own:
            raise QiaoError(
                f"{model} is an artifact for target {own!r}. fix: drop --target or pass --target "
                f"{own}; to benchmark other targets give the model (.onnx or built-in name) instead"
            )
        plan_targets = [(own, existing.manifest["backend"].get("arch"))]
    else:
        plan_targets = parse_targets(targets or "cpu", arch)

    workdir = artifact_dir or tempfile.mkdtemp(prefix="qiao-bench-")
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "label": label,
        "machine": machine_fingerprint(),
        "software": dict(software_versions(), qiao=__version__),
        "settings": {
            "warmup": warmup,
            "repeat": repeat,
            "min_time_s": min_time,
            "seed": seed,
            "baselines": list(baselines),
            "rpc": {"tracker": rpc_tracker, "key": rpc_key} if rpc_tracker else None,
            "memory_measured": PeakRSS.supported() and rpc_tracker is None,
            "definitions": DEFINITIONS,
        },
        "model": None,
        "targets": [],
        "cases": [],
    }
    if result["label"] is None:
        result["label"] = f"{rpc_key} (rpc)" if rpc_tracker else result["machine"]["hostname"]
    run = _Run(
        model,
        existing,
        tuple(baselines),
        tokens,
        batch,
        dict(dims or {}),
        warmup,
        repeat,
        min_time,
        seed,
        (rpc_tracker, rpc_key) if rpc_tracker else None,
        workdir,
        artifact_dir is not None,
        roofs,
        say,
        compile,
    )
    try:
        for target, target_arch in plan_targets:
            _bench_target(result, run, target, target_arch)
    finally:
        if artifact_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


@dataclass(frozen=True)
class _Run:
    """What one ``bench`` call does for every target."""

    model: Any
    existing: Any  # an Artifact when ``model`` is an artifact directory
    baselines: tuple[str, ...]
    tokens: Sequence[int] | None
    batch: Sequence[int] | None
    dims: Mapping[str, int]
    warmup: int
    repeat: int
    min_time: float
    seed: int
    rpc: tuple[str, str] | None  # (tracker, key)
    workdir: str
    keep_artifacts: bool
    roofs: bool
    say: Callable[[str], None]
    compile: Callable[..., Any]


def _bench_target(result: dict, run: _Run, target: str, arch: str | None) -> None:
    entry, artifact = _compile_for(result, run, target, arch)
    if run.rpc is None:
        _measure(result, run, entry, artifact, None)
        return
    from qiao.compiler.rpc import request_device

    run.say(f"requesting a device with key {run.rpc[1]} from {run.rpc[0]}")
    with request_device(*run.rpc) as remote:
        _measure(result, run, entry, artifact, remote)


def _compile_for(result: dict, run: _Run, target: str, arch: str | None) -> tuple[dict, Any]:
    """Compile (or take the given artifact) and open the target's entry in ``result``."""
    from qiao.compiler.driver import default_output_dir

    model, existing, say = run.model, run.existing, run.say
    entry: dict[str, Any] = {"target": target, "arch": arch, "compile_s": None, "notes": []}
    result["targets"].append(entry)
    if existing is not None:
        artifact = existing
    else:
        is_path = isinstance(model, (str, os.PathLike))
        name = os.path.basename(os.fspath(model)).removesuffix(".onnx") if is_path else "model"
        say(f"compiling {name} for {target}{':' + arch if arch else ''}")
        out = os.path.join(run.workdir, default_output_dir(name, target, arch))
        start = time.perf_counter()
        artifact = run.compile(model, target, out, arch=arch)
        entry["compile_s"] = time.perf_counter() - start
    manifest = artifact.manifest
    entry.update(
        arch=manifest["backend"].get("arch"),
        target_json=manifest.get("target"),
        artifact=artifact.directory if existing is not None or run.keep_artifacts else None,
    )
    if result["model"] is None:
        result["model"] = {
            "name": manifest.get("model"),
            "source": {k: v for k, v in manifest.get("source", {}).items() if k != "path"},
            "inputs": manifest["inputs"],
            "outputs": manifest["outputs"],
        }
    return entry, artifact


def _measure(result: dict, run: _Run, entry: dict, artifact, remote) -> None:
    """Time every engine on every size for one target; append the cases to ``result``."""
    from qiao.compiler import artifact as art

    say, target, manifest = run.say, entry["target"], artifact.manifest
    notes: list[str] = entry["notes"]
    plan = plan_sizes(artifact.inputs, run.tokens, run.batch, run.dims)  # bad sizes fail first
    if remote is not None:
        from qiao.compiler.rpc import RPCRunner

        say(f"uploading to {remote.key} via {remote.tracker}")
        runner = RPCRunner(remote, artifact.directory, manifest)
        entry["remote"] = runner.info
        if runner.info.get("note"):
            notes.append(runner.info["note"])
    else:
        availability = artifact.backend.availability()
        if not availability.can_run:
            entry["status"] = "compiled only"
            notes.append(
                f"not run: {'; '.join(availability.missing) or 'no device here'}; run `qiao bench` "
                "on a machine with the device, or pass --rpc-tracker/--rpc-key"
            )
            say(f"{target}: compiled only ({notes[-1]})")
            return
        runner = None
    with PeakRSS() as load_mem:
        qiao_engine = QiaoEngine(artifact, runner)
        engines: list[Engine] = [qiao_engine]
    entry["load_rss_delta_mib"] = load_mem.delta_mib if remote is None else None
    baseline_engines = _baseline_engines(artifact, run.baselines, notes)
    if remote is not None and baseline_engines:
        notes.append(
            "baselines run on this host, not the remote device: their outputs check correctness, "
            "their times are not compared; run `qiao bench` on the device for baseline timings"
        )
    else:
        engines += baseline_engines
    entry["engines"] = {e.name: dict(e.info) for e in [qiao_engine, *baseline_engines]}
    if run.roofs and remote is None and _device_of(manifest) == "cpu":
        entry["roofs"] = measure_cpu_roofs()
    entry["status"] = "ok"
    result["model"].setdefault("sizes", {"mode": plan.mode, "dim": plan.dim})
    source_proto = _load_source(os.path.join(artifact.directory, art.SOURCE_MODEL))
    for index, size in enumerate(plan.sizes):
        case_dims = plan.dims(size)
        inputs = artifact.random_inputs(run.seed, case_dims)
        samples_per_call, tokens_per_call = plan.items(size, artifact.inputs)
        cost = estimate_cost(source_proto, case_dims) if source_proto is not None else None
        case: dict[str, Any] = {
            "target": target,
            "arch": entry["arch"],
            "size": {plan.mode: size} if plan.dim else {},
            "dims": case_dims,
            "samples_per_call": samples_per_call,
            "tokens_per_call": tokens_per_call,
            "flops": cost["flops"] if cost else None,
            "bytes": cost["bytes"] if cost else None,
            "cost_estimate": cost,
            "engines": {},
            "speedup": {},
            "check": {},
        }
        qiao_outputs = qiao_engine.outputs(inputs)
        for engine in engines:
            where = f"{target} {plan.mode}={size}" if plan.dim else target
            say(f"[{index + 1}/{len(plan.sizes)}] {where}: {engine.name}")
            settle()
            with PeakRSS() as mem:
                samples, number = engine.measure(inputs, run.warmup, run.repeat, run.min_time)
            memory = mem.delta_mib if (remote is None or engine is not qiao_engine) else None
            case["engines"][engine.name] = _engine_result(
                samples, number, samples_per_call, tokens_per_call, cost, memory
            )
        for engine in baseline_engines:
            case["check"][engine.name] = _check(
                artifact, qiao_outputs, engine.outputs(inputs), engine.name
            )
        qiao_median = case["engines"]["qiao"]["latency_s"]["median"]
        for name, timed in case["engines"].items():
            if name != "qiao":
                case["speedup"][name] = timed["latency_s"]["median"] / qiao_median
        result["cases"].append(case)


def _load_source(path: str):
    """The artifact's ONNX model without its weights' data (``shape_only``), or ``None``."""
    import onnx

    try:
        return shape_only(onnx.load(path, load_external_data=False))
    except Exception:  # no estimate rather than a failed benchmark
        return None


# --------------------------------------------------------------------------------------------------
# schema check, writing, formatting
REQUIRED = {
    "top": (
        "schema",
        "schema_version",
        "machine",
        "software",
        "settings",
        "model",
        "targets",
        "cases",
    ),
    "case": ("target", "size", "engines", "speedup", "check", "flops", "bytes"),
    "latency": ("mean", "median", "p90", "p99", "min", "std", "n"),
}


def check_result(doc: Any, source: str = "result") -> dict[str, Any]:
    """Check that ``doc`` is a result this qiao reads; raise ``QiaoError`` saying why not."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise QiaoError(
            f'{source} is not a qiao bench result (no "schema": "{SCHEMA}"). fix: pass files '
            "written by `qiao bench -o FILE`"
        )
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise QiaoError(
            f"{source} has result schema version {version!r}; this qiao reads version "
            f"{SCHEMA_VERSION}. fix: rerun `qiao bench` with this qiao, or use the qiao version "
            "that wrote it"
        )
    missing = [k for k in REQUIRED["top"] if k not in doc]
    for i, case in enumerate(doc.get("cases") or []):
        missing += [f"cases[{i}].{k}" for k in REQUIRED["case"] if k not in case]
        for name, engine in (case.get("engines") or {}).items():
            stats = engine.get("latency_s", {})
            missing += [
                f"cases[{i}].engines.{name}.latency_s.{k}"
                for k in REQUIRED["latency"]
                if k not in stats
            ]
    if missing:
        raise QiaoError(
            f"{source} is missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}. "
            "fix: rerun `qiao bench`; do not edit result files by hand"
        )
    return doc


def write_result(result: Mapping[str, Any], path: str) -> None:
    """Write a result document as JSON (atomically: a temporary file renamed into place)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def format_seconds(seconds: float | None) -> str:
    """``1.234e-5`` → ``"12.34 µs"``: four significant digits, unit by magnitude."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds / 1e-9:.4g} ns"


def format_rate(value: float, unit: str) -> str:
    """``12345.0, "tok"`` → ``"12.3k tok/s"``."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix} {unit}/s"
    return f"{value:.3g} {unit}/s"


def format_result(result: Mapping[str, Any]) -> str:
    """A human-readable table of a result document (what ``qiao bench`` prints)."""
    from qiao.compiler.fingerprint import describe

    model = result.get("model") or {}
    lines = [f"qiao bench {model.get('name')} · {describe(result['machine'])}"]
    for entry in result["targets"]:
        where = f"{entry['target']} ({entry.get('arch')})"
        compile_s = entry.get("compile_s")
        extra = f", compiled in {compile_s:.2f} s" if compile_s is not None else ""
        remote = entry.get("remote")
        if remote:
            device = remote.get("device_name") or remote.get("llvm_cpu")
            extra += f", remote {remote.get('key')}: {device}"
        lines.append(f"target {where}: {entry.get('status')}{extra}")
        lines += [f"  note: {n}" for n in entry.get("notes", [])]
    header = (
        f"{'target':<14} {'size':<12} {'engine':<17} {'median':>10} {'mean':>10} {'p90':>10} "
        f"{'p99':>10} {'min':>10} {'std':>10}  {'throughput':<20} {'peak RSS Δ':>10}  "
        f"{'qiao speed-up':<13} check"
    )
    lines += ["", header]
    for case in result["cases"]:
        size = ",".join(f"{k}={v}" for k, v in case["size"].items()) or "static"
        where = case["target"] + (f":{case['arch']}" if case.get("arch") else "")
        for name, timed in case["engines"].items():
            s = timed["latency_s"]
            thr = timed["throughput"]
            rate = (
                format_rate(thr["tokens_per_s"], "tok")
                if "tokens_per_s" in thr
                else format_rate(thr["samples_per_s"], "samples")
            )
            mem = timed.get("peak_rss_delta_mib")
            speed = f"×{case['speedup'][name]:.2f}" if name in case["speedup"] else ""
            check = case["check"].get(name)
            verdict = "" if check is None else ("ok" if check["ok"] else "MISMATCH")
            if check is not None and check.get("max_abs") is not None:
                verdict += f" ({check['max_abs']:.1e})"
            lines.append(
                f"{where:<14} {size:<12} {name:<17} {format_seconds(s['median']):>10} "
                f"{format_seconds(s['mean']):>10} {format_seconds(s['p90']):>10} "
                f"{format_seconds(s['p99']):>10} {format_seconds(s['min']):>10} "
                f"{format_seconds(s['std']):>10}  {rate:<20} "
                f"{('-' if mem is None else f'{mem:.1f} MiB'):>10}  {speed:<13} {verdict}".rstrip()
            )
        for name, check in case["check"].items():
            if name not in case["engines"]:
                lines.append(
                    f"{where:<14} {size:<12} {name:<17} (not timed) check: "
                    f"{'ok' if check['ok'] else 'MISMATCH'}"
                )
        if case.get("flops"):
            qiao = case["engines"]["qiao"]
            lines.append(
                f"{'':<27} flops≈{case['flops']:.3g}, bytes≈{case['bytes']:.3g}, qiao "
                f"{qiao.get('achieved_gflops', 0):.3g} GFLOP/s (estimate)"
            )
    return "\n".join(lines)


def mismatches(result: Mapping[str, Any]) -> list[str]:
    """``"target size engine"`` for every case whose outputs differ from a baseline's."""
    out = []
    for case in result["cases"]:
        for name, check in case["check"].items():
            if not check.get("ok"):
                out.append(f"{case['target']} {case['size']} vs {name}")
    return out
