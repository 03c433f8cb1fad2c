"""Tuning that persists: a per-device database of measured GEMM tiles, filled on demand.

``qiao compile --tune`` measures, for every GEMM-like kernel of the model (dense layers, batched
matmuls, convolutions) whose workload this device has no record of, up to ``--trials`` candidate
tiles of qiao's CPU GEMM schedule (``cpu_gemm.candidate_tiles``: the default first) and records the
fastest — when it is not the default, only if a second measurement, on cold caches and interleaved
with the default, confirms it at least ``MIN_GAIN`` times faster (else the default is recorded: a
tile that wins alone with its operands in L2 can lose inside the model). Every later compile for
the same device, tuned or not, schedules those workloads with the recorded tile; a workload
already tuned on a device is never measured again.

Why not MetaSchedule's search: qiao's models keep their batch and sequence dimensions symbolic, and
MetaSchedule tunes static shapes only (its builder also imports ``tvm.s_tir.tensor_intrin``, about
a minute, and strips the weight-packing blocks qiao's GEMMs rely on). The search space here is the
same rule the compiler uses without tuning, so a tuned schedule is valid for every shape, and the
symbolic dimensions only need one value to measure at (``tune_dims``, default 64 each).

Layout: ``$QIAO_CACHE_DIR/tuning/<device>/records.json`` (default cache dir ``~/.cache/qiao``; the
``tuning_db`` compile option or ``qiao tune --tuning-db`` replaces the ``tuning`` root). The same
root holds the user's MoE schedule table (``moe_table.json``, see
``qiao.compiler.schedules.moe_table``): one tuning store per user, never inside the package.
``<device>`` names the CPU and hashes what changes the best schedule: the LLVM ``mcpu``/``mattr``,
the core count, and the CPU model when compiling for the host. A record holds the tile, its time,
the default tile's time, the confirmed gain over the default (``None``: the default), the trial
count and the dimensions measured at; records of an older schedule version are ignored rather than
misapplied. Candidates run in a separate process (one kept for the whole tune: starting it imports
TVM), so a kernel that crashes costs a trial, not the compile.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("qiao.tuning")

DEFAULT_TRIALS = 16
DEFAULT_DIM = 64
# Bump when the GEMM schedule changes meaning: older records are then ignored, not misapplied.
# 2: records are confirmed against the default on cold caches (``MIN_GAIN``), and the defaults
# they were measured against changed (long-reduction convolutions, capped column blocks).
SCHEDULE_VERSION = 2
RECORDS = "records.json"
# A tile the screening found faster replaces the default only when it is at least this much faster
# again on a cold-cache, interleaved re-measurement (``confirmed_gain``). The screening times each
# kernel alone, its operands hot in L2; on EfficientNet-B0 (Intel AVX-512 host, 2026-12-04) three
# projection tiles it had timed 1-5% faster than the default ran 2-3x slower in the model
# (conv2d9: 41 against 42 us screened, 91 -> 182 us in the model; 46 against 41 us on re-measuring
# hot, 81-96 against 72-81 us cold), and the model 5.78 -> 6.12 ms.
MIN_GAIN = 1.05
CONFIRM_ROUNDS = 5
MIN_FLUSH_BYTES = 8 << 20


def cache_dir() -> str:
    """``$QIAO_CACHE_DIR`` or ``~/.cache/qiao``."""
    return os.environ.get("QIAO_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "qiao"
    )


@contextlib.contextmanager
def shipped_schedules(store: str | os.PathLike):
    """Compile with qiao's shipped schedules only, inside the ``with``: the benchmarks' setting,
    so that their figures do not depend on what was tuned on the machine before. ``store`` (an
    empty directory) becomes the tuning store and ``QIAO_MOE_TABLE`` is unset; the environment is
    restored after. ``QIAO_BENCH_TUNED=1`` keeps the user's store and table (to measure tuned
    compiles)."""
    if os.environ.get("QIAO_BENCH_TUNED") == "1":
        yield
        return
    saved = {k: os.environ.get(k) for k in ("QIAO_CACHE_DIR", "QIAO_MOE_TABLE")}
    os.environ["QIAO_CACHE_DIR"] = os.fspath(store)
    os.environ.pop("QIAO_MOE_TABLE", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tuning_root(root: str | os.PathLike | None = None) -> str:
    """The user's tuning store: ``root`` when given, else ``cache_dir()/tuning``.

    Everything ``qiao tune`` and ``qiao compile --tune`` measure is written under it (GEMM records
    per device, the MoE schedule table); nothing is ever written into the installed package.
    """
    return os.fspath(root) if root else os.path.join(cache_dir(), "tuning")


def _host_cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def is_host_target(target: Any) -> bool:
    """Whether ``target`` is this machine's CPU (tuning measures here, so it must be)."""
    import tvm

    return str(target.attrs.get("mcpu", "")) == str(tvm.target.codegen.llvm_get_system_cpu())


def device_key(target: Any) -> str:
    """Directory name of ``target``'s records: ``<mcpu>-<cores>c-<hash of the details>``."""
    attrs = {k: str(v) for k, v in json.loads(str(target)).items() if k != "tag"}
    mcpu = attrs.get("mcpu", "") or "generic"
    details = dict(attrs, cpu_model=_host_cpu_model() if is_host_target(target) else "")
    digest = hashlib.sha256(json.dumps(details, sort_keys=True).encode()).hexdigest()[:12]
    cores = attrs.get("num-cores", "")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{mcpu}-{cores}c" if cores else mcpu)
    return f"{slug}-{digest}"


def workload_key(func) -> str:
    """Identity of a PrimFunc's workload: its structural hash (names of variables do not matter)."""
    import tvm_ffi

    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    value = tvm_ffi.structural_hash(func, map_free_vars=True)
    return f"{value & ((1 << 64) - 1):016x}"


class TuningDatabase:
    """Tuned GEMM tiles of one device, keyed by workload.

    Parameters
    ----------
    directory : str
        Where ``records.json`` lives (created on the first record).
    target : tvm.target.Target, optional
        The device's target.
    tune_dims : mapping, optional
        Values of symbolic dimensions to measure at (``{"batch": 1, "seq": 128}``); others take
        ``DEFAULT_DIM``.
    """

    def __init__(
        self, directory: str, target: Any = None, tune_dims: Mapping[str, int] | None = None
    ):
        self.directory = directory
        self.target = target
        self.tune_dims = dict(tune_dims or {})
        self._records: dict[str, dict] | None = None
        self.tuned: list[str] = []  # workloads measured by this object (for reports and tests)

    @classmethod
    def for_target(
        cls, target: Any, root: str | None = None, tune_dims: Mapping[str, int] | None = None
    ) -> TuningDatabase:
        """The database of ``target`` under ``root`` (default ``tuning_root()``)."""
        return cls(os.path.join(tuning_root(root), device_key(target)), target, tune_dims)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, RECORDS)

    def records(self) -> dict[str, dict]:
        """All records (read once; a missing or unreadable file is an empty database)."""
        if self._records is None:
            self._records = {}
            try:
                with open(self.path) as f:
                    data = json.load(f)
                if data.get("schedule_version") == SCHEDULE_VERSION:
                    self._records = dict(data.get("records", {}))
            except (OSError, ValueError, AttributeError):
                pass
        return self._records

    def lookup(self, func) -> dict | None:
        """The record of ``func``'s workload, or ``None``."""
        return self.records().get(workload_key(func))

    def commit(self, func, record: Mapping[str, Any]) -> None:
        """Store ``record`` for ``func``'s workload (atomic rewrite of ``records.json``)."""
        records = self.records()
        records[workload_key(func)] = dict(record)
        os.makedirs(self.directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".records-", dir=self.directory)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {"schedule_version": SCHEDULE_VERSION, "records": records},
                f,
                indent=1,
                sort_keys=True,
            )
        os.replace(tmp, self.path)

    def schedule(self, func, target: Any, tune_trials: int = 0):
        """``func`` scheduled from its record — tuning it first when ``tune_trials`` > 0, it has no
        record and it is GEMM-like — or ``None`` (no record; the default rules apply)."""
        from qiao.compiler.schedules.cpu_gemm import CPUMatmul, GemmTile

        record = self.lookup(func)
        if record is None and tune_trials > 0 and is_tunable(func):
            record = tune_gemm(func, target, tune_trials, self.tune_dims)
            if record is not None:
                self.commit(func, record)
                self.tuned.append(workload_key(func))
        if record is None:
            return None
        sch = CPUMatmul(GemmTile(**record["tile"])).apply(func, target, False)
        return None if sch is None else sch.mod["main"]


# -- measuring -------------------------------------------------------------------------------------


def is_tunable(func) -> bool:
    """Whether ``func`` is a kernel the tuner searches (GEMM-like: ``CPUMatmul`` applies)."""
    from tvm import s_tir

    from qiao.compiler.schedules.cpu_gemm import find_gemm_block

    return find_gemm_block(s_tir.Schedule(func)) is not None


def shape_vars(func) -> dict[str, Any]:
    """Symbolic shape variables of ``func``'s parameters, by name."""
    import tvm_ffi
    from tvm.ir.expr import Var

    found: dict[str, Any] = {}
    for p in func.params:
        shape = getattr(p.ty, "shape", None)
        if shape is None:
            found.setdefault(p.name, p)  # a scalar parameter (e.g. a shape value)
            continue
        for d in shape:
            tvm_ffi.structural_walk(d, [(Var, lambda v: (found.setdefault(v.name, v), None)[1])])
    return found


def concrete_args(func, dims: Mapping[str, int]) -> list[dict]:
    """Argument specs for calling ``func`` with its symbolic dimensions set to ``dims``:
    ``{"shape": [...], "dtype": ...}`` for buffers, ``{"scalar": int}`` for scalar parameters."""
    import tvm
    import tvm_ffi
    from tvm.ir.expr import Var

    variables = shape_vars(func)
    analyzer = tvm.sym.Analyzer()

    def value(expr) -> int:
        def on_var(v, _mutator):
            var = variables.get(v.name)
            if var is not None and v.same_as(var):
                return tvm.tirx.const(int(dims[v.name]), "int64")
            return v

        out = analyzer.simplify(tvm_ffi.structural_mutate(expr, [(Var, on_var)]))
        if not isinstance(out, tvm.tirx.IntImm):
            raise ValueError(f"cannot evaluate {expr} with {dict(dims)}")
        return int(out.value)

    args = []
    for p in func.params:
        shape = getattr(p.ty, "shape", None)
        if shape is None:
            args.append({"scalar": int(dims[p.name])})
        else:
            args.append({"shape": [value(d) for d in shape], "dtype": str(p.ty.dtype)})
    return args


def tune_gemm(
    func, target: Any, trials: int, tune_dims: Mapping[str, int] | None = None
) -> dict | None:
    """Measure up to ``trials`` candidate tiles of ``func`` (GEMM-like) on this machine.

    Returns the record of the fastest (``tile``, ``seconds``, ``default_seconds``, ``trials``,
    ``dims``), or ``None`` when ``func`` is not GEMM-like or nothing could be measured.
    """
    import tvm
    from tvm import s_tir

    from qiao.compiler.errors import QiaoError
    from qiao.compiler.passes.shuffle_strided_loads import compile_cpu_kernel
    from qiao.compiler.schedules.cpu_gemm import (
        CPUMatmul,
        candidate_tiles,
        find_gemm_block,
        gemm_lanes,
        gemm_shape,
        normalize_gemm,
    )
    from qiao.compiler.schedules.cpu_info import cpu_info

    if not is_host_target(target):
        raise QiaoError(
            f"cannot tune for mcpu={target.attrs.get('mcpu')!r} on this "
            f"{tvm.target.codegen.llvm_get_system_cpu()} machine: tuning measures here. fix: tune "
            "on the target machine (its records can then be copied into this cache), or compile "
            "without --tune"
        )
    probe = s_tir.Schedule(func)
    block = find_gemm_block(probe)
    if block is None:
        return None
    cpu = cpu_info(target)
    normalize_gemm(probe, block, gemm_lanes(cpu, probe, block), cpu)
    shape = gemm_shape(probe, block)
    dims = {n: int((tune_dims or {}).get(n, DEFAULT_DIM)) for n in shape_vars(func)}
    try:
        args = concrete_args(func, dims)
    except (KeyError, ValueError) as err:
        log.info("not tuning %s: %s", func.attrs.get("global_symbol", "kernel"), err)
        return None
    tiles = candidate_tiles(cpu_info(target), shape)[: max(1, trials)]
    with tempfile.TemporaryDirectory(prefix="qiao-tune-") as tmp:
        libs = []
        for n, tile in enumerate(tiles):
            sch = CPUMatmul(tile).apply(func, target, False)
            scheduled = _finish(sch.mod["main"], target)
            path = os.path.join(tmp, f"cand{n}.so")
            try:
                ex = compile_cpu_kernel(scheduled, target)
                ex.export_library(path)
                libs.append((tile, path))
            except Exception as err:  # a candidate the compiler rejects is just not measured
                log.info("candidate %s does not build: %s", tile, err)
        seconds = measure_libraries([p for _, p in libs], args)
        measured = [(t, p, s) for (t, p), s in zip(libs, seconds) if s is not None]
        if not measured:
            return None
        best_tile, best_path, best = min(measured, key=lambda tps: tps[2])
        default_path, default = next(
            ((p, s) for t, p, s in measured if t == tiles[0]), (None, None)
        )
        gain = None
        if default_path is not None and best_tile != tiles[0]:
            gain = confirmed_gain(default_path, best_path, args)
            if gain is None or gain < MIN_GAIN:
                log.info(
                    "%s: %s screened faster than the default but gains %s on cold caches: "
                    "keeping the default", shape, best_tile, gain,
                )  # fmt: skip
                best_tile, best = tiles[0], default
    log.info("tuned %s: %s at %.3g s (default %s)", shape, best_tile, best, default)
    return {
        "kind": "gemm",
        "tile": best_tile.to_json(),
        "seconds": best,
        "default_seconds": default,
        "confirmed_gain": gain,
        "trials": len(libs),
        "dims": dims,
    }


def confirmed_gain(default_path: str, candidate_path: str, args: list[dict]) -> float | None:
    """How many times faster the candidate kernel runs than the default one, measured as a model
    runs them: caches flushed before every call (``flush_bytes``), the two interleaved over
    ``CONFIRM_ROUNDS`` rounds (load drifting hits both); the median of the per-round ratios of
    median times. ``None`` when either fails."""
    rounds = measure_rounds([default_path, candidate_path], args, CONFIRM_ROUNDS, flush_bytes())
    if rounds is None:
        return None
    ratios = [d / c for d, c in zip(*rounds) if c > 0]
    return statistics.median(ratios) if ratios else None


def flush_bytes() -> int:
    """Bytes written between timed calls so that a kernel's operands are out of the private
    caches, as they are when a model calls it (other kernels ran in between): twice the L2 of
    all cores (Linux sysfs), at least ``MIN_FLUSH_BYTES``."""
    total = 0
    for cpu in range(os.cpu_count() or 1):
        path = f"/sys/devices/system/cpu/cpu{cpu}/cache/index2/size"
        try:
            with open(path) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        total += int(text.rstrip("KM")) * scale
    return max(MIN_FLUSH_BYTES, 2 * total)


def _finish(func, target):
    """The post-rule CPU passes, so candidates are measured as they will be compiled."""
    from qiao.compiler.passes.vectorizable_math import rewrite_math
    from qiao.compiler.passes.vectorize_ragged_loops import split_ragged_vector_loops

    return rewrite_math(split_ragged_vector_loops(func))


class _MeasuringChild:
    """The measuring child process, kept between specs: starting one imports TVM (about 3 s), once
    per tune instead of once or twice per kernel. A spec is one JSON line on its stdin; it prints
    one JSON row per library measured, then ``{"done": true}``. A child that crashes (a
    candidate's kernel) or runs past the timeout is gone, and one started under another
    environment (``TVM_NUM_THREADS``...) is ended: the next spec starts another."""

    TIMEOUT = 600  # seconds per spec

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.stderr = None
        self.env: dict[str, str] = {}
        self.lock = threading.Lock()

    def _start(self) -> None:
        self.stderr = tempfile.TemporaryFile()
        self.env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qiao.compiler.schedules.tuning", "measure"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # end of output: the child exited

    def _stop(self) -> str:
        """End the child; the tail of what it wrote on stderr."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read()[-300:].decode(errors="replace")
        self.stderr.close()
        return tail

    def run(self, spec: dict) -> tuple[bool, list[dict], str]:
        """``(finished, rows, stderr tail)``: ``finished`` is False when the child died or timed
        out before the end of ``spec`` (``rows`` holds what it measured first)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None or self.env != dict(os.environ):
                self._stop()
                self._start()
            rows: list[dict] = []
            try:
                self.proc.stdin.write(json.dumps(spec) + "\n")
                self.proc.stdin.flush()
            except OSError:
                return False, rows, self._stop()
            deadline = time.monotonic() + self.TIMEOUT
            while True:
                try:
                    line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return False, rows, self._stop()
                if line is None:
                    return False, rows, self._stop()
                if not line.startswith("{"):
                    continue
                row = json.loads(line)
                if row.get("done"):
                    return True, rows, ""
                rows.append(row)

    def close(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.stdin.close()  # the child's loop ends
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            self._stop()


_CHILD = _MeasuringChild()
atexit.register(_CHILD.close)


def measure_rounds(
    paths: list[str], args: list[dict], rounds: int, flush: int, repeat: int = 5
) -> list[list[float]] | None:
    """Per library, its median seconds per call in each of ``rounds`` rounds (every round times
    every library in turn, ``flush`` bytes written before each call); ``None`` when any failed."""
    spec = {"paths": paths, "args": args, "repeat": repeat, "rounds": rounds, "flush": flush}
    finished, rows, _ = _CHILD.run(spec)
    times: list[list[float]] = [[] for _ in paths]
    for row in rows:
        if row.get("seconds") is None:
            return None
        times[row["index"]].append(row["seconds"])
    if not finished or any(len(t) != rounds for t in times):
        return None
    return times


def measure_libraries(paths: list[str], args: list[dict], repeat: int = 5) -> list[float | None]:
    """Median seconds per call of each library's ``main`` on random ``args``, measured in a child
    process (one that crashes loses that candidate only); ``None`` where a candidate failed."""
    results: dict[int, float | None] = {}
    pending = list(range(len(paths)))
    while pending:
        spec = {"paths": [paths[i] for i in pending], "args": args, "repeat": repeat}
        finished, rows, stderr = _CHILD.run(spec)
        done = 0
        for row in rows:
            results[pending[row["index"]]] = row.get("seconds")
            done = max(done, row["index"] + 1)
        if not finished:
            if done < len(pending):
                results[pending[done]] = None  # the candidate that was running when it died
                log.info("candidate %s crashed: %s", paths[pending[done]], stderr)
            done += 1
        pending = pending[done:]
    return [results.get(i) for i in range(len(paths))]


def _measure_main() -> int:
    """Child process (``_MeasuringChild``): for each spec line on stdin, one JSON line per library
    as it is measured, then ``{"done": true}``; ends with its stdin."""
    for line in sys.stdin:
        if line.strip():
            _measure_spec(json.loads(line))
            print(json.dumps({"done": True}), flush=True)
    return 0


def _measure_spec(spec: dict) -> None:
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)
    from qiao.compiler.schedules.cpu_info import cpu_device

    dev = cpu_device()
    host_args = []
    for a in spec["args"]:
        if "scalar" in a:
            host_args.append(a["scalar"])
        elif a["dtype"] == "bool":
            host_args.append(rng.integers(0, 2, a["shape"]).astype(bool))
        else:
            host_args.append(rng.standard_normal(a["shape"]).astype(a["dtype"]))
    dev_args = [tvm.runtime.tensor(x, dev) if isinstance(x, np.ndarray) else x for x in host_args]
    flush = int(spec.get("flush", 0))
    # Hot (the screening): calls back to back, at least 20 ms of them per repeat. Cold: one call
    # per repeat, the caches flushed before each.
    timing = dict(cache_flush_bytes=flush) if flush else dict(min_repeat_ms=20)
    evaluators: dict[int, Any] = {}
    for round_ in range(int(spec.get("rounds", 1))):
        for index, path in enumerate(spec["paths"]):
            try:
                if index not in evaluators:
                    lib = tvm.runtime.load_module(path)
                    lib["main"](*dev_args)  # warm-up (and a crash here is caught by the parent)
                    evaluators[index] = lib.time_evaluator(
                        "main", dev, number=1, repeat=spec["repeat"], **timing
                    )
                secs = float(np.median(list(evaluators[index](*dev_args).results)))
            except Exception as err:  # a candidate that fails at run time
                row = {"index": index, "round": round_, "seconds": None, "error": str(err)[:200]}
                print(json.dumps(row), flush=True)
                continue
            print(json.dumps({"index": index, "round": round_, "seconds": secs}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["measure"]:
        sys.exit(_measure_main())
    sys.exit(f"usage: {sys.argv[0]} measure  (one JSON spec per line on stdin)")
