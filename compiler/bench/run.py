"""``bench``: compile (or take an artifact), then time every engine on every size of every target
and check the outputs against every baseline; returns the result document (``schema``)."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qiao.compiler.bench.cost import estimate_cost, load_source
from qiao.compiler.bench.engines import BASELINES, Engine, QiaoEngine, baseline_engines
from qiao.compiler.bench.memory import PeakRSS
from qiao.compiler.bench.roofs import measure_cpu_roofs
from qiao.compiler.bench.schema import DEFINITIONS, SCHEMA, SCHEMA_VERSION
from qiao.compiler.bench.sizes import plan_sizes
from qiao.compiler.bench.stats import latency_stats
from qiao.compiler.bench.targets import parse_targets, runs_on_host_cpu
from qiao.compiler.bench.timing import settle
from qiao.compiler.errors import QiaoError


def _is_artifact_dir(model) -> bool:
    from qiao.compiler import artifact as art

    return isinstance(model, (str, os.PathLike)) and os.path.isfile(
        os.path.join(os.fspath(model), art.MANIFEST)
    )


def _check(artifact, actual, expected, reference: str) -> dict[str, Any]:
    from qiao.compiler.validate import compare, tolerances

    rtol, atol = tolerances(artifact, None, None)
    rows = [
        compare(n, reference, actual[n], expected[n], rtol, atol) for n in actual if n in expected
    ]
    if not rows:
        return {"ok": False, "max_abs": None, "note": "no output names in common"}
    return {
        "ok": all(r.ok for r in rows),
        "max_abs": max(r.max_abs for r in rows),
        "rtol": rtol,
        "atol": atol,
    }


def _engine_result(samples, number, samples_per_call, tokens_per_call, cost, memory) -> dict:
    stats = latency_stats(samples)
    out: dict[str, Any] = {
        "latency_s": stats,
        "samples_s": [float(s) for s in samples],
        "number": number,
        "throughput": {"samples_per_s": samples_per_call / stats["mean"]},
        "peak_rss_delta_mib": memory,
    }
    if tokens_per_call is not None:
        out["throughput"]["tokens_per_s"] = tokens_per_call / stats["mean"]
    if cost is not None:
        out["achieved_gflops"] = cost["flops"] / stats["median"] / 1e9
    return out


def bench(
    model,
    targets: str | Sequence[str] | None = None,
    *,
    arch: str | None = None,
    baselines: Sequence[str] = BASELINES,
    tokens: Sequence[int] | None = None,
    batch: Sequence[int] | None = None,
    dims: Mapping[str, int] | None = None,
    dim_ranges: Mapping[str, tuple[int, int]] | None = None,
    warmup: int = 3,
    repeat: int = 30,
    min_time: float = 0.5,
    seed: int = 0,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    artifact_dir: str | None = None,
    label: str | None = None,
    roofs: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark ``model`` on each target against the baselines; returns the result document.

    Parameters
    ----------
    model : str or os.PathLike
        Built-in model name, ``.onnx`` path, or an artifact directory (then ``targets`` must be the
        artifact's backend or omitted).
    targets : str or list of str, optional
        ``"cpu,cuda:sm_90"``; ``TARGET:ARCH`` picks a device preset per target. Default: ``cpu``, or
        the artifact's own target.
    arch : str, optional
        Device preset when there is one target.
    baselines : list of str
        Any of ``onnxruntime``, ``torch``; empty for qiao alone.
    tokens, batch : list of int, optional
        Sizes for the token or batch dimension (see ``plan_sizes``); at most one of the two.
    dims : dict, optional
        Values of the other symbolic dims (default 1).
    dim_ranges : dict, optional
        Compile option: ``{symbolic dim: (min, max)}`` the artifact serves (memory planned for
        ``max``; ``qiao compile --dim-range``). Not with an existing artifact.
    warmup, repeat, min_time
        Untimed calls, timed samples per engine and case, and the minimum total seconds of timed
        calls per engine and case (``number`` calls per sample is chosen to reach it).
    rpc_tracker, rpc_key : str, optional
        Run the artifact on a remote device through TVM's RPC tracker (both or neither).
    artifact_dir : str, optional
        Keep the compiled artifacts here (default: a temporary directory, removed afterwards).
    label : str, optional
        Name of this machine in reports (default: the host name, or the RPC key).
    roofs : bool
        Measure this CPU's attainable GEMM and copy ceilings for the roofline view (CPU targets).
    progress : callable, optional
        Called with one line of text at each step.

    Returns
    -------
    dict
        The result document (schema ``SCHEMA`` version ``SCHEMA_VERSION``).
    """
    from qiao.compiler.driver import __version__, compile, load
    from qiao.compiler.fingerprint import machine_fingerprint, software_versions

    say = progress or (lambda _msg: None)
    if (rpc_tracker is None) != (rpc_key is None):
        raise QiaoError("--rpc-tracker and --rpc-key go together. fix: pass both or neither")
    if warmup < 0 or repeat < 1 or min_time < 0:
        raise QiaoError("need --warmup >= 0, --repeat >= 1 and --min-time >= 0. fix: adjust them")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise QiaoError(
            f"unknown baseline(s) {', '.join(unknown)}. fix: use any of {', '.join(BASELINES)}"
        )
    if rpc_tracker is not None:
        from qiao.compiler import rpc

        say(f"checking RPC tracker {rpc_tracker} for key {rpc_key}")
        rpc.probe(rpc_tracker, rpc_key)  # fail before compiling; the device is requested later

    existing = load(model) if _is_artifact_dir(model) else None
    if existing is not None:
        own = existing.manifest["backend"]["name"]
        wanted = parse_targets(targets, arch) if targets else [(own, None)]
        if len(wanted) != 1 or wanted[0][0] != own:
            raise QiaoError(
                f"{model} is an artifact for target {own!r}. fix: drop --target or pass --target "
                f"{own}; to benchmark other targets give the model (.onnx or built-in name) instead"
            )
        plan_targets = [(own, existing.manifest["backend"].get("arch"))]
        if dim_ranges:
            raise QiaoError(
                f"{model} is compiled already: dim ranges are a compile option. fix: drop "
                "--dim-range, or give the model (.onnx or built-in name) instead"
            )
    else:
        plan_targets = parse_targets(targets or "cpu", arch)

    workdir = artifact_dir or tempfile.mkdtemp(prefix="qiao-bench-")
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "label": label,
        "machine": machine_fingerprint(),
        "software": dict(software_versions(), qiao=__version__),
        "settings": {
            "warmup": warmup,
            "repeat": repeat,
            "min_time_s": min_time,
            "seed": seed,
            "baselines": list(baselines),
            "rpc": {"tracker": rpc_tracker, "key": rpc_key} if rpc_tracker else None,
            "memory_measured": PeakRSS.supported() and rpc_tracker is None,
            "definitions": DEFINITIONS,
        },
        "model": None,
        "targets": [],
        "cases": [],
    }
    if result["label"] is None:
        result["label"] = f"{rpc_key} (rpc)" if rpc_tracker else result["machine"]["hostname"]
    run = _Run(
        model,
        existing,
        tuple(baselines),
        tokens,
        batch,
        dict(dims or {}),
        warmup,
        repeat,
        min_time,
        seed,
        (rpc_tracker, rpc_key) if rpc_tracker else None,
        workdir,
        artifact_dir is not None,
        roofs,
        say,
        functools.partial(compile, dim_ranges=dict(dim_ranges)) if dim_ranges else compile,
    )
    try:
        for target, target_arch in plan_targets:
            _bench_target(result, run, target, target_arch)
    finally:
        if artifact_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


@dataclass(frozen=True)
class _Run:
    """What one ``bench`` call does for every target."""

    model: Any
    existing: Any  # an Artifact when ``model`` is an artifact directory
    baselines: tuple[str, ...]
    tokens: Sequence[int] | None
    batch: Sequence[int] | None
    dims: Mapping[str, int]
    warmup: int
    repeat: int
    min_time: float
    seed: int
    rpc: tuple[str, str] | None  # (tracker, key)
    workdir: str
    keep_artifacts: bool
    roofs: bool
    say: Callable[[str], None]
    compile: Callable[..., Any]


def _bench_target(result: dict, run: _Run, target: str, arch: str | None) -> None:
    entry, artifact = _compile_for(result, run, target, arch)
    if run.rpc is None:
        _measure(result, run, entry, artifact, None)
        return
    from qiao.compiler.rpc import request_device

    run.say(f"requesting a device with key {run.rpc[1]} from {run.rpc[0]}")
    with request_device(*run.rpc) as remote:
        _measure(result, run, entry, artifact, remote)


def _compile_for(result: dict, run: _Run, target: str, arch: str | None) -> tuple[dict, Any]:
    """Compile (or take the given artifact) and open the target's entry in ``result``."""
    from qiao.compiler.driver import default_output_dir

    model, existing, say = run.model, run.existing, run.say
    entry: dict[str, Any] = {"target": target, "arch": arch, "compile_s": None, "notes": []}
    result["targets"].append(entry)
    if existing is not None:
        artifact = existing
    else:
        is_path = isinstance(model, (str, os.PathLike))
        name = os.path.basename(os.fspath(model)).removesuffix(".onnx") if is_path else "model"
        say(f"compiling {name} for {target}{':' + arch if arch else ''}")
        out = os.path.join(run.workdir, default_output_dir(name, target, arch))
        start = time.perf_counter()
        artifact = run.compile(model, target, out, arch=arch)
        entry["compile_s"] = time.perf_counter() - start
    manifest = artifact.manifest
    entry.update(
        arch=manifest["backend"].get("arch"),
        target_json=manifest.get("target"),
        artifact=artifact.directory if existing is not None or run.keep_artifacts else None,
    )
    if result["model"] is None:
        result["model"] = {
            "name": manifest.get("model"),
            "source": {k: v for k, v in manifest.get("source", {}).items() if k != "path"},
            "inputs": manifest["inputs"],
            "outputs": manifest["outputs"],
        }
    return entry, artifact


def _measure(result: dict, run: _Run, entry: dict, artifact, remote) -> None:
    """Time every engine on every size for one target; append the cases to ``result``."""
    from qiao.compiler import artifact as art

    say, target, manifest = run.say, entry["target"], artifact.manifest
    notes: list[str] = entry["notes"]
    plan = plan_sizes(artifact.inputs, run.tokens, run.batch, run.dims)  # bad sizes fail first
    if remote is not None:
        from qiao.compiler.rpc import RPCRunner

        say(f"uploading to {remote.key} via {remote.tracker}")
        runner = RPCRunner(remote, artifact.directory, manifest)
        entry["remote"] = runner.info
        if runner.info.get("note"):
            notes.append(runner.info["note"])
    else:
        availability = artifact.backend.availability()
        if not availability.can_run:
            entry["status"] = "compiled only"
            notes.append(
                f"not run: {'; '.join(availability.missing) or 'no device here'}; run `qiao bench` "
                "on a machine with the device, or pass --rpc-tracker/--rpc-key"
            )
            say(f"{target}: compiled only ({notes[-1]})")
            return
        runner = None
    with PeakRSS() as load_mem:
        qiao_engine = QiaoEngine(artifact, runner)
        engines: list[Engine] = [qiao_engine]
    entry["load_rss_delta_mib"] = load_mem.delta_mib if remote is None else None
    baselines = baseline_engines(artifact, run.baselines, notes)
    if remote is not None and baselines:
        notes.append(
            "baselines run on this host, not the remote device: their outputs check correctness, "
            "their times are not compared; run `qiao bench` on the device for baseline timings"
        )
    else:
        engines += baselines
    entry["engines"] = {e.name: dict(e.info) for e in [qiao_engine, *baselines]}
    if run.roofs and remote is None and runs_on_host_cpu(artifact.backend):
        entry["roofs"] = measure_cpu_roofs()
    entry["status"] = "ok"
    result["model"].setdefault("sizes", {"mode": plan.mode, "dim": plan.dim})
    source_proto = load_source(os.path.join(artifact.directory, art.SOURCE_MODEL))
    for index, size in enumerate(plan.sizes):
        case_dims = plan.dims(size)
        inputs = artifact.random_inputs(run.seed, case_dims)
        samples_per_call, tokens_per_call = plan.items(size, artifact.inputs)
        cost = estimate_cost(source_proto, case_dims) if source_proto is not None else None
        case: dict[str, Any] = {
            "target": target,
            "arch": entry["arch"],
            "size": {plan.mode: size} if plan.dim else {},
            "dims": case_dims,
            "samples_per_call": samples_per_call,
            "tokens_per_call": tokens_per_call,
            "flops": cost["flops"] if cost else None,
            "bytes": cost["bytes"] if cost else None,
            "cost_estimate": cost,
            "engines": {},
            "speedup": {},
            "check": {},
        }
        qiao_outputs = qiao_engine.outputs(inputs)
        for engine in engines:
            where = f"{target} {plan.mode}={size}" if plan.dim else target
            say(f"[{index + 1}/{len(plan.sizes)}] {where}: {engine.name}")
            settle()
            with PeakRSS() as mem:
                samples, number = engine.measure(inputs, run.warmup, run.repeat, run.min_time)
            memory = mem.delta_mib if (remote is None or engine is not qiao_engine) else None
            case["engines"][engine.name] = _engine_result(
                samples, number, samples_per_call, tokens_per_call, cost, memory
            )
        for engine in baselines:
            case["check"][engine.name] = _check(
                artifact, qiao_outputs, engine.outputs(inputs), engine.name
            )
        qiao_median = case["engines"]["qiao"]["latency_s"]["median"]
        for name, timed in case["engines"].items():
            if name != "qiao":
                case["speedup"][name] = timed["latency_s"]["median"] / qiao_median
        result["cases"].append(case)
