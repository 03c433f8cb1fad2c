"""Shared fixtures. The helpers (``assert_close``, ``run_cli``, ``has_command``) live in
``qiao.compiler.testing`` so that tests/ and benchmarks/ can both import them."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def compiled_builtin(tmp_path_factory):
    """``compiled_builtin(name)`` → an Artifact compiled once per session for the CPU."""
    from qiao.compiler import compile

    cache = {}
    root = tmp_path_factory.mktemp("builtin-artifacts")

    def get(name: str):
        if name not in cache:
            cache[name] = compile(name, "cpu", root / name)
        return cache[name]

    return get
