"""The artifact directory: compiled files, weights and ``manifest.json``.

Written into a temporary sibling directory and renamed into place, so a failed compile leaves
nothing behind and a reader never sees half an artifact. ``load`` refuses an artifact of another
format version or whose files changed since they were written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from qiao.compiler.errors import ArtifactCorrupt, InputMismatch, InvalidModel

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "params.npz"
SOURCE_MODEL = "model.onnx"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_tree(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full) and not inside(root, rel):
                raise ArtifactCorrupt(
                    f"artifact {root}: {rel} is a link to {os.path.realpath(full)}, outside the "
                    "artifact; refused. fix: recompile the model; an artifact holds its own files"
                )
            if rel != MANIFEST:
                out[rel] = sha256_file(full)
    return dict(sorted(out.items()))


@contextlib.contextmanager
def staging_dir(
    final_dir: str, marker: str = MANIFEST, what: str = "qiao artifact"
) -> Iterator[str]:
    """Yield an empty temporary directory beside ``final_dir``; on success it replaces ``final_dir``
    atomically (an existing ``what`` there, a directory holding ``marker``, is swapped out, then
    removed; any other non-empty path is refused); on error it is removed.

    Kill-safe: at every instant ``final_dir`` is the old directory or the complete new one (Linux:
    one ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, with a moment without it). What a
    killed process leaves (``.<name>.tmp-<pid>-*`` beside it) is removed by the next call once that
    process is gone. Concurrent calls for the same directory each swap in a complete one, one at a
    time (a lock on the parent directory): the last to finish stays."""
    final_dir = os.path.abspath(final_dir)
    parent = os.path.dirname(final_dir)
    if os.path.exists(final_dir) and not os.path.isfile(os.path.join(final_dir, marker)):
        if not os.path.isdir(final_dir) or os.listdir(final_dir):
            raise ArtifactCorrupt(
                f"{final_dir} exists and is not a {what}; refusing to replace it. "
                "fix: choose another -o directory or remove it"
            )
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(final_dir)}.tmp-"
    _remove_stale(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; artifacts are shared like any directory
    try:
        yield tmp
        with _locked(parent):
            if not os.path.exists(final_dir):
                os.rename(tmp, final_dir)
                return
            if not _exchange(tmp, final_dir):
                old = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-old-", dir=parent)
                os.rmdir(old)
                os.rename(final_dir, old)
                os.rename(tmp, final_dir)
                tmp = old
        shutil.rmtree(tmp, ignore_errors=True)  # the old directory, swapped out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale(parent: str, prefix: str) -> None:
    """Remove ``prefix<pid>-*`` directories whose process no longer runs (killed mid-write)."""
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` (advisory; a no-op where flock is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # an unreadable directory: no lock, the swap itself is still atomic
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def save_params(workdir: str, params: Mapping[str, np.ndarray]) -> list[str]:
    """Write weights to ``params.npz`` (uncompressed: a plain read, ``np.savez``'s layout) one at
    a time; returns their order. A weight mapped from a file (a read-only ``np.memmap``: the
    compiler maps external data) is copied from that file in chunks, never through its map, so
    writing gigabytes of weights keeps one chunk of them in this process' memory."""
    names = list(params)
    with zipfile.ZipFile(os.path.join(workdir, PARAMS), "w", zipfile.ZIP_STORED) as archive:
        for i, name in enumerate(names):
            array = np.asanyarray(params[name])
            with archive.open(f"p{i}.npy", "w", force_zip64=True) as f:
                if _file_range(array) is None:
                    np.lib.format.write_array(f, array, allow_pickle=False)
                else:
                    _copy_mapped(f, array)
    return names


_CHUNK = 64 << 20


def _file_range(array: np.ndarray) -> tuple[str, int] | None:
    """``(file, offset)`` of a read-only ``np.memmap`` that maps its whole file range (not a view
    into one, and nobody can have written it), else None."""
    import mmap

    if not isinstance(array, np.memmap) or not isinstance(array.base, mmap.mmap):
        return None
    if array.flags.writeable or not array.flags.c_contiguous or not array.filename:
        return None
    return array.filename, int(array.offset)


def _copy_mapped(f, array: np.ndarray) -> None:
    """``np.lib.format.write_array`` for a read-only map, its bytes read from its file (a file cut
    short while compiling is an error here, where touching the map would be a SIGBUS)."""
    path, offset = _file_range(array)
    np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
    buffer = memoryview(bytearray(min(_CHUNK, array.nbytes)))
    remaining = array.nbytes
    with open(path, "rb") as src:
        src.seek(offset)
        while remaining:
            got = src.readinto(buffer[: min(len(buffer), remaining)])
            if not got:
                raise InvalidModel(
                    f"{path} ended {remaining} bytes before the weight at offset {offset} while "
                    "it was being compiled. fix: do not rewrite a model while qiao compiles it"
                )
            f.write(buffer[:got])
            remaining -= got


def iter_params(artifact_dir: str, manifest: Mapping[str, Any]) -> Iterator[np.ndarray]:
    """The weights in manifest order, read one at a time: a caller that copies each to its device
    and drops it holds one host copy of one weight at a time, not of all of them (a decoder's
    weights are gigabytes)."""
    names = manifest.get("params", {}).get("names", [])
    if not names:
        return
    with np.load(os.path.join(artifact_dir, PARAMS)) as data:
        for i in range(len(names)):
            array = data[f"p{i}"]
            # ``.npy`` has no bfloat16: an ml_dtypes bfloat16 weight reads back as raw 2-byte
            # void, the one such type qiao writes (``--dtype bfloat16``)
            if array.dtype == np.dtype("V2"):
                import ml_dtypes

                array = array.view(ml_dtypes.bfloat16)
            yield array


def load_params(artifact_dir: str, manifest: Mapping[str, Any]) -> list[np.ndarray]:
    return list(iter_params(artifact_dir, manifest))


def write_manifest(workdir: str, manifest: dict) -> dict:
    """Fill in the file hashes and write ``manifest.json`` into ``workdir``."""
    manifest = dict(manifest)
    manifest["files"] = _hash_tree(workdir)
    _write_json_atomic(os.path.join(workdir, MANIFEST), manifest)
    return manifest


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_manifest(artifact_dir: str, verify: bool = True) -> dict:
    """Read and check an artifact's manifest: format version, every file present and unmodified."""
    path = os.path.join(artifact_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactCorrupt(
            f"{artifact_dir} is not a qiao artifact (no {MANIFEST}). "
            "fix: pass a directory written by "
            "`qiao compile`, or compile the model again"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError) as err:  # JSON, UTF-8, nesting
        raise ArtifactCorrupt(
            f"{path} is unreadable ({type(err).__name__}: {err}). fix: compile the model again"
        ) from err
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactCorrupt(
            f"{artifact_dir} has artifact format version {version!r}; this qiao reads version "
            f"{FORMAT_VERSION}. fix: recompile the model with this qiao version"
        )
    check_manifest(artifact_dir, manifest)
    if verify:
        expected = manifest["files"]
        actual = _hash_tree(artifact_dir)
        missing = sorted(set(expected) - set(actual))
        changed = sorted(n for n in expected if n in actual and actual[n] != expected[n])
        extra = sorted(set(actual) - set(expected))
        problems = []
        if missing:
            problems.append(f"missing: {', '.join(missing)}")
        if changed:
            problems.append(f"modified: {', '.join(changed)}")
        if extra:
            problems.append(f"unexpected: {', '.join(extra)}")
        if problems:
            raise ArtifactCorrupt(
                f"artifact {artifact_dir} does not match its manifest ({'; '.join(problems)}). "
                "fix: recompile the model; do not edit artifact files by hand"
            )
    return manifest


# A dimension larger than this in a manifest is damage (no device holds 2^48 elements of anything).
_MAX_DIM = 1 << 48


def _corrupt(artifact_dir: str, problem: str) -> ArtifactCorrupt:
    return ArtifactCorrupt(
        f"artifact {artifact_dir}: its {MANIFEST} is damaged ({problem}). fix: recompile the "
        "model; do not edit artifact files by hand"
    )


def inside(artifact_dir: str, rel: object) -> bool:
    """Whether ``rel`` is a relative path naming something inside ``artifact_dir`` (no ``..``, not
    absolute, no symlink leading out)."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel):
        return False
    root = os.path.realpath(artifact_dir)
    full = os.path.realpath(os.path.join(root, rel))
    return full != root and os.path.commonpath([root, full]) == root


def check_manifest(artifact_dir: str, manifest: Any) -> None:
    """The manifest's structure: every field ``load`` and ``run`` read has the type they expect,
    and every file it names lies inside ``artifact_dir`` (an artifact that names files elsewhere
    is refused, not followed). Raises ``ArtifactCorrupt``."""
    from qiao.compiler.frontend.lowprec import ml_dtype

    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise _corrupt(artifact_dir, "'files' is not a table of file hashes")
    outside = sorted(str(k) for k in files if not inside(artifact_dir, k))
    if outside:
        raise _corrupt(artifact_dir, f"it names files outside the artifact: {', '.join(outside)}")
    for key in ("inputs", "outputs"):
        specs = manifest.get(key)
        if not isinstance(specs, list) or (key == "outputs" and not specs):
            raise _corrupt(artifact_dir, f"{key!r} is not a list of tensors")
        for spec in specs:
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise _corrupt(artifact_dir, f"an entry of {key!r} has no name")
            try:
                dtype = ml_dtype(spec["dtype"]) if isinstance(spec.get("dtype"), str) else None
            except TypeError:
                dtype = None
            if dtype is None or dtype.kind == "O":
                raise _corrupt(artifact_dir, f"{spec['name']!r} has dtype {spec.get('dtype')!r}")
            shape = spec.get("shape")
            ok = isinstance(shape, list) and all(
                (isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM)
                or (isinstance(d, str) and d)
                for d in shape
            )
            if not ok:
                raise _corrupt(artifact_dir, f"{spec['name']!r} has shape {shape!r}")
    backend, params = manifest.get("backend"), manifest.get("params")
    if not isinstance(backend, dict) or not isinstance(backend.get("name"), str):
        raise _corrupt(artifact_dir, "'backend' names no backend")
    if not isinstance(params, dict) or not isinstance(params.get("names", []), list):
        raise _corrupt(artifact_dir, "'params' is not a table of weights")
    named = {"backend library": backend.get("library"), "params file": params.get("file")}
    named["backend output"] = backend.get("output")
    for what, rel in named.items():
        if rel is not None and rel not in files:
            raise _corrupt(artifact_dir, f"the {what} {rel!r} is not one of the artifact's files")
    if params.get("names") and params.get("file") is None:
        raise _corrupt(artifact_dir, "'params' names weights but no file")


def record_validation(artifact_dir: str, result: dict) -> None:
    """Store the last validation result in the manifest (which is not part of the file hashes)."""
    manifest = read_manifest(artifact_dir, verify=False)
    manifest["validation"] = dict(result, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _write_json_atomic(os.path.join(artifact_dir, MANIFEST), manifest)


def check_inputs(
    specs: Sequence[Mapping[str, Any]],
    inputs: Mapping[str, Any],
    dim_ranges: Mapping[str, Sequence[int]] | None = None,
) -> list[np.ndarray]:
    """Order ``inputs`` as ``specs`` and check names, dtypes, ranks, static dims, that each
    symbolic dim has one value across all inputs, and that it lies in its compiled range
    (``dim_ranges``: the memory plan holds that many, no more).

    Raises ``InputMismatch`` naming the input, expected vs got."""
    ranges = dict(dim_ranges or {})
    names = [s["name"] for s in specs]
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unknown input(s) {', '.join(map(repr, extra))}")
        raise InputMismatch(f"{'; '.join(parts)}. fix: the model takes exactly: {', '.join(names)}")
    bound: dict[str, tuple[int, str]] = {}
    ordered = []
    for spec in specs:
        name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
        value = np.asarray(inputs[name])
        if value.dtype != np.dtype(dtype):
            raise InputMismatch(
                f"input {name!r}: expected dtype {dtype}, got {value.dtype}. "
                f"fix: cast it, e.g. x.astype('{dtype}')"
            )
        want = "(" + ", ".join(str(d) for d in shape) + ")"
        if value.ndim != len(shape):
            raise InputMismatch(
                f"input {name!r}: expected shape {want} (rank {len(shape)}), got {value.shape} "
                f"(rank {value.ndim})"
            )
        for axis, (dim, got) in enumerate(zip(shape, value.shape)):
            if isinstance(dim, int):
                if got != dim:
                    raise InputMismatch(
                        f"input {name!r}: expected shape {want}, got {tuple(value.shape)} "
                        f"(axis {axis} must be {dim})"
                    )
            elif isinstance(dim, str):
                if dim in bound and bound[dim][0] != got:
                    other = bound[dim][1]
                    raise InputMismatch(
                        f"input {name!r}: axis {axis} is {dim!r}={got}, but input {other!r} has "
                        f"{dim!r}={bound[dim][0]}; inputs sharing a symbolic dim must agree"
                    )
                if dim in ranges and not ranges[dim][0] <= got <= ranges[dim][1]:
                    lo, hi = ranges[dim]
                    raise InputMismatch(
                        f"input {name!r}: axis {axis} is {dim!r}={got}, outside the range "
                        f"{lo}..{hi} the artifact was compiled for. fix: pass {dim} within "
                        f"{lo}..{hi}, or recompile with --dim-range {dim}={min(lo, got)}:"
                        f"{max(hi, got)}"
                    )
                bound.setdefault(dim, (got, name))
        ordered.append(np.asarray(value, order="C"))  # ascontiguousarray makes 0-d 1-d
    return ordered
