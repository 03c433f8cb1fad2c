"""Minimal runtime for a qiao bundle: runs a compiled artifact with TVM's runtime library only.

Needs Python >= 3.10, NumPy and the ``tvm_ffi`` package vendored in ``vendor/``; never imports
qiao, tvm (its Python package pulls in the 259 MB compiler library), torch, onnx or onnxruntime.
The artifact's ``model.so`` is a Relax VM executable: TVM's runtime library registers the VM, so
loading it through ``tvm_ffi.load_module`` after ``libtvm_runtime.so`` is in the process is all
that ``tvm.relax.VirtualMachine`` does, minus the compiler.

This file is copied into every bundle by ``qiao pack`` (``qiao.compiler.pack``); the bundle's
``bundle.json`` lists every file with its sha256, checked before anything is loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np

BUNDLE_MANIFEST = "bundle.json"
# CPU weights of at least HUGE_PAGE_MIN_BYTES live on memory advised onto 2 MB transparent huge
# pages before they are written, as in qiao's runner (qiao.backends.tvm_backend, whose figures and
# reasons are there; tests/test_pack.py checks the two agree): a bundle cannot import qiao.
HUGE_PAGE_BYTES = 2 << 20
HUGE_PAGE_MIN_BYTES = 8 << 20
_MADV_HUGEPAGE = 14
BUNDLE_FORMAT = 1
POOLED_ALLOCATOR = 2  # tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR

# /proc/cpuinfo flag -> LLVM feature name, for the features qiao records in a CPU artifact. The
# same tables as qiao.compiler.schedules.cpu_info (tests/test_pack.py checks they agree): a bundle
# cannot import qiao.
X86_FLAGS = {
    "sse4_1": "sse4.1", "sse4_2": "sse4.2", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "f16c": "f16c", "bmi1": "bmi", "bmi2": "bmi2", "avx512f": "avx512f", "avx512cd": "avx512cd",
    "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi", "avx512_vbmi2": "avx512vbmi2",
    "avx512_vnni": "avx512vnni", "avx512_bf16": "avx512bf16", "avx512_fp16": "avx512fp16",
    "avx512_bitalg": "avx512bitalg", "avx512_vpopcntdq": "avx512vpopcntdq",
    "avx_vnni": "avxvnni", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
    "amx_tile": "amx-tile", "amx_bf16": "amx-bf16", "amx_int8": "amx-int8",
}  # fmt: skip
ARM_FLAGS = {
    "asimd": "neon", "asimddp": "dotprod", "fphp": "fullfp16", "sve": "sve", "sve2": "sve2",
    "i8mm": "i8mm", "bf16": "bf16",
}  # fmt: skip


# The CPU family the kernels choose by (a schedule choice only the running machine settles), as
# qiao.compiler.schedules.cpu_info publishes it: ``vendor code * 256 + family`` in QIAO_CPU_FAMILY
# (tests/test_pack.py checks the two agree): a bundle cannot import qiao.
CPU_FAMILY_ENV = "QIAO_CPU_FAMILY"
CPU_VENDORS = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}
CPU_VENDOR_CODES = {"amd": 1, "intel": 2}


def cpu_family_of(cpuinfo: str) -> str | None:
    """The family name (``amd-26``) of the first processor in /proc/cpuinfo's text, or None."""
    fields: dict = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    vendor = CPU_VENDORS.get(fields.get("vendor_id", ""))
    family = fields.get("cpu family", "")
    return f"{vendor}-{int(family)}" if vendor and family.isdigit() else None


def read_cpuinfo() -> str | None:
    """/proc/cpuinfo's text (None: not there, another OS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def publish_cpu_family() -> None:
    """Tell the kernels this machine's CPU family unless the user has (0: unknown)."""
    text = read_cpuinfo()
    family = None if text is None else cpu_family_of(text)
    code = 0
    if family:
        vendor, _, number = family.partition("-")
        code = CPU_VENDOR_CODES[vendor] * 256 + int(number)
    os.environ.setdefault(CPU_FAMILY_ENV, str(code))


def advise_huge_pages(ptr: int, nbytes: int) -> bool:
    """Ask Linux to back the whole 2 MB pages inside ``[ptr, ptr + nbytes)`` with transparent huge
    pages (``madvise(MADV_HUGEPAGE)``); effective for pages not yet written. False where it was
    not done (another OS, no whole page inside, THP unavailable)."""
    start = -(-ptr // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (ptr + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if not sys.platform.startswith("linux") or end <= start:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return False
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(start, end - start, _MADV_HUGEPAGE) == 0


class BundleError(Exception):
    """The bundle or its inputs are unusable here (exit code 2); the message says the fix."""

    exit_code = 2


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(root: str) -> dict:
    """Read ``bundle.json`` and check its format."""
    path = os.path.join(root, BUNDLE_MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise BundleError(
            f"{root} is not a readable qiao bundle ({err}). fix: pack the artifact again with "
            "`qiao pack ARTIFACT -o BUNDLE`"
        ) from err
    if manifest.get("bundle_format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path} has bundle format {manifest.get('bundle_format')!r}; this runner reads "
            f"{BUNDLE_FORMAT}. fix: pack the artifact again with the same qiao"
        )
    return manifest


def verify_files(root: str, manifest: dict) -> None:
    """Refuse a bundle whose files are missing or differ from the sha256 in its manifest."""
    missing, changed = [], []
    for rel, digest in manifest["files"].items():
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            missing.append(rel)
        elif sha256_file(path) != digest:
            changed.append(rel)
    if missing or changed:
        parts = []
        if missing:
            parts.append(f"missing: {', '.join(missing)}")
        if changed:
            parts.append(f"modified: {', '.join(changed)}")
        raise BundleError(
            f"bundle {root} does not match its manifest ({'; '.join(parts)}); running it could "
            "give wrong results or crash. fix: copy the bundle again from where it was packed, "
            "or pack the artifact again"
        )


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def host_cpu_features() -> set[str] | None:
    """LLVM names of the checked SIMD features the OS reports (``None``: cannot tell)."""
    table = ARM_FLAGS if host_arch() == "aarch64" else X86_FLAGS
    text = read_cpuinfo()
    if text is None:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return {llvm for flag, llvm in table.items() if flag in flags}


def check_cpu(root: str, needs: dict | None) -> None:
    """Refuse a CPU bundle whose code uses an architecture or SIMD features this CPU lacks (it
    would die of an illegal instruction, or silently in a worker thread)."""
    if not needs:
        return
    if needs["arch"] != host_arch():
        missing = [needs["arch"]]
    else:
        host = host_cpu_features()
        missing = [] if host is None else sorted(set(needs["features"]) - host)
    if missing:
        raise BundleError(
            f"bundle {root} was compiled for a {needs['arch']} CPU with "
            f"{', '.join(needs['features']) or 'no extra features'}; this machine "
            f"({host_arch()}) lacks {', '.join(missing)}, so running it would crash. fix: "
            "compile the model for a baseline every target machine has (qiao compile --arch "
            "x86-64-v3 for any AVX2 x86-64) and pack it again"
        )


class Bundle:
    """A packed artifact loaded into TVM's Relax VM.

    Parameters
    ----------
    root : str
        The bundle directory (the one holding ``bundle.json``).
    verify : bool
        Check every file's sha256 first (default); ``False`` only for a bundle already checked.
    """

    def __init__(self, root: str, verify: bool = True):
        self.root = os.path.abspath(root)
        self.manifest = read_manifest(self.root)
        if verify:
            verify_files(self.root, self.manifest)
        self.target = self.manifest["target"]
        self.device_name = self.manifest.get("device")
        if not self.device_name or not self.manifest.get("runtime_libraries"):
            raise BundleError(
                f"bundle.json names no device or runtime libraries for target {self.target!r}. "
                "fix: pack the artifact again with this qiao"
            )
        check_cpu(self.root, self.manifest.get("cpu"))
        self.inputs = self.manifest["inputs"]
        self.outputs = self.manifest["outputs"]
        self._load()

    def _load(self) -> None:
        # One worker thread per usable core unless the user chose (TVM's default is half the
        # hardware threads, which assumes SMT), as `qiao run` does.
        if hasattr(os, "sched_getaffinity"):
            os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
        publish_cpu_family()
        running = f"{sys.version_info.major}.{sys.version_info.minor}"
        if self.manifest.get("python") not in (None, running):
            # tvm_ffi is a compiled extension: it imports only into the Python it was built for.
            raise BundleError(
                f"this bundle was packed for Python {self.manifest['python']}; this is Python "
                f"{running}. fix: run it with python{self.manifest['python']}, or pack it again "
                f"with `qiao pack --python {running}`"
            )
        vendor = os.path.join(self.root, "vendor")
        if vendor not in sys.path:
            sys.path.insert(0, vendor)
        try:
            import tvm_ffi
        except ImportError as err:
            raise BundleError(
                f"cannot import the bundled tvm_ffi ({err}). fix: run the bundle with the Python "
                f"it was packed for ({self.manifest.get('python', '?')}), or pack it again with "
                "--python for this one"
            ) from err
        self.ffi = tvm_ffi
        for lib in self.manifest["runtime_libraries"]:
            # RTLD_GLOBAL: model.so resolves the runtime's symbols; the runtime registers the VM.
            try:
                ctypes.CDLL(os.path.join(self.root, "lib", lib), mode=ctypes.RTLD_GLOBAL)
            except OSError as err:  # e.g. the CUDA runtime module without libcuda.so.1
                raise BundleError(
                    f"cannot load lib/{lib}: {err}. fix: run a {self.target} bundle on a machine "
                    f"with the {self.target} driver installed and visible to this process"
                ) from err
        get = tvm_ffi.get_global_func
        self._alloc = get("runtime.TVMTensorAllocWithScope")
        self._copy_from = get("runtime.TVMTensorCopyFromBytes")
        self._copy_to = get("runtime.TVMTensorCopyToBytes")
        self._sync = get("runtime.Device_StreamSync")
        self.device = tvm_ffi.device(self.device_name, 0)
        self.cpu = tvm_ffi.device("cpu", 0)
        library = os.path.join(self.root, "artifact", self.manifest["library"])
        try:
            self.vm = tvm_ffi.load_module(library)["vm_load_executable"]()
            init = [self.device.dlpack_device_type(), 0, POOLED_ALLOCATOR]
            if self.device_name != "cpu":  # the VM runs shape functions on the host
                init += [self.cpu.dlpack_device_type(), 0, POOLED_ALLOCATOR]
            self.vm["vm_initialization"](*init)
            self._main = self.vm["main"]
            self.params = self._load_params()
        except Exception as err:  # a missing driver or device, an incompatible library
            raise BundleError(
                f"cannot load {library} on {self.target}: {str(err).strip().splitlines()[-1]}. "
                "fix: check the device and its driver are visible to this process"
            ) from err

    def _load_params(self) -> list:
        names = self.manifest.get("params", [])
        if not names:
            return []
        with np.load(os.path.join(self.root, "artifact", "params.npz")) as data:
            tensors = [self.to_device(data[f"p{i}"]) for i in range(len(names))]
        try:
            transform = self.vm["main_transform_params"]
        except Exception:  # artifacts without load-time weight packing
            return tensors
        out = list(transform(tensors))
        tensors.clear()
        if self.device_name == "cpu":
            # large packed weights moved onto huge pages, one at a time (through the host)
            for i, tensor in enumerate(out):
                if self._large_host_copyable(tensor):
                    out[i] = self.to_device(self.to_numpy(tensor))
                del tensor
        return out

    @staticmethod
    def _large_host_copyable(tensor) -> bool:
        """At least ``HUGE_PAGE_MIN_BYTES``, of a dtype NumPy holds (not bfloat16)."""
        try:
            itemsize = np.dtype(str(tensor.dtype)).itemsize
        except TypeError:
            return False
        count = 1
        for d in tensor.shape:
            count *= int(d)
        return count * itemsize >= HUGE_PAGE_MIN_BYTES

    def to_device(self, array: np.ndarray):
        """Copy a NumPy array into a new TVM tensor on the bundle's device (TVM allocates it
        aligned, as compiled kernels assume; a NumPy buffer may not be); a large one on the CPU
        onto memory advised onto huge pages first."""
        array = np.ascontiguousarray(array)
        shape = self.ffi.Shape([int(d) for d in array.shape])
        # .npy has no bfloat16: qiao's bfloat16 weights (--dtype) read back as raw 2-byte void
        dtype = "bfloat16" if array.dtype == np.dtype("V2") else str(array.dtype)
        tensor = self._alloc(shape, self.ffi.dtype(dtype), self.device, None)
        if self.device_name == "cpu" and array.nbytes >= HUGE_PAGE_MIN_BYTES:
            advise_huge_pages(tensor.data_ptr(), array.nbytes)
        self._copy_from(tensor, ctypes.c_void_p(array.ctypes.data), array.nbytes)
        return tensor

    def to_numpy(self, tensor) -> np.ndarray:
        out = np.empty(tuple(int(d) for d in tensor.shape), dtype=str(tensor.dtype))
        self._copy_to(tensor, ctypes.c_void_p(out.ctypes.data), out.nbytes)
        return out

    def sync(self) -> None:
        self._sync(self.device, 0)  # 0: the default stream

    def check_inputs(self, inputs: dict) -> list[np.ndarray]:
        """Order ``inputs`` as the manifest does; refuse missing/unknown names, wrong dtypes,
        ranks, static dims, disagreeing symbolic dims and sizes outside a compiled range."""
        names = [s["name"] for s in self.inputs]
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        if missing or extra:
            raise BundleError(
                f"inputs do not match the model (missing: {missing or 'none'}, unknown: "
                f"{extra or 'none'}). fix: the model takes exactly: {', '.join(names)}"
            )
        bound: dict = {}
        ranges = self.manifest.get("dim_ranges") or {}
        ordered = []
        for spec in self.inputs:
            name, value = spec["name"], np.asarray(inputs[spec["name"]])
            want = "(" + ", ".join(str(d) for d in spec["shape"]) + ")"
            if value.dtype != np.dtype(spec["dtype"]):
                raise BundleError(
                    f"input {name!r}: expected dtype {spec['dtype']}, got {value.dtype}. "
                    f"fix: cast it, e.g. x.astype('{spec['dtype']}')"
                )
            if value.ndim != len(spec["shape"]):
                raise BundleError(f"input {name!r}: expected shape {want}, got {value.shape}")
            for dim, got in zip(spec["shape"], value.shape):
                if isinstance(dim, int) and dim != got:
                    raise BundleError(f"input {name!r}: expected shape {want}, got {value.shape}")
                if isinstance(dim, str) and bound.setdefault(dim, got) != got:
                    raise BundleError(
                        f"input {name!r}: {dim}={got}, but another input has {dim}={bound[dim]}; "
                        "inputs sharing a symbolic dim must agree"
                    )
                lo, hi = ranges.get(dim, (got, got)) if isinstance(dim, str) else (got, got)
                if not lo <= got <= hi:
                    # the memory plan holds at most ``hi`` (qiao's dim_ranges compile option)
                    raise BundleError(
                        f"input {name!r}: {dim}={got} is outside the range {lo}..{hi} the model "
                        f"was compiled for. fix: pass {dim} within {lo}..{hi}, or recompile "
                        f"with --dim-range {dim}={min(lo, got)}:{max(hi, got)}"
                    )
            ordered.append(value)
        return ordered

    def _call(self, args: list) -> list:
        result = self._main(*args, *self.params)
        self.sync()
        return [result] if isinstance(result, self.ffi.Tensor) else list(result)

    def run(self, inputs: dict) -> dict:
        """Run ``main`` once; returns output name -> NumPy array."""
        args = [self.to_device(x) for x in self.check_inputs(inputs)]
        results = [self.to_numpy(r) for r in self._call(args)]
        return dict(zip([o["name"] for o in self.outputs], results))

    def time(self, inputs: dict, repeat: int = 20, warmup: int = 3) -> list[float]:
        """Seconds per call of ``main`` (inputs already on the device, synchronised), ``repeat``
        times after ``warmup`` calls."""
        args = [self.to_device(x) for x in self.check_inputs(inputs)]
        for _ in range(warmup):
            self._call(args)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            self._call(args)
            times.append(time.perf_counter() - start)
        return times


def compare(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> tuple:
    """``(ok, max_abs_err, note)``: shape and dtype must match, integers exactly, floats within
    ``atol + rtol * |expected|`` with the same NaN/inf pattern (qiao.compiler.validate.compare)."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        got, want = f"{actual.dtype}{actual.shape}", f"{expected.dtype}{expected.shape}"
        return False, float("inf"), f"{got} vs {want}"
    if actual.size == 0:
        return True, 0.0, ""
    if actual.dtype.kind in "biu":
        diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
        return bool((diff == 0).all()), float(diff.max()), ""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(e)
    pattern_ok = bool(((np.isnan(a) == np.isnan(e)) & (finite | np.isnan(a) | (a == e))).all())
    diff = np.where(finite, np.abs(a - e), 0.0)
    ok = bool((diff <= atol + rtol * np.abs(np.where(finite, e, 0))).all()) and pattern_ok
    return ok, float(diff.max()), "" if pattern_ok else "NaN/inf pattern differs"
