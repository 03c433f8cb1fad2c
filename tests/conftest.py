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


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.full_tier("why")``: a case another test already covers in the default run
    (CI), skipped there with that reason; ``QIAO_TESTS=full`` runs it."""
    if os.environ.get("QIAO_TESTS", "").lower() == "full":
        return
    for item in items:
        marker = item.get_closest_marker("full_tier")
        if marker is not None:
            why = marker.args[0] if marker.args else "redundant in the default run"
            item.add_marker(pytest.mark.skip(reason=f"full tier: {why} (QIAO_TESTS=full runs it)"))


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
