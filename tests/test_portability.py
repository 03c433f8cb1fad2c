"""Any x86-64 (and AArch64) host: the host target describes the host by its features, artifacts
record the features their code needs and refuse a CPU that lacks them, nothing here runs code
compiled for another CPU, and AArch64 cross-compiles.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from qiao.backends import get_backend
from qiao.backends.toolchains import find_lld
from qiao.compiler import compile, load
from qiao.compiler.errors import ArtifactIncompatible, ToolchainMissing
from qiao.compiler.schedules import cpu_info
from qiao.compiler.testing import assert_close, run_cli

EM_X86_64, EM_AARCH64 = 62, 183


def elf_machine(path) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF", "not an ELF file"
    return int.from_bytes(head[18:20], "little")


@pytest.fixture
def fake_host(monkeypatch):
    """Make this process see a host CPU named ``name`` whose OS reports only ``features``."""

    def install(name: str, features):
        import tvm

        monkeypatch.setattr(tvm.target.codegen, "llvm_get_system_cpu", lambda: name)
        monkeypatch.setattr(cpu_info, "host_cpu_features", lambda: frozenset(features))

    return install


AVX2_HOST = {"sse4.1", "sse4.2", "avx", "avx2", "fma", "f16c", "bmi", "bmi2"}


def test_host_target_masks_features_the_cpu_name_implies_but_the_os_hides(fake_host):
    # A VM that calls itself Zen 4 and masks AVX-512: LLVM's CPU name alone would emit AVX-512.
    fake_host("znver4", AVX2_HOST)
    attrs = cpu_info.host_target_attrs()
    assert attrs["mcpu"] == "znver4"
    assert "-avx512f" in attrs["mattr"] and "-avx512vnni" in attrs["mattr"]
    target = get_backend("cpu").target("host")
    assert not any(f.startswith("avx512") for f in cpu_info.checked_features(target))
    info = cpu_info.cpu_info(target)
    assert (info.simd_bits, info.vector_registers) == (256, 16)  # schedules for AVX2
    assert cpu_info.missing_here(target) == []


def test_host_target_is_runnable_here():
    target = get_backend("cpu").target("host")
    assert cpu_info.missing_here(target) == []
    assert cpu_info.target_arch(target) == cpu_info.host_arch()


def _mlp_reference(artifact, x):
    sess = ort.InferenceSession(
        f"{artifact.directory}/model.onnx", providers=["CPUExecutionProvider"]
    )
    return sess.run(None, {"x": x})[0]


@pytest.mark.skipif(cpu_info.host_arch() != "x86_64", reason="x86-64-v3 code runs on x86-64 only")
def test_avx2_baseline_artifact_records_its_features_and_runs(tmp_path):
    art = compile("mlp", "cpu", tmp_path / "v3", arch="x86-64-v3")
    needs = art.manifest["backend"]["cpu"]
    assert needs["arch"] == "x86_64"
    assert {"avx2", "fma"} <= set(needs["features"])
    assert not any(f.startswith("avx512") for f in needs["features"])
    assert elf_machine(tmp_path / "v3" / "model.so") == EM_X86_64
    if cpu_info.missing_here(get_backend("cpu").target("x86-64-v3")):
        pytest.skip("this x86-64 host lacks AVX2: the artifact is checked, not run")
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    assert_close(art.run({"x": x})["logits"], _mlp_reference(art, x), rtol=1e-4, atol=1e-5)


def test_loading_on_a_cpu_without_the_features_is_a_clear_error(tmp_path, monkeypatch):
    art = compile("mlp", "cpu", tmp_path / "host")
    needed = art.manifest["backend"]["cpu"]["features"]
    assert needed, "the host target records the features its code uses"
    # The same artifact on a machine that reports none of them (checked in-process: the refusal
    # happens before the library is opened).
    monkeypatch.setattr(cpu_info, "host_cpu_features", lambda: frozenset({"sse4.1"}))
    with pytest.raises(ArtifactIncompatible, match=r"lacks .*fix:.*--arch"):
        load(art.directory).run(art.random_inputs())


@pytest.mark.skipif(
    cpu_info.host_arch() != "x86_64" or "avx512f" in (cpu_info.host_cpu_features() or ()),
    reason="needs an x86-64 host without AVX-512 to hold a real foreign artifact",
)
def test_cli_refuses_avx512_artifact_on_avx2_host(tmp_path):
    out = tmp_path / "zen4"
    proc = run_cli("compile", "mlp", "--target", "cpu", "--arch", "znver4", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (
        "avx512f" in json.loads((out / "manifest.json").read_text())["backend"]["cpu"]["features"]
    )
    for cmd in (("run", str(out)), ("validate", str(out))):
        proc = run_cli(*cmd)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "lacks avx512" in lines[0] and "Traceback" not in proc.stderr


def test_aarch64_cross_compile_needs_ld_lld(tmp_path, monkeypatch):
    from qiao.backends import cpu as cpu_backend

    target = get_backend("cpu").target("neoverse-v1")
    assert cpu_info.target_arch(target) == "aarch64"
    assert {"neon", "sve"} <= set(cpu_info.checked_features(target))
    if cpu_info.host_arch() == "aarch64":
        pytest.skip("this host is AArch64: neoverse-v1 is native here")
    monkeypatch.setattr(cpu_backend, "find_lld", lambda: None)
    with pytest.raises(ToolchainMissing, match="ld.lld.*lld-19"):
        compile("mlp", "cpu", tmp_path / "arm", arch="neoverse-v1")
    assert not (tmp_path / "arm").exists(), "no half-written artifact"


@pytest.mark.skipif(find_lld() is None, reason="ld.lld not installed (apt-get install lld-19)")
@pytest.mark.skipif(cpu_info.host_arch() == "aarch64", reason="AArch64 is native on this host")
def test_aarch64_cross_compile_writes_an_aarch64_library_that_is_refused_here(tmp_path):
    out = tmp_path / "arm"
    art = compile("mlp", "cpu", out, arch="neoverse-v1")
    assert elf_machine(out / "model.so") == EM_AARCH64
    assert art.manifest["backend"]["cpu"]["arch"] == "aarch64"
    assert art.manifest["target"]["mtriple"] == "aarch64-linux-gnu"
    # No qemu-aarch64 here: the code object is checked; running it is refused, not attempted.
    proc = run_cli("run", str(out))
    assert proc.returncode == 2 and "lacks aarch64" in proc.stderr, proc.stderr
