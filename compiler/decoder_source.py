"""Decoder sources for ``qiao generate`` and ``qiao bench --generate``: an artifact directory, a
built-in decoder, an ONNX Runtime GenAI folder or a Hugging Face folder. The last three are
compiled on the way and kept in a cache under ``$QIAO_CACHE_DIR/decoders``, keyed by the content
hash of the source (every file of a folder; the name of a built-in) and of qiao's own code, so the
next call with the same source reuses the artifact and a changed file or a changed qiao compiles
again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from typing import Any

from qiao.compiler.content_cache import code_fingerprint
from qiao.compiler.errors import ArtifactCorrupt, QiaoError, UnknownModel

CACHE_SUBDIR = "decoders"
_HASH_INDEX = "file-hashes.json"  # (path, size, mtime) -> sha256: a 7 GB folder is read once


class NotADecoder(QiaoError):
    """An artifact or model that has no ``"decoder"`` manifest section (not a language model)."""


def cache_root() -> str:
    """``$QIAO_CACHE_DIR/decoders`` (default ``~/.cache/qiao/decoders``)."""
    from qiao.compiler.schedules.tuning import cache_dir

    return os.path.join(cache_dir(), CACHE_SUBDIR)


def is_artifact_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding an artifact manifest."""
    from qiao.compiler import artifact as art

    return os.path.isfile(os.path.join(os.fspath(path), art.MANIFEST))


def folder_kind(path: str | os.PathLike) -> str | None:
    """``"genai"`` (genai_config.json), ``"hf"`` (config.json) or ``None`` for another path."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, "genai_config.json")):
        return "genai"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    return None


def _file_sha256(path: str, index: dict[str, Any]) -> str:
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns]
    known = index.get(path)
    if known and known[:2] == stamp:
        return known[2]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    index[path] = [*stamp, digest.hexdigest()]
    return digest.hexdigest()


def folder_sha256(folder: str | os.PathLike, root: str | None = None) -> str:
    """sha256 over every file of ``folder`` (relative names and contents). File hashes are kept in
    an index in the cache keyed by size and modification time, so large weights are read once."""
    folder = os.path.abspath(os.fspath(folder))
    root = root or cache_root()
    index_path = os.path.join(root, _HASH_INDEX)
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        index = {}
    before = dict(index)
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, folder).encode())
            digest.update(_file_sha256(path, index).encode())
    if index != before:
        os.makedirs(root, exist_ok=True)
        tmp = f"{index_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(index, f)
        os.replace(tmp, index_path)
    return digest.hexdigest()


def _unknown_source(source: str) -> QiaoError:
    return UnknownModel(
        f"unknown decoder source {source!r}: not an artifact directory, an ONNX Runtime GenAI "
        "folder (genai_config.json), a Hugging Face folder (config.json) or a built-in model. "
        "fix: pass one of those (`qiao models` lists the built-ins)"
    )


def check_decoder(artifact) -> dict[str, Any]:
    """The artifact's ``"decoder"`` manifest section; ``NotADecoder`` when it has none."""
    decoder = artifact.manifest.get("decoder")
    if not decoder:
        raise NotADecoder(
            f'{artifact.directory} is not a decoder artifact (its manifest has no "decoder" '
            "section: it was compiled from a plain model). fix: pass a decoder source: a "
            "built-in decoder such as qwen3-small, an ONNX Runtime GenAI folder or a Hugging "
            "Face folder"
        )
    return decoder


def cache_key(source: str | os.PathLike, target: str = "cpu", root: str | None = None) -> str:
    """The cache directory name of ``source`` compiled for ``target``: its name and the first 16
    hex digits of the hash of its content and of qiao's code."""
    text = os.fspath(source)
    digest = hashlib.sha256(code_fingerprint().encode())
    digest.update(target.encode())
    if folder_kind(text):
        digest.update(b"folder " + folder_sha256(text, root).encode())
        name = os.path.basename(os.path.abspath(text))
    else:
        digest.update(b"builtin " + text.encode())
        name = text
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "decoder"
    return f"{safe}-{target}-{digest.hexdigest()[:16]}"


def open_decoder(
    source: str | os.PathLike,
    target: str = "cpu",
    *,
    root: str | None = None,
    progress: Callable[[str], None] | None = None,
):
    """An ``Artifact`` with a ``"decoder"`` manifest section for ``source``.

    Parameters
    ----------
    source : str or os.PathLike
        An artifact directory (used as is), a built-in decoder name, an ONNX Runtime GenAI folder
        or a Hugging Face folder (compiled with ``qiao.compiler.compile`` into the cache, or taken
        from it when the same content was compiled before).
    target : str
        Backend to compile for when ``source`` is not an artifact.
    root : str, optional
        Cache directory (default ``$QIAO_CACHE_DIR/decoders``).
    progress : callable, optional
        Called with one line of text before a compile.

    Returns
    -------
    qiao.compiler.Artifact

    Raises
    ------
    UnknownModel
        ``source`` is none of the four kinds.
    NotADecoder
        The artifact (given or compiled) is not a language model.
    """
    from qiao.compiler.driver import compile, load

    text = os.fspath(source)
    if is_artifact_dir(text):
        artifact = load(text)
        check_decoder(artifact)
        return artifact
    if not folder_kind(text):
        if os.path.exists(text):
            raise _unknown_source(text)
        from qiao.models import list_models

        if text not in list_models():
            raise _unknown_source(text)
    root = root or cache_root()
    out = os.path.join(root, cache_key(text, target, root))
    if is_artifact_dir(out):
        try:
            artifact = load(out)
        except ArtifactCorrupt:  # a cache entry changed on disk: compile it again
            artifact = None
        if artifact is not None:
            check_decoder(artifact)
            return artifact
    if progress is not None:
        progress(f"compiling {text} for {target} into {out} (cached for the next call)")
    os.makedirs(root, exist_ok=True)
    artifact = compile(text, target, out)
    check_decoder(artifact)
    return artifact
