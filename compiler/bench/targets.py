"""Targets: parsing ``--target`` lists, and what a target's backend says about where its
baselines and roofs are measured (the backend is the one place that knows its target kind)."""

from __future__ import annotations

from collections.abc import Sequence

from qiao.compiler.bench.engines import HOST
from qiao.compiler.errors import QiaoError


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


def runs_on_host_cpu(backend) -> bool:
    """Whether ``backend``'s artifacts run on this host's CPU, so that the CPU's measured roofs
    (``measure_cpu_roofs``) bound them."""
    return backend.reference_device == HOST
