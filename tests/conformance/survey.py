"""Run ONNX node cases through qiao's CPU path in crash-proof workers and tabulate the results.

Not a test: a tool for keeping ``exclusions.py`` and ``/work/notes/conformance.md`` current. Each
case runs in a worker subprocess, so a case that crashes TVM (segfault) or hangs costs only itself::

    python tests/conformance/survey.py -o /tmp/survey.json            # every case
    python tests/conformance/survey.py -k 'test_reshape|test_split'   # a regex over case names
    python tests/conformance/survey.py --compare /tmp/old.json /tmp/new.json
    python tests/conformance/survey.py --check-exclusions /tmp/survey.json

The JSON holds one record per case: name, op type, status (pass, unsupported, import, compile, run,
mismatch, crash, timeout), the first line of the error, and the prepare (import + compile) and run
times.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import select
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))  # the repository: ``tests`` is a package


def classify(stage: str, err: BaseException) -> str:
    from qiao.compiler.errors import CompileError, UnsupportedOps

    if isinstance(err, UnsupportedOps):
        return "unsupported"
    if stage == "prepare":
        if isinstance(err, CompileError) and str(err).startswith("TVM's ONNX importer"):
            return "import"
        return "compile"
    return "mismatch" if isinstance(err, AssertionError) else "run"


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return f"{type(err).__name__}: {text}"[:400]


def worker() -> None:
    """Read case names on stdin, answer one JSON line each on stdout."""
    sys.path.insert(0, ROOT)
    from tests.conformance import node_cases
    from tests.conformance.qiao_backend import QiaoBackend

    if os.environ.get("QIAO_SURVEY_NO_SCHEDULE"):
        from qiao.backends.cpu import CPUBackend

        CPUBackend.schedule_passes = lambda self, *args, **kwargs: []
    cases = node_cases.all_cases()
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the compiler prints must not corrupt the protocol
    for line in sys.stdin:
        name = line.strip()
        case = cases[name]
        print(f"--- {name}", file=sys.stderr, flush=True)
        record = {"name": name, "op": node_cases.op_type(case), "status": "pass", "error": ""}
        t0 = time.perf_counter()
        stage = "prepare"
        try:
            rep = QiaoBackend.prepare(case.model, "CPU")
            record["prepare_s"] = time.perf_counter() - t0
            stage = "run"
            t1 = time.perf_counter()
            for inputs, refs in case.data_sets:
                outputs = rep.run([node_cases._normalize(x) for x in inputs])
                node_cases.compare(
                    list(outputs), [node_cases._normalize(x) for x in refs], case.rtol, case.atol
                )
            record["run_s"] = time.perf_counter() - t1
        except Exception as err:  # noqa: BLE001 - every failure is data here
            record["status"] = classify(stage, err)
            record["error"] = _first_line(err)
            if os.environ.get("QIAO_SURVEY_TRACE"):
                traceback.print_exc()
        record.setdefault("prepare_s", time.perf_counter() - t0)
        out.write(json.dumps(record) + "\n")
        out.flush()


class Worker:
    def __init__(self, log):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            bufsize=1,
        )

    def ask(self, name: str, timeout: float) -> dict | None:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def survey(names: list[str], timeout: float, log_path: str) -> list[dict]:
    sys.path.insert(0, ROOT)
    from tests.conformance import node_cases

    cases = node_cases.all_cases()
    results = []
    with open(log_path, "w") as log:
        w = Worker(log)
        first = True
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            # The first answer also waits for the worker to import TVM and build the cases.
            record = w.ask(name, timeout + (120 if first else 0))
            first = False
            if record is None:
                status = "crash" if w.proc.poll() is not None else "timeout"
                record = {
                    "name": name,
                    "op": node_cases.op_type(cases[name]),
                    "status": status,
                    "error": f"worker {status} (exit {w.proc.poll()})",
                    "prepare_s": time.perf_counter() - t0,
                }
                w.stop()
                w = Worker(log)
                first = True
            results.append(record)
            if (i + 1) % 100 == 0:
                passed = sum(r["status"] == "pass" for r in results)
                print(f"{i + 1}/{len(names)}: {passed} pass", file=sys.stderr, flush=True)
        w.stop()
    return results


def summarize(results: list[dict]) -> str:
    lines = []
    by_status = collections.Counter(r["status"] for r in results)
    lines.append(
        f"{by_status['pass']} / {len(results)} pass; "
        + ", ".join(f"{k} {v}" for k, v in by_status.most_common() if k != "pass")
    )
    prep = sorted(r.get("prepare_s", 0.0) for r in results)
    if prep:
        lines.append(
            f"prepare time: total {sum(prep):.0f}s, median {prep[len(prep) // 2]:.3f}s, "
            f"p95 {prep[int(len(prep) * 0.95)]:.3f}s, max {prep[-1]:.2f}s"
        )
    groups = collections.defaultdict(list)
    for r in results:
        if r["status"] != "pass":
            msg = re.sub(r"\d+", "N", r["error"])[:160]
            groups[(r["status"], msg)].append(r["name"])
    lines.append("failures by cause (count, status, message, examples):")
    for (status, msg), names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(names):4d} {status:11s} {msg}")
        lines.append(f"       e.g. {', '.join(names[:4])}")
    return "\n".join(lines)


def check_exclusions(results: list[dict]) -> int:
    """Print failing cases with no exclusion, excluded cases that pass, unused patterns."""
    sys.path.insert(0, ROOT)
    import re as _re

    from tests.conformance.exclusions import EXCLUSIONS, exclusion_for

    problems = 0
    for r in results:
        excluded = exclusion_for(r["name"])
        if r["status"] != "pass" and excluded is None:
            problems += 1
            print(f"NOT EXCLUDED  {r['name']}: {r['status']} {r['error'][:150]}")
        elif r["status"] == "pass" and excluded is not None and excluded.kind == "xfail":
            problems += 1
            print(f"PASSES        {r['name']} (excluded: {excluded.reason[:60]})")
    names = [r["name"] for r in results]
    for e in EXCLUSIONS:
        for p in e.patterns:
            if not any(_re.fullmatch(p, n) for n in names):
                problems += 1
                print(f"UNUSED        {p}")
    print(f"{problems} problem(s)")
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-k", "--select", default=None, help="regex over case names")
    p.add_argument("-o", "--output", default=None, help="write the per-case JSON here")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    p.add_argument("--log", default="/tmp/qiao-survey-workers.log", help="workers' stderr")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="diff two result files")
    p.add_argument(
        "--check-exclusions",
        metavar="RESULTS",
        help="list failures without an exclusion and exclusions that pass or match nothing",
    )
    p.add_argument(
        "--no-schedule",
        action="store_true",
        help="diagnostic: empty the CPU backend's schedule phase (tells frontend failures from "
        "schedule miscompiles; not qiao's real path)",
    )
    args = p.parse_args(argv)
    if args.no_schedule:
        os.environ["QIAO_SURVEY_NO_SCHEDULE"] = "1"
    if args.worker:
        worker()
        return 0
    if args.check_exclusions:
        return check_exclusions(json.load(open(args.check_exclusions)))
    if args.compare:
        old, new = ({r["name"]: r for r in json.load(open(f))} for f in args.compare)
        for name in sorted(set(old) | set(new)):
            a, b = old.get(name, {}).get("status"), new.get(name, {}).get("status")
            if a != b:
                print(f"{name}: {a} -> {b}  {new.get(name, {}).get('error', '')[:120]}")
        return 0
    sys.path.insert(0, ROOT)
    from tests.conformance import node_cases

    names = list(node_cases.all_cases())
    if args.select:
        names = [n for n in names if re.search(args.select, n)]
    results = survey(names, args.timeout, args.log)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=0)
    print(summarize(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
