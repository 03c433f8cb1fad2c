"""Shared test helpers: one ``assert_close`` for every numeric check, cached capability probes, and
fixtures for compiled built-in models."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest


def assert_close(actual, expected, rtol: float = 1e-5, atol: float = 1e-5, name: str = "output"):
    """Check length (for sequences), then shape, then dtype, then values; name what differs."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{name}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_close(actual[key], expected[key], rtol, atol, f"{name}[{key!r}]")
        return
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), (
            f"{name}: {len(actual)} outputs, expected {len(expected)}"
        )
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, rtol, atol, f"{name}[{i}]")
        return
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{name}: shape {actual.shape} != expected {expected.shape}"
    )
    assert actual.dtype == expected.dtype, (
        f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    )
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name, equal_nan=True)


@functools.cache
def has_command(name: str) -> bool:
    return shutil.which(name) is not None


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run ``qiao ARGS`` in a subprocess; returns the CompletedProcess (text mode)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "qiao.compiler.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
