"""Human-readable output of a result document: units, rates, the table ``qiao bench`` prints, and
the cases whose outputs differ from a baseline's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def format_seconds(seconds: float | None) -> str:
    """``1.234e-5`` → ``"12.34 µs"``: four significant digits, unit by magnitude."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds / 1e-9:.4g} ns"


def format_rate(value: float, unit: str) -> str:
    """``12345.0, "tok"`` → ``"12.3k tok/s"``."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix} {unit}/s"
    return f"{value:.3g} {unit}/s"


def format_result(result: Mapping[str, Any]) -> str:
    """A human-readable table of a result document (what ``qiao bench`` prints)."""
    from qiao.compiler.fingerprint import describe

    model = result.get("model") or {}
    lines = [f"qiao bench {model.get('name')} · {describe(result['machine'])}"]
    for entry in result["targets"]:
        where = f"{entry['target']} ({entry.get('arch')})"
        compile_s = entry.get("compile_s")
        extra = f", compiled in {compile_s:.2f} s" if compile_s is not None else ""
        remote = entry.get("remote")
        if remote:
            device = remote.get("device_name") or remote.get("llvm_cpu")
            extra += f", remote {remote.get('key')}: {device}"
        lines.append(f"target {where}: {entry.get('status')}{extra}")
        lines += [f"  note: {n}" for n in entry.get("notes", [])]
    header = (
        f"{'target':<14} {'size':<12} {'engine':<17} {'median':>10} {'mean':>10} {'p90':>10} "
        f"{'p99':>10} {'min':>10} {'std':>10}  {'throughput':<20} {'peak RSS Δ':>10}  "
        f"{'qiao speed-up':<13} check"
    )
    lines += ["", header]
    for case in result["cases"]:
        size = ",".join(f"{k}={v}" for k, v in case["size"].items()) or "static"
        where = case["target"] + (f":{case['arch']}" if case.get("arch") else "")
        for name, timed in case["engines"].items():
            s = timed["latency_s"]
            thr = timed["throughput"]
            rate = (
                format_rate(thr["tokens_per_s"], "tok")
                if "tokens_per_s" in thr
                else format_rate(thr["samples_per_s"], "samples")
            )
            mem = timed.get("peak_rss_delta_mib")
            speed = f"×{case['speedup'][name]:.2f}" if name in case["speedup"] else ""
            check = case["check"].get(name)
            verdict = "" if check is None else ("ok" if check["ok"] else "MISMATCH")
            if check is not None and check.get("max_abs") is not None:
                verdict += f" ({check['max_abs']:.1e})"
            lines.append(
                f"{where:<14} {size:<12} {name:<17} {format_seconds(s['median']):>10} "
                f"{format_seconds(s['mean']):>10} {format_seconds(s['p90']):>10} "
                f"{format_seconds(s['p99']):>10} {format_seconds(s['min']):>10} "
                f"{format_seconds(s['std']):>10}  {rate:<20} "
                f"{('-' if mem is None else f'{mem:.1f} MiB'):>10}  {speed:<13} {verdict}".rstrip()
            )
        for name, check in case["check"].items():
            if name not in case["engines"]:
                lines.append(
                    f"{where:<14} {size:<12} {name:<17} (not timed) check: "
                    f"{'ok' if check['ok'] else 'MISMATCH'}"
                )
        if case.get("flops"):
            qiao = case["engines"]["qiao"]
            lines.append(
                f"{'':<27} flops≈{case['flops']:.3g}, bytes≈{case['bytes']:.3g}, qiao "
                f"{qiao.get('achieved_gflops', 0):.3g} GFLOP/s (estimate)"
            )
    return "\n".join(lines)


def mismatches(result: Mapping[str, Any]) -> list[str]:
    """``"target size engine"`` for every case whose outputs differ from a baseline's."""
    out = []
    for case in result["cases"]:
        for name, check in case["check"].items():
            if not check.get("ok"):
                out.append(f"{case['target']} {case['size']} vs {name}")
    return out
