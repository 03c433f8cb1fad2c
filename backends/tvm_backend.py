"""What the TVM-based backends (cpu, cuda, rocm) share: compile through qiao's pipeline, export one
shared library, load it in TVM's Relax VM with the weights from ``params.npz``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from qiao.backends.base import Backend, Runner
from qiao.compiler.errors import CompileError

LIBRARY = "model.so"


class TVMRunner(Runner):
    """Runs a compiled Relax VM executable on one device."""

    def __init__(self, library_path: str, params: Sequence[np.ndarray], device):
        import tvm
        from tvm import relax

        self.device = device
        self.executable = tvm.runtime.load_module(library_path)
        self.vm = relax.VirtualMachine(self.executable, device)
        self.params = [tvm.runtime.tensor(p, device) for p in params]

    def _args(self, inputs: Sequence[np.ndarray]) -> list:
        import tvm

        return [
            tvm.runtime.tensor(np.ascontiguousarray(x), self.device) for x in inputs
        ] + self.params

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        result = self.vm["main"](*self._args(inputs))
        if hasattr(result, "numpy"):
            return [result.numpy()]
        return [r.numpy() for r in result]

    def benchmark(self, inputs: Sequence[np.ndarray], repeat: int, number: int) -> list[float]:
        args = self._args(inputs)
        timer = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat)
        return list(timer(*args).results)


class TVMBackend(Backend):
    """Shared base for backends whose artifact is a TVM shared library."""

    def schedule_passes(self, target: Any) -> list:
        """The passes of the ``schedule`` phase for this target; overridden per backend."""
        return []

    def phases(self, target: Any):
        from qiao.compiler.pipeline import default_phases

        return default_phases(target, schedule=self.schedule_passes(target))

    def compile_module(self, mod, target, options: Mapping[str, Any]):
        """Run the phases and ``tvm.compile``; returns the TVM executable."""
        import tvm
        from qiao.compiler.pipeline import make_pipeline

        pipeline = make_pipeline(self.phases(target), target, options.get("dump_ir"))
        try:
            return tvm.compile(mod, target=target, relax_pipeline=pipeline)
        except Exception as err:
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CompileError(
                f"TVM failed to compile the model for {target.kind.name}: {first}. "
                "fix: rerun with --debug for the full trace and report it with the model attached"
            ) from err

    def build(self, model, arch, workdir, options):
        target = self.target(arch)
        executable = self.compile_module(model.mod, target, options)
        self.export(executable, target, workdir, options)
        return {"library": LIBRARY}

    def export(self, executable, target, workdir: str, options: Mapping[str, Any]) -> None:
        """Write the compiled executable as ``LIBRARY``; device backends add their device code."""
        executable.export_library(os.path.join(workdir, LIBRARY))

    def device(self):
        """The TVM device this backend runs on."""
        raise NotImplementedError

    def load(self, artifact_dir, manifest):
        from qiao.compiler.artifact import load_params

        params = load_params(artifact_dir, manifest)
        return TVMRunner(
            os.path.join(artifact_dir, manifest["backend"]["library"]), params, self.device()
        )
