"""Run every bundle of a device-check folder: compare with the stored references, time qiao, and
time PyTorch eager on the same device when torch is installed.

Copied into the folder by ``benchmarks/device/check.sh``; needs Python >= 3.10 and NumPy, nothing
of qiao. Usage, on the device machine::

    python CHECK_DIR/run_bundles.py [--repeat 50] [--json results.json]

Prints one table; writes one ``qiao bench``-schema document per model into ``CHECK_DIR/results/``
and the summary (``--json``, default ``CHECK_DIR/check_result.json``). Exit 0 when every bundle
matches its reference, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = ("lib", "vendor")  # identical in every bundle: stored once under runtime/


def restore_shared(bundle: str) -> None:
    """Put the shared runtime files back into a bundle (the bundle's own sha256 check then proves
    they are the ones it was packed with)."""
    for part in SHARED:
        if not os.path.exists(os.path.join(bundle, part)):
            shutil.copytree(os.path.join(HERE, "runtime", part), os.path.join(bundle, part))


def latency(samples: list[float]) -> dict:
    """The ``qiao bench`` latency statistics of a list of seconds."""
    s = sorted(samples)

    def pct(p: float) -> float:
        k = (len(s) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {
        "mean": statistics.fmean(s),
        "median": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "min": s[0],
        "std": statistics.pstdev(s),
        "n": len(s),
    }


def time_qiao(bundle: str, repeat: int) -> dict:
    """Run the bundle's own runner in a child process (one TVM runtime per process; a crash in
    one bundle does not stop the others)."""
    out = os.path.join(bundle, "..", f".{os.path.basename(bundle)}.result.json")
    cmd = [sys.executable, os.path.join(bundle, "run.py"), "--check", "--time", str(repeat)]
    proc = subprocess.run([*cmd, "--json", out], capture_output=True, text=True, timeout=1800)
    result = {"returncode": proc.returncode, "log": (proc.stdout + proc.stderr)[-2000:]}
    if os.path.isfile(out):
        with open(out) as f:
            result.update(json.load(f))
        os.remove(out)
    return result


def time_torch(name: str, target: str, bundle: str, repeat: int) -> dict | None:
    """PyTorch (the TorchScript trace, interpreted op by op) on the same device and inputs, or
    ``None`` where the build stored no trace."""
    path = os.path.join(HERE, "torch", f"{name}.pt")
    if not os.path.isfile(path):
        return None
    try:
        import numpy as np
        import torch
    except ImportError:
        return {"note": "torch is not installed here"}
    device = "cpu" if target == "cpu" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        return {"note": "torch sees no CUDA device"}
    with open(os.path.join(bundle, "bundle.json")) as f:
        manifest = json.load(f)
    with np.load(os.path.join(bundle, "reference", "inputs.npz")) as data:
        args = [torch.from_numpy(data[s["name"]]).to(device) for s in manifest["inputs"]]
    module = torch.jit.load(path, map_location=device).eval()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    if hasattr(os, "sched_getaffinity"):  # the same threads as the bundle's TVM runtime
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    samples = []
    # The traced graph run op by op by TorchScript's interpreter, without its fusing optimiser:
    # the closest a file can carry to eager PyTorch (no model class needed on the device).
    with torch.no_grad(), torch.jit.optimized_execution(False):
        for _ in range(10):
            module(*args)
        sync()
        for _ in range(repeat):
            start = time.perf_counter()
            module(*args)
            sync()
            samples.append(time.perf_counter() - start)
    return {"latency_s": latency(samples), "version": torch.__version__}


def bench_document(name: str, manifest: dict, qiao: dict, torch_result: dict | None) -> dict:
    """One model's result in ``qiao bench``'s schema (``qiao report`` reads it)."""
    engines = {}
    if "samples_s" in qiao:
        engines["qiao"] = {"latency_s": latency(qiao["samples_s"])}
    speedup = {}
    if torch_result and "latency_s" in torch_result and "qiao" in engines:
        engines["pytorch"] = {"latency_s": torch_result["latency_s"]}
        speedup["pytorch"] = (
            torch_result["latency_s"]["median"] / engines["qiao"]["latency_s"]["median"]
        )
    ref = manifest.get("reference") or {}
    check = {
        ref.get("source", "reference"): {
            "ok": qiao.get("ok", False),
            "max_abs_err": max((o["max_abs_err"] for o in qiao.get("outputs", {}).values()),
                               default=None),
            "rtol": ref.get("rtol"),
            "atol": ref.get("atol"),
        }
    }  # fmt: skip
    return {
        "schema": "qiao-bench",
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "label": f"device check on {socket.gethostname()}",
        "machine": {"hostname": socket.gethostname(), "machine": platform.machine()},
        "software": {"python": platform.python_version(), "tvm": manifest.get("tvm_version"),
                     "torch": (torch_result or {}).get("version")},
        "settings": {"repeat": len(qiao.get("samples_s", [])), "source": "device check bundle"},
        "model": {"name": name, "inputs": manifest["inputs"], "outputs": manifest["outputs"]},
        "targets": [{"target": manifest["target"], "arch": manifest.get("arch"), "notes": []}],
        "cases": [{
            "target": manifest["target"],
            "size": {"example": 1},
            "engines": engines,
            "speedup": speedup,
            "check": check,
            "flops": None,
            "bytes": None,
        }],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=50, help="timed calls per engine (default 50)")
    p.add_argument("--json", default=os.path.join(HERE, "check_result.json"))
    args = p.parse_args(argv)
    with open(os.path.join(HERE, "check.json")) as f:
        plan = json.load(f)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    rows, summary, ok_all = [], [], True
    for name in plan["models"]:
        bundle = os.path.join(HERE, "bundles", name)
        restore_shared(bundle)
        with open(os.path.join(bundle, "bundle.json")) as f:
            manifest = json.load(f)
        qiao = time_qiao(bundle, args.repeat)
        ok = qiao["returncode"] == 0 and qiao.get("ok", False)
        ok_all = ok_all and ok
        try:
            torch_result = time_torch(name, plan["target"], bundle, args.repeat) if ok else None
        except Exception as err:  # the baseline failing does not fail the check of qiao
            torch_result = {"note": f"pytorch failed: {type(err).__name__}: {str(err)[:80]}"}
        if torch_result is None and name in plan.get("notes", {}):
            torch_result = {"note": plan["notes"][name]}
        doc = bench_document(name, manifest, qiao, torch_result)
        with open(os.path.join(HERE, "results", f"{name}.json"), "w") as f:
            json.dump(doc, f, indent=1)
        err = doc["cases"][0]["check"]
        err = next(iter(err.values()))["max_abs_err"]
        q_ms = 1e3 * doc["cases"][0]["engines"]["qiao"]["latency_s"]["median"] if ok else None
        t = (torch_result or {}).get("latency_s")
        t_ms = 1e3 * t["median"] if t else None
        note = "" if ok else f"exit {qiao['returncode']}: {qiao['log'].strip().splitlines()[-1:]}"
        if torch_result and "note" in torch_result:
            note = torch_result["note"]
        rows.append((name, plan["target"], "PASS" if ok else "FAIL", err, q_ms, t_ms, note))
        summary.append({"model": name, "ok": ok, "max_abs_err": err, "qiao_ms": q_ms,
                        "pytorch_ms": t_ms, "note": note})  # fmt: skip
    print(f"{'model':<18} {'target':<7} {'check':<5} {'max abs err':>11} {'qiao ms':>9} "
          f"{'torch ms':>9} {'speedup':>8}  note")  # fmt: skip
    for name, target, verdict, err, q_ms, t_ms, note in rows:
        errs = f"{err:.2e}" if err is not None else "-"
        qs = f"{q_ms:.3f}" if q_ms is not None else "-"
        ts = f"{t_ms:.3f}" if t_ms is not None else "-"
        sp = f"{t_ms / q_ms:.2f}x" if q_ms and t_ms else "-"
        print(f"{name:<18} {target:<7} {verdict:<5} {errs:>11} {qs:>9} {ts:>9} {sp:>8}  {note}")
    with open(args.json, "w") as f:
        json.dump({"target": plan["target"], "arch": plan.get("arch"), "ok": ok_all,
                   "models": summary}, f, indent=1)  # fmt: skip
    print(f"{'PASS' if ok_all else 'FAIL'}: wrote {args.json} and results/*.json")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
