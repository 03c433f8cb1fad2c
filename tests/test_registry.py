"""Backend discovery through the ``qiao.backends`` entry points, with real third-party
distributions (``tests/plugin_fixture``: a package plus its ``*.dist-info``) put on ``PYTHONPATH``
of a subprocess, or on ``sys.path`` in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qiao.compiler.testing import run_cli

FIXTURE = os.path.join(os.path.dirname(__file__), "plugin_fixture")
BUILTINS = {"cpu", "cuda", "rocm", "ascend", "cambricon"}


def plugin_env(*folders: str, **extra: str) -> dict[str, str]:
    paths = [os.path.join(FIXTURE, f) for f in folders]
    return dict(
        PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        **extra,
    )


def targets_json(env: dict[str, str]) -> dict[str, dict]:
    proc = run_cli("targets", "--json", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


def test_builtins_come_from_qiaos_own_entry_points():
    from qiao.backends.registry import discover

    entries = discover()
    assert BUILTINS <= set(entries)
    for name in BUILTINS:
        assert entries[name].dist == "qiao" and entries[name].value.startswith("qiao.backends.")


def test_discovery_imports_nothing():
    # Listing entries must not import any backend module (entries are import strings).
    code = (
        "import sys; from qiao.backends.registry import discover; d = discover(); "
        "print(sorted(m for m in sys.modules if m.startswith('qiao.backends.') and "
        "m.split('.')[-1] in {'cuda', 'rocm', 'ascend', 'cambricon', 'cpu'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_plugin_broken_and_duplicate_reported_together():
    rows = targets_json(plugin_env("good", "broken", "duplicate"))
    assert BUILTINS <= set(rows)
    assert all(not rows[n]["status"].startswith("broken") for n in BUILTINS)
    demo = rows["demo_ort"]
    assert demo["source"] == "qiao-demo-plugin" and demo["status"] == "ready"
    assert demo["presets"] == ["cpu (ONNX Runtime CPU execution provider)"]
    broken = rows["broken"]
    assert broken["status"].startswith("broken plugin:")
    assert "qiao_missing_native_dependency" in broken["status"]
    assert "QIAO_DISABLE_PLUGINS" in broken["status"]
    dup = rows["cpu (qiao-dup-plugin)"]
    assert "duplicate backend name 'cpu'" in dup["status"] and "qiao-dup-plugin" in dup["status"]
    assert rows["cpu"]["vendor"] == "generic (LLVM)"  # qiao's own cpu kept its name
    from qiao.backends import get_backend

    for name in BUILTINS:  # vendor and presets of every built-in, as `qiao targets` shows them
        backend = get_backend(name)
        assert rows[name]["vendor"] == backend.vendor
        assert [p.split(" (")[0] for p in rows[name]["presets"]] == list(backend.presets())


@pytest.fixture
def plugins_on_path(monkeypatch):
    """All three fixture distributions importable in this process (entry points are read live)."""
    for folder in ("good", "broken", "duplicate"):
        monkeypatch.syspath_prepend(os.path.join(FIXTURE, folder))
    monkeypatch.delenv("QIAO_DISABLE_PLUGINS", raising=False)
    return monkeypatch


@pytest.mark.parametrize("value", ["1", "true", "0", ""])
def test_disable_plugins_switch(plugins_on_path, value):
    from qiao.backends.registry import discover

    plugins_on_path.setenv("QIAO_DISABLE_PLUGINS", value)
    names = set(discover())
    if value in ("1", "true"):
        assert names == BUILTINS
    else:
        assert {"demo_ort", "broken", "cpu (qiao-dup-plugin)"} <= names


def test_registry_is_read_only_and_lazy(plugins_on_path):
    from qiao.backends.registry import BrokenBackend, discover, get_backend, list_backends

    entries = discover()
    with pytest.raises(TypeError):
        entries["x"] = entries["cpu"]  # MappingProxyType
    with pytest.raises(BrokenBackend, match="qiao_missing_native_dependency"):
        get_backend("broken")
    with pytest.raises(BrokenBackend, match="duplicate backend name 'cpu'"):
        get_backend("cpu (qiao-dup-plugin)")
    assert get_backend("cpu").vendor == "generic (LLVM)"
    assert get_backend("demo_ort").availability().status == "ready"
    errors = {entry.name: error for entry, _, error in list_backends()}
    assert (
        errors["cpu"] is None
        and errors["demo_ort"] is None
        and "failed to load" in errors["broken"]
    )


def test_broken_plugin_fails_only_when_asked_for():
    proc = run_cli("compile", "x.onnx", "--target", "broken", env=plugin_env("broken"), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "failed to load" in proc.stderr


def test_third_party_backend_compiles_and_validates(tmp_path):
    from tests.test_backends import write_tiny_onnx

    env = plugin_env("good")
    out = tmp_path / "tiny-demo"
    model = write_tiny_onnx(tmp_path / "tiny.onnx")
    proc = run_cli("validate", model, "--target", "demo_ort", "-o", str(out), env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "onnxruntime" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"]["name"] == "demo_ort" and manifest["backend"]["arch"] == "cpu"
    assert manifest["validation"]["ok"] is True


def test_unknown_target_lists_known_ones():
    from qiao.backends import get_backend
    from qiao.compiler.errors import UnknownTarget

    with pytest.raises(UnknownTarget, match="unknown target 'nosuch'") as err:
        get_backend("nosuch")
    for name in BUILTINS:
        assert name in str(err.value)
