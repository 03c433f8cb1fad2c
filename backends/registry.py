"""Backend discovery through the ``qiao.backends`` entry-point group.

Built-in backends are declared in qiao's own ``pyproject.toml`` under the same group third parties
use. Entries are stored as import strings and imported only when a backend is asked for or listed; a
plugin that fails to import is reported (``qiao targets`` shows it as broken) and never breaks other
backends or ``import qiao``. Set ``QIAO_DISABLE_PLUGINS=1`` to ignore every backend not shipped with
qiao."""

from __future__ import annotations

import importlib
import os
import types
from dataclasses import dataclass
from importlib import metadata

from qiao.backends.base import Backend
from qiao.compiler.errors import QiaoError, UnknownTarget

GROUP = "qiao.backends"
DISABLE_ENV = "QIAO_DISABLE_PLUGINS"
_OWN_DIST = "qiao"


class BrokenBackend(QiaoError):
    """A backend entry point that could not be loaded or is not a valid backend."""


@dataclass(frozen=True)
class BackendEntry:
    """One discovered entry: where it comes from and, once loaded, the backend or the error."""

    name: str
    value: str  # "module:Class"
    dist: str  # distribution that declared it
    error: str | None = None  # set for duplicates found at discovery time

    @property
    def builtin(self) -> bool:
        return self.dist == _OWN_DIST


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return (dist.metadata["Name"] if dist is not None else "") or "?"


def discover() -> types.MappingProxyType:
    """Return a read-only ``{name: BackendEntry}`` of every declared backend (nothing imported)."""
    plugins_off = os.environ.get(DISABLE_ENV, "").strip() not in ("", "0", "false", "no")
    found: dict[str, BackendEntry] = {}
    duplicates: list[BackendEntry] = []
    eps = sorted(metadata.entry_points(group=GROUP), key=lambda e: _dist_name(e) != _OWN_DIST)
    for ep in eps:
        entry = BackendEntry(ep.name, ep.value, _dist_name(ep))
        if plugins_off and not entry.builtin:
            continue
        if ep.name in found:
            if found[ep.name].value == ep.value:
                continue  # the same distribution seen twice on sys.path
            first = found[ep.name]
            duplicates.append(
                BackendEntry(
                    f"{ep.name} ({entry.dist})",
                    ep.value,
                    entry.dist,
                    error=f"duplicate backend name {ep.name!r}: already provided by {first.dist} "
                    f"({first.value}); fix: rename the entry point in {entry.dist}'s "
                    f'[project.entry-points."{GROUP}"]',
                )
            )
            continue
        found[ep.name] = entry
    for dup in duplicates:
        found[dup.name] = dup
    return types.MappingProxyType(found)


_cache: dict[tuple[str, str], Backend] = {}


def load_entry(entry: BackendEntry) -> Backend:
    """Import and instantiate one entry; raise ``BrokenBackend`` with the cause and a fix."""
    if entry.error:
        raise BrokenBackend(entry.error)
    key = (entry.name, entry.value)
    if key in _cache:
        return _cache[key]
    module_name, _, attr = entry.value.partition(":")
    hint = (
        f"fix: reinstall {entry.dist!r} or set {DISABLE_ENV}=1 to ignore third-party backends"
        if not entry.builtin
        else "fix: reinstall qiao (pip install -e .)"
    )
    try:
        obj = importlib.import_module(module_name)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except Exception as err:  # a plugin may fail in any way; report, never propagate
        raise BrokenBackend(
            f"backend {entry.name!r} from {entry.dist} failed to load ({entry.value}): "
            f"{type(err).__name__}: {err}. {hint}"
        ) from err
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise BrokenBackend(
            f"backend {entry.name!r} from {entry.dist}: {entry.value} is not a "
            "qiao.backends.base.Backend "
            f"subclass. {hint}"
        )
    try:
        backend = obj()
    except Exception as err:
        raise BrokenBackend(
            f"backend {entry.name!r} from {entry.dist} failed to initialise: {type(err).__name__}: "
            f"{err}. {hint}"
        ) from err
    if getattr(backend, "name", None) != entry.name:
        raise BrokenBackend(
            f"backend {entry.name!r} from {entry.dist}: its class says "
            f"name={getattr(backend, 'name', None)!r}; "
            "the entry-point name and Backend.name must match"
        )
    _cache[key] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; ``UnknownTarget`` (listing known names) if none is."""
    entries = discover()
    if name not in entries:
        known = (
            ", ".join(n for n, e in entries.items() if e.error is None)
            or "(none: is qiao installed?)"
        )
        raise UnknownTarget(
            f"unknown target {name!r}. fix: use one of: {known} (see `qiao targets`)"
        )
    return load_entry(entries[name])


def list_backends() -> list[tuple[BackendEntry, Backend | None, str | None]]:
    """Every discovered entry with its loaded backend, or ``None`` and the error text."""
    rows = []
    for entry in discover().values():
        try:
            rows.append((entry, load_entry(entry), None))
        except BrokenBackend as err:
            rows.append((entry, None, str(err)))
    return rows


def backend_for_kind(kind: str) -> Backend | None:
    """The backend whose ``target_kinds`` include TVM target kind ``kind`` (qiao's own first, then
    plugins in discovery order); ``None`` when no loadable backend claims it. Broken plugins are
    skipped here: ``qiao targets`` reports them."""
    for entry in discover().values():
        try:
            backend = load_entry(entry)
        except BrokenBackend:
            continue
        if kind in backend.target_kinds:
            return backend
    return None
