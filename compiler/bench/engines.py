"""Engines: what runs a model for ``qiao validate``, ``qiao bench`` and ``benchmarks/``, behind one
small interface. ``prepare`` turns numpy inputs into a zero-argument callable (inputs already in the
engine's format, so host-side conversion is not timed), ``outputs`` returns numpy arrays by output
name, ``measure`` times the engine.

Where a baseline runs comes from the artifact's backend (``Backend.reference_device`` and
``Backend.ort_providers``): nothing here knows a target kind. A new engine (ONNX Runtime GenAI, a
vendor runtime...) subclasses ``Engine`` and implements ``prepare`` and ``outputs``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qiao.compiler.bench.timing import calibrate, choose_number, time_callable
from qiao.compiler.errors import QiaoError, ToolchainMissing

# The reference device of a backend that runs on this host's CPU (``Backend.reference_device``).
HOST = "cpu"
# torch and ONNX Runtime both call GPU memory "cuda", on their CUDA and ROCm builds alike: a name
# of their memory device, not a TVM target kind.
GPU_MEMORY = "cuda"


class Engine:
    """Something that runs the model: ``prepare`` turns numpy inputs into a zero-argument callable
    (inputs already in the engine's format), ``measure`` times it, ``outputs`` returns numpy arrays.
    """

    name: str = "engine"
    info: Mapping[str, Any] = {}  # how the engine runs (provider, threads...), recorded per target

    def prepare(self, inputs: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        """A zero-argument callable that runs once on ``inputs`` converted beforehand."""
        raise NotImplementedError

    def outputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; the outputs as numpy arrays by output name."""
        raise NotImplementedError

    def measure(
        self, inputs: Mapping[str, np.ndarray], warmup: int, repeat: int, min_time: float
    ) -> tuple[list[float], int]:
        """Warm up, choose ``number`` for ``min_time``, and return (samples, number)."""
        fn = self.prepare(inputs)
        number = calibrate(fn, warmup, repeat, min_time)
        return time_callable(fn, repeat, number), number


class RunnerEngine(Engine):
    """A qiao ``Runner`` (``qiao.backends.base.Runner``) with named inputs and outputs; timed by the
    runner's own ``benchmark`` (TVM's evaluator for TVM backends: device-synchronised)."""

    def __init__(
        self,
        runner,
        input_names: Sequence[str],
        output_names: Sequence[str],
        name: str = "qiao",
        info: Mapping[str, Any] | None = None,
    ):
        self.name = name
        self.runner = runner
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.info = dict(info or {"runner": type(runner).__name__})

    def ordered(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The inputs as the runner takes them: a list in the model's input order."""
        return [inputs[n] for n in self.input_names]

    def _named(self, values: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, values))

    def prepare(self, inputs):
        return self.runner.prepare(self.ordered(inputs))

    def outputs(self, inputs):
        return self._named(self.runner.run(self.ordered(inputs)))

    def benchmark(self, inputs: Mapping[str, np.ndarray], repeat: int, number: int) -> list[float]:
        """``repeat`` samples of the mean seconds of ``number`` calls (the runner's timer)."""
        return self.runner.benchmark(self.ordered(inputs), repeat=repeat, number=number)

    def measure(self, inputs, warmup, repeat, min_time):
        ordered = self.ordered(inputs)
        for _ in range(warmup):
            self.runner.run(ordered)
        single = min(self.runner.benchmark(ordered, repeat=3, number=1))
        number = choose_number(single, repeat, min_time)
        return self.runner.benchmark(ordered, repeat=repeat, number=number), number


class QiaoEngine(RunnerEngine):
    """A compiled artifact (its own runner, or a given one such as a remote ``RPCRunner``); inputs
    are checked against the manifest and low-precision tensors pass as their storage type, as
    ``Artifact.run`` does."""

    def __init__(self, artifact, runner=None):
        runner = runner if runner is not None else artifact.runner
        super().__init__(
            runner,
            [s["name"] for s in artifact.inputs],
            [o["name"] for o in artifact.outputs],
            info={
                "runner": type(runner).__name__,
                "threads": os.environ.get("TVM_NUM_THREADS", "TVM default"),
            },
        )
        self.artifact = artifact

    def ordered(self, inputs):
        from qiao.compiler.frontend import lowprec

        return lowprec.inputs_to_storage(self.artifact.inputs, self.artifact.check_inputs(inputs))

    def _named(self, values):
        from qiao.compiler.frontend import lowprec

        return super()._named(lowprec.outputs_from_storage(self.artifact.outputs, values))


def ort_providers(device: str) -> tuple[str, ...]:
    """ONNX Runtime providers for a reference device, from the backend that names it (its
    ``reference_device`` and ``ort_providers``)."""
    from qiao.backends import list_backends

    for _entry, backend, _error in list_backends():
        if backend is not None and backend.reference_device == device and backend.ort_providers:
            return tuple(backend.ort_providers)
    raise QiaoError(
        f"no backend runs its ONNX Runtime reference on {device!r}. fix: pass providers=, or use "
        "the reference_device of a backend in `qiao targets`"
    )


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime on the first available of ``providers`` (default: those of the backend whose
    reference device is ``device``); IO binding keeps GPU inputs on the device.

    ``model`` is an ``.onnx`` path or serialised bytes; ``threads`` sets ONNX Runtime's intra-op
    threads (default: its own choice)."""

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        device: str = HOST,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        wanted = list(providers) if providers else list(ort_providers(device))
        available = ort.get_available_providers()
        provider = next((p for p in wanted if p in available), None)
        if provider is None:
            raise ToolchainMissing(
                f"onnxruntime has no {' or '.join(wanted)} here (it has {', '.join(available)}). "
                "fix: install onnxruntime-gpu (CUDA) or onnxruntime-rocm"
            )
        self.name = f"onnxruntime-{device}"
        self.provider = provider
        self.on_device = provider != "CPUExecutionProvider"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        source = model if isinstance(model, bytes) else os.fspath(model)
        self.session = ort.InferenceSession(source, opts, providers=[provider])
        self.info = {"provider": provider, "version": ort.__version__}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def prepare(self, inputs):
        if not self.on_device:
            feeds, names, run = dict(inputs), self.output_names, self.session.run
            return lambda: run(names, feeds)
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in inputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(value, GPU_MEMORY, 0)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, GPU_MEMORY)
        self._binding = binding
        return lambda: self.session.run_with_iobinding(binding)

    def outputs(self, inputs):
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(inputs))))


class TorchEngine(Engine):
    """PyTorch eager on a built-in model (rebuilt from its seed), under ``torch.inference_mode``."""

    def __init__(self, source: Mapping[str, Any], device: str = HOST):
        import torch

        from qiao.models import get_model

        if device != HOST and not torch.cuda.is_available():
            raise ToolchainMissing(
                f"this torch ({torch.__version__}) has no {device} device. fix: install a CUDA or "
                "ROCm build of torch"
            )
        self.name = f"torch-{device}"
        self.torch = torch
        self.device = torch.device(HOST if device == HOST else GPU_MEMORY)
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
        sync = torch.cuda.synchronize if self.device.type != HOST else (lambda: None)

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


BASELINES = ("onnxruntime", "torch")


def baseline_engines(artifact, names: Sequence[str], notes: list[str]) -> list[Engine]:
    """The requested baselines (``BASELINES``) where the artifact's backend says its reference runs
    (``reference_device``, ``ort_providers``), falling back to the CPU with a note."""
    from qiao.compiler import artifact as art

    backend = artifact.backend
    device = backend.reference_device
    source = artifact.manifest.get("source", {})
    model_path = os.path.join(artifact.directory, art.SOURCE_MODEL)
    builders = {
        "onnxruntime": lambda d: OnnxRuntimeEngine(
            model_path, d, backend.ort_providers if d == device else None
        ),
        "torch": lambda d: TorchEngine(source, d),
    }
    engines: list[Engine] = []
    for name in names:
        if name == "torch" and source.get("kind") != "builtin":
            notes.append("torch: only built-in models have a PyTorch module to time")
            continue
        if name == "torch" and artifact.manifest.get("decoder"):
            notes.append("torch: decoders are timed against transformers: qiao bench --generate")
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
            if device == HOST:
                notes.append(f"{name}: {err}")
                continue
            notes.append(f"{name} on {device}: {err}; timed on the CPU instead")
            try:
                engines.append(builders[name](HOST))
            except Exception as cpu_err:
                notes.append(f"{name}: {cpu_err}")
        except Exception as err:  # an engine that cannot load this model: say so, keep going
            notes.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return engines
