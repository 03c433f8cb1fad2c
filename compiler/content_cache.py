"""Content-keyed caches under ``$QIAO_CACHE_DIR``: a folder made once for a key (a hash of what
made it) and reused by every later call, in this process or another, with the same key.

``code_fingerprint`` hashes qiao's own sources, so an entry made by other code is never reused.
``cached_folder`` writes a new entry to a temporary sibling and renames it into place: concurrent
callers (xdist workers, two shells) never see half an entry, and the loser of a race keeps the
winner's copy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any


@functools.cache
def code_fingerprint() -> str:
    """sha256 of qiao's Python sources and the TVM version: a compiled artifact or an export
    depends on them. Read once per process."""
    import tvm

    import qiao.backends
    import qiao.compiler
    import qiao.models

    digest = hashlib.sha256(f"tvm {tvm.__version__}".encode())
    for package in (qiao.compiler, qiao.backends, qiao.models):
        root = os.path.dirname(os.path.abspath(package.__file__))
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(f for f in filenames if f.endswith(".py")):
                path = os.path.join(dirpath, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def cached_folder(
    root: str,
    name: str,
    key: Mapping[str, Any],
    make: Callable[[str], None],
    complete: Callable[[str], bool] | None = None,
    key_file: str = "qiao_cache_key.json",
    max_bytes: int | None = None,
) -> str:
    """The folder ``make(tmp_dir)`` writes, kept at ``root/<name>-<hash of key>``.

    Parameters
    ----------
    root : str
        The cache's directory (created when missing).
    name : str
        A readable prefix of the entry's name.
    key : mapping
        Everything the folder's content depends on (JSON; other values by ``str``). Written into
        the folder as ``key_file``.
    make : callable
        ``make(tmp_dir)`` fills a fresh, empty directory.
    complete : callable, optional
        ``complete(folder)``: whether an existing entry is whole (a hit). Default: its key file
        is there (written last, before the rename).
    max_bytes : int, optional
        After a new entry is written, the least recently used entries of ``root`` are deleted
        until all of them together take at most this much (the new one is kept).

    Returns
    -------
    str
        The entry's path.
    """
    if complete is None:

        def complete(folder: str) -> bool:
            return os.path.isfile(os.path.join(folder, key_file))

    blob = json.dumps(dict(key), sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    final = os.path.join(root, f"{name}-{digest}")
    if complete(final):
        _touch(os.path.join(final, key_file))
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
    try:
        make(tmp)
        with open(os.path.join(tmp, key_file), "w") as f:
            f.write(blob)
        _touch(os.path.join(tmp, key_file))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its copy
            if not complete(final):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    if max_bytes is not None:
        _prune(root, key_file, max_bytes, keep=final)
    return final


def _touch(path: str) -> None:
    """Stamp ``path`` with the entry's last use, for ``_prune``: the clock's own time, not the
    kernel's (``os.utime(path)`` and a write stamp the time of the last scheduler tick, a few ms
    coarse, so an entry written and another used within one tick tied and pruning took either)."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:
        pass


def _folder_bytes(folder: str) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def _prune(root: str, key_file: str, max_bytes: int, keep: str) -> None:
    """Delete the least recently used entries of ``root`` (by their key file's modification time)
    until the entries take at most ``max_bytes``; ``keep`` stays. Best effort: another process
    may be deleting or reading the same entries."""
    entries = []
    for name in os.listdir(root):
        folder = os.path.join(root, name)
        try:
            used = os.path.getmtime(os.path.join(folder, key_file))
        except OSError:
            continue  # not an entry (a temporary folder being written, a stray file)
        entries.append((used, folder, _folder_bytes(folder)))
    total = sum(size for _, _, size in entries)
    for _, folder, size in sorted(entries):
        if total <= max_bytes:
            break
        if folder != keep:
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
