"""``qiao pack`` bundles run where only Python and NumPy are installed, and match ONNX Runtime.

A fresh virtual environment with NumPy alone (made once per session; skipped with the reason when
the package registry is unreachable) runs the bundles' ``run.py``; ONNX Runtime's outputs are
computed here, outside it. Tampered files and CPUs lacking the code's features are refused with
exit code 2 and a message naming the problem.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv

import numpy as np
import pytest

from qiao.compiler.errors import ArtifactCorrupt, QiaoError
from qiao.compiler.pack import CPU_SIZE_LIMIT, TEMPLATE_DIR, pack
from qiao.compiler.testing import assert_close, has_cuda_gpu, has_nvcc, run_cli
from qiao.compiler.validate import onnxruntime_reference


@pytest.fixture(scope="session")
def numpy_python(tmp_path_factory) -> str:
    """A Python with NumPy and nothing else (no qiao, tvm, torch, onnx, onnxruntime)."""
    env = tmp_path_factory.mktemp("numpy-only-venv")
    try:
        venv.create(env, with_pip=False)  # ensurepip is slow; this pip installs into it instead
        python = str(env / "bin" / "python")
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "numpy"],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (subprocess.SubprocessError, OSError) as err:
        detail = getattr(err, "stderr", "") or err
        pytest.skip(f"cannot make a NumPy-only virtual environment here: {str(detail)[-300:]}")
    probe = subprocess.run(
        [python, "-c", "import numpy; import importlib.util as u; "
         "print([m for m in ('tvm', 'tvm_ffi', 'qiao', 'torch', 'onnx', 'onnxruntime') "
         "if u.find_spec(m)])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == "[]", f"the NumPy-only venv sees {probe.stdout}"
    return python


# The MoE model: Qwen3-30B-A3B's MoE block (router, top-k, SwiGLU experts) at small dimensions,
# which compiles in a quarter of the time of the qwen3-moe-tiny decoder.
MOE_BLOCK = ("qwen3-moe-30b-a3b-block", {"hidden_size": 64, "num_experts": 8,
             "num_experts_per_tok": 2, "moe_intermediate_size": 32})  # fmt: skip


@pytest.fixture(scope="session")
def bundles(compiled_builtin, tmp_path_factory):
    """``bundles(name)`` → (artifact, bundle folder) of ``mlp`` or ``moe-block``, packed with
    reference outputs."""
    from qiao.compiler import compile

    root = tmp_path_factory.mktemp("bundles")
    cache = {}

    def get(name: str):
        if name not in cache:
            if name == "moe-block":
                model, options = MOE_BLOCK
                artifact = compile(model, "cpu", root / "art-moe", model_options=options)
            else:
                artifact = compiled_builtin(name)
            cache[name] = (artifact, pack(artifact.directory, root / name, with_reference=True))
        return cache[name][0], str(root / name)

    return get


def run_bundle(python: str, bundle: str, *args: str) -> subprocess.CompletedProcess:
    # From an unrelated folder, with no PYTHONPATH: nothing of this checkout can leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run(
        [python, os.path.join(bundle, "run.py"), *args],
        capture_output=True, text=True, timeout=300, cwd=os.path.dirname(bundle), env=env,
    )  # fmt: skip


def copy_bundle(bundle: str, tmp_path) -> str:
    dest = str(tmp_path / "copy")
    shutil.copytree(bundle, dest)
    return dest


@pytest.mark.parametrize("name", ["mlp", "moe-block"])
def test_bundle_matches_onnxruntime_with_numpy_only(name, bundles, numpy_python, tmp_path):
    artifact, bundle = bundles(name)
    manifest = json.load(open(os.path.join(bundle, "bundle.json")))
    files = manifest["files"]
    assert not [f for f in files if "libtvm_compiler" in f or f.startswith("artifact/model.onnx")]
    weights = os.path.getsize(os.path.join(bundle, "artifact", "params.npz"))
    size = sum(os.path.getsize(os.path.join(bundle, f)) for f in files)
    assert size - weights < CPU_SIZE_LIMIT, f"{size - weights} bytes without weights"

    # The stored reference (ONNX Runtime at pack time, on the model's example inputs).
    check = run_bundle(numpy_python, bundle, "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "PASS" in check.stdout and "vs onnxruntime" in check.stdout

    # Other inputs, another batch size; ONNX Runtime runs here, outside the NumPy-only Python.
    dims = {d: 3 for s in artifact.inputs for d in s["shape"] if isinstance(d, str)}
    inputs = artifact.random_inputs(seed=7, dims=dims)
    np.savez(tmp_path / "in.npz", **inputs)
    run = run_bundle(numpy_python, bundle, "-i", str(tmp_path / "in.npz"), "-o", "out.npz")
    assert run.returncode == 0, run.stdout + run.stderr
    with np.load(os.path.join(os.path.dirname(bundle), "out.npz")) as data:
        got = {k: data[k] for k in data.files}
    expected = onnxruntime_reference(os.path.join(artifact.directory, "model.onnx"), inputs)
    ref = manifest["reference"]
    assert ref["rtol"] <= 1e-3 and ref["atol"] <= 1e-4  # the model's own float32 tolerances
    assert_close(got, expected, rtol=ref["rtol"], atol=ref["atol"], name=name)


def test_tampered_file_refused(bundles, numpy_python, tmp_path):
    _, bundle = bundles("mlp")
    bundle = copy_bundle(bundle, tmp_path)
    with open(os.path.join(bundle, "artifact", "params.npz"), "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    result = run_bundle(numpy_python, bundle, "--check")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "modified: artifact/params.npz" in result.stderr
    os.remove(os.path.join(bundle, "lib", "libtvm_runtime.so"))
    result = run_bundle(numpy_python, bundle, "--check")
    assert result.returncode == 2 and "missing: lib/libtvm_runtime.so" in result.stderr


def _runtime_module():
    spec = importlib.util.spec_from_file_location(
        "qiao_runtime_template", os.path.join(TEMPLATE_DIR, "qiao_runtime.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_lacking_features_refused(bundles, numpy_python, tmp_path):
    """A bundle whose code needs a SIMD feature this CPU lacks, or another architecture, stops
    before loading the library (the manifest is edited: running such code here would crash)."""
    from qiao.compiler.schedules.cpu_info import host_cpu_features

    _, bundle = bundles("mlp")
    bundle = copy_bundle(bundle, tmp_path)
    path = os.path.join(bundle, "bundle.json")
    manifest = json.load(open(path))
    lacking = sorted(set(_runtime_module().X86_FLAGS.values()) - set(host_cpu_features() or ()))
    if not lacking:
        pytest.skip("this CPU has every feature qiao checks")
    manifest["cpu"]["features"].append(lacking[0])
    json.dump(manifest, open(path, "w"))
    result = run_bundle(numpy_python, bundle, "--check")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"lacks {lacking[0]}" in result.stderr and "--arch" in result.stderr
    manifest["cpu"]["arch"] = "aarch64"
    json.dump(manifest, open(path, "w"))
    result = run_bundle(numpy_python, bundle, "--check")
    assert result.returncode == 2 and "lacks aarch64" in result.stderr


def test_runtime_feature_tables_match_qiao():
    """The bundle's copy of the /proc/cpuinfo → LLVM feature tables (it cannot import qiao)."""
    from qiao.compiler.schedules import cpu_info

    runtime = _runtime_module()
    assert runtime.X86_FLAGS == cpu_info._X86_FLAGS
    assert runtime.ARM_FLAGS == cpu_info._ARM_FLAGS


# /proc/cpuinfo openings: (text, family name); the first processor's block decides
_CPUINFO = [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n\n"
     "processor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n", "amd-26"),
    ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n", "intel-6"),
    ("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n", None),
    ("processor\t: 0\nvendor_id\t: HygonGenuine\ncpu family\t: 24\n", None),
    ("vendor_id\t: AuthenticAMD\ncpu family\t: x\n", None),
]  # fmt: skip


@pytest.mark.parametrize("text,family", _CPUINFO)
def test_runtime_cpu_family_matches_qiao(text, family, monkeypatch):
    """The bundle's copy of the CPU family the kernels choose by (it cannot import qiao): the
    same name from the same /proc/cpuinfo text, published under the same variable with the same
    code, and a value the user set is kept."""
    from qiao.compiler.schedules import cpu_info

    runtime = _runtime_module()
    assert cpu_info.cpu_family_of(text) == runtime.cpu_family_of(text) == family
    assert runtime.CPU_FAMILY_ENV == cpu_info.CPU_FAMILY_ENV
    assert (runtime.CPU_VENDORS, runtime.CPU_VENDOR_CODES) == (
        cpu_info.CPU_VENDORS,
        cpu_info.CPU_VENDOR_CODES,
    )
    host = cpu_info.host_cpu_family()
    for publish in (runtime.publish_cpu_family, cpu_info.publish_cpu_family):
        monkeypatch.delenv(cpu_info.CPU_FAMILY_ENV, raising=False)
        publish()
        expected = cpu_info.cpu_family_code(host) if host else 0
        assert os.environ[cpu_info.CPU_FAMILY_ENV] == str(expected)
        monkeypatch.setenv(cpu_info.CPU_FAMILY_ENV, "7")
        publish()
        assert os.environ[cpu_info.CPU_FAMILY_ENV] == "7"


def test_runtime_huge_page_rule_matches_qiao():
    """The bundle's copy of the runner's huge-page rule (it cannot import qiao): the same
    thresholds, and the same answer for a region without a whole 2 MB page."""
    from qiao.backends import tvm_backend

    runtime = _runtime_module()
    assert runtime.HUGE_PAGE_BYTES == tvm_backend.HUGE_PAGE_BYTES
    assert runtime.HUGE_PAGE_MIN_BYTES == tvm_backend.HUGE_PAGE_MIN_BYTES
    inside = (runtime.HUGE_PAGE_BYTES + 64, runtime.HUGE_PAGE_BYTES)
    assert runtime.advise_huge_pages(*inside) is tvm_backend.advise_huge_pages(*inside) is False


HUGE_PAGE_CHECK = """
import json, re, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import qiao_runtime as rt
bundle = rt.Bundle(sys.argv[1])
maps = re.split(r"\\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read())
def advised(ptr):
    page = -(-ptr // rt.HUGE_PAGE_BYTES) * rt.HUGE_PAGE_BYTES
    for block in maps:
        lo, hi = (int(x, 16) for x in block.split()[0].split("-"))
        if lo <= page < hi:
            return "hg" in re.search(r"VmFlags:(.*)", block).group(1).split()
large = [p for p in bundle.params if rt.Bundle._large_host_copyable(p)]
y = bundle.run({"x": np.load(sys.argv[2])})["y"]
np.save(sys.argv[3], y)
print(json.dumps([advised(p.data_ptr()) for p in large]))
"""


def test_bundle_keeps_large_weights_on_huge_pages(numpy_python, tmp_path):
    """A CPU bundle whose 8 MB weight is packed at load, run with NumPy only: its packed weight
    sits on memory advised onto huge pages, and the layer computes x @ w."""
    from qiao.compiler import compile
    from tests.test_huge_pages import THP_REASON, _thp_mode, dense_onnx

    if not sys.platform.startswith("linux") or _thp_mode() in (None, "never"):
        pytest.skip(THP_REASON)
    path, w = dense_onnx(tmp_path)
    artifact = compile(str(path), "cpu", tmp_path / "art")
    bundle = tmp_path / "bundle"
    pack(artifact.directory, bundle)
    x = np.random.default_rng(3).standard_normal((4, w.shape[0])).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "check.py").write_text(HUGE_PAGE_CHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    run = subprocess.run(
        [numpy_python, str(tmp_path / "check.py"), str(bundle), str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [True]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), x @ w, rtol=1e-4, atol=1e-3)


def test_bad_inputs_exit_2(bundles, numpy_python, tmp_path):
    _, bundle = bundles("mlp")
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 63), np.float32))
    result = run_bundle(numpy_python, bundle, "-i", str(tmp_path / "bad.npz"))
    assert result.returncode == 2 and "axis" not in result.stderr
    assert "expected shape (batch, 64)" in result.stderr


def test_bundle_refuses_sizes_outside_the_compiled_range(numpy_python, tmp_path):
    """An artifact compiled with ``dim_ranges`` (memory planned for at most that many) keeps the
    range in its bundle: the NumPy-only runtime runs a batch inside it and refuses one outside,
    exit 2, naming the range and the fix."""
    from qiao.compiler import compile

    artifact = compile("mlp", "cpu", tmp_path / "art", dim_ranges={"batch": (1, 4)})
    pack(artifact.directory, tmp_path / "bundle")
    for batch, code in ((4, 0), (5, 2)):
        np.savez(tmp_path / "in.npz", x=np.ones((batch, 64), np.float32))
        result = run_bundle(numpy_python, str(tmp_path / "bundle"), "-i", str(tmp_path / "in.npz"))
        assert result.returncode == code, result.stderr
    assert "batch=5 is outside the range 1..4" in result.stderr
    assert "--dim-range batch=1:5" in result.stderr and "Traceback" not in result.stderr


def test_pack_refuses_bad_input(tmp_path, bundles):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ArtifactCorrupt, match="not a qiao artifact"):
        pack(tmp_path / "notes", tmp_path / "b")
    artifact, _ = bundles("mlp")
    with pytest.raises(QiaoError, match="not a qiao bundle; refusing"):
        pack(artifact.directory, tmp_path / "notes")
    result = run_cli("pack", str(tmp_path / "missing"), "-o", str(tmp_path / "b"))
    assert result.returncode == 2 and "error:" in result.stderr
    assert not (tmp_path / "b").exists()


def test_device_check_script_cpu(compiled_builtin, tmp_path):
    """benchmarks/device/check.sh for the CPU, end to end (CI's "device" is this machine): the
    folder's bundle matches ONNX Runtime, qiao and PyTorch eager are timed, the results are
    `qiao bench` documents."""
    from qiao.compiler.bench.schema import check_result

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "device", "check.sh")
    mlp = compiled_builtin("mlp").directory
    out = tmp_path / "chk"
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", script, "cpu", "--models", "mlp", "--from", f"mlp={mlp}", "-o", str(out),
         "--repeat", "5"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    plan = json.load(open(out / "check.json"))
    assert plan["folder_bytes"] < 60 * 2**20
    summary = json.load(open(out / "check_result.json"))
    assert summary["ok"] and [m["model"] for m in summary["models"]] == ["mlp"]
    assert summary["models"][0]["qiao_ms"] > 0 and summary["models"][0]["pytorch_ms"] > 0
    doc = check_result(json.load(open(out / "results" / "mlp.json")))
    assert doc["cases"][0]["check"]["onnxruntime"]["ok"]
    assert "PASS" in result.stdout and "mlp" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(
    not (has_cuda_gpu() and has_nvcc()),
    reason="no NVIDIA GPU with nvcc here: CUDA bundles are built by benchmarks/device/check.sh "
    "cuda and run on the GPU machine",
)
def test_cuda_bundle_matches_onnxruntime(numpy_python, tmp_path):
    from qiao.compiler import compile

    artifact = compile("mlp", "cuda", tmp_path / "art")
    bundle = str(tmp_path / "bundle")
    manifest = pack(artifact.directory, bundle, with_reference=True)
    assert "lib/libtvm_runtime_cuda.so" in manifest["files"]
    check = run_bundle(numpy_python, bundle, "--check")
    assert check.returncode == 0 and "vs onnxruntime" in check.stdout, check.stdout + check.stderr


def test_other_python_refused(bundles, numpy_python, tmp_path):
    """A bundle packed for another Python says which one, instead of failing inside tvm_ffi."""
    _, bundle = bundles("mlp")
    bundle = copy_bundle(bundle, tmp_path)
    path = os.path.join(bundle, "bundle.json")
    manifest = json.load(open(path))
    manifest["python"] = "3.99"
    json.dump(manifest, open(path, "w"))
    result = run_bundle(numpy_python, bundle, "--check")
    assert result.returncode == 2 and "packed for Python 3.99" in result.stderr
    assert "qiao pack --python" in result.stderr
