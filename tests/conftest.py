"""Shared fixtures. The helpers (``assert_close``, ``run_cli``, ``has_command``) live in
``qiao.compiler.testing`` so that tests/ and benchmarks/ can both import them."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import pytest


def pytest_configure(config):
    """Tests never read or write the developer's tuning store: a tuned entry there would change
    which schedule a test compiles (and a test's writes would land in it). Each pytest process
    (each xdist worker too) gets its own empty cache; CLI subprocesses inherit it."""
    cache = tempfile.mkdtemp(prefix="qiao-test-cache-")
    os.environ["QIAO_CACHE_DIR"] = cache
    atexit.register(functools.partial(shutil.rmtree, cache, ignore_errors=True))


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
