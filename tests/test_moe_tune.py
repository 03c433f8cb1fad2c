"""The per-device MoE schedule table and ``qiao tune``, which measures a CPU entry into the user's
tuning store (the shipped defaults are read-only). (No timing is asserted: only that tuning
measures, writes a valid entry, and the lowering uses it.) Every test points ``QIAO_CACHE_DIR`` at
a temporary directory, so a user's own tuned entries never change what a test sees."""

from __future__ import annotations

import json
import os

import pytest

from qiao.compiler.testing import assert_close, run_cli


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QIAO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("QIAO_MOE_TABLE", raising=False)
    return tmp_path / "cache"


def target(d):
    import tvm

    return tvm.target.Target(d)


def test_table_picks_entries_by_target():
    from qiao.compiler.schedules.moe_table import device_keys, lookup

    avx512 = lookup(target({"kind": "llvm", "mcpu": "skylake-avx512"}))
    avx2 = lookup(target({"kind": "llvm", "mcpu": "x86-64-v3"}))
    assert (avx512.device, avx512.vector_lanes) == ("cpu/avx512", 16)
    assert (avx2.device, avx2.vector_lanes) == ("cpu/avx2", 8)
    # the lone token's merge is AVX2's (3 x 4 blocks), not AVX-512's (6 x 4)
    assert (avx2.lone_merge, avx512.lone_merge) == (1, 0)
    assert device_keys(target({"kind": "cuda", "arch": "sm_90"})) == ["cuda/sm_90", "cuda"]
    assert lookup(target({"kind": "cuda", "arch": "sm_90"})).device == "cuda"
    assert lookup(target({"kind": "llvm", "mcpu": "x86-64-v3"}), {"block_m": 7}).block_m == 7
    # a CPU tuned apart: the Intel AVX-512 entry is the AVX-512 family's with reduction chunks
    intel = lookup(target({"kind": "llvm", "mcpu": "rocketlake"}))
    assert (intel.device, intel.k_chunk, avx512.k_chunk) == ("cpu/rocketlake", 256, 0)
    assert intel.replace(device="cpu/avx512", k_chunk=0) == avx512
    # AMD Zen 5 (512-bit FMAs, 48 KB L1d): chunks of 512 and 1 prefetch line for a few tokens
    zen5 = lookup(target({"kind": "llvm", "mcpu": "znver5"}))
    assert (zen5.device, zen5.k_chunk, zen5.few_prefetch_lines) == ("cpu/znver5", 512, 1)
    # and the GEMV first in the experts of few tokens
    assert (zen5.few_lead, avx512.few_lead, avx2.few_lead) == (1, 0, 0)
    assert zen5.replace(device="cpu/avx512", k_chunk=0, few_prefetch_lines=4, few_lead=0) == avx512
    # token-lanes sweeps: panels of up to 1 MB of L2 on AVX-512 machines, 512 KB on AVX2 ones
    assert (avx512.lanes_sweep_kb, zen5.lanes_sweep_kb, avx2.lanes_sweep_kb) == (1024, 1024, 512)
    assert (avx512.lanes_group_kb, avx2.lanes_group_kb) == (192, 192)
    # AVX2 code drops the few-token prefetch where it runs on a Zen 5 (family 26), and only there
    assert (avx2.few_prefetch_off, avx512.few_prefetch_off, zen5.few_prefetch_off) == (
        ("amd-26",),
        (),
        (),
    )


def test_tune_starts_from_what_the_entry_runs_here():
    """A tune starts from what the entry runs on this machine: on a family its
    ``few_prefetch_off`` lists, no few-token prefetch (``few_prefetch_lines`` 0); elsewhere its
    lines; the tuned entry lists no families either way."""
    from qiao.compiler.schedules.moe_table import MoESchedule, tune_start

    entry = MoESchedule(device="cpu/avx2", few_prefetch_lines=3, few_prefetch_off=("amd-26",))
    zen5 = tune_start(entry, "cpu/x86-64-v3", 8, "amd-26")
    zen4 = tune_start(entry, "cpu/x86-64-v3", 8, "amd-25")
    assert (zen5.few_prefetch_lines, zen4.few_prefetch_lines) == (0, 3)
    assert zen5.few_prefetch_off == zen4.few_prefetch_off == ()
    assert zen4 == entry.replace(device="cpu/x86-64-v3", few_prefetch_off=())
    assert tune_start(entry, "cpu/x86-64-v3", 8, None).few_prefetch_lines == 3


def test_table_rejects_bad_entries(tmp_path, monkeypatch):
    from qiao.compiler.errors import QiaoError
    from qiao.compiler.schedules.moe_table import lookup

    bad = tmp_path / "t.json"
    monkeypatch.setenv("QIAO_MOE_TABLE", str(bad))
    avx2 = target({"kind": "llvm", "mcpu": "x86-64-v3"})

    def entry(**fields):
        bad.write_text(json.dumps({"version": 1, "entries": {"cpu/avx2": fields}}))
        return lookup(avx2)

    for fields, message in [
        ({"micro_q": 3}, "unknown field.*micro_q.*fix:"),
        ({"micro_m": 0}, "positive integers"),
        ({"prefetch": 4}, "prefetch must be 0, 1, 2 or 3, got 4.*fix:"),
        ({"prefetch_level": 3}, "prefetch_level must be 1 .L1. or 2 .L2., got 3.*fix:"),
        ({"few_prefetch_lines": 9}, "few_prefetch_lines must be 0 .. 8, got 9.*fix:"),
        ({"prefetch_lines": 0}, "prefetch_lines.*positive integers"),
        ({"lone_merge": 2}, "lone_merge must be 0 or 1, got 2.*fix:"),
        ({"few_lead": 2}, "few_lead must be 0 or 1, got 2.*fix:"),
        ({"lanes_sweep_kb": 16385}, "lanes_sweep_kb must be 0 .. 16384 .KB of L2., got 16385"),
        ({"lanes_group_kb": 0}, "lanes_group_kb.*positive integers"),
        ({"few_prefetch_off": ["zen5"]}, "few_prefetch_off must list CPU families.*'zen5'.*fix:"),
        ({"few_prefetch_off": ["amd-0"]}, "few_prefetch_off must list CPU families.*amd-26"),
        ({"few_prefetch_off": [26]}, "few_prefetch_off must list CPU families"),
    ]:
        with pytest.raises(QiaoError, match=message):
            entry(**fields)
    # no prefetch for the experts of few tokens (the hardware prefetcher alone) is an entry
    assert entry(few_prefetch_lines=0).few_prefetch_lines == 0
    assert entry(lanes_sweep_kb=0).lanes_sweep_kb == 0  # one token-lanes pass at a time
    # the CPU families whose few-token streams drop the prefetch at run time, one or a list
    assert entry(few_prefetch_off=["amd-26", "intel-6"]).few_prefetch_off == ("amd-26", "intel-6")
    assert entry(few_prefetch_off="amd-25").few_prefetch_off == ("amd-25",)
    monkeypatch.delenv("QIAO_MOE_TABLE")
    with pytest.raises(QiaoError, match=r"\bunknown field"):
        lookup(target({"kind": "llvm", "mcpu": "x86-64-v3"}), {"nope": 1})


def test_tune_measures_and_writes_an_entry_the_lowering_uses(tmp_path, monkeypatch):
    """A narrowed search on a tiny MoE shape; the written entry drives a correct compile. The
    tune places its experts on the device once (``weight_tensor``: fc1 and fc2) and every
    measurement reads those pages: no copy per candidate (300 MB a call at the CLI's 16-expert
    shape)."""
    import numpy as np

    from qiao.compiler import compile
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules import cpu_memory, moe_table
    from qiao.compiler.schedules.moe_table import TABLE_PATH, lookup, tune_cpu, write_entry
    from tests.test_moe import inputs, make_weights, moe_model, numpy_moe

    placed, timed = [], []
    real_place, real_time = cpu_memory.weight_tensor, moe_table.time_stage_kernels

    def place(value, device):
        placed.append(value.shape)
        return real_place(value, device)

    def time_stages(*args, **kwargs):
        timed.append(kwargs["weights"])
        return real_time(*args, **kwargs)

    monkeypatch.setattr(cpu_memory, "weight_tensor", place)
    monkeypatch.setattr(moe_table, "time_stage_kernels", time_stages)

    table = tmp_path / "table.json"
    table.write_text(open(TABLE_PATH).read())
    # Tuning measures on this machine: tune for this machine (an AVX2 host must never run AVX-512
    # code; test_tune_refuses_code_this_machine_cannot_run covers the refusal).
    from qiao.backends import get_backend

    cpu = get_backend("cpu").target("host")
    device = f"cpu/{cpu.attrs['mcpu']}"
    lines = []
    entry = lookup(cpu)  # where the search starts
    key, best, measured = tune_cpu(
        cpu,
        MoEConfig(4, 32, 16, 2),
        tokens_prefill=24,
        repeat=1,
        log=lines.append,
        candidates=[(2, 4), (3, 2)],
        gemv_rows=(4,),
        tiles_up=(8,),
        tiles_down=(16, 32),
        prefetch_options=(0, 1),
        prefetch_levels=(1, 2),
        prefetch_lines=(1, 2),
        few_prefetch_lines=(2, 4),
        lanes_sweeps=((0, 192), (512, 96)),
    )
    assert key == device and best.device == device
    # what the search found: ``best``, or the start where the result was slower as a whole
    # (its values then stay in the measurements)
    searched = best.replace(**measured.get("overall", {}).get("result", {}))
    if any(line.startswith("slower as a whole") for line in lines):
        assert (best.micro_m, best.micro_n, best.prefetch) == (
            entry.micro_m,
            entry.micro_n,
            entry.prefetch,
        )
    else:
        assert searched == best
    assert placed == [(4, MoEConfig(4, 32, 16, 2).fc1_rows, 32), (4, 32, 16)]
    assert len(timed) > 2 and all(w is timed[0] for w in timed)
    monkeypatch.setattr(cpu_memory, "weight_tensor", real_place)
    # a candidate, or the entry's value where no candidate beat it by MIN_GAIN on re-timing
    assert (searched.micro_m, searched.micro_n) in {(2, 4), (3, 2), (entry.micro_m, entry.micro_n)}
    assert searched.tile_down in (16, 32, entry.tile_down)
    assert searched.prefetch in (0, 1, entry.prefetch) and searched.prefetch_level in (1, 2)
    assert set(measured["prefetch"]) == {"0", "1/L1", "1/L2"}
    assert all(v > 0 for v in measured["micro_up"].values())
    # the prefetch lines are tried where the best schedule prefetches
    assert searched.prefetch_lines in (1, 2, entry.prefetch_lines)
    assert set(measured.get("prefetch_lines", {})) == ({"1", "2"} if searched.prefetch else set())
    # and so are the lines of the experts of few tokens (the entry's few_tokens, or 3 at most)
    assert searched.few_prefetch_lines in ((2, 4) if searched.prefetch else ()) + (
        entry.few_prefetch_lines,
    )
    assert set(measured.get("few_prefetch_lines", {})) == (
        {"2", "4"} if searched.prefetch else set()
    )
    if searched.prefetch:
        assert searched.few_tokens in (entry.few_tokens, min(3, searched.micro_m))
    # the GEMV first or not, where experts of few tokens have their own path
    leads = searched.few_tokens >= 2
    assert set(measured.get("few_lead", {})) == ({"0", "1"} if leads else set())
    # the token-lanes sweeps, where the entry has the token-lanes order
    sweeps = searched.lanes_min > 0
    assert set(measured.get("lanes_sweep", {})) == ({"0/192", "512/96"} if sweeps else set())
    assert (searched.lanes_sweep_kb, searched.lanes_group_kb) in {
        (0, 192),
        (512, 96),
        (entry.lanes_sweep_kb, entry.lanes_group_kb),
    }
    # one line per candidate, and one per winner re-timed against the schedule so far
    whole = ("tuned against", "slower as a whole")  # the result against the start, if changed
    screened = [line for line in lines if " again, " not in line and not line.startswith(whole)]
    again = [line for line in lines if " again, " in line]  # one or two re-timed a step
    assert len(measured["confirmed"]) <= len(again) <= 2 * len(measured["confirmed"])
    assert len(lines) - len(screened) - len(again) in ((1, 2) if "overall" in measured else (0,))
    assert len(screened) == 11 + (4 if searched.prefetch else 0) + (2 if leads else 0) + (
        2 if sweeps else 0
    )
    write_entry(
        key, {**best.to_json(), "micro_m": 3, "micro_n": 2, "block_m": 3}, measured, path=str(table)
    )
    monkeypatch.setenv("QIAO_MOE_TABLE", str(table))
    chosen = lookup(cpu)
    assert (chosen.device, chosen.micro_m, chosen.micro_n) == (device, 3, 2)
    assert json.loads(table.read_text())["measurements"][device]["tokens_prefill"] == 24
    w = make_weights(4, 32, 16, seed=3)
    art = compile(moe_model(w, 2), "cpu", tmp_path / "art", arch="host")
    x, logits = inputs(11, 32, 4, seed=1)
    assert_close(
        art.run({"x": x, "logits": logits})["y"],
        numpy_moe(x, logits, w["fc1"], w["fc2"], 2),
        1e-4,
        1e-5,
    )
    assert np.isfinite(x).all()


def test_tune_cli_dry_run(tmp_path):
    table = tmp_path / "table.json"
    proc = run_cli(
        "tune",
        "--experts",
        "2",
        "--hidden",
        "16",
        "--inter",
        "8",
        "--top-k",
        "1",
        "--tokens",
        "4",
        "--repeat",
        "1",
        "--table",
        str(table),
        "--dry-run",
        "--quick",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "best for cpu/" in proc.stdout and not table.exists()


def test_tune_refuses_code_this_machine_cannot_run():
    from qiao.compiler.errors import QiaoError
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules.cpu_info import host_arch
    from qiao.compiler.schedules.moe_table import tune_cpu

    # Another architecture is foreign on every host; nothing is compiled or run before the refusal.
    foreign = (
        {"kind": "llvm", "mcpu": "znver3", "mtriple": "x86_64-linux-gnu"}
        if host_arch() == "aarch64"
        else {"kind": "llvm", "mcpu": "neoverse-v1", "mtriple": "aarch64-linux-gnu"}
    )
    with pytest.raises(QiaoError, match="cannot tune .* lacks .*fix:"):
        tune_cpu(target(foreign), MoEConfig(4, 32, 16, 2), repeat=1, log=lambda *_: None)


def _digest(path) -> tuple[str, int]:
    import hashlib
    import os

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns


def test_user_store_is_read_before_the_shipped_defaults(cache_dir, tmp_path):
    from qiao.compiler.schedules.moe_table import (
        TABLE_PATH,
        load_table,
        lookup,
        user_table_path,
        write_entry,
    )

    shipped = _digest(TABLE_PATH)
    haswell = target({"kind": "llvm", "mcpu": "haswell"})  # keys: cpu/haswell, then cpu/avx2
    assert lookup(haswell).device == "cpu/avx2"
    default_gemv = lookup(haswell).gemv_n
    # A user entry for a shipped key replaces it; one for the exact CPU wins over both.
    path = write_entry("cpu/avx2", {"gemv_n": default_gemv + 4, "micro_m": 3})
    assert path == user_table_path() and path.startswith(str(cache_dir))
    got = lookup(haswell)
    assert (got.device, got.gemv_n, got.micro_m) == ("cpu/avx2", default_gemv + 4, 3)
    write_entry("cpu/haswell", {"micro_m": 5}, {"note": "measured"})
    assert (lookup(haswell).device, lookup(haswell).micro_m) == ("cpu/haswell", 5)
    data = json.loads(open(path).read())
    assert set(data["entries"]) == {"cpu/avx2", "cpu/haswell"}  # only what was tuned
    assert data["measurements"]["cpu/haswell"] == {"note": "measured"}
    assert set(load_table()) >= {"cpu/avx512", "cuda", "cpu/haswell"}
    # Another store (`--tuning-db` / the `tuning_db` option) has its own table.
    other = tmp_path / "other-store"
    write_entry("cpu/haswell", {"micro_m": 6}, root=other)
    assert lookup(haswell, root=other).micro_m == 6 and lookup(haswell).micro_m == 5
    assert (other / "moe_table.json").exists()
    assert _digest(TABLE_PATH) == shipped


def test_the_shipped_table_is_never_written(tmp_path):
    from qiao.compiler.errors import QiaoError
    from qiao.compiler.schedules.moe_table import TABLE_PATH, write_entry

    shipped = _digest(TABLE_PATH)
    with pytest.raises(QiaoError, match="never written.*fix:"):
        write_entry("cpu/avx2", {"micro_m": 3}, path=TABLE_PATH)
    assert _digest(TABLE_PATH) == shipped


def test_an_interrupted_write_leaves_the_previous_table(cache_dir, monkeypatch):
    """Killed between writing the new table and renaming it over the old one: the old one stays
    whole and readable (the rename is atomic) and the temporary file is gone."""
    import os

    from qiao.compiler.schedules import moe_table

    haswell = target({"kind": "llvm", "mcpu": "haswell"})
    path = moe_table.write_entry("cpu/haswell", {"micro_m": 5})

    def killed(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(moe_table.os, "replace", killed)
        moe_table.write_entry("cpu/haswell", {"micro_m": 7})
    assert moe_table.lookup(haswell).micro_m == 5
    assert os.listdir(os.path.dirname(path)) == ["moe_table.json"]
    # A table someone truncated is an error naming the fix, not silently replaced or ignored.
    with open(path, "w") as f:
        f.write('{"version": 1, "entr')
    with pytest.raises(moe_table.QiaoError, match="cannot read .*fix: delete"):
        moe_table.lookup(haswell)
    with pytest.raises(moe_table.QiaoError, match="cannot read"):
        moe_table.write_entry("cpu/haswell", {"micro_m": 7})


def test_tune_cli_writes_only_the_user_store(cache_dir, monkeypatch, capsys):
    """`qiao tune` (the write path, in this process) with the package's table read-only and every
    write to it refused: the entry lands in the user's store, the package file is untouched."""
    import builtins
    import os

    from qiao.compiler.cli.__main__ import main
    from qiao.compiler.schedules.moe_table import TABLE_PATH, lookup

    shipped = _digest(TABLE_PATH)
    real_open, real_replace = builtins.open, os.replace

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and os.path.realpath(file) == TABLE_PATH:
            raise AssertionError(f"{TABLE_PATH} opened for writing")
        return real_open(file, mode, *args, **kwargs)

    def guarded_replace(src, dst, *args, **kwargs):
        if os.path.realpath(dst) == TABLE_PATH:
            raise AssertionError(f"{TABLE_PATH} replaced")
        return real_replace(src, dst, *args, **kwargs)

    mode = os.stat(TABLE_PATH).st_mode
    os.chmod(TABLE_PATH, 0o444)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(builtins, "open", guarded_open)
            patch.setattr(os, "replace", guarded_replace)
            args = ["tune", "--experts", "2", "--hidden", "16", "--inter", "8", "--top-k", "1"]
            assert main([*args, "--tokens", "4", "--repeat", "1", "--quick"]) == 0
            out = capsys.readouterr().out
            assert main(["tune", "show"]) == 0
            shown = capsys.readouterr().out
    finally:
        os.chmod(TABLE_PATH, mode)
    store = cache_dir / "tuning" / "moe_table.json"
    assert f"written to {store}" in out
    from qiao.backends import get_backend

    host = get_backend("cpu").target("host")
    key = f"cpu/{host.attrs['mcpu']}"
    assert list(json.loads(store.read_text())["entries"]) == [key]
    assert lookup(host).device == key
    assert str(store) in shown and f"  {key}: " in shown
    assert _digest(TABLE_PATH) == shipped


def test_tune_show_prints_what_tuning_bought(tmp_path, capsys):
    """`qiao tune show` prints, under a tuned entry, the whole-result gain its tune measured
    against the entry it started from (``measurements["overall"]``), and what the search found
    where the entry kept its start's values; an entry without it (an unchanged result, an older
    table) prints none."""
    from qiao.compiler.cli.__main__ import main
    from qiao.compiler.schedules.moe_table import write_entry

    overall = {"against": "cpu/avx2", "tokens": [1, 128, 512], "gain": 1.0834}
    overall["result"] = {"micro_m": 4}  # kept: the entry has it
    write_entry("cpu/x86-64-v3", {"micro_m": 4}, {"overall": overall}, root=str(tmp_path))
    write_entry("cpu/znver9", {"micro_m": 2}, {"confirmed": {}}, root=str(tmp_path))
    assert main(["tune", "show", "--tuning-db", str(tmp_path)]) == 0
    shown = capsys.readouterr().out.splitlines()
    at = shown.index("  cpu/x86-64-v3: micro_m=4")
    assert (
        shown[at + 1] == "    when tuned: 1.08x as fast as cpu/avx2 (T=1 + 128 + 512, both GEMMs)"
    )
    assert shown[shown.index("  cpu/znver9: micro_m=2") + 1].startswith("  shipped defaults")
    assert not any(line.startswith("    found, not kept") for line in shown)
    # a result slower as a whole than its start: the entry keeps the start's values, and what
    # the search found is printed under it
    kept = {"against": "cpu/avx2", "tokens": [1], "gain": 0.5, "result": {"micro_m": 2}}
    write_entry("cpu/x86-64-v3", {"micro_m": 3}, {"overall": kept}, root=str(tmp_path))
    assert main(["tune", "show", "--tuning-db", str(tmp_path)]) == 0
    shown = capsys.readouterr().out.splitlines()
    at = shown.index("  cpu/x86-64-v3: micro_m=3")
    assert shown[at + 2] == "    found, not kept (slower as a whole): micro_m=2"
    # measurements of another shape (hand-edited): the entries alone, no traceback
    table = tmp_path / "moe_table.json"
    data = json.loads(table.read_text())
    data["measurements"]["cpu/x86-64-v3"] = ["not", "a", "mapping"]
    table.write_text(json.dumps(data))
    assert main(["tune", "show", "--tuning-db", str(tmp_path)]) == 0
    assert "when tuned" not in capsys.readouterr().out


@pytest.mark.parametrize("lanes_min", [16, 0])
def test_tuner_scores_the_gate_up_blocks_where_they_run(monkeypatch, lanes_min):
    """The gate/up GEMM's dot-product blocks serve the experts below ``lanes_min`` tokens (the
    larger ones take the token-lanes order), so its micro-kernel and tile are scored on about 8
    tokens per expert, the down GEMM's on the prefill load; with no lanes order (``lanes_min``
    0) the gate/up blocks serve the prefill too. Timings are faked: each candidate scores by
    the load it was timed on, so a candidate timed on the wrong load loses."""
    from qiao.backends import get_backend
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules import moe_table

    cfg = MoEConfig(16, 32, 16, 2)
    mid, prefill = 8 * 16 // 2, 48
    calls = []

    def fake(target, schedule, cfg_, tokens, *, stages=("up", "down"), **_):
        calls.append((schedule, tokens, stages))
        # (3, 2) is the best gate/up block at 8 tokens an expert, (2, 4) at the prefill load
        best_up = (3, 2) if tokens == mid else (2, 4)
        up = 1.0 if (schedule.micro_m, schedule.micro_n) == best_up else 2.0
        return {s: up if s == "up" else 1.0 for s in stages}

    monkeypatch.setattr(moe_table, "time_stage_kernels", fake)
    cpu = get_backend("cpu").target("host")
    real_lookup = moe_table.lookup
    monkeypatch.setattr(
        moe_table,
        "lookup",
        lambda *a, **k: real_lookup(*a, **k).replace(lanes_min=lanes_min),
    )
    _key, best, measured = moe_table.tune_cpu(
        cpu,
        cfg,
        tokens_prefill=prefill,
        log=lambda line: None,
        candidates=[(2, 4), (3, 2)],
        gemv_rows=(4,),
        tiles_up=(8, 16),
        tiles_down=(16,),
        prefetch_options=(0,),
        k_chunks=(),
        lanes_sweeps=(),
    )
    up_load = mid if lanes_min else prefill
    assert measured["tokens_up_blocks"] == up_load
    # every gate/up-only timing (micro-kernels, then tiles 8 and 16) on the blocks' load
    up = [(sched.tile_up, t) for sched, t, st in calls if st == ("up",)]
    assert {t for _tile, t in up} == {up_load} and {tile for tile, _t in up} >= {8, 16}
    assert {t for _sched, t, st in calls if st == ("down",)} == {prefill}
    assert (best.micro_m, best.micro_n, best.block_m) == ((3, 2, 3) if lanes_min else (2, 4, 2))


def _tune_up_micro(monkeypatch, fake, candidates):
    """``tune_cpu`` on a tiny MoE with ``fake`` timings, from a 3 x 2 gate/up block, screening
    the gate/up ``candidates`` and nothing else of note. Returns (best, measurements, log)."""
    from qiao.backends import get_backend
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules import moe_table

    monkeypatch.setattr(moe_table, "time_stage_kernels", fake)
    real_lookup = moe_table.lookup
    monkeypatch.setattr(
        moe_table,
        "lookup",
        lambda *a, **k: real_lookup(*a, **k).replace(micro_m=3, micro_n=2, block_m=3),
    )
    lines = []
    _key, best, measured = moe_table.tune_cpu(
        get_backend("cpu").target("host"),
        MoEConfig(16, 32, 16, 2),
        tokens_prefill=48,
        log=lines.append,
        candidates=candidates,
        gemv_rows=(4,),
        tiles_up=(16,),
        tiles_down=(16,),
        prefetch_options=(0,),
        k_chunks=(),
        lanes_sweeps=(),
    )
    return best, measured, lines


@pytest.mark.parametrize("fluke", [True, False])
def test_tuner_keeps_a_screening_winner_only_when_it_wins_again(monkeypatch, fluke):
    """A candidate that screened fastest replaces the schedule so far only when it is at least
    ``MIN_GAIN`` faster again over interleaved rounds: a fluke of the screening (fast once,
    slow after) leaves the entry's block; a real gain takes it. Timings are faked."""

    timed = {}

    def fake(target, schedule, cfg_, tokens, *, stages=("up", "down"), **_):
        block = (schedule.micro_m, schedule.micro_n)
        timed[block] = timed.get(block, 0) + ("up" in stages and len(stages) == 1)
        if block == (2, 4):  # the candidate: 1.0 when screened (after a first timing that
            # compiles it), then 2.0 if a fluke
            up = 2.0 if fluke and timed[block] > 2 else 1.0
        else:
            up = 1.5
        return {s: up if s == "up" else 1.0 for s in stages}

    best, measured, lines = _tune_up_micro(monkeypatch, fake, [(2, 4), (3, 2)])
    gain = measured["confirmed"]["up micro"]
    assert gain == pytest.approx(0.75 if fluke else 1.5)
    # a changed schedule is timed as a whole against the start (1.5 + 1 against 1 + 1 per load)
    assert ("overall" in measured) == (not fluke)
    if not fluke:
        assert measured["overall"]["gain"] == pytest.approx(1.25)
    assert (best.micro_m, best.micro_n, best.block_m) == ((3, 2, 3) if fluke else (2, 4, 2))
    assert any(line.startswith("up micro: (2, 4) against (3, 2) again") for line in lines)


def test_tuner_screens_each_candidate_against_the_schedule_so_far(monkeypatch):
    """A slow spell of the machine during the screening slows whatever runs in it: each candidate
    is timed between two timings of the schedule so far, the three back to back after a first
    timing that compiles it, and scored by the ratio, so the best block, screened in a spell
    that slows the incumbent around it alike, still wins (and is taken after re-timing), where
    a candidate screened outside the spell at a worse time but a lower raw time than the best's
    does not. Timings are faked: blocks (3, 2) (incumbent) 1.0, (4, 4) 1.3, (2, 4) 0.8, every
    timing in the spell twice that."""

    true_time = {(3, 2): 1.0, (4, 4): 1.3, (2, 4): 0.8}
    up_calls = []

    def fake(target, schedule, cfg_, tokens, *, stages=("up", "down"), **_):
        block = (schedule.micro_m, schedule.micro_n)
        up = true_time.get(block, 1.0)
        if stages == ("up",):
            up_calls.append(block)
            # the spell: the up micro step's timings of (2, 4) and the incumbent around it
            if 5 <= len(up_calls) <= 8:
                up *= 2
        return {s: up if s == "up" else 1.0 for s in stages}

    best, measured, lines = _tune_up_micro(monkeypatch, fake, [(4, 4), (2, 4), (3, 2)])
    assert up_calls[:9] == [(4, 4), (3, 2), (4, 4), (3, 2)] + [(2, 4), (3, 2), (2, 4), (3, 2)] + [
        (3, 2)
    ]
    assert measured["micro_up"] == {"4x4": 1.3, "2x4": 1.6, "3x2": 1.0}
    assert measured["confirmed"]["up micro"] == pytest.approx(1.25)
    assert (best.micro_m, best.micro_n, best.block_m) == (2, 4, 2)
    assert any("up micro 2x4: 1600.000 ms (0.80x the schedule so far)" in line for line in lines)


def test_tuner_re_times_the_runner_up_where_the_screening_winner_was_a_fluke(monkeypatch):
    """The candidate that screened fastest is re-timed first; where it does not win again (a
    fluke of its screening), the runner-up is, and taken where it wins. Timings are faked: the
    incumbent (3, 2) 1.5; (4, 4) 0.5 at its screening, 1.5 after; (2, 4) 1.0."""
    timed = {}

    def fake(target, schedule, cfg_, tokens, *, stages=("up", "down"), **_):
        block = (schedule.micro_m, schedule.micro_n)
        if stages == ("up",):
            timed[block] = timed.get(block, 0) + 1
        up = {(3, 2): 1.5, (2, 4): 1.0}.get(block, 1.5)
        if block == (4, 4) and stages == ("up",) and timed[block] == 2:  # its screening
            up = 0.5
        return {s: up if s == "up" else 1.0 for s in stages}

    best, measured, lines = _tune_up_micro(monkeypatch, fake, [(4, 4), (2, 4), (3, 2)])
    again = [line for line in lines if line.startswith("up micro: ")]
    assert [line.split(" again,")[0] for line in again] == [
        "up micro: (4, 4) against (3, 2)",
        "up micro: (2, 4) against (3, 2)",
    ]
    assert "1.00x as fast" in again[0] and "1.50x as fast" in again[1]
    assert (best.micro_m, best.micro_n, best.block_m) == (2, 4, 2)


def test_tuner_keeps_the_start_where_the_result_is_slower_as_a_whole(monkeypatch):
    """Each step scores its candidates on one load; the result is timed against the entry the
    search started from on decode, ~8 tokens per expert and the prefill together, and where it
    is slower by ``MIN_GAIN`` the start's values stay, the result's beside them in the
    measurements. Timings are faked: the (2, 4) block wins at 8 tokens an expert (1.0 against the
    entry's 1.5) and takes 10.0 at every other load."""
    from qiao.compiler.schedules import tuning

    mid = 8 * 16 // 2

    def fake(target, schedule, cfg_, tokens, *, stages=("up", "down"), **_):
        if (schedule.micro_m, schedule.micro_n) == (2, 4):
            up = 1.0 if tokens == mid else 10.0
        else:
            up = 1.5
        return {s: up if s == "up" else 1.0 for s in stages}

    best, measured, lines = _tune_up_micro(monkeypatch, fake, [(2, 4), (3, 2)])
    assert measured["confirmed"]["up micro"] == pytest.approx(1.5)  # the step took it
    overall = measured["overall"]
    assert overall["tokens"] == [1, mid, 48] and overall["against"].startswith("cpu/")
    assert overall["gain"] == pytest.approx(7.5 / 24) and overall["gain"] < 1 / tuning.MIN_GAIN
    assert (best.micro_m, best.micro_n, best.block_m) == (3, 2, 3)
    assert any(line.startswith("slower as a whole: keeping") for line in lines)
    # what the search found stays in the measurements (the table's entry has the start's values)
    assert overall["result"] == {"micro_m": 2, "micro_n": 4, "block_m": 2}


def test_tuner_places_the_experts_as_the_runner_does(monkeypatch):
    """``time_stage_kernels`` (what ``qiao tune moe`` measures) puts the experts on the device
    through ``weight_tensor``, the runners' placement (huge pages for large weights), so its
    timings are those of the pages the compiled model will read, not of 4 KB ones."""
    import numpy as np

    from qiao.backends import get_backend
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules import cpu_memory
    from qiao.compiler.schedules.moe_table import lookup, time_stage_kernels

    placed = []
    real = cpu_memory.weight_tensor

    def spy(value, device):
        placed.append(value)
        return real(value, device)

    monkeypatch.setattr(cpu_memory, "weight_tensor", spy)
    cfg = MoEConfig(4, 32, 16, 2)
    rng = np.random.default_rng(0)
    weights = (
        rng.standard_normal((4, cfg.fc1_rows, 32), dtype=np.float32),
        rng.standard_normal((4, 32, 16), dtype=np.float32),
    )
    cpu = get_backend("cpu").target("host")
    times = time_stage_kernels(cpu, lookup(cpu), cfg, 6, repeat=1, weights=weights)
    assert [id(w) for w in placed] == [id(w) for w in weights]
    assert times["up"] > 0 and times["down"] > 0
    # experts already placed are read where they are (the tuner places its own once)
    from qiao.compiler.schedules.cpu_info import cpu_device

    on_device = tuple(real(w, cpu_device()) for w in weights)
    placed.clear()
    times = time_stage_kernels(cpu, lookup(cpu), cfg, 6, repeat=1, weights=on_device)
    assert placed == [] and times["up"] > 0 and times["down"] > 0


def test_tuner_compiles_each_kernel_once(monkeypatch):
    """A schedule scored on several token counts, or on one GEMM, compiles each of its kernels once
    (the kernels are the same for every count); ``stages`` times only the GEMMs it names, a
    changed schedule compiles again."""
    from qiao.backends import get_backend
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules import moe_table

    compiled = []
    real = moe_table._compile_kernel

    def counting(func, target):
        compiled.append(func)
        return real(func, target)

    monkeypatch.setattr(moe_table, "_compile_kernel", counting)
    moe_table._stage_kernel.cache_clear()
    moe_table._dispatch_kernels.cache_clear()
    cfg = MoEConfig(4, 32, 16, 2, activation="relu")  # a config no other test times
    cpu = get_backend("cpu").target("host")
    sched = moe_table.lookup(cpu)
    up = moe_table.time_stage_kernels(cpu, sched, cfg, 6, repeat=1, stages=("up",))
    assert set(up) == {"up"} and up["up"] > 0
    both = moe_table.time_stage_kernels(cpu, sched, cfg, 11, repeat=1)
    assert set(both) == {"up", "down"} and both["down"] > 0
    moe_table.time_stage_kernels(cpu, sched, cfg, 1, repeat=1)
    assert len(compiled) == 2 + 2  # gating and alignment, then up, then down
    other = sched.replace(tile_down=2 * sched.tile_down)
    assert set(moe_table.time_stage_kernels(cpu, other, cfg, 6, repeat=1, stages=("down",))) == {
        "down"
    }
    assert len(compiled) == 5
    with pytest.raises(ValueError, match="unknown stages"):
        moe_table.time_stage_kernels(cpu, sched, cfg, 6, repeat=1, stages=("gate",))


def test_tuner_compiles_the_kernels_as_a_model_does():
    """The tuner's kernels (``moe_table._compile_kernel``) go through the schedule phase's loop
    passes as a compiled model's do: the gate/up epilogue's SiLU is a polynomial, not LLVM's
    ``exp`` (libm's ``expf`` per element), which the plain TIR pipeline leaves."""
    from qiao.backends import get_backend
    from qiao.compiler.kernels.group_gemm import group_gemm_up
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.passes.shuffle_strided_loads import compile_cpu_kernel
    from qiao.compiler.schedules.moe_table import _compile_kernel, lookup

    cfg = MoEConfig(4, 64, 32, 2)
    cpu = get_backend("cpu").target("x86-64-v3")  # compiled only, never run
    func = group_gemm_up(cfg, lookup(cpu))
    assert "@llvm.exp." in compile_cpu_kernel(func, cpu).mod.inspect_source("ll")
    assert "@llvm.exp." not in _compile_kernel(func, cpu).mod.inspect_source("ll")


@pytest.mark.parametrize("tuned", [False, True])
def test_benchmarks_compile_with_the_shipped_schedules(tmp_path, monkeypatch, tuned):
    """Inside ``shipped_schedules`` the tuning store is an empty one and ``QIAO_MOE_TABLE`` is
    unset, so a tuned entry of this machine does not change a benchmark's figures;
    ``QIAO_BENCH_TUNED=1`` keeps them. The environment is restored after."""
    from qiao.compiler.schedules.moe_table import lookup, write_entry
    from qiao.compiler.schedules.tuning import shipped_schedules

    avx2 = target({"kind": "llvm", "mcpu": "x86-64-v3"})
    table = tmp_path / "user.json"
    write_entry("cpu/x86-64-v3", {"micro_m": 4, "micro_n": 2}, path=str(table))
    monkeypatch.setenv("QIAO_MOE_TABLE", str(table))
    monkeypatch.setenv("QIAO_CACHE_DIR", str(tmp_path / "mine"))
    if tuned:
        monkeypatch.setenv("QIAO_BENCH_TUNED", "1")
    else:
        monkeypatch.delenv("QIAO_BENCH_TUNED", raising=False)
    assert lookup(avx2).device == "cpu/x86-64-v3"
    store = tmp_path / "empty"
    store.mkdir()
    with shipped_schedules(store):
        inside = lookup(avx2)
        cache = os.environ["QIAO_CACHE_DIR"]
    assert inside.device == ("cpu/x86-64-v3" if tuned else "cpu/avx2")
    assert cache == str(tmp_path / "mine" if tuned else store)
    assert os.environ["QIAO_MOE_TABLE"] == str(table)
    assert os.environ["QIAO_CACHE_DIR"] == str(tmp_path / "mine")
