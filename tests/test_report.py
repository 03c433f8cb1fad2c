"""`qiao report`: merging results from several machines, the Markdown table, valid PNG plots, and
the refusal of unknown schema versions (library and CLI exit code)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qiao.compiler import QiaoError
from qiao.compiler.bench import SCHEMA, SCHEMA_VERSION
from qiao.compiler.report import flatten, load_results, write_report
from qiao.compiler.testing import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _engine(median: float, batch: int) -> dict:
    samples = [median * f for f in (0.9, 1.0, 1.3)]
    return {
        "latency_s": {
            "mean": float(np.mean(samples)),
            "median": median,
            "p90": max(samples),
            "p99": max(samples),
            "min": min(samples),
            "max": max(samples),
            "std": float(np.std(samples)),
            "n": 3,
        },
        "samples_s": samples,
        "number": 1,
        "throughput": {"samples_per_s": batch / float(np.mean(samples))},
        "peak_rss_delta_mib": 1.0,
    }


def make_result(label, target, medians, flops=True, roofs=None, version=SCHEMA_VERSION):
    """A result document written by hand (not by ``bench``); ``medians``: batch → {engine: s}."""
    cases = []
    for batch, engines in medians.items():
        qiao = engines["qiao"]
        cases.append(
            {
                "target": target,
                "arch": None,
                "size": {"batch": batch},
                "dims": {"batch": batch},
                "samples_per_call": batch,
                "tokens_per_call": None,
                "flops": 1000 * batch if flops else None,
                "bytes": 400 + 8 * batch if flops else None,
                "engines": {name: _engine(m, batch) for name, m in engines.items()},
                "speedup": {n: m / qiao for n, m in engines.items() if n != "qiao"},
                "check": {n: {"ok": True, "max_abs": 1e-7} for n in engines if n != "qiao"},
            }
        )
    return {
        "schema": SCHEMA,
        "schema_version": version,
        "label": label,
        "machine": {
            "hostname": label,
            "cpu": {"model": f"{label} CPU", "cores_usable": 8},
            "gpus": [],
            "os": {"platform": "Linux"},
        },
        "software": {"qiao": "0.1.0", "apache-tvm": "0.27.0", "onnxruntime": "1.2", "torch": "2"},
        "settings": {},
        "model": {"name": "mlp"},
        "targets": [{"target": target, "arch": None, "status": "ok", "notes": [], "roofs": roofs}],
        "cases": cases,
    }


def _write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _assert_png(path):
    import matplotlib.image as mpimg

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert np.ptp(image[..., :3]) > 0, f"{path} is blank"


def test_report_merges_machines(tmp_path):
    laptop = make_result(
        "laptop",
        "cpu",
        {1: {"qiao": 2e-4, "onnxruntime-cpu": 3e-4}, 16: {"qiao": 1e-3, "onnxruntime-cpu": 5e-4}},
        roofs={"peak_gflops": 100.0, "bandwidth_gbs": 20.0},
    )
    h100 = make_result(
        "h100",
        "cuda",
        {1: {"qiao": 5e-5, "onnxruntime-cuda": 1e-4}, 16: {"qiao": 6e-5, "onnxruntime-cuda": 9e-5}},
    )
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    _write(results_dir, "laptop.json", laptop)
    _write(results_dir, "h100.json", h100)
    results = load_results([results_dir])  # a directory stands for its *.json files
    assert len(results) == 2
    written = write_report(results, tmp_path / "report")
    for kind in ("latency", "speedup", "roofline"):
        _assert_png(written[kind])
    text = open(written["markdown"]).read()
    assert "| laptop |" in text and "| h100 |" in text
    # every case is one table row, with the speed-up computed from the medians written above
    rows = [line for line in text.splitlines() if line.startswith("| mlp |")]
    assert len(rows) == 4 + 4  # latency table + roofline table
    for doc in (laptop, h100):
        for case in doc["cases"]:
            for name, timed in case["engines"].items():
                if name != "qiao":
                    ratio = (
                        timed["latency_s"]["median"]
                        / case["engines"]["qiao"]["latency_s"]["median"]
                    )
                    assert f"×{ratio:.2f}" in text
    # roofline ceiling for the laptop at batch 16: min(peak, bandwidth * intensity)
    intensity = 16000 / (400 + 8 * 16)
    assert f"{min(100.0, 20.0 * intensity):.4g}" in text


def test_report_without_flops_has_no_roofline(tmp_path):
    doc = make_result("box", "cpu", {4: {"qiao": 1e-3}}, flops=False)
    written = write_report(load_results([_write(tmp_path, "a.json", doc)]), tmp_path / "out")
    assert "roofline" not in written and "speedup" not in written
    _assert_png(written["latency"])
    rows = flatten([doc])
    assert len(rows) == 1 and rows[0].intensity is None


def test_report_refuses_unknown_schema(tmp_path):
    bad = _write(tmp_path, "future.json", make_result("x", "cpu", {1: {"qiao": 1e-3}}, version=7))
    with pytest.raises(QiaoError, match="schema version 7"):
        load_results([bad])
    other = _write(tmp_path, "other.json", {"benchmarks": []})
    with pytest.raises(QiaoError, match="not a qiao bench result"):
        load_results([other])
    with pytest.raises(QiaoError, match="no such file"):
        load_results([tmp_path / "missing.json"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(QiaoError, match="not readable JSON"):
        load_results([tmp_path / "broken.json"])


def test_cli_report(tmp_path):
    good = _write(
        tmp_path, "good.json", make_result("box", "cpu", {1: {"qiao": 1e-3, "torch-cpu": 2e-3}})
    )
    proc = run_cli("report", str(good), "-o", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rep" / "report.md").is_file()
    _assert_png(tmp_path / "rep" / "speedup.png")
    bad = _write(tmp_path, "bad.json", make_result("x", "cpu", {1: {"qiao": 1e-3}}, version=2))
    proc = run_cli("report", str(good), str(bad), "-o", str(tmp_path / "rep2"))
    assert proc.returncode == 2
    assert "schema version 2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
