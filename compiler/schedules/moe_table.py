"""Per-device schedule parameters of qiao's MoE kernels (block sizes, micro-kernel shapes).

Two layers, read in this order:

- the user's table, ``moe_table.json`` in the tuning store (``tuning.tuning_root()``:
  ``$QIAO_CACHE_DIR/tuning``, or the ``root`` given; ``QIAO_MOE_TABLE`` names another file), which
  ``qiao tune moe`` writes (atomically: a killed tune leaves the previous table);
- the shipped defaults, ``moe_table.json`` beside this file: read-only, no command writes them.

A user entry replaces the shipped entry of the same key. ``lookup(target)`` picks the entry for a
TVM target:

- LLVM (CPU) targets: ``cpu/<mcpu>`` when tuned for that CPU, else ``cpu/avx512``, ``cpu/avx2`` or
  ``cpu/simd128`` from the target's SIMD width (read from the target, never from this machine);
- CUDA: ``cuda/<arch>`` then ``cuda``; ROCm: ``rocm/<mcpu>`` then ``rocm``.

The ``moe_schedule`` compile option may give overrides (a mapping of field names); they are applied
with ``MoESchedule.replace``. Entries only name the fields they change from the defaults below."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qiao.compiler.errors import QiaoError

# The shipped defaults: read-only (an installed package may not even be writable).
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_table.json")
TABLE_VERSION = 1
USER_TABLE = "moe_table.json"  # file name of the user's table inside the tuning store
MAX_PREFETCH_LINES = 8  # CPU: the most vector steps of each next weight row one step prefetches
MAX_LANES_SWEEP_KB = 16 * 1024  # CPU: the most L2 a token-lanes sweep's panels may take (KB)
# ``tune_cpu``: the screened candidates re-timed against the schedule so far, best first, until
# one is confirmed (on the Zen 5 VM, 2026-12-07, a fluke of the screening put 4 few-token
# prefetch lines at 0.74x the incumbent's time, 0.99x on re-timing, ahead of none at 0.79x,
# which had won 1.12x on re-timing in the two tunes before)
CONTENDERS = 2
# ``tune_cpu``: interleaved rounds of a re-timing (the GEMM tuner's 5 were too few for the MoE
# kernels' weight streams there: none against 3 few-token prefetch lines re-timed at 1.12x and
# 0.85x in two tunes of one hour, 40 rounds of the whole block 0.74x the time at T = 1)
CONFIRM_ROUNDS = 11


@dataclass(frozen=True)
class MoESchedule:
    """Schedule parameters of the four MoE stages for one device.

    Parameters
    ----------
    device : str
        The table key this came from (``cpu/avx512``, ``cuda``...).
    block_m : int
        Alignment block: each expert's token slots are padded to a multiple of this (vLLM's
        ``moe_align_block_size``); on GPUs it is also the rows of one thread-block tile.
    vector_lanes : int
        CPU: float32 lanes of one SIMD register; the reduction axis is vectorised by this.
    micro_m, micro_n : int
        CPU gate/up grouped-GEMM micro-kernel: tokens x weight rows held in ``micro_m * micro_n``
        vector accumulators (registers). ``micro_m`` full rows use it; fewer use the GEMV kernel.
    down_micro_m, down_micro_n : int
        The same for the down projection (its reduction axis is shorter, so more token rows stay
        in L1).
    gemv_n : int
        CPU GEMV (decode) kernel: weight rows per step for one token.
    prefetch : int
        CPU: prefetch the next group of weight rows while the current one is multiplied (the
        weight streams are what bounds decode and small batches): 1 while each of the expert's
        token blocks is, 2 while only the first is, 0 never (the hardware prefetcher alone), 3
        (split) the group two ahead, its rows shared out among a pass's token blocks (round
        robin, the first block left out where there are three or more: it reads the rows
        prefetched for it), in passes of at most ``SPLIT_BLOCKS`` (4) blocks, otherwise as 1
        (until 2026-12-07 as 2: on a 2-core AMD Zen 5 VM the down GEMM of the Qwen3-30B-A3B
        block at T = 512, AVX2 code, eleven blocks of 32 tokens an expert, then took 1.10-1.14x
        the time of 1, 9-11 interleaved rounds; T = 128 the same).
        With 2 the first block's own reads and the prefetches of the next group go out at once
        and the memory idles while the later blocks multiply from L1 (on one core the first of
        three blocks took twice the time of the second). On one core of the AVX-512 EPYC VM
        (2026-12-05, AVX2 code, 64 experts of exactly c tokens, both GEMMs, 5 interleaved
        rounds) 3 took 0.93 / 0.90 / 0.99 / 1.00x the time of 2 for c = 5 / 8 / 12 / 32; the
        group one ahead instead of two took 1.09x the time of two at c = 5 and 8. On the whole
        Qwen3-30B-A3B block (AVX2 code, two threads) 3 took 0.89x the time at T = 128 (11
        interleaved rounds, most at ~60 GB/s; qiao / roofline 1.32 -> 1.20; before the cap of
        four blocks) and 0.97x (9 at ~33 GB/s), 1.00x at T = 16 and 512 (1.02-1.03x at 512
        without the cap),
        so ``cpu/avx2`` takes 3. On AVX-512 code (blocks of 6 tokens: T = 128's experts have one
        or two) the split took 1.00x at T = 128 and 0.99x at T = 512: ``cpu/avx512`` keeps 1.
    prefetch_level : int
        CPU: the cache that software prefetch fills, 1 (L1) or 2 (L2). On the Intel AVX-512 host
        of 2026-12-03, L2 took 0.95-0.97x the time of L1 at T = 128 and 512 on the Qwen3-30B-A3B
        block (AVX-512 and AVX2 code), the same at T = 1 and 16.
    prefetch_lines : int
        CPU: vector steps of each next weight row prefetched per step, 1 (the step's own) or 2
        (also the following one: every line is asked for twice, and a prefetch dropped while the
        core's miss buffers are full gets a second chance). On the AVX-512 EPYC VM (2026-12-04,
        Qwen3-30B-A3B block, 5-7 interleaved rounds against 1) 2 took 0.87x the time at T = 128
        and 0.92x at T = 16 in rounds where the memory read ~60 GB/s, 0.94-0.99x where it read ~35;
        on AVX2 code, whose 8-lane steps already ask for each line twice, 0.97x at T = 128 and
        1.04x at T = 1 (a third request) with the 2 x 4 block of then. With the 3 x 4 block
        (2026-12-05, 11 rounds, ~60 GB/s) 2 took 0.93x at T = 1, 0.90x at T = 16 (qiao ÷
        roofline 1.26 -> 1.09), 0.99-1.00x at T = 128 / 512, so ``cpu/avx2`` takes 2 too.
    few_tokens, few_prefetch_lines : int
        CPU: experts with at most ``few_tokens`` tokens (one register block of them, so each
        weight line is met once: bound by the memory stream; 0: none) prefetch
        ``few_prefetch_lines`` vector steps of each next weight row per step instead of
        ``prefetch_lines``; decode's GEMV too. On the AVX-512 EPYC VM (2026-12-05, the
        Qwen3-30B-A3B experts, 64 of them with exactly c tokens each, one core, against its
        streaming read) 4 lines instead of 2 read the weights at 0.95 / 0.94 / 0.93 of the read
        rate for c = 1 / 2 / 3 (0.89 / 0.73 / 0.67 with 2; 6 lines 0.82, 8 lines 0.78) and 0.84
        for c = 6 (0.64), but prefetching 4 lines for every expert took 1.06-1.07x the time at
        T = 128 and 512, where the experts' blocks are bound by the FMAs. On the whole block (9
        interleaved rounds at ~65 GB/s) ``few_tokens`` 3 with 4 lines took 0.89x the time at T =
        16 (qiao ÷ roofline 1.20 -> 1.12), 1.00x at T = 1 and 128; ``few_tokens`` 6 against 3
        0.955x at T = 128, 1.01x at T = 16 and 512, so ``cpu/avx512`` takes 6 (its ``micro_m``).
        On AVX2 code (half a line per step) one core read at 0.98 / 0.98 / 0.96 of the read rate
        for c = 1 / 2 / 3 with 3 lines (0.90 / 0.79 / 0.80 with 2; 4 lines 0.93-0.97 / 0.89-0.93
        / 0.86-0.88, 5 and more slower), and the whole block took 0.89x the time at T = 16 (qiao ÷
        roofline 1.12 -> 1.02), 1.02x at T = 1 and 128 (within noise), so ``cpu/avx2`` takes 3
        tokens (its ``micro_m``) and 3 lines. On a 2-core AMD Zen 5 VM (LLVM ``znver5``: 512-bit
        FMAs, 48 KB L1d, 1 MB L2 per core; 2026-12-07, stage kernels alone, 7 interleaved rounds)
        2 lines on AVX-512 code took 0.88x the time of 4 at T = 1 and 0.92x at T = 16 (3 lines
        0.95x / 0.95x), and AVX2 code kept 3-4. Later the same day, with ``few_lead`` (whole
        block, 9 interleaved rounds) 1 line took 0.97 / 0.90 / 0.98x the time of 2 at T = 1 /
        16 / 128, and in 20-40 rounds each against the read probe 0.94-0.98x at T = 1 and
        0.93-0.97x at T = 16; 0 (no prefetch there: the hardware prefetcher alone) 0.94-0.97x
        and 0.96-0.98x, so its ``cpu/znver5`` entry takes 1. AVX2 code there read fastest with 0
        (T = 1: 0.82x the time of 3, 1 line 0.89x, 2 lines 0.95x), where the AVX-512 EPYC had
        measured the hardware prefetcher alone at 0.49-0.69 of the read rate: ``cpu/avx2``
        keeps 3 and turns them off at run time on a Zen 5 (``few_prefetch_off``), ``qiao tune
        moe`` tries 0 .. 6 per machine.
    few_prefetch_off : tuple of str
        CPU: the families (``cpu_info.cpu_family_code``'s names: ``amd-26``) on which the
        few-token blocks and decode's GEMV run without software prefetch, as with
        ``few_prefetch_lines`` 0, chosen when the kernel runs (the CPU family qiao's runners
        publish, ``cpu_info.publish_cpu_family``), not when it is compiled: generic-ISA code
        (``cpu/avx2``, what ``--arch x86-64-v3`` builds) meets both kinds of machine. On the
        2-core AMD Zen 5 VM (family 26) AVX2 code's decode read fastest with none (sessions
        49-53: 0.82x the time of 3 lines at T = 1; on 2026-12-08 the whole block took 3.92
        against 5.05 ms at T = 1 and qiao ÷ roofline 1.25 -> 1.04, 1.28 -> 1.11 at T = 16),
        where the AVX-512 EPYC (Zen 4, family 25) read at 0.49-0.69 of the rate without it:
        ``cpu/avx2`` names ``amd-26``. ``qiao tune moe`` clears it (a tuned entry is for one
        machine).
    few_lead : int
        CPU: 1: in an expert of 2 .. ``few_tokens`` tokens the first token streams each task's
        weight rows in through the GEMV (decode's kernel, the lightest reader), and the others
        then meet them in L2 as one register block (a second GEMV where one is left); 0: all of
        them in one block straight from memory. On a 2-core AMD Zen 5 VM (LLVM ``znver5``, 1 MB
        L2; 2026-12-07, Qwen3-30B-A3B block, every expert given exactly c tokens, 9 interleaved
        rounds) AVX-512 code took 0.92 / 0.89 / 0.90x the gate/up GEMM's time for c = 2 / 4 / 6
        and 0.95-0.98x the down GEMM's; there the GEMV streamed its weights at 1.15-1.2x the rate
        of the blocks of 2-6 tokens, whose reads lag the memory also with no software prefetch
        at all. The whole block took 0.97x the time at T = 16 and 128 (random routing) and
        AVX2 code (blocks of up to 3 tokens) gained nothing: ``cpu/znver5`` takes 1.
    lanes_min : int
        CPU gate/up grouped GEMM: experts with at least this many tokens take the token-lanes
        order (``cpu_gemm.lanes_microkernel``: tokens in SIMD lanes, weights broadcast, no
        horizontal sums), the others the dot-product micro-kernels; 0: never. The down GEMM keeps
        the dot order (the lanes order measured slower there: 94 against 72 ms at T = 512).
    lanes_sweep_kb, lanes_group_kb : int
        CPU gate/up grouped GEMM, token-lanes order: an expert of more tokens than one pass
        takes (three vectors: 24 on AVX2, 48 on AVX-512) has the token panels of as many of its
        passes as ``lanes_sweep_kb`` KB holds transposed first, and every group of about
        ``lanes_group_kb`` KB of weight rows then meets them in turn: the first pass reads the
        group from memory, the others from L2, so the weight stream is spread over all of the
        expert's FMAs; 0: one pass at a time over the task's rows (the later passes read them
        again from L3, and the memory idles while they run). On a 2-core AMD Zen 5 VM (1 MB L2;
        2026-12-07, Qwen3-30B-A3B block, every expert given exactly 32 tokens, 7-11 interleaved
        rounds) AVX2 code (two passes of 16 tokens) ran the gate/up GEMM in 0.86-0.92x the time
        with 512 KB and groups of 192 KB (96 KB: 0.92-0.96x; 384 KB: 0.91x), the whole block in
        0.91-0.96x, and 0.94x at T = 512 with random routing; AVX-512 code at 64 tokens an
        expert (T = 1024) 0.91-0.94x the gate/up GEMM's time. ``qiao tune moe`` tries a few
        pairs per machine.
    k_chunk : int
        CPU gate/up grouped GEMM (dot-product order): walk the reduction in chunks of this many
        float32, the chunk loop outside the weight row groups, so each chunk of the tokens' rows
        is read from L1 by every row group; 0: the whole reduction at once. On the AVX2 code path
        (16 registers: a 2 x 4 register block, then, loaded 6 vectors per 8 FMAs) the
        Qwen3-30B-A3B block at T = 128 took 0.91x the time with chunks of 512 (AVX-512 EPYC,
        2026-12-04, 7 interleaved rounds); on the AVX-512 path (4 x 6 and 6 x 4 blocks) chunks
        were slower there. On an Intel AVX-512 VM (LLVM ``rocketlake``, 48 KB L1d, 2 MB L2,
        2026-12-06; a chunk keeps a pass's token rows in L1, where without it every weight row
        group reads them from L2), chunks of 256 took 0.92x the time of 512 at T = 128 on AVX2 code
        and 0.94x the time of none on AVX-512 code (whole block, 7 interleaved rounds; gate/up
        GEMM alone 0.95x / 0.86x), T = 16 and 512 within the noise. That CPU has its own entry,
        ``cpu/rocketlake`` (``cpu/avx512`` with chunks of 256); ``cpu/avx2`` (any AVX2 machine)
        keeps 512, where the EPYC VM measured 256 at 1.07-1.08x the time (2026-12-05, 3 x 4
        block): ``qiao tune moe`` picks the chunk per machine. Chunking the down GEMM's reduction
        (768) measured no gain on the Intel VM. On a 2-core AMD Zen 5 VM (LLVM ``znver5``, 48 KB
        L1d, 2026-12-07) chunks of 512 took the AVX-512 gate/up GEMM at T = 128 from 39.9 to 32.4
        ms (1024: 37.3; 5 interleaved rounds, stage kernels alone), T = 512 unchanged; with the
        2 lines above the whole block took 0.91 / 0.92 / 0.95 / 1.00x the time at T = 1 / 16 /
        128 / 512 (7 interleaved rounds): ``cpu/znver5`` is ``cpu/avx512`` with both.
    x_pad : int
        CPU gate/up grouped GEMM: where a token row of ``x`` is a multiple of 4 KB (hidden 1024,
        2048, ...), read the tokens from a copy whose rows are this many float32 longer
        (``group_gemm.pad_rows``); 0: read ``x`` in place. Rows 4 KB apart start in the same L1
        set, so a register block's rows of ``x`` and the weight rows (8 KB apart) all fall into
        the same few sets of an 8-way L1 and evict each other; a 64-byte pad starts each row one
        set further. On the Qwen3-30B-A3B block (AVX-512 EPYC VM, 2026-12-05, T = 128, stage
        kernels alone, interleaved rounds) the gate/up GEMM took 0.90x the time on AVX2 code
        (7 rounds; 0.96-0.98x in two earlier runs of 6 and 3) and 0.94x on AVX-512 code (5
        rounds); the copy took 6 / 31 / 100 us at T = 1 / 128 / 512 (0.1 % of the block at T =
        1).
    tile_up, tile_down : int
        CPU: intermediate columns (gate/up) and output columns (down) of one parallel task.
    lone_merge : int
        CPU grouped GEMMs (dot-product order): 1: a pass of an expert's tokens that would end in
        a lone token after full register blocks (``q * micro_m + 1`` tokens, ``micro_m`` >= 3)
        runs its last ``micro_m + 1`` tokens as two blocks of about half (3 + 1 -> 2 + 2); 0:
        full blocks and the lone token's one-row kernel. On the AVX-512 EPYC VM (2026-12-06,
        experts held in L3: 32 of H = 2048, I = 64, 8 tokens each on average, 7 interleaved
        rounds) AVX2 code (3 x 4 blocks; a lone token's block runs at about half the FMA rate per
        token) ran the gate/up GEMM 1.02x and the down GEMM 1.03x as fast with 1, so
        ``cpu/avx2`` takes 1; AVX-512 code (6 x 4 blocks: 6 + 1 -> 4 + 3) 0.99x and 0.89x, so
        ``cpu/avx512`` keeps 0.
    task_chunks : int
        CPU: the tasks of each expert are dealt out in this many chunks of its output tiles, the
        task list ordered chunk, expert, tile, so that TVM's static split of a parallel loop
        over as many threads gives every thread a chunk of every expert (the same tokens per
        thread) instead of a run of whole experts (their tokens vary: at T = 128 on the
        Qwen3-30B-A3B block one thread of two got 526 tokens, the other 498); 0: the target's
        cores (``lookup``), 1: experts in a run, as before.
    gpu_tile_n, gpu_tile_k : int
        GPU tile: output columns and reduction depth per thread block (shared memory).
    gpu_thread_m, gpu_thread_n : int
        GPU: outputs per thread (rows x columns) inside the tile.
    gpu_gemv_max_tokens : int
        GPU: token counts up to this use the GEMV (decode) kernels.
    """

    device: str = "default"
    block_m: int = 4
    vector_lanes: int = 8
    micro_m: int = 2
    micro_n: int = 4
    down_micro_m: int = 2
    down_micro_n: int = 4
    gemv_n: int = 8
    prefetch: int = 0
    prefetch_level: int = 1
    prefetch_lines: int = 1
    few_tokens: int = 0
    few_prefetch_lines: int = 1
    few_prefetch_off: tuple[str, ...] = ()
    few_lead: int = 0
    lanes_min: int = 0
    lanes_sweep_kb: int = 0
    lanes_group_kb: int = 192
    k_chunk: int = 0
    x_pad: int = 0
    tile_up: int = 16
    tile_down: int = 64
    task_chunks: int = 0
    lone_merge: int = 0
    gpu_tile_n: int = 64
    gpu_tile_k: int = 32
    gpu_thread_m: int = 2
    gpu_thread_n: int = 4
    gpu_gemv_max_tokens: int = 4

    def replace(self, **changes: Any) -> MoESchedule:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(MoESchedule)}
# fields that may be 0: off, or (``RESOLVED_BY_LOOKUP``) the target's own value
_MAY_BE_ZERO = (
    "prefetch",
    "lanes_min",
    "k_chunk",
    "few_tokens",
    "x_pad",
    "task_chunks",
    "lone_merge",
    "few_lead",
    "few_prefetch_lines",
    "lanes_sweep_kb",
)
# fields that are not integers (checked on their own)
_NOT_INTEGERS = ("few_prefetch_off",)
# fields whose 0 ``lookup`` replaces by the compiling target's value (``task_chunks``: its cores);
# ``qiao tune moe`` leaves them out of the entries it writes, so they follow the machine
RESOLVED_BY_LOOKUP = ("task_chunks",)


def _check_entry(key: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(entry) - _FIELDS
    if unknown:
        raise QiaoError(
            f"MoE schedule table entry {key!r} has unknown field(s) {sorted(unknown)}. "
            "fix: use only "
            f"{sorted(_FIELDS - {'device'})} (see qiao.compiler.schedules.moe_table.MoESchedule)"
        )
    entry = dict(entry)
    if "few_prefetch_off" in entry:
        entry["few_prefetch_off"] = _cpu_families(key, entry["few_prefetch_off"])
    bad = [
        k
        for k, v in entry.items()
        if k not in ("device", *_NOT_INTEGERS)
        and (not isinstance(v, int) or v < (0 if k in _MAY_BE_ZERO else 1))
    ]
    if bad:
        raise QiaoError(
            f"MoE schedule table entry {key!r}: {bad} must be positive integers. fix: rerun "
            "`qiao tune moe` or correct the entry"
        )
    if entry.get("prefetch", 0) > 3:
        raise QiaoError(
            f"MoE schedule table entry {key!r}: prefetch must be 0, 1, 2 or 3, got "
            f"{entry['prefetch']}. fix: rerun `qiao tune moe` or correct the entry"
        )
    for field, least, most, unit in (
        ("prefetch_lines", 1, MAX_PREFETCH_LINES, ""),
        ("few_prefetch_lines", 0, MAX_PREFETCH_LINES, ""),
        ("lanes_sweep_kb", 0, MAX_LANES_SWEEP_KB, " (KB of L2)"),
    ):
        if not least <= entry.get(field, least) <= most:
            raise QiaoError(
                f"MoE schedule table entry {key!r}: {field} must be {least} .. {most}{unit}, got "
                f"{entry[field]}. fix: rerun `qiao tune moe` or correct the entry"
            )
    for field in ("lone_merge", "few_lead"):
        if entry.get(field, 0) > 1:
            raise QiaoError(
                f"MoE schedule table entry {key!r}: {field} must be 0 or 1, got "
                f"{entry[field]}. fix: rerun `qiao tune moe` or correct the entry"
            )
    if entry.get("prefetch_level", 1) > 2:
        raise QiaoError(
            f"MoE schedule table entry {key!r}: prefetch_level must be 1 (L1) or 2 (L2), got "
            f"{entry['prefetch_level']}. fix: rerun `qiao tune moe` or correct the entry"
        )
    return entry


def _cpu_families(key: str, names: Any) -> tuple[str, ...]:
    from qiao.compiler.schedules.cpu_info import cpu_family_code

    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        names = [names]
    try:
        for name in names:
            cpu_family_code(name)
    except ValueError as err:
        raise QiaoError(
            f"MoE schedule table entry {key!r}: few_prefetch_off must list CPU families: {err}. "
            "fix: correct the entry"
        ) from None
    return tuple(names)


@functools.lru_cache(maxsize=8)
def _load(path: str, stamp: tuple[int, int]) -> dict[str, dict[str, Any]]:
    # ``stamp`` (mtime in ns, size) makes a rewritten table a cache miss.
    fix = (
        "fix: reinstall qiao (the shipped defaults are read-only)"
        if os.path.abspath(path) == TABLE_PATH
        else f"fix: delete {path} (the shipped defaults then apply) or rerun `qiao tune moe`"
    )
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise QiaoError(f"cannot read the MoE schedule table {path}: {err}. {fix}") from err
    if (
        not isinstance(data, dict)
        or data.get("version") != TABLE_VERSION
        or not isinstance(data.get("entries"), dict)
    ):
        raise QiaoError(f"{path} is not a version-{TABLE_VERSION} MoE schedule table. {fix}")
    return {k: _check_entry(k, v) for k, v in data["entries"].items()}


def read_table(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Entries of the one table file at ``path`` (checked); a missing file has none."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}
    return dict(_load(path, (st.st_mtime_ns, st.st_size)))


def read_measurements(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """What the tunes measured, kept beside the entries of the table at ``path`` (``write_entry``'s
    ``measured``), per device key. Informational, never checked: a missing or unreadable file,
    or measurements of another shape (a hand-edited table), give none rather than an error."""
    try:
        with open(path) as f:
            measured = json.load(f).get("measurements")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(measured, dict):
        return {}
    return {k: v for k, v in measured.items() if isinstance(v, dict)}


def user_table_path(root: str | os.PathLike | None = None) -> str:
    """The user's MoE table: ``<root>/moe_table.json`` when ``root`` is given, else
    ``$QIAO_MOE_TABLE``, else ``moe_table.json`` in the default tuning store."""
    from qiao.compiler.schedules.tuning import tuning_root

    if root is None and os.environ.get("QIAO_MOE_TABLE"):
        return os.environ["QIAO_MOE_TABLE"]
    return os.path.join(tuning_root(root), USER_TABLE)


def load_table(
    path: str | os.PathLike | None = None, root: str | os.PathLike | None = None
) -> dict[str, dict[str, Any]]:
    """The entries lookups see, ``{device key: {field: value}}``: the shipped defaults with the
    user's table (``path``, default ``user_table_path(root)``) over them."""
    if not os.path.exists(TABLE_PATH):
        raise QiaoError(
            f"the shipped MoE schedule table {TABLE_PATH} is missing. fix: reinstall qiao"
        )
    user = os.path.abspath(os.fspath(path) if path else user_table_path(root))
    entries = read_table(TABLE_PATH)
    if user != TABLE_PATH:
        entries.update(read_table(user))
    return entries


def device_keys(target: Any) -> list[str]:
    """Table keys for ``target``, most specific first, read from the target (the default of
    ``Backend.tuning_keys``; a backend passes its own to ``lookup``).

    By TVM's device family of the target (its first target key; every kind declares it): a CPU
    (key ``cpu``) is ``cpu/<mcpu>`` then its SIMD family (``cpu/avx512``, ``cpu/avx2``,
    ``cpu/simd128``, read from the target, never from this machine); another device is
    ``<family>/<chip>`` (``arch`` or ``mcpu``) then ``<family>``: ``cuda/sm_90``, ``cuda``."""
    attrs = target.attrs
    if "cpu" in target.keys:
        from qiao.compiler.schedules.cpu_info import cpu_info

        mcpu = str(attrs.get("mcpu", "") or "")
        width = cpu_info(target).simd_bits
        family = {512: "cpu/avx512", 256: "cpu/avx2"}.get(width, "cpu/simd128")
        return ([f"cpu/{mcpu}"] if mcpu else []) + [family]
    family = str(target.keys[0])
    chip = str(attrs.get("arch", "") or attrs.get("mcpu", "") or "")
    return ([f"{family}/{chip}"] if chip else []) + [family]


def lookup(
    target: Any,
    overrides: Mapping[str, Any] | None = None,
    root: str | os.PathLike | None = None,
    keys: list[str] | None = None,
) -> MoESchedule:
    """The MoE schedule for a TVM target, with a backend's ``overrides`` applied last.

    Parameters
    ----------
    target : tvm.target.Target
    overrides : mapping, optional
        Fields replacing the table's (the ``moe_schedule`` compile option).
    root : str, optional
        Tuning store whose user table is read (default ``tuning.tuning_root()``).
    keys : list of str, optional
        Table keys to try, most specific first: the compiling backend's ``tuning_keys``
        (default ``device_keys(target)``).

    Returns
    -------
    MoESchedule
        The most specific entry of the user's table or the shipped defaults; a ``task_chunks`` of
        0 becomes the target's cores (``cpu_info``; GPU kernels do not read it).
    """
    table = load_table(root=root)
    for key in device_keys(target) if keys is None else keys:
        if key in table:
            schedule = MoESchedule(**{**table[key], "device": key})
            break
    else:
        schedule = MoESchedule(device="default")
    if overrides:
        schedule = schedule.replace(**_check_entry("backend override", dict(overrides)))
    if schedule.task_chunks == 0:  # a CPU field (the GPU kernels never read it)
        from qiao.compiler.schedules.cpu_info import cpu_info

        schedule = schedule.replace(task_chunks=cpu_info(target).num_cores)
    return schedule


def write_entry(
    key: str,
    values: Mapping[str, Any],
    measured: Mapping[str, Any] | None = None,
    path: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
) -> str:
    """Store ``values`` as the entry ``key`` of the user's table and return its path.

    Parameters
    ----------
    key : str
        Device key (``cpu/znver3``).
    values : mapping
        Schedule fields (``device`` is ignored).
    measured : mapping, optional
        Measurements to keep beside the entry.
    path : str, optional
        The table file (default ``user_table_path(root)``); never the shipped defaults.
    root : str, optional
        Tuning store (default ``tuning.tuning_root()``).

    Returns
    -------
    str
        The file written. It is replaced atomically (a temporary file, then ``os.replace``): a
        killed ``qiao tune`` leaves the previous table, never a half-written one.
    """
    path = os.path.abspath(os.fspath(path) if path else user_table_path(root))
    if os.path.realpath(path) == os.path.realpath(TABLE_PATH):
        raise QiaoError(
            f"{TABLE_PATH} holds qiao's shipped MoE defaults and is never written. fix: leave "
            "--table unset (tuned entries go to the user's store, "
            f"{user_table_path(root)}) or name another file"
        )
    entry = _check_entry(key, {k: v for k, v in values.items() if k != "device"})
    data: dict[str, Any] = {"version": TABLE_VERSION, "entries": {}, "measurements": {}}
    if os.path.exists(path):
        read_table(path)  # an unreadable table is an error naming the fix, not silently replaced
        with open(path) as f:
            data = json.load(f)
    data.setdefault("measurements", {})
    data["entries"][key] = entry
    if measured is not None:
        data["measurements"][key] = dict(measured)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".moe_table-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------------------------------------
# Measuring schedules (``qiao tune``)
# ------------------------------------------------------------------------------------------------
def _compile_kernel(func, target):
    """``func`` compiled for the CPU ``target`` as a model's MoE kernels are: the schedule phase's
    loop passes (``cpu_loop_passes``: the epilogues' sigmoid as a vectorisable polynomial, not a
    libm call per element) and then the CPU TIR pipeline, so tuning times what ships."""
    import tvm

    from qiao.compiler.passes.shuffle_strided_loads import compile_cpu_kernel
    from qiao.compiler.schedules import cpu_loop_passes

    mod = tvm.IRModule({"main": func})
    with target:
        mod = tvm.transform.Sequential(cpu_loop_passes())(mod)
    return compile_cpu_kernel(mod["main"], target)


@functools.lru_cache(maxsize=64)
def _stage_kernel(stage: str, cfg, schedule: MoESchedule, target_json: str):
    """The compiled gate/up (``stage`` "up") or down grouped GEMM of ``cfg`` under ``schedule``:
    the tuner scores one schedule on several token counts (one kernel serves every count) and
    keeps most fields between candidates, so each kernel is compiled once."""
    import tvm

    from qiao.compiler.kernels.group_gemm import group_gemm_down, group_gemm_up

    build = group_gemm_up if stage == "up" else group_gemm_down
    return _compile_kernel(build(cfg, schedule), tvm.target.Target(target_json))


@functools.lru_cache(maxsize=16)
def _dispatch_kernels(
    num_experts: int, top_k: int, normalize: bool, block_m: int, target_json: str
):
    import tvm

    from qiao.compiler.kernels.moe_align import moe_align
    from qiao.compiler.kernels.moe_gating import moe_gating

    target = tvm.target.Target(target_json)
    return (
        _compile_kernel(moe_gating(num_experts, top_k, normalize), target),
        _compile_kernel(moe_align(num_experts, top_k, block_m), target),
    )


def time_stage_kernels(
    target: Any,
    schedule: MoESchedule,
    cfg,
    tokens: int,
    *,
    seed: int = 0,
    repeat: int = 5,
    weights=None,
    stages: tuple[str, ...] = ("up", "down"),
) -> dict[str, float]:
    """Median seconds of the gate/up and down grouped GEMMs for ``tokens`` tokens on this machine.

    Gating and alignment run once (compiled for ``target``) to produce the real dispatch tables; the
    two GEMMs are then timed with TVM's evaluator. ``weights`` = (fc1, fc2) to reuse: NumPy arrays,
    placed on the device for this call as the runner places them (``weight_tensor``), or device
    tensors so placed, read where they are (``tune_cpu`` places its experts once, so that every
    candidate reads the same pages, no call copies them again (300 MB a call at the CLI's 16-expert
    shape, some 500 calls a tune) and the tune holds one copy of them, not two).
    ``stages`` names the GEMMs to time ("up", "down"; the activations the down GEMM reads start
    random, so timed alone it never reads an uninitialised buffer). Compiled kernels are kept for
    the next call.
    """
    unknown = set(stages) - {"up", "down"}
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}: pass 'up' and/or 'down'")
    import numpy as np
    import tvm

    from qiao.compiler.kernels.group_gemm import up_row_floats
    from qiao.compiler.kernels.moe_common import num_blocks

    E, H, INTER, K, BM = cfg.num_experts, cfg.hidden, cfg.inter, cfg.top_k, schedule.block_m
    rng = np.random.default_rng(seed)
    if weights is None:
        weights = (
            rng.standard_normal((E, cfg.fc1_rows, H), dtype=np.float32),
            rng.standard_normal((E, H, INTER), dtype=np.float32),
        )
    from qiao.compiler.schedules.cpu_info import cpu_device
    from qiao.compiler.schedules.cpu_memory import weight_tensor

    dev = cpu_device()

    def nd(a):
        return tvm.runtime.tensor(np.ascontiguousarray(a), dev)

    def empty(shape, dtype):
        return tvm.runtime.empty(shape, dtype, dev)

    blocks = num_blocks(tokens, K, E, BM)
    # the gate/up GEMM's rows of x as the lowering gives them (``MoESchedule.x_pad``)
    x = nd(rng.standard_normal((tokens, up_row_floats(cfg, schedule)), dtype=np.float32))
    logits = nd(rng.standard_normal((tokens, E), dtype=np.float32))
    ids, tw = empty((tokens, K), "int32"), empty((tokens, K), "float32")
    gating, align = _dispatch_kernels(E, K, cfg.normalize, BM, str(target))
    gating["main"](logits, ids, tw)
    tables = [
        empty((E,), "int32"),
        empty((E + 1,), "int32"),
        empty((E,), "int32"),
        empty((1,), "int32"),
        empty((blocks * BM,), "int32"),
        empty((blocks,), "int32"),
        empty((1,), "int32"),
        empty((tokens, K), "int32"),
    ]
    align["main"](ids, *tables)
    counts, offsets, active, nact, pairs, bexp, nblk, pslot = tables
    # the experts on the pages the runner gives them (huge pages: 4 KB ones rank TLB misses)
    fc1, fc2 = (w if isinstance(w, tvm.runtime.Tensor) else weight_tensor(w, dev) for w in weights)
    bias = nd(np.zeros((1,), np.float32))
    # real values (not whatever memory holds: denormals would slow the down GEMM) when it is timed
    # without the gate/up GEMM writing them first
    act = nd(rng.standard_normal((blocks * BM, INTER), dtype=np.float32))
    out = empty((tokens, K, H), "float32")
    up_args = [x, fc1, bias, ids, pairs, offsets, counts, active, nact, bexp, nblk, pslot, act]
    down_args = [
        act,
        fc2,
        bias,
        ids,
        tw,
        pairs,
        offsets,
        counts,
        active,
        nact,
        bexp,
        nblk,
        pslot,
        out,
    ]
    result = {}
    for name, args in (("up", up_args), ("down", down_args)):
        if name not in stages:
            continue
        lib = _stage_kernel(name, cfg, schedule, str(target))
        timer = lib.mod.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=20)
        timer(*args)
        result[name] = float(np.median(timer(*args).results))
    return result


def tune_start(start: MoESchedule, key: str, lanes: int, family: str | None) -> MoESchedule:
    """Where ``tune_cpu`` starts for table key ``key`` on a machine of CPU ``family``: ``start``
    (the entry lookups give) for ``lanes``-float vectors. A tuned entry is for this machine, so
    what ``few_prefetch_off`` would choose here at run time becomes its own
    ``few_prefetch_lines`` and it lists no families."""
    base = start.replace(device=key, vector_lanes=lanes, few_prefetch_off=())
    if family in start.few_prefetch_off:
        base = base.replace(few_prefetch_lines=0)
    return base


def tune_cpu(
    target: Any,
    cfg,
    *,
    tokens_decode: int = 1,
    tokens_prefill: int | None = None,
    repeat: int = 5,
    log=print,
    candidates=None,
    gemv_rows=(4, 8, 12, 16),
    tiles_up=(8, 16, 32, 64),
    tiles_down=(32, 64, 128, 256),
    prefetch_options=(0, 1, 2, 3),
    prefetch_levels=(1, 2),
    k_chunks=(0, 256, 512, 1024),
    prefetch_lines=(1, 2),
    few_prefetch_lines=(0, 1, 2, 4, 6),
    few_lead=(0, 1),
    lanes_sweeps=((0, 192), (512, 96), (512, 192), (1024, 192)),
    root: str | os.PathLike | None = None,
) -> tuple[str, MoESchedule, dict[str, Any]]:
    """Measure candidate CPU schedules for ``cfg`` on this machine and return the best.

    The decode kernel (``gemv_n``) is chosen on ``tokens_decode`` tokens, the down GEMM's
    micro-kernel and tiles on ``tokens_prefill`` (default: enough tokens for ~32 per expert,
    Qwen3-30B-A3B's T=512 load), the gate/up GEMM's micro-kernel, tiles and reduction chunk
    (``k_chunk``) on ~8 tokens per expert (T = 128's load) where the entry sends experts of
    ``lanes_min`` tokens or more to the token-lanes order: those are the experts its dot-product
    blocks serve, while at ~32 tokens per expert the lanes blocks do all the work and the
    candidates' scores are noise (on a 2-core AMD Zen 5 VM, 2026-12-07, that picked a 1 x 12
    block for AVX2 code, which took the gate/up GEMM at T = 128 from 42.7 to 69.2 ms); then
    software prefetch on decode and prefill together. Each step screens its candidates once,
    each between two timings of the schedule so far (the three back to back, the candidate's
    kernels compiled first) and scored by its time over theirs (on the Zen 5 VM, 2026-12-07,
    whole-process slow spells came and went within seconds to tens of seconds: screened one
    after another, the few-token prefetch lines timed 3.9-13.1 ms in one pass, and the setting
    that had won 1.12x the day before was never re-timed); the
    best of them, where it beat the schedule so far, is timed against it again over
    ``CONFIRM_ROUNDS`` interleaved rounds and kept only at ``MIN_GAIN`` or more (the GEMM
    tuner's rule: on the Zen 5 VM one screening pass timed a 3 x 4 block at 15.4 ms against
    5.3-7.5 for the others); where it is not, the runner-up is (``CONTENDERS``). Last, where
    anything changed, the result is timed against the entry it started from on decode, ~8
    tokens per expert and the prefill together over ``CONFIRM_ROUNDS`` interleaved rounds
    (``measurements["overall"]``: the gain, and under ``result`` the values found that differ
    from the start), and the start is kept where the result is slower by ``MIN_GAIN`` or more
    (each step's gain was measured on its own load only). ``candidates``
    (micro-kernel shapes), ``gemv_rows``, ``tiles_*``, ``k_chunks`` (those that divide the hidden
    size into whole vectors; fewer than two: the entry's stays), ``prefetch_options``,
    ``prefetch_levels`` and ``prefetch_lines`` (tried where the best prefetches; fewer than two:
    the entry's stays) narrow the search. ``few_prefetch_lines`` (the same; for the experts of up
    to ``few_tokens`` tokens, the entry's or 3) is scored on decode plus ``num_experts // top_k``
    tokens (about one per expert: the weight stream); ``few_lead`` (the same; where the entry
    has experts of few tokens) on about four tokens per expert; ``lanes_sweeps`` (pairs of
    ``lanes_sweep_kb``, ``lanes_group_kb``; the same; where the entry has the token-lanes order)
    on the gate/up GEMM at four token vectors per expert (two passes). The search starts
    from the entry ``lookup(target, root=root)`` gives. Nothing is written (``write_entry`` stores
    the result). Returns ``(table key, schedule, measurements)``.
    """
    from qiao.compiler.schedules.cpu_gemm import fits_registers, register_tiles
    from qiao.compiler.schedules.cpu_info import cpu_info, host_cpu_family, require_runnable_here
    from qiao.compiler.schedules.tuning import MIN_GAIN

    require_runnable_here(target, "tune")  # it measures here: foreign code would crash us
    info = cpu_info(target)
    lanes = info.lanes("float32")
    key = device_keys(target)[0]
    start = lookup(target, root=root)
    base = tune_start(start, key, lanes, host_cpu_family())
    prefill = tokens_prefill or max(1, 32 * cfg.num_experts // cfg.top_k)
    mid = max(1, 8 * cfg.num_experts // cfg.top_k)  # about 8 tokens per expert
    # the load each GEMM's dot-product blocks are scored on (the gate/up GEMM's larger experts
    # take the token-lanes order from ``lanes_min`` tokens)
    dot_load = {"up": mid if base.lanes_min > 0 else prefill, "down": prefill}
    rng_weights = None
    measurements: dict[str, Any] = {
        "config": dict(
            experts=cfg.num_experts, hidden=cfg.hidden, inter=cfg.inter, top_k=cfg.top_k
        ),
        "tokens_decode": tokens_decode,
        "tokens_prefill": prefill,
        "tokens_up_blocks": dot_load["up"],
    }

    def measure(schedule, tokens, stages=("up", "down")):
        nonlocal rng_weights
        if rng_weights is None:
            import numpy as np

            from qiao.compiler.schedules.cpu_info import cpu_device
            from qiao.compiler.schedules.cpu_memory import weight_tensor

            rng = np.random.default_rng(0)
            rng_weights = tuple(
                weight_tensor(w, cpu_device())
                for w in (
                    rng.standard_normal((cfg.num_experts, cfg.fc1_rows, cfg.hidden), np.float32),
                    rng.standard_normal((cfg.num_experts, cfg.hidden, cfg.inter), np.float32),
                )
            )
        return time_stage_kernels(
            target, schedule, cfg, tokens, repeat=repeat, weights=rng_weights, stages=stages
        )

    def both_gemms(schedule, *loads) -> float:
        # both GEMMs at each load (token counts): the score of the prefetch settings
        return sum(sum(measure(schedule, tokens).values()) for tokens in loads)

    def decode_and_prefill(schedule) -> float:
        return both_gemms(schedule, tokens_decode, prefill)

    confirmed: dict[str, float] = {}
    measurements["confirmed"] = confirmed

    def gain(kept, tried) -> float:
        # how many times faster ``tried()`` ran than ``kept()``: the median of the per-round
        # ratios over ``CONFIRM_ROUNDS`` interleaved rounds
        return statistics.median(kept() / tried() for _ in range(CONFIRM_ROUNDS))

    def search(name, options, incumbent, schedule_of, score, describe):
        # screen each option between two timings of the incumbent (the schedule so far), all
        # three back to back (a first, discarded timing compiles the option's kernels: seconds),
        # and score it by its time over the mean of those two: a slow spell of the machine that
        # spans the three moves both sides alike (``describe(option, ms)``: its log line, with
        # that ratio). The option of the lowest ratio below 1 is taken where it beats the
        # incumbent by ``MIN_GAIN`` again over ``CONFIRM_ROUNDS`` interleaved rounds, else the
        # next (``CONTENDERS`` at most), else the incumbent stays. Returns (choice, screening
        # scores: seconds per option).
        def timed(option):
            return score(schedule_of(option))

        scores, ratios = {}, {}
        for option in options:
            if option == incumbent:
                scores[option] = timed(option)
                log(describe(option, scores[option] * 1e3) + " (the schedule so far)")
                continue
            timed(option)  # compiles it
            before = timed(incumbent)
            scores[option] = timed(option)
            ratios[option] = scores[option] / ((before + timed(incumbent)) / 2)
            log(
                describe(option, scores[option] * 1e3)
                + f" ({ratios[option]:.2f}x the schedule so far)"
            )
        # the best ratios below 1, best first: where the first is not confirmed (a fluke of its
        # screening), the runner-up is re-timed too
        for winner in sorted((o for o in ratios if ratios[o] < 1.0), key=ratios.get)[:CONTENDERS]:
            again = gain(lambda: timed(incumbent), lambda w=winner: timed(w))
            confirmed[name] = again
            log(f"{name}: {winner} against {incumbent} again, {again:.2f}x as fast")
            if again >= MIN_GAIN:
                return winner, scores
        return incumbent, scores

    # 1. decode: rows per GEMV step
    best = base
    gemv_n, scores = search(
        "gemv_n",
        [n for n in gemv_rows if fits_registers(info, 1, n)],
        best.gemv_n,
        lambda v: best.replace(gemv_n=v),
        lambda sched: sum(measure(sched, tokens_decode).values()),
        lambda v, ms: f"decode T={tokens_decode} gemv_n={v}: {ms:.3f} ms",
    )
    best = best.replace(gemv_n=gemv_n)
    measurements["decode"] = {str(k): v for k, v in scores.items()}

    # 2. prefill: micro-kernel of each GEMM, then the task tiles, each on its blocks' load
    def stage_time(stage):
        return lambda sched: measure(sched, dot_load[stage], (stage,))[stage]

    for stage, fields in (
        ("up", ("micro_m", "micro_n")),
        ("down", ("down_micro_m", "down_micro_n")),
    ):

        def with_block(block, fields=fields, stage=stage, base=best):
            sched = base.replace(**{fields[0]: block[0], fields[1]: block[1]})
            return sched.replace(block_m=block[0]) if stage == "up" else sched

        # the register blocks of the CPU GEMM's weight-in-place micro-kernel (one budget rule)
        choice, scores = search(
            f"{stage} micro",
            candidates or register_tiles(info, "dot"),
            (getattr(best, fields[0]), getattr(best, fields[1])),
            with_block,
            stage_time(stage),
            lambda b, ms, stage=stage: (
                f"T={dot_load[stage]} {stage} micro {b[0]}x{b[1]}: {ms:.3f} ms"
            ),
        )
        best = with_block(choice)
        measurements[f"micro_{stage}"] = {f"{a}x{b}": v for (a, b), v in scores.items()}
    for field, options, stage in (("tile_up", tiles_up, "up"), ("tile_down", tiles_down, "down")):

        def with_tile(v, field=field, base=best):
            return base.replace(**{field: v})

        choice, scores = search(
            field,
            options,
            getattr(best, field),
            with_tile,
            stage_time(stage),
            lambda v, ms, field=field, stage=stage: f"T={dot_load[stage]} {field}={v}: {ms:.3f} ms",
        )
        best = with_tile(choice)
        measurements[field] = {str(k): v for k, v in scores.items()}
    # 2b. the gate/up reduction chunk, where experts take the dot-product register blocks
    from qiao.compiler.kernels.group_gemm import reduction_chunk

    chunks = [c for c in dict.fromkeys(k_chunks) if c == 0 or reduction_chunk(c, cfg.hidden, lanes)]
    if len(chunks) > 1:
        chunk, scores = search(
            "k_chunk",
            chunks,
            best.k_chunk,
            lambda c: best.replace(k_chunk=c),
            lambda sched: measure(sched, mid, ("up",))["up"],
            lambda c, ms: f"T={mid} up k_chunk={c}: {ms:.3f} ms",
        )
        best = best.replace(k_chunk=chunk)
        measurements["k_chunk"] = {str(k): v for k, v in scores.items()}
    # 3. software prefetch of the next weight rows, and the cache it fills: on decode and
    # prefill together
    (pf, level), scores = search(
        "prefetch",
        [
            (pf, level)
            for pf in prefetch_options
            for level in (prefetch_levels if pf else (best.prefetch_level,))
        ],
        (best.prefetch, best.prefetch_level),
        lambda v: best.replace(prefetch=v[0], prefetch_level=v[1]),
        decode_and_prefill,
        lambda v, ms: f"prefetch={v[0]} level=L{v[1]}: {ms:.3f} ms (decode + prefill)",
    )
    best = best.replace(prefetch=pf, prefetch_level=level)
    measurements["prefetch"] = {
        (f"{pf}/L{level}" if pf else "0"): v for (pf, level), v in scores.items()
    }
    lines = list(dict.fromkeys(prefetch_lines))
    if best.prefetch and len(lines) > 1:
        n, scores = search(
            "prefetch_lines",
            lines,
            best.prefetch_lines,
            lambda v: best.replace(prefetch_lines=v),
            decode_and_prefill,
            lambda v, ms: f"prefetch_lines={v}: {ms:.3f} ms (decode + prefill)",
        )
        best = best.replace(prefetch_lines=n)
        measurements["prefetch_lines"] = {str(k): v for k, v in scores.items()}
    few = list(dict.fromkeys(few_prefetch_lines))
    if best.prefetch and len(few) > 1:
        streamed = max(1, cfg.num_experts // cfg.top_k)
        best = best.replace(few_tokens=best.few_tokens or min(3, best.micro_m))
        n, scores = search(
            "few_prefetch_lines",
            few,
            best.few_prefetch_lines,
            lambda v: best.replace(few_prefetch_lines=v),
            lambda sched: both_gemms(sched, tokens_decode, streamed),
            lambda v, ms: f"few_prefetch_lines={v}: {ms:.3f} ms (T={tokens_decode} + T={streamed})",
        )
        best = best.replace(few_prefetch_lines=n)
        measurements["few_prefetch_lines"] = {str(k): v for k, v in scores.items()}
    leads = list(dict.fromkeys(few_lead))
    if best.few_tokens >= 2 and len(leads) > 1:
        few_load = max(1, 4 * cfg.num_experts // cfg.top_k)  # about 4 tokens per expert
        lead, scores = search(
            "few_lead",
            leads,
            best.few_lead,
            lambda v: best.replace(few_lead=v),
            lambda sched: both_gemms(sched, few_load),
            lambda v, ms: f"few_lead={v}: {ms:.3f} ms (T={few_load})",
        )
        best = best.replace(few_lead=lead)
        measurements["few_lead"] = {str(k): v for k, v in scores.items()}
    sweeps = list(dict.fromkeys(tuple(pair) for pair in lanes_sweeps))
    if best.lanes_min > 0 and len(sweeps) > 1:
        # experts of four token vectors: two passes of the token-lanes order
        sweep_load = max(1, max(4 * lanes, best.lanes_min) * cfg.num_experts // cfg.top_k)
        (sweep_kb, group_kb), scores = search(
            "lanes_sweep",
            sweeps,
            (best.lanes_sweep_kb, best.lanes_group_kb),
            lambda v: best.replace(lanes_sweep_kb=v[0], lanes_group_kb=v[1]),
            lambda sched: measure(sched, sweep_load, ("up",))["up"],
            lambda v, ms: f"T={sweep_load} up lanes_sweep_kb={v[0]} group={v[1]}: {ms:.3f} ms",
        )
        best = best.replace(lanes_sweep_kb=sweep_kb, lanes_group_kb=group_kb)
        measurements["lanes_sweep"] = {f"{a}/{b}": v for (a, b), v in scores.items()}
    # 4. the whole: the result against the entry the search started from, both GEMMs at decode,
    # about 8 tokens an expert and the prefill load, over interleaved rounds (each step's gain
    # was measured on its own load); clearly slower (by ``MIN_GAIN``): the start is kept
    if best != base:
        loads = tuple(dict.fromkeys((tokens_decode, mid, prefill)))
        overall = gain(lambda: both_gemms(base, *loads), lambda: both_gemms(best, *loads))
        start_values = base.to_json()
        measurements["overall"] = {
            "against": start.device,
            "tokens": list(loads),
            "gain": overall,
            # what the search found, kept or not (where not, nothing else records it)
            "result": {
                k: v for k, v in best.to_json().items() if k != "device" and start_values[k] != v
            },
        }
        log(
            f"tuned against {start.device}: {overall:.2f}x as fast "
            f"(T={' + '.join(map(str, loads))}, both GEMMs)"
        )
        if overall < 1 / MIN_GAIN:
            log(f"slower as a whole: keeping {start.device}'s values")
            best = base
    return key, best, measurements


__all__ = [
    "MoESchedule",
    "RESOLVED_BY_LOOKUP",
    "TABLE_PATH",
    "device_keys",
    "load_table",
    "read_measurements",
    "read_table",
    "lookup",
    "time_stage_kernels",
    "tune_cpu",
    "user_table_path",
    "write_entry",
]
