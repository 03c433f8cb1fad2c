"""What the TVM-based backends (cpu, cuda, rocm) share: compile through qiao's pipeline, export one
shared library, load it in TVM's Relax VM with the weights from ``params.npz``.

GPU backends add two things here. ``GPUBackend`` schedules with qiao's GPU rule set (TVM's dlight
GPU rules) and lets a subclass replace the device code TVM generated (CUDA source → a fatbin
compiled ahead of time) before it is packed into the library; the formats that rewrite reads and
writes (the packed-imports blob, the device module) are in ``binfmt``."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from qiao.backends.base import Backend, Runner
from qiao.backends.binfmt import LIBRARY_BLOB_SYMBOL, DeviceModule, PackedImports
from qiao.compiler.errors import CompileError
from qiao.compiler.schedules.cpu_memory import (  # noqa: F401  (re-exported: the runners' API)
    HUGE_PAGE_BYTES,
    HUGE_PAGE_MIN_BYTES,
    advise_huge_pages,
    libc,
    weight_tensor,
)

LIBRARY = "model.so"


def _return_freed_memory() -> None:
    """Hand the host memory freed while loading weights back to the system (glibc keeps freed
    chunks below its adaptive mmap threshold in the heap: for Qwen3-0.6B's weights 2 GB stayed
    resident after the host copies were gone). A no-op elsewhere."""
    try:
        libc().malloc_trim(0)
    except AttributeError:
        pass


_LIBRARIES: dict[tuple, Any] = {}
_LIBRARIES_LOCK = threading.Lock()


def load_library(path: str):
    """``tvm.runtime.load_module(path)``, once per file per process: TVM 0.27 never frees a loaded
    library module (about 9 KB for a 4-node model, more for larger executables, each load), so
    loading the same artifact again reuses the module (each ``TVMRunner`` still gets its own VM).
    Keyed by the file's identity (device, inode, size, modification time): a recompiled artifact at
    the same path is a new file and is loaded anew."""
    import tvm

    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _LIBRARIES_LOCK:
        if key not in _LIBRARIES:
            if any(k[0] == real for k in _LIBRARIES):
                # dlopen matches an already loaded library by its path name before it looks at
                # the file, so a new library at the old path would run the old code: load it
                # under a name of its own (the mapping outlives that name).
                _LIBRARIES[key] = _load_under_new_name(tvm, real, key)
            else:
                _LIBRARIES[key] = tvm.runtime.load_module(real)
        return _LIBRARIES[key]


def _load_under_new_name(tvm, real: str, key: tuple):
    """Load ``real`` through a hard link (a copy across file systems) with a name of its own; a
    symbolic link would not do, TVM resolves it back to the old name."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="qiao-lib-")
    alias = os.path.join(folder, f"{key[2]}-{key[4]}-{os.path.basename(real)}")
    try:
        try:
            os.link(real, alias)
        except OSError:
            shutil.copyfile(real, alias)
        return tvm.runtime.load_module(alias)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(alias)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


@contextlib.contextmanager
def _stderr_kept_unless_failed() -> Iterator[None]:
    """Hold what is written to file descriptor 2 in the block (TVM's native log lines too) and
    pass it on if the block succeeds; drop it if it raises: a failed compile then ends with its one
    error line, not TVM's warnings about the half-built module ("BlockBuilder destroyed with
    remaining blocks!")."""
    import sys
    import tempfile

    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                sys.stderr.write(held.read().decode("utf-8", "replace"))
                sys.stderr.flush()


class TVMRunner(Runner):
    """Runs a compiled Relax VM executable on one device."""

    def __init__(self, library_path: str, params: Iterable[np.ndarray], device):
        from tvm import relax

        self.device = device
        self.executable = load_library(library_path)
        self.vm = relax.VirtualMachine(self.executable, device)
        self.params = self.prepare_params(params)

    def prepare_params(self, params: Iterable[np.ndarray]) -> list:
        """Copy the weights to the device and run the artifact's ``main_transform_params`` once:
        weight packing that the ``lift_params`` phase moved out of ``main`` happens at load, not on
        every call. Artifacts without it take the weights as they are. Large weights end on huge
        pages (``weight_tensor``), the packed ones moved there after the transform."""
        tensors = [weight_tensor(p, self.device) for p in params]
        try:
            transform = self.vm["main_transform_params"]
        except (AttributeError, KeyError, RuntimeError):
            _return_freed_memory()
            return tensors
        out = list(transform(tensors))
        tensors.clear()  # the untransformed copies go as soon as the call returns
        # the packed weights the transform allocated: large ones moved onto huge pages, one at a
        # time (each original goes as its copy is made)
        for i, tensor in enumerate(out):
            out[i] = weight_tensor(tensor, self.device)
            del tensor
        _return_freed_memory()
        return out

    def _args(self, inputs: Sequence[np.ndarray]) -> list:

        return [self.to_device(x) for x in inputs] + self.params

    def prepare(self, inputs: Sequence[np.ndarray]) -> Callable[[], Any]:
        """One call of ``main`` with the inputs already on the device (for timing loops),
        synchronised: a GPU call is timed to its end, not to its launch."""
        args, main, device = self._args(inputs), self.vm["main"], self.device

        def call():
            main(*args)
            device.sync()

        return call

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [r.numpy() for r in self.call([self.to_device(x) for x in inputs])]

    def to_device(self, array: np.ndarray) -> Any:
        import tvm

        return tvm.runtime.tensor(np.asarray(array, order="C"), self.device)

    def empty(self, shape: Sequence[int], dtype: str) -> Any:
        return self.to_device(np.zeros(tuple(shape), dtype))

    def to_host(self, tensor: Any) -> np.ndarray:
        return tensor.numpy() if hasattr(tensor, "numpy") else np.asarray(tensor)

    def call(self, inputs: Sequence[Any]) -> list[Any]:
        result = self.vm["main"](*inputs, *self.params)
        self.device.sync()
        return [result] if hasattr(result, "numpy") else list(result)

    def benchmark(self, inputs: Sequence[np.ndarray], repeat: int, number: int) -> list[float]:
        args = self._args(inputs)
        timer = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat)
        return list(timer(*args).results)


class TVMBackend(Backend):
    """Shared base for backends whose artifact is a TVM shared library."""

    # Whether the schedules pack weights that the lift_params phase moves to load time.
    lift_weight_packing: bool = False

    def schedule_rules(self, target: Any) -> list:
        """The ordered schedule rules for ``target`` (the first that applies to a kernel wins);
        overridden per backend. The default has none."""
        return []

    def schedule_passes(self, target: Any, options: Mapping[str, Any] | None = None) -> list:
        """The passes of the ``schedule`` phase for this target; overridden per backend.
        ``options`` are the compile options (tuning switches...). The default applies
        ``schedule_rules`` (nothing when there are none)."""
        from qiao.compiler.schedules import rule_pass

        rules = self.schedule_rules(target)
        return [rule_pass(rules)] if rules else []

    def phases(self, target: Any, options: Mapping[str, Any] | None = None):
        from qiao.compiler.pipeline import default_phases

        options = options or {}
        return default_phases(
            target,
            schedule=self.schedule_passes(target, options),
            moe_schedule=options.get("moe_schedule"),
            lift_params=self.lift_weight_packing,
            gpu=self.is_gpu,
            moe_keys=self.tuning_keys(target),
            dim_bounds={k: hi for k, (_, hi) in (options.get("dim_ranges") or {}).items()},
        )

    def tir_pipeline(self, target: Any) -> str:
        """Name of the TIR lowering ``tvm.compile`` runs on the scheduled kernels."""
        return "default"

    def compile_context(self, target: Any) -> contextlib.AbstractContextManager:
        """Entered around ``tvm.compile``: where a backend registers TVM callbacks (linkers...)."""
        return contextlib.nullcontext()

    def compile_module(self, mod, target, options: Mapping[str, Any]):
        """Run the phases and ``tvm.compile``; returns the TVM executable."""
        import tvm

        from qiao.compiler.pipeline import make_pipeline

        pipeline = make_pipeline(self.phases(target, options), target, options.get("dump_ir"))
        try:
            with self.compile_context(target), _stderr_kept_unless_failed():
                return tvm.compile(
                    mod,
                    target=target,
                    relax_pipeline=pipeline,
                    tir_pipeline=self.tir_pipeline(target),
                )
        except CompileError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CompileError(
                f"TVM failed to compile the model for {target.kind.name}: {first}. "
                "fix: rerun with --debug for the full trace and report it with the model attached"
            ) from err

    def build(self, model, arch, workdir, options):
        target = self.target(arch)
        executable = self.compile_module(model.mod, target, options)
        section = self.export(executable, target, workdir, options)
        return {"library": LIBRARY, **(section or {})}

    def export(
        self, executable, target, workdir: str, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Write the executable as ``LIBRARY``; returns extra manifest fields (device code...)."""
        executable.export_library(os.path.join(workdir, LIBRARY))
        return {}

    def device(self):
        """The TVM device this backend runs on."""
        raise NotImplementedError

    def load(self, artifact_dir, manifest):
        from qiao.backends.binfmt import check_elf_extents
        from qiao.compiler.artifact import iter_params

        library = os.path.join(artifact_dir, manifest["backend"]["library"])
        check_elf_extents(library)  # a truncated library kills dlopen with SIGBUS
        params = iter_params(artifact_dir, manifest)  # streamed: one host copy at a time
        return TVMRunner(library, params, self.device())


class GPUBackend(TVMBackend):
    """A TVM backend whose library imports one device module (``cuda``, ``hip``...).

    Subclasses set ``device_module`` (the module kind in TVM's import tree) and may override
    ``device_code`` to replace what TVM generated (e.g. compile CUDA source ahead of time).
    ``export`` stores a copy of the final device code beside the library
    (``model.<arch>.<format>``) and records its format and kernels in the manifest; the copy is
    what tests and vendor tools inspect, the library holds the same bytes.
    """

    device_module: ClassVar[str]
    is_gpu = True

    def schedule_rules(self, target):
        """TVM's dlight GPU rules, most specific first."""
        from qiao.compiler.schedules.gpu import gpu_rules

        return gpu_rules(target)

    def schedule_passes(self, target, options=None):
        # The rules alone: ApplyScheduleRules skips kernels that come scheduled already (the MoE
        # lowering's); no tuning database, no CPU loop rewrites.
        from qiao.compiler.schedules import gpu_schedule_passes

        return gpu_schedule_passes(target, options, rules=self.schedule_rules(target))

    def arch_name(self, target: Any) -> str:
        """The chip name used in file names and the manifest (``sm_90``, ``gfx942``)."""
        raise NotImplementedError

    def device_code(
        self, fmt: str, code: bytes, target: Any, options: Mapping[str, Any]
    ) -> tuple[str, bytes]:
        """Return the final ``(format, bytes)`` of the device code; the default keeps TVM's."""
        return fmt, code

    def export(self, executable, target, workdir, options):
        imports = PackedImports.parse(pack_imports(executable.mod))
        found = [i for i, (kind, _) in enumerate(imports.modules) if kind == self.device_module]
        if len(found) != 1:
            raise CompileError(
                f"expected one {self.device_module!r} device module in the compiled library, found "
                f"{len(found)} (modules: {[k for k, _ in imports.modules]}). fix: report this with "
                "the model attached"
            )
        index = found[0]
        module = DeviceModule.parse(imports.modules[index][1])
        fmt, code = self.device_code(module.fmt, module.code, target, options)
        path = os.path.join(workdir, LIBRARY)
        if (fmt, code) == (module.fmt, module.code):
            executable.export_library(path)
        else:
            module = DeviceModule(fmt, module.functions, code, module.tail)
            imports.modules[index] = (self.device_module, module.to_bytes())
            export_library_with_imports(executable.mod, path, imports.to_bytes())
        device_file = f"model.{self.arch_name(target)}.{fmt}"
        with open(os.path.join(workdir, device_file), "wb") as f:
            f.write(code)
        return {
            "device_code": device_file,
            "device_format": fmt,
            "kernels": sorted(module.kernel_names()),
        }


@contextlib.contextmanager
def tvm_global_funcs(funcs: Mapping[str, Callable]) -> Iterator[None]:
    """Register TVM global functions (``tvm_callback_*``) for the duration of a block, then restore
    whatever was registered before, so one backend's linker choice does not leak into another's."""
    import tvm_ffi

    previous = {name: tvm_ffi.get_global_func(name, allow_missing=True) for name in funcs}
    for name, func in funcs.items():
        tvm_ffi.register_global_func(name, func, override=True)
    try:
        yield
    finally:
        for name, func in previous.items():
            if func is None:
                tvm_ffi.remove_global_func(name)
            else:
                tvm_ffi.register_global_func(name, func, override=True)


# -- writing the packed imports into a library -----------------------------------------------------
def pack_imports(module) -> bytes:
    """The packed-imports blob TVM would embed when exporting ``module``."""
    import tvm_ffi

    return bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy())


def export_library_with_imports(module, path: str, blob: bytes) -> None:
    """``module.export_library(path)`` but embedding ``blob`` as the packed imports."""

    def fpack_imports(_mod, is_system_lib, prefix, workspace_dir):
        if is_system_lib or prefix:
            raise CompileError(
                "system-library export is not supported by qiao's device-code packing"
            )
        c_path = os.path.join(workspace_dir, "qiao_devc.c")
        with open(c_path, "w") as f:
            f.write(_blob_c_source(blob))
        return c_path

    module.export_library(path, fpack_imports=fpack_imports)


def _blob_c_source(blob: bytes) -> str:
    rows = [",".join(str(b) for b in blob[i : i + 32]) for i in range(0, len(blob), 32)]
    return (
        "#ifdef _WIN32\n#define QIAO_EXPORT __declspec(dllexport)\n#else\n"
        '#define QIAO_EXPORT __attribute__((visibility("default")))\n#endif\n'
        '#ifdef __cplusplus\nextern "C" {\n#endif\n'
        f"QIAO_EXPORT extern const unsigned char {LIBRARY_BLOB_SYMBOL}[];\n"
        f"const unsigned char {LIBRARY_BLOB_SYMBOL}[{len(blob)}] = {{\n"
        + ",\n".join(rows)
        + "\n};\n#ifdef __cplusplus\n}\n#endif\n"
    )
