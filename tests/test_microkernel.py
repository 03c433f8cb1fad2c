"""The CPU GEMM micro-kernels' shared register budget and the weight-in-place (dot-product)
micro-kernel the MoE grouped GEMM is built from, checked against NumPy on its own."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from qiao.compiler.testing import assert_close


def test_dot_register_tiles_fit_and_cover_the_former_moe_candidates():
    from qiao.compiler.schedules.cpu_gemm import fits_registers, register_tiles
    from qiao.compiler.schedules.cpu_info import CPUInfo

    # The blocks `qiao tune moe` measured when its candidates were a hand-written list.
    former = {
        16: {(1, 8), (2, 4), (2, 6), (3, 4), (4, 2)},
        32: {(1, 16), (2, 8), (2, 12), (3, 8), (4, 4), (4, 6), (6, 4), (8, 2)},
    }
    for regs, old in former.items():
        cpu = CPUInfo(256, regs, 2)
        tiles = register_tiles(cpu, "dot")
        assert old <= set(tiles)
        # accumulators + one register per token row + one for the weight stream
        assert all(m * n + m + 1 <= regs for m, n in tiles)
        assert all(fits_registers(cpu, m, n) for m, n in tiles)
        assert fits_registers(cpu, 1, regs - 2) and not fits_registers(cpu, 1, regs - 1)
        for mr, nv in register_tiles(cpu):  # the packed (outer-product) order's budget
            assert fits_registers(cpu, mr, nv, "outer")
    with pytest.raises(ValueError, match="order"):
        register_tiles(CPUInfo(256, 16, 2), "inner")


def _dot_gemm(
    rows, cols, lanes, k, n_groups, prefetch, prefetch_lines=1, row_masks=False, per_line=False
):
    """``C[m, g * cols + r] = A[m] . W[0, g * cols + r]`` through one ``dot_microkernel`` block per
    weight-row group, the rows of A taken in reverse (the gather the MoE kernel does); with
    ``prefetch`` only the even groups prefetch (a run-time ``prefetch_rows`` mask of all or
    none, as the MoE kernel's first-token-block-only mode); with ``row_masks`` the odd groups
    the first next row (one row of the mask, as its split mode)."""
    from tvm.script import tirx as T

    from qiao.compiler.schedules.cpu_gemm import PREFETCH_ALL, dot_accumulators, dot_microkernel

    N = cols * n_groups
    tile = dot_microkernel(
        rows=rows,
        cols=cols,
        lanes=lanes,
        k_vectors=k // lanes,
        w_row=lambda r: r,
        prefetch=prefetch,
        prefetch_lines=prefetch_lines,
        row_masks=row_masks,
        per_line=per_line,
    )
    ACC0, ACC1 = dot_accumulators(rows, cols, lanes)
    ODD = 1 if row_masks else 0  # the odd groups' mask

    @T.prim_func(s_tir=True)
    def main(a: T.handle, w: T.handle, c: T.handle):
        A = T.match_buffer(a, (rows, k), "float32")
        # one spare group: the last block's prefetch reads the next (unused) rows
        W = T.match_buffer(w, (T.int64(1), N + cols, k), "float32")
        C = T.match_buffer(c, (rows, N), "float32")
        with T.sblock("root"):
            acc0 = T.alloc_buffer(ACC0, "float32")
            acc1 = T.alloc_buffer(ACC1, "float32")
            red = T.alloc_buffer((rows, cols), "float32")
            arow = T.alloc_buffer((rows,), "int64")
            for m in range(rows):
                arow[m] = T.int64(rows - 1 - m)
            for g in range(n_groups):
                pf = T.if_then_else(g % 2 == 0, PREFETCH_ALL, ODD)
                tile(A, W, arow, T.int64(0), g * cols, (g + 1) * cols, acc0, acc1, red, pf, 0)
                for m in range(rows):
                    for r in range(cols):
                        C[rows - 1 - m, g * cols + r] = red[m, r]

    return main, N


@pytest.mark.parametrize(
    "rows, cols, prefetch, lanes",
    # lanes: rows of 4 and 8 accumulators are summed four at a time (16, 8 and 4 lanes), the
    # others one by one, halving 16 and 8 lanes; 3 and 1 take the serial sum
    [(2, 4, 0, 8), (3, 5, 1, 8), (1, 8, 2, 8), (2, 3, 2, 8), (2, 3, 1, 16), (1, 2, 0, 3)]
    + [(2, 1, 0, 1), (2, 4, 1, 16), (1, 8, 0, 16), (3, 4, 0, 4)],
)
def test_dot_microkernel_matches_numpy(rows, cols, prefetch, lanes):

    k, groups = 5 * lanes, 3
    _check_dot_gemm(*_dot_gemm(rows, cols, lanes, k, groups, prefetch), rows, cols, k)
    if prefetch:  # prefetching one row of the next group by a run-time mask
        func, n = _dot_gemm(rows, cols, lanes, k, groups, prefetch, row_masks=True)
        assert ">> r & 1" in func.script()  # the bit test per row
        _check_dot_gemm(func, n, rows, cols, k)


def _check_dot_gemm(func, n, rows, cols, k):
    """Run ``func`` from ``_dot_gemm`` on this machine against NumPy."""
    from qiao.compiler.schedules.cpu_info import cpu_device

    # this machine's CPU: the kernel runs here
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    rng = np.random.default_rng(rows * 10 + cols)
    a = rng.standard_normal((rows, k), dtype=np.float32)
    w = rng.standard_normal((1, n + cols, k), dtype=np.float32)
    dev = cpu_device()
    out = tvm.runtime.tensor(np.zeros((rows, n), np.float32), dev)
    lib["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(w, dev), out)
    assert_close(out.numpy(), a @ w[0, :n].T, rtol=1e-5, atol=1e-5)


def _dot_gemm_asm(mcpu: str, *args) -> str:
    """Assembly of ``_dot_gemm(*args)`` compiled for ``mcpu`` (x86-64; compiled, never run)."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    func, _ = _dot_gemm(*args)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    return lib.mod.inspect_source("asm")


def test_dot_microkernel_prefetches_each_line_twice_when_asked():
    """``prefetch_lines=2``: each step asks for its own step of the next rows and the following
    one (at a row's last step, the line past its end: a prefetch never faults, and the loop
    keeps no clamp); in the kernel's TIR, two prefetches per weight row."""
    one, _ = _dot_gemm(2, 4, 16, 64, 2, 2)
    two, n = _dot_gemm(2, 4, 16, 64, 2, 2, prefetch_lines=2)
    assert one.script().count("llvm.prefetch") == 1 and "for j in T.unroll(2)" not in one.script()
    assert two.script().count("llvm.prefetch") == 1 and "for j in T.unroll(2)" in two.script()
    _check_dot_gemm(two, n, 2, 4, 64)


@pytest.mark.parametrize("row_masks", [False, True])
def test_dot_microkernel_walks_a_cache_line_per_loop_step(row_masks):
    """``per_line`` with 8 float32 lanes (AVX2's width): two vector steps per loop step (one
    64-byte line of each weight row), the rows ahead asked for at four steps (each line twice,
    as two single steps with ``prefetch_lines=2`` did); a reduction of an odd number of steps
    keeps one step per loop step. Both run against NumPy on this machine."""
    func, n = _dot_gemm(3, 4, 8, 64, 3, 2, 2, row_masks, per_line=True)
    script = func.script()
    assert "for kl in range(4)" in script and "for u in T.unroll(2)" in script
    assert "for j in T.unroll(4)" in script
    _check_dot_gemm(func, n, 3, 4, 64)
    odd, n = _dot_gemm(3, 4, 8, 40, 3, 2, 2, row_masks, per_line=True)
    assert "for kl in range(5)" in odd.script() and "for j in T.unroll(2)" in odd.script()
    _check_dot_gemm(odd, n, 3, 4, 40)
    wide, _ = _dot_gemm(3, 4, 16, 64, 3, 2, 2, row_masks, per_line=True)  # 16 lanes: a line
    assert "for kl in range(4)" in wide.script() and "for j in T.unroll(2)" in wide.script()
    assert "for u in T.unroll(2)" not in wide.script()


@pytest.mark.parametrize(
    "prefetch, instruction, other",
    [(1, "prefetcht0", "prefetcht1"), (2, "prefetcht1", "prefetcht0")],
)
def test_dot_microkernel_prefetches_into_the_asked_cache(prefetch, instruction, other):
    """Level 1 fills L1 (``prefetcht0``), level 2 L2 only (``prefetcht1``); 0 emits none. Code
    generation only (x86-64 AVX2 code, not run)."""
    code = _dot_gemm_asm("x86-64-v3", 2, 4, 8, 64, 3, prefetch)
    assert instruction in code and other not in code
    assert "prefetch" not in _dot_gemm_asm("x86-64-v3", 2, 4, 8, 64, 3, 0)


def test_dot_microkernel_sums_lanes_by_halving():
    """The horizontal sum of an accumulator summed alone (a row of 3) halves the vector (512 ->
    256 -> 128 bits, then within the register) instead of adding its 16 lanes one by one (which
    LLVM emitted as chains of lane inserts and adds, no 256-bit extract). Code generation only
    (AVX-512, not run)."""
    code = _dot_gemm_asm("x86-64-v4", 2, 3, 16, 48, 1, 0)
    accumulators = 2 * 3  # 2 rows x 3 weight rows
    assert code.count("vextractf64x4") >= accumulators  # each sum's first halving
    assert code.count("vinsertps") < 2 * accumulators  # one by one: 4 per accumulator and more


@pytest.mark.parametrize(
    "mcpu, rows, cols, lanes, extract",
    [("x86-64-v3", 2, 4, 8, "vextractf128"), ("x86-64-v4", 1, 8, 16, "vextractf64x4")],
    ids=["avx2-2x4", "avx512-1x8"],
)
def test_dot_microkernel_sums_four_accumulators_at_once(mcpu, rows, cols, lanes, extract):
    """A row of 4 (or 8) accumulators is summed four at a time into one vector: pairwise adds
    within each group of 4 lanes, then one halving per four sums, not per accumulator (one by
    one a 3 x 4 block took 72 instructions, four at a time 15). Code generation only (not run;
    the sums themselves: ``test_dot_microkernel_matches_numpy``)."""
    code = _dot_gemm_asm(mcpu, rows, cols, lanes, 4 * lanes, 1, 0)
    assert code.count(extract) == rows * cols // 4  # one by one: rows * cols
    assert "vinsertps" not in code  # no sums gathered lane by lane


def test_macros_expand_without_reading_source_and_to_the_same_kernel(monkeypatch):
    """qiao replaces TVMScript's parser lookup at every macro call (``qiao.compiler.tvmscript.
    fast_frames``: TVM's builds a source-reading ``FrameInfo`` for every outer frame, most of a
    MoE compile). With it the macro calls inspect no frames (the parse of the PrimFunc
    itself still does, once), and a kernel of nested macros parses to the same PrimFunc as with
    TVM's own lookup."""
    import inspect

    from tvm.script.parser.core.parser import ScriptMacro

    import qiao.compiler.kernels  # noqa: F401  (installs it, as any kernel build does)

    ours = ScriptMacro._find_parser_def
    assert ours.__module__ == "qiao.compiler.tvmscript"
    calls = []
    real = inspect.getouterframes
    monkeypatch.setattr(inspect, "getouterframes", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast, _ = _dot_gemm(3, 3, 8, 64, 2, 2)  # a row of 3: each lane sum a macro call
    outside_macros = len(calls)
    monkeypatch.setattr(ScriptMacro, "_find_parser_def", ours.__wrapped__)
    slow, _ = _dot_gemm(3, 3, 8, 64, 2, 2)
    # TVM's lookup inspects the frames once per macro call: the dot kernel, its lane sums, ...
    assert len(calls) - outside_macros > outside_macros + 4
    tvm.ir.assert_structural_equal(fast, slow)


def _fma_loops(code: str, fmas: int) -> list[list[str]]:
    """The basic blocks of ``code`` (assembly) with at least ``fmas`` FMA instructions."""
    blocks, current = [], []
    for line in code.splitlines():
        if re.match(r"(\.LBB|[A-Za-z_])[\w.$]*:", line):  # a block's label (not a debug .Ltmp)
            blocks.append(current)
            current = []
        elif line.strip() and not line.strip().startswith("."):
            current.append(line.strip())
    blocks.append(current)
    return [b for b in blocks if sum(ins.startswith("vfmadd") for ins in b) >= fmas]


@pytest.mark.parametrize("mcpu, lanes, regs", [("x86-64-v3", 8, 16), ("x86-64-v4", 16, 32)])
def test_dot_microkernel_blocks_stay_in_registers(mcpu, lanes, regs):
    """Every block ``register_tiles`` lists for the target's vector registers compiles to a
    reduction loop that never touches the stack (no accumulator spilled). The token-outer order
    kept all of a block's weight vectors live at once: the AVX2 3 x 4 block spilled an
    accumulator every step although the budget (accumulators + token rows + one weight vector)
    said it fits. Code generation only (x86-64, not run)."""
    from qiao.compiler.schedules.cpu_gemm import register_tiles
    from qiao.compiler.schedules.cpu_info import CPUInfo

    for rows, cols in register_tiles(CPUInfo(256, regs, 2), "dot"):
        loops = _fma_loops(_dot_gemm_asm(mcpu, rows, cols, lanes, 64 * lanes, 2, 2), rows * cols)
        assert loops, (rows, cols)
        spills = [ins for loop in loops for ins in loop if "(%rsp)" in ins]
        assert not spills, ((rows, cols), spills[:4])
