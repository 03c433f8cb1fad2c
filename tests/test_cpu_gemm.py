"""qiao's CPU GEMM with a symbolic row count against a weight (every linear layer of a decoder):
column tasks sweeping every row, the few-rows variant's wide one-row tile over the shared packed
panels, and both run against NumPy at the row counts on either side of each branch."""

from __future__ import annotations

import numpy as np
import pytest

from qiao.compiler.testing import assert_close
from tests.test_schedules import _can_run, _run, _schedule, _script, _target


def test_symbolic_rows_against_static_columns_take_column_tasks():
    """Enough static columns: every task holds every row (``mc_tiles=0``) and a block of columns,
    four tasks per core where the panels allow, each block within ``ROWS_OUTSIDE_B_BYTES`` (so
    its task sweeps it from L2 inside each row tile); too few columns keep row tasks."""
    from qiao.compiler.schedules.cpu_gemm import (
        ROWS_OUTSIDE_B_BYTES,
        GemmShape,
        _rows_outside,
        check_tile,
        choose_tile,
    )
    from qiao.compiler.schedules.cpu_info import CPUInfo

    for cpu, lanes in ((CPUInfo(256, 16, 2), 8), (CPUInfo(512, 32, 16), 16)):
        for n in (1024, 3072, 151936):
            shape = GemmShape(None, None, n, 1024, "float32")
            tile = choose_tile(cpu, shape)
            check_tile(tile, shape, lanes)
            n_tiles = -(-n // tile.nr(lanes))
            assert tile.mc_tiles == 0, (cpu, n, tile)
            assert n_tiles % tile.nc_tiles == 0
            assert n_tiles // tile.nc_tiles >= min(4 * cpu.num_cores, n_tiles), (cpu, n, tile)
            assert 1024 * tile.nc_tiles * tile.nr(lanes) * 4 <= ROWS_OUTSIDE_B_BYTES, tile
            assert tile.nc_tiles == 1 or _rows_outside(shape, tile, tile.nr(lanes), False), tile
        narrow = GemmShape(None, None, 16, 1024, "float32")
        assert choose_tile(cpu, narrow).mc_tiles == 1


def test_few_rows_tile_spans_whole_packed_panels():
    from qiao.compiler.schedules.cpu_gemm import (
        FEW_ROWS_VECTORS,
        GemmShape,
        choose_tile,
        few_rows_max,
        few_rows_tile,
    )
    from qiao.compiler.schedules.cpu_info import CPUInfo

    cpu = CPUInfo(256, 16, 2)
    shape = GemmShape(None, None, 3072, 1024, "float32")
    wide = few_rows_tile(cpu, choose_tile(cpu, shape), shape)
    assert (wide.mr, wide.mc_tiles, wide.nr_vectors) == (1, 0, FEW_ROWS_VECTORS)
    # 688 columns = 43 panels of 16: no wider tile divides them, the tile stays one panel wide.
    shape = GemmShape(None, None, 688, 256, "float32")
    base = choose_tile(cpu, shape)
    assert few_rows_tile(cpu, base, shape).nr_vectors == base.nr_vectors
    assert 1 <= few_rows_max(base, cpu) < base.mr
    # AVX2 (6-row tiles): two rows take the one-row tile; AVX-512 (8-row tiles, a 4-row middle
    # tile): one row only, two take the middle tile
    assert few_rows_max(choose_tile(cpu, shape), cpu) == 2
    avx512 = CPUInfo(512, 32, 2)
    assert few_rows_max(choose_tile(avx512, shape), avx512) == 1


def _columns_kernel(k, n, batch_dims):
    """``x[B?, m, k] @ w[k, n]`` (symbolic rows, and a symbolic batch with ``batch_dims``)."""
    import tvm
    from tvm import relax

    from qiao.compiler.testing import prim_func

    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64")
    lead = (tvm.tirx.Var("b", "int64"),) if batch_dims else ()
    x = relax.Var("x", relax.TensorType(lead + (m, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    return prim_func(mod, "matmul")


@pytest.mark.parametrize("batch_dims", [False, True], ids=["rows", "batch-rows"])
def test_column_task_gemm_matches_numpy_on_both_row_variants(batch_dims):
    """Column tasks (``mc_tiles=0``), A packed up front, and the few-rows variant reading the same
    packed weight, at 1-2 rows (few-rows side), just above it, a ragged tile and many tiles."""
    from tvm import s_tir

    from qiao.compiler.schedules.cpu_gemm import (
        CPUMatmul,
        choose_tile,
        few_rows_max,
        find_gemm_block,
        gemm_shape,
        normalize_gemm,
    )
    from qiao.compiler.schedules.cpu_info import cpu_info

    target = _target()
    if not _can_run(target):
        pytest.skip("this host cannot run code for its own target")
    cpu = cpu_info(target)
    # Twice the columns that give every core four tasks of two-vector panels: column tasks.
    k, n = 96, 2 * 4 * cpu.num_cores * 2 * cpu.lanes("float32")
    func = _columns_kernel(k, n, batch_dims)
    scheduled, _ = _schedule(func, target, CPUMatmul())
    text = _script(scheduled)
    assert text.count("meta_schedule.layout_rewrite_preproc") == 1, "weights packed twice"
    assert "if m < T.int64(" in text, "no run-time choice between the row schedules"
    sch = s_tir.Schedule(func)
    block = find_gemm_block(sch)
    normalize_gemm(sch, block)
    tile = choose_tile(cpu, gemm_shape(sch, block))
    assert tile.mc_tiles == 0, f"{tile}: not the column-task schedule under test"
    rng = np.random.default_rng(3)
    w = rng.standard_normal((k, n)).astype("float32")
    few = few_rows_max(tile, cpu)
    batches = (1, 3) if batch_dims else (None,)
    for b in batches:
        for m in (1, few, few + 1, tile.mr + 1, 4 * tile.mr + 3):
            lead = (b,) if b else ()
            x = rng.standard_normal(lead + (m, k)).astype("float32")
            got = _run(scheduled, target, [x, w, np.zeros(lead + (m, n), "float32")])[-1]
            ref = (x.astype("float64") @ w.astype("float64")).astype("float32")
            assert_close(got, ref, rtol=1e-4, atol=1e-4, name=f"b={b} m={m}")


def test_row_tasks_variant_only_for_a_weight_that_fits():
    """Column tasks for symbolic rows get a row-tasks variant (one row tile per task, every
    column) when the whole packed weight fits ``ROW_TASKS_B_BYTES``: the transformer layer's
    688 x 256 does (704 KB), a 1024 x 1024 weight (4 MB) does not; row tasks have none."""
    from qiao.compiler.schedules.cpu_gemm import (
        GemmShape,
        GemmTile,
        choose_tile,
        row_tasks_tile,
    )
    from qiao.compiler.schedules.cpu_info import CPUInfo

    for cpu, lanes in ((CPUInfo(256, 16, 2), 8), (CPUInfo(512, 32, 2), 16)):
        small = GemmShape(None, None, 256, 688, "float32")
        tile = choose_tile(cpu, small)
        assert tile.mc_tiles == 0 and tile.nc_tiles > 0, tile
        many = row_tasks_tile(tile, small, lanes)
        assert (many.mr, many.nr_vectors, many.k_unroll) == (tile.mr, tile.nr_vectors, 8)
        assert (many.mc_tiles, many.nc_tiles) == (1, 0)
        big = GemmShape(None, None, 1024, 1024, "float32")
        assert row_tasks_tile(choose_tile(cpu, big), big, lanes) is None
    assert row_tasks_tile(GemmTile(8, 2, 1, 0, 8), small, 16) is None


@pytest.mark.parametrize("batch_dims", [False, True], ids=["rows", "batch-rows"])
def test_row_tasks_variant_matches_numpy_across_the_switch(batch_dims):
    """x[b?, m, 688] @ w[688, 256]: the run-time choice takes row tasks once the rows of ``A``
    outgrow ``ROW_TASKS_A_BYTES`` (381 rows here), column tasks below; every side of both
    switches (few rows, many rows, a ragged last row tile) against NumPy, with a symbolic batch
    too."""
    from qiao.compiler.schedules.cpu_gemm import ROW_TASKS_A_BYTES, CPUMatmul

    target = _target()
    if not _can_run(target):
        pytest.skip("this host cannot run code for its own target")
    k, n = 688, 256
    scheduled, _ = _schedule(_columns_kernel(k, n, batch_dims), target, CPUMatmul())
    text = _script(scheduled)
    assert f"m * T.int64({4 * k}) > T.int64({ROW_TASKS_A_BYTES})" in text
    assert text.count("meta_schedule.layout_rewrite_preproc") == 1, "weights packed twice"
    switch = ROW_TASKS_A_BYTES // (4 * k)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((k, n)).astype("float32")
    lead = (2,) if batch_dims else ()
    for m in (2, 37, switch, switch + 1, switch + 19, 1024):
        x = rng.standard_normal(lead + (m, k)).astype("float32")
        got = _run(scheduled, target, [x, w, np.zeros(lead + (m, n), "float32")])[-1]
        ref = (x.astype("float64") @ w.astype("float64")).astype("float32")
        assert_close(got, ref, rtol=1e-4, atol=1e-3, name=f"m={m}")


def test_one_static_row_takes_the_wide_one_row_tile():
    """A static single row (a batch-1 classifier head) gets the few-rows variant's one-row tile,
    as wide as the registers allow (not a 1 x 2-vector tile with two accumulators); two rows keep
    the row tile. Run against NumPy with ReLU fused and a column count (1000) that pads."""
    from qiao.compiler.schedules.cpu_gemm import (
        FEW_ROWS_VECTORS,
        CPUMatmul,
        GemmShape,
        check_tile,
        choose_tile,
    )
    from qiao.compiler.schedules.cpu_info import CPUInfo
    from qiao.compiler.testing import prim_func
    from tests.test_schedules import _matmul_module

    for cpu, lanes in ((CPUInfo(256, 16, 2), 8), (CPUInfo(512, 32, 2), 16)):
        shape = GemmShape(1, 1, 1000, 512, "float32")
        tile = choose_tile(cpu, shape)
        check_tile(tile, shape, lanes)
        assert (tile.mr, tile.mc_tiles) == (1, 0), (cpu, tile)
        # 1000 columns: 63 vectors of 16 on AVX-512 pad to 1024 (8 x 16 divides it), 125 of 8
        # on AVX2 to 1008 (6 x 8 divides it)
        assert 2 < tile.nr_vectors <= FEW_ROWS_VECTORS, (cpu, tile)
        assert choose_tile(cpu, GemmShape(1, 2, 1000, 512, "float32")).mr == 2
    target = _target()
    if not _can_run(target):
        pytest.skip("this host cannot run code for its own target")
    k, n = 512, 1000
    func = prim_func(_matmul_module(1, k, n, epilogue="relu"), "fused_matmul")
    scheduled, _ = _schedule(func, target, CPUMatmul())
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, k)).astype("float32")
    w = rng.standard_normal((k, n)).astype("float32")
    got = _run(scheduled, target, [x, w, np.zeros((1, n), "float32")])[-1]
    ref = np.maximum(x.astype("float64") @ w.astype("float64"), 0).astype("float32")
    assert_close(got, ref, rtol=1e-4, atol=1e-4, name="one static row")
