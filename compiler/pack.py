"""``qiao pack``: a compiled artifact as a bundle that runs without qiao.

A bundle is a folder that runs the artifact on a machine with Python >= 3.10 and NumPy only (no
apache-tvm, torch, onnx, onnxruntime)::

    BUNDLE/
      run.py, qiao_runtime.py   the runner and the minimal loader (compiler/bundle/)
      bundle.json               what the model takes and returns, the CPU it needs, the reference,
                                and the sha256 of every other file
      artifact/                 manifest.json, model.so, params.npz (the source model.onnx stays)
      lib/                      TVM's runtime library (+ the CUDA runtime module for CUDA), never
                                the 259 MB compiler library
      vendor/                   apache-tvm-ffi's Python package for the bundle's Python (from this
                                install, or the wheel from the package registry for --python),
                                and typing_extensions, its one dependency
      reference/                inputs.npz and ONNX Runtime's outputs.npz (--with-reference)

The loader works on ``tvm_ffi`` and ``libtvm_runtime.so`` alone: TVM's runtime registers the
Relax VM, which is all ``tvm.relax.VirtualMachine`` needs (see ``compiler/bundle/qiao_runtime.py``).
The bundle is written into a staging folder and renamed into place, like an artifact.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from typing import Any

import numpy as np

from qiao.compiler import artifact as art
from qiao.compiler.errors import ArtifactCorrupt, QiaoError, ToolchainMissing

BUNDLE_MANIFEST = "bundle.json"
BUNDLE_FORMAT = 1
TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundle")
TEMPLATE_FILES = ("run.py", "qiao_runtime.py")
# Parts of the tvm_ffi package a runner never touches: C++ headers and sources, build files, type
# stubs (its testing library stays: tvm_ffi loads it at import). Dropping them halves its size.
_FFI_SKIP = {"include", "src", "3rdparty", "cython", "stub", "share", "CMakeLists.txt"}
# What a CPU bundle may weigh without its weights (issue 14); `qiao pack` warns above it.
CPU_SIZE_LIMIT = 25 * 2**20


def _package_dir(name: str) -> str:
    """The installed folder of package ``name``, found without importing it (importing ``tvm``
    would load the compiler library)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ToolchainMissing(
            f"the Python package {name!r} is not installed. fix: pip install "
            f"{'apache-tvm' if name == 'tvm' else 'apache-tvm-ffi'}"
        )
    return list(spec.submodule_search_locations)[0]


def _ffi_ignore(directory: str, names: list[str]) -> set[str]:
    top = os.path.basename(directory) == "tvm_ffi"
    return {
        n
        for n in names
        if n == "__pycache__" or n.endswith((".pyc", ".pyi")) or (top and n in _FFI_SKIP)
    }


def _python_tag(python: str | None) -> str:
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python is None:
        return here
    if python not in ("3.10", "3.11", "3.12", "3.13"):
        raise QiaoError(f"--python {python!r}: expected 3.10, 3.11, 3.12 or 3.13")
    return python


def vendor_tvm_ffi(dest: str, python: str) -> str:
    """Put apache-tvm-ffi's package for ``python`` (``"3.11"``) into ``dest/tvm_ffi``, plus
    ``typing_extensions``; returns the tvm_ffi version. This Python's install is copied; another
    Python's wheel (same version) is downloaded from the package registry."""
    import importlib.metadata as md

    version = md.version("apache-tvm-ffi")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python == here:
        shutil.copytree(_package_dir("tvm_ffi"), os.path.join(dest, "tvm_ffi"), ignore=_ffi_ignore)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                "--only-binary=:all:", "--python-version", python,
                "--platform", sysconfig.get_platform().replace("-", "_").replace(".", "_"),
                "--platform", f"manylinux_2_28_{os.uname().machine}",
                "--platform", f"manylinux_2_17_{os.uname().machine}",
                "--dest", tmp, f"apache-tvm-ffi=={version}",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if proc.returncode or not wheels:
                raise ToolchainMissing(
                    f"cannot download apache-tvm-ffi=={version} for Python {python}: "
                    f"{(proc.stderr or proc.stdout).strip()[-300:]}. fix: pack with the Python the "
                    "bundle will run on (omit --python), or make the package registry reachable"
                )
            with tempfile.TemporaryDirectory() as unpacked:
                with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as whl:
                    whl.extractall(unpacked)
                shutil.copytree(
                    os.path.join(unpacked, "tvm_ffi"),
                    os.path.join(dest, "tvm_ffi"),
                    ignore=_ffi_ignore,
                )
    spec = importlib.util.find_spec("typing_extensions")
    if spec is None or spec.origin is None:
        raise ToolchainMissing("typing_extensions is not installed. fix: pip install it")
    shutil.copy2(spec.origin, os.path.join(dest, "typing_extensions.py"))
    return version


def _check_packable(artifact_dir: str, manifest: dict[str, Any]) -> str:
    from qiao.backends import get_backend

    target = manifest.get("backend", {}).get("name")
    try:
        packable = bool(get_backend(target).runtime_libraries)
    except QiaoError:  # a backend not installed here
        packable = False
    if not packable:
        raise QiaoError(
            f"{artifact_dir} is a {target!r} artifact; qiao pack bundles TVM artifacts (cpu, "
            "cuda, rocm). fix: hand a vendor artifact to its toolchain as README describes"
        )
    specs = manifest["inputs"] + manifest["outputs"]
    odd = [s["name"] for s in specs if not _numpy_dtype(s["dtype"])]
    if odd:
        raise QiaoError(
            f"{artifact_dir} has inputs/outputs of low-precision types ({', '.join(odd)}) that "
            "the NumPy-only runner cannot convert. fix: run it with qiao, or export the model "
            "with float32/int boundaries"
        )
    return target


def _numpy_dtype(name: str) -> bool:
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True


def _reference(artifact_dir: str, root: str) -> dict[str, Any]:
    """Store example inputs and ONNX Runtime's outputs on them (PyTorch's where the artifact keeps
    no source model); returns the manifest's ``reference`` section."""
    from qiao.compiler.driver import load
    from qiao.compiler.validate import (
        example_inputs,
        onnxruntime_reference,
        tolerances,
        torch_reference,
    )

    artifact = load(artifact_dir)
    inputs = example_inputs(artifact)
    model_path = os.path.join(artifact_dir, art.SOURCE_MODEL)
    if os.path.isfile(model_path):
        outputs, source = onnxruntime_reference(model_path, inputs), "onnxruntime"
    else:
        outputs = torch_reference(artifact.manifest.get("source", {}), inputs)
        source = "pytorch"
        if outputs is None:
            raise QiaoError(
                f"{artifact_dir} keeps no source model ({art.SOURCE_MODEL}) to compute reference "
                "outputs with. fix: pack without --with-reference, or recompile the model"
            )
    rtol, atol = tolerances(artifact, None, None)
    os.makedirs(os.path.join(root, "reference"))
    np.savez(os.path.join(root, "reference", "inputs.npz"), **inputs)
    names = [o["name"] for o in artifact.outputs]
    np.savez(os.path.join(root, "reference", "outputs.npz"), **{n: outputs[n] for n in names})
    return {
        "inputs": "reference/inputs.npz",
        "outputs": "reference/outputs.npz",
        "source": source,
        "rtol": rtol,
        "atol": atol,
    }


def pack(
    artifact_dir: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    with_reference: bool = False,
    python: str | None = None,
) -> dict[str, Any]:
    """Write ``artifact_dir`` as a self-contained bundle at ``bundle_dir``.

    Parameters
    ----------
    artifact_dir : path
        An artifact written by ``qiao compile`` (cpu, cuda or rocm).
    bundle_dir : path
        Where the bundle goes; an existing bundle there is replaced atomically.
    with_reference : bool
        Also store example inputs and ONNX Runtime's outputs, for ``run.py --check``.
    python : str, optional
        ``"3.10"``... the Python the bundle runs on (default: this one).

    Returns
    -------
    dict
        The bundle manifest (``bundle.json``), with ``size_bytes`` and ``weights_bytes``.
    """
    artifact_dir = os.path.abspath(os.fspath(artifact_dir))
    if not os.path.isdir(artifact_dir):
        raise ArtifactCorrupt(
            f"{artifact_dir} is not a directory. fix: pass an artifact written by `qiao compile`"
        )
    manifest = art.read_manifest(artifact_dir)
    target = _check_packable(artifact_dir, manifest)
    python = _python_tag(python)
    tvm_lib = os.path.join(_package_dir("tvm"), "lib")
    from qiao.backends import get_backend

    runtime = get_backend(target)
    libraries = [os.path.join(tvm_lib, name) for name in runtime.runtime_libraries]
    absent = [p for p in libraries if not os.path.isfile(p)]
    if absent:
        raise ToolchainMissing(
            f"TVM's runtime library for {target} is not in this apache-tvm install "
            f"({', '.join(absent)}). fix: install an apache-tvm build with {target} support"
        )
    backend = manifest["backend"]
    with art.staging_dir(os.fspath(bundle_dir), BUNDLE_MANIFEST, "qiao bundle") as root:
        os.makedirs(os.path.join(root, "artifact"))
        kept = [art.MANIFEST, backend["library"]]
        if manifest.get("params", {}).get("names"):
            kept.append(art.PARAMS)
        for name in kept:
            shutil.copy2(os.path.join(artifact_dir, name), os.path.join(root, "artifact", name))
        os.makedirs(os.path.join(root, "lib"))
        for path in libraries:
            shutil.copy2(path, os.path.join(root, "lib"))
        os.makedirs(os.path.join(root, "vendor"))
        ffi_version = vendor_tvm_ffi(os.path.join(root, "vendor"), python)
        for name in TEMPLATE_FILES:
            shutil.copy2(os.path.join(TEMPLATE_DIR, name), os.path.join(root, name))
        bundle: dict[str, Any] = {
            "bundle_format": BUNDLE_FORMAT,
            "model": manifest.get("model"),
            "target": target,
            "device": runtime.device_type,
            "runtime_libraries": list(runtime.runtime_libraries),
            "arch": backend.get("arch"),
            "library": backend["library"],
            "cpu": backend.get("cpu"),
            "inputs": manifest["inputs"],
            "outputs": manifest["outputs"],
            # the sizes the memory plan holds (``dim_ranges``); the runtime refuses others
            "dim_ranges": manifest.get("dim_ranges") or {},
            "params": manifest.get("params", {}).get("names", []),
            "python": python,
            "platform": sysconfig.get_platform(),
            "tvm_version": manifest.get("tvm_version"),
            "tvm_ffi_version": ffi_version,
            "reference": _reference(artifact_dir, root) if with_reference else None,
        }
        files = {}
        for dirpath, _, names in os.walk(root):
            for name in names:
                full = os.path.join(dirpath, name)
                files[os.path.relpath(full, root)] = art.sha256_file(full)
        bundle["files"] = dict(sorted(files.items()))
        with open(os.path.join(root, BUNDLE_MANIFEST), "w") as f:
            json.dump(bundle, f, indent=1)
            f.write("\n")
        size = sum(os.path.getsize(os.path.join(root, rel)) for rel in files)
        weights = (
            os.path.getsize(os.path.join(root, "artifact", art.PARAMS)) if art.PARAMS in kept else 0
        )
    return dict(bundle, size_bytes=size, weights_bytes=weights)
