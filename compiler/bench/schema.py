"""The result document: its schema name and version, the definitions it carries, the check that a
file is one this qiao reads, and writing it."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from qiao.compiler.errors import QiaoError

SCHEMA = "qiao-bench"
SCHEMA_VERSION = 1
DEFINITIONS = {
    "latency": "seconds per call; each sample is the mean of `number` back-to-back calls, "
    "`repeat` samples per engine and case; std is the population standard deviation of the "
    "samples; p90/p99 interpolate linearly between samples",
    "qiao_timing": "TVM's time evaluator on the Relax VM (device-synchronised; inputs already on "
    "the device, so host-side conversion is excluded; one discarded call before the samples)",
    "baseline_timing": "time.perf_counter around calls on inputs already in the engine's format "
    "(numpy for ONNX Runtime CPU, device OrtValues with IO binding for its GPU providers, torch "
    "tensors on the device with a synchronise after each call for PyTorch)",
    "throughput": "items per second = items per call / mean latency (sustained rate)",
    "speedup": "baseline median latency / qiao median latency (>1: qiao is faster)",
    "compile_s": "wall time of qiao.compiler.compile (includes the ONNX export of built-in models)",
    "memory": "host process peak RSS during one engine's warm-up and timed runs of one case, "
    "minus the RSS before them (Linux VmHWM, reset per case); device memory is not included",
    "flops": "estimate from the ONNX graph with the case's sizes: 2*M*N*K per "
    "MatMul/Gemm/FusedMatMul, 2*outputs*(Cin/groups)*kernel per Conv/ConvTranspose, "
    "2*tokens*k*expert weights per com.microsoft MoE; other operators are not counted",
    "bytes": "estimate: weights + graph inputs + outputs, each moved once (MoE: only the experts "
    "that tokens*k routes can reach)",
}

REQUIRED = {
    "top": (
        "schema",
        "schema_version",
        "machine",
        "software",
        "settings",
        "model",
        "targets",
        "cases",
    ),
    "case": ("target", "size", "engines", "speedup", "check", "flops", "bytes"),
    "latency": ("mean", "median", "p90", "p99", "min", "std", "n"),
}


def check_result(doc: Any, source: str = "result") -> dict[str, Any]:
    """Check that ``doc`` is a result this qiao reads; raise ``QiaoError`` saying why not."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise QiaoError(
            f'{source} is not a qiao bench result (no "schema": "{SCHEMA}"). fix: pass files '
            "written by `qiao bench -o FILE`"
        )
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise QiaoError(
            f"{source} has result schema version {version!r}; this qiao reads version "
            f"{SCHEMA_VERSION}. fix: rerun `qiao bench` with this qiao, or use the qiao version "
            "that wrote it"
        )
    missing = [k for k in REQUIRED["top"] if k not in doc]
    for i, case in enumerate(doc.get("cases") if isinstance(doc.get("cases"), list) else []):
        if not isinstance(case, dict):
            continue  # _wrong_types names it
        missing += [f"cases[{i}].{k}" for k in REQUIRED["case"] if k not in case]
        engines = case.get("engines")
        for name, engine in (engines if isinstance(engines, dict) else {}).items():
            stats = engine.get("latency_s", {}) if isinstance(engine, dict) else {}
            stats = stats if isinstance(stats, dict) else {}
            missing += [
                f"cases[{i}].engines.{name}.latency_s.{k}"
                for k in REQUIRED["latency"]
                if k not in stats
            ]
    if missing:
        raise QiaoError(
            f"{source} is missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}. "
            "fix: rerun `qiao bench`; do not edit result files by hand"
        )
    wrong = _wrong_types(doc)
    if wrong:
        raise QiaoError(
            f"{source} has fields of the wrong type or value: {', '.join(wrong[:6])}"
            f"{' ...' if len(wrong) > 6 else ''}. fix: rerun `qiao bench`; do not edit result "
            "files by hand"
        )
    return doc


def _is_number(value: Any, positive: bool = False) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return ok and (value > 0 if positive else value >= 0)


def _wrong_types(doc: Mapping[str, Any]) -> list[str]:
    """The fields ``qiao report`` reads whose type or value it cannot use (a damaged file)."""
    wrong = [
        k for k in ("machine", "software", "settings", "model") if not isinstance(doc[k], dict)
    ]
    targets, cases = doc["targets"], doc["cases"]
    if not isinstance(targets, list) or not all(
        isinstance(t, dict) and isinstance(t.get("target"), str) for t in targets
    ):
        wrong.append("targets")
    if not isinstance(cases, list):
        return wrong + ["cases"]
    for i, case in enumerate(cases):
        where = f"cases[{i}]"
        if not isinstance(case, dict):
            wrong.append(where)
            continue
        for key in ("size", "engines", "speedup", "check"):
            if not isinstance(case.get(key), dict):
                wrong.append(f"{where}.{key}")
        if not isinstance(case.get("target"), str):
            wrong.append(f"{where}.target")
        for key in ("flops", "bytes"):
            if case.get(key) is not None and not _is_number(case[key]):
                wrong.append(f"{where}.{key}")
        for name, value in (
            (case.get("speedup") or {}).items() if isinstance(case.get("speedup"), dict) else ()
        ):
            if not _is_number(value, positive=True):
                wrong.append(f"{where}.speedup.{name}")
        if isinstance(case.get("check"), dict) and not all(
            isinstance(c, dict) for c in case["check"].values()
        ):
            wrong.append(f"{where}.check")
        engines = case.get("engines") if isinstance(case.get("engines"), dict) else {}
        if engines and "qiao" not in engines:
            wrong.append(f"{where}.engines.qiao")
        for name, engine in engines.items():
            stats = engine.get("latency_s") if isinstance(engine, dict) else None
            if not isinstance(stats, dict) or not isinstance(engine.get("throughput", {}), dict):
                wrong.append(f"{where}.engines.{name}")
                continue
            wrong += [
                f"{where}.engines.{name}.latency_s.{k}"
                for k in REQUIRED["latency"]
                if not _is_number(stats.get(k), positive=k in ("median", "mean"))
            ]
    return wrong


def write_result(result: Mapping[str, Any], path: str) -> None:
    """Write a result document as JSON (atomically: a temporary file renamed into place)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
