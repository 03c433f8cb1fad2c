"""Kills and races: ``qiao compile -o DIR`` killed at any point leaves DIR as it was or complete
(never partial) and the next compile removes what the killed one left; two compiles racing for one
DIR end with one complete, valid artifact; ``qiao tune`` killed mid-way leaves its store readable.

Two kinds of kill: deterministic ones at each step of ``artifact.staging_dir`` (a forked child
SIGKILLs itself there), and SIGKILLs of real ``qiao compile`` / ``qiao tune`` processes at seeded
random times. ``QIAO_KILL_POINTS=N`` kills N real compiles (default 2) and N real tunes (default 1).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from qiao.compiler import artifact as art

KILL_POINTS = int(os.environ.get("QIAO_KILL_POINTS", "0"))


def _leftovers(path) -> list[str]:
    parent, base = os.path.split(os.path.abspath(path))
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{base}."))


def _write_artifact(tmp: str, tag: str, files: int = 3) -> None:
    for i in range(files):
        with open(os.path.join(tmp, f"f{i}.bin"), "wb") as f:
            f.write(tag.encode() * 1000)
    art.write_manifest(tmp, {"format_version": art.FORMAT_VERSION, "tag": tag})


def _manifest(path) -> dict:
    with open(os.path.join(path, art.MANIFEST)) as f:
        return json.load(f)


def _tag(path) -> str:
    return _manifest(path)["tag"]


def _complete(path) -> bool:
    """Every file the manifest lists is there, unmodified, and nothing else."""
    return _manifest(path)["files"] == art._hash_tree(str(path))


def _die_at(out: str, step: str) -> int:
    """Fork a child that stages a new artifact 'new' into ``out`` and SIGKILLs itself at ``step``;
    returns its pid after it died."""
    pid = os.fork()
    if pid == 0:  # child: never returns
        try:
            import shutil

            die = lambda *_, **__: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
            if step == "after swap":  # the old directory is swapped out, not yet removed
                shutil.rmtree = die
            elif step == "mid removal":  # part of the old directory removed

                def partial(path, *a, **k):
                    os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
                    die()

                shutil.rmtree = partial
            with art.staging_dir(out) as tmp:
                if step == "before writing":
                    die()
                _write_artifact(tmp, "new", files=1)
                if step == "mid write":
                    die()
                _write_artifact(tmp, "new")
                if step == "before swap":
                    die()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0
    return pid


STEPS = ["before writing", "mid write", "before swap", "after swap", "mid removal"]


@pytest.mark.parametrize("existing", [True, False], ids=["over an artifact", "new directory"])
def test_killed_at_each_step_of_the_swap(tmp_path, existing):
    out = str(tmp_path / "a")
    for step in STEPS:
        if existing:
            with art.staging_dir(out) as tmp:
                _write_artifact(tmp, "old")
        elif os.path.exists(out):
            import shutil

            shutil.rmtree(out)
        _die_at(out, step)
        swapped = step in ("after swap", "mid removal")
        if existing or swapped:
            assert _complete(out), step
            assert _tag(out) == ("new" if swapped else "old"), step
        else:
            assert not os.path.exists(out), step
        # the next write removes what the killed process left
        with art.staging_dir(out) as tmp:
            _write_artifact(tmp, "next")
        assert _tag(out) == "next" and _complete(out)
        assert _leftovers(out) == [], (step, _leftovers(out))


def test_live_writers_staging_is_not_removed(tmp_path):
    """A concurrent writer's staging directory (its process alive) survives another's cleanup."""
    out = str(tmp_path / "a")
    parent = str(tmp_path)
    live = os.path.join(parent, f".a.tmp-{os.getppid()}-xyz")  # pytest's parent: alive
    os.mkdir(live)
    with art.staging_dir(out) as tmp:
        _write_artifact(tmp, "x")
    assert os.path.isdir(live)


def test_racing_writers_end_with_one_complete_artifact(tmp_path):
    """Eight processes stage into one directory at once: each swap is whole, the result is one of
    them, complete, and nothing is left beside it."""
    out = str(tmp_path / "a")
    pids = []
    for i in range(8):
        pid = os.fork()
        if pid == 0:
            try:
                with art.staging_dir(out) as tmp:
                    _write_artifact(tmp, f"w{i}", files=20)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert _tag(out) in {f"w{i}" for i in range(8)}
    assert _complete(out)
    assert _leftovers(out) == []


# ----------------------------------------------------------------------------------------------
# Real processes


def _model(path: str, seed: int) -> str:
    import numpy as np
    import onnx

    from tests.test_malformed import tiny_model

    model = tiny_model()
    rng = np.random.default_rng(seed)
    for t in model.graph.initializer:
        arr = onnx.numpy_helper.to_array(t)
        t.CopyFrom(
            onnx.numpy_helper.from_array(rng.standard_normal(arr.shape).astype(arr.dtype), t.name)
        )
    onnx.save(model, path)
    return path


def _start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qiao.compiler.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill takes its children too
        env=dict(os.environ, **(env or {})),
    )


def _kill_after(proc: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL ``proc``'s group after ``seconds``; False when it finished before."""
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _source_sha(path) -> str:
    return art.read_manifest(str(path))["source"]["sha256"]


@pytest.mark.slow
def test_compile_killed_at_random_times(tmp_path):
    from qiao.compiler.driver import model_files_sha256

    old_model, new_model = (
        _model(str(tmp_path / "old.onnx"), 1),
        _model(str(tmp_path / "new.onnx"), 2),
    )
    out = str(tmp_path / "a")
    start = time.monotonic()
    proc = _start("compile", old_model, "-o", out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    full = time.monotonic() - start
    shas = {model_files_sha256(old_model): "old", model_files_sha256(new_model): "new"}
    rng = random.Random(5)
    killed = 0
    for point in range(KILL_POINTS or 2):
        proc = _start("compile", new_model, "-o", out)
        # the first mid-way (a compile is never that much faster than the first), others anywhere
        killed += _kill_after(proc, full * 0.5 if point == 0 else rng.uniform(0.2, full * 1.1))
        assert shas[_source_sha(out)] in ("old", "new")  # read_manifest verifies every file
    proc = _start("compile", old_model, "-o", out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    assert shas[_source_sha(out)] == "old"
    assert _leftovers(out) == []
    print(
        f"\n{killed} of {KILL_POINTS or 2} compiles killed mid-way (a full one took {full:.1f} s)"
    )
    assert killed, f"no compile was killed mid-way (a full compile took {full:.1f} s)"


@pytest.mark.slow
def test_two_compiles_racing_for_one_directory(tmp_path):
    from qiao.compiler import load

    models = [_model(str(tmp_path / f"m{i}.onnx"), i) for i in range(2)]
    out = str(tmp_path / "a")
    procs = [_start("compile", m, "-o", out) for m in models]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    artifact = load(out)
    assert artifact.manifest["source"]["path"] in models
    assert artifact.run(artifact.random_inputs())["y"].shape == (2, 4)
    assert _leftovers(out) == []


def _records_files(root: str) -> list[str]:
    return [
        os.path.join(d, n) for d, _, files in os.walk(root) for n in files if n == "records.json"
    ]


@pytest.mark.slow
def test_tune_killed_leaves_its_store_readable(tmp_path):
    """Each tune (a fresh store each time) is killed a random moment after its first record is
    written, while it measures or writes the second kernel's; the store reads back, ``qiao tune
    show`` reads it, and a tune run on the last one completes it."""
    model = _model(str(tmp_path / "m.onnx"), 0)  # two GEMM kernels
    rng = random.Random(6)
    killed = 0
    for point in range(KILL_POINTS or 1):
        cache = str(tmp_path / f"cache{point}")
        env = {"QIAO_CACHE_DIR": cache}
        proc = _start("tune", "model", model, "--trials", "2", env=env)
        while proc.poll() is None and not _records_files(cache):
            time.sleep(0.05)
        killed += _kill_after(proc, rng.uniform(0, 1))
        for path in _records_files(cache):
            with open(path) as f:
                data = json.load(f)  # never half a file
            assert isinstance(data["records"], dict) and data["records"]
        show = subprocess.run(
            [sys.executable, "-m", "qiao.compiler.cli", "tune", "show"],
            capture_output=True,
            text=True,
            env=dict(os.environ, **env),
            timeout=120,
        )
        assert show.returncode == 0, show.stderr
    proc = _start("tune", "model", model, "--trials", "2", env=env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    with open(_records_files(cache)[0]) as f:
        assert len(json.load(f)["records"]) == 2
    print(f"\n{killed} of {KILL_POINTS or 1} tunes killed after writing records")
    assert killed
