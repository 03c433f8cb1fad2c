"""CPU GEMM schedules: register-blocked, vectorised, cache-blocked, packed and parallel.

Every GEMM-like TIR block — ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` in any buffer layout, with
any elementwise producers and epilogues fused around it (dense layers, ``matmul``, batched matmul,
attention's ``Q·Kᵀ`` and ``P·V``, convolutions as implicit im2col, grouped ones batched over
their groups once ``split_group_axis`` splits the output channel) — is scheduled the same way,
after BLIS:

* the block is normalised to ``(S, IO, I, J, K)`` (``IO``: row axes other than the last, e.g. the
  batch of ``x[batch, seq, k] @ w``, kept as an outer loop) and padded so that ``I``, ``J`` (and
  ``K`` when it is unrolled) are multiples of the micro-tile — symbolic extents included;
* ``B`` is packed once per call into panels ``Bp[S, J / nr, K, nr]`` (contiguous ``nr``-wide rows,
  no TLB or cache-set conflicts), in parallel; when ``B`` is a static-shaped parameter (a weight)
  the packing block is marked as a layout-rewrite preprocessing step, so the pipeline can lift it
  out of the run-time path (``SplitLayoutRewritePreproc`` then ``LiftTransformParams``);
* the parallel loop runs over ``(S, IO, I / mc, J / nc)``; each task packs its rows of ``A`` into
  ``Ap[mc / mr, K, mr]`` (the zero padding of a symbolic ``I`` happens here) so the micro-kernel
  broadcasts ``A`` from one contiguous stream. A symbolic ``I`` (tokens) against a weight puts
  every row in every task instead (``mc_tiles=0``: column tasks, ``A`` packed once up front), so
  each ``B`` panel is read from memory once per call, and carries run-time variants for a few
  rows (one-row and ``MID_ROWS``-row tiles, see ``with_few_rows_variant``);
* the micro-kernel keeps an ``mr × nr`` tile of ``C`` in SIMD registers (``nr = nr_vectors ×
  lanes``, lanes from the target's SIMD width), unrolls ``mr`` and ``k_unroll``, and writes the tile
  back through the fused epilogue. A task sweeps its rows inside each ``B`` panel (BLIS), or its
  columns inside each row tile when its whole ``B`` block stays in L2 (``_rows_outside``: output
  rows written in long runs); ``B`` whose columns already are contiguous runs of its source (a 1x1
  convolution's input planes) is read in place, unpacked, when few row tiles share it
  (``_reads_b_in_place``); a windowed convolution whose positions divide into register tiles
  takes them as rows and broadcasts its (padded) input in place, no im2col panel at all
  (``direct_rows``).

Half-precision weights (``--dtype``; ``FoldWeightCasts`` makes the block ``C += A * float32(B)``
with ``B`` float16/bfloat16) are packed in their own dtype — the panels, lifted to load time, stay
half the bytes — and widened to float32 in the micro-kernel as each vector is loaded (bf16: a
16-bit shift; fp16: F16C ``vcvtph2ps``), float32 accumulation; ``dot_microkernel(widen=True)``
does the same for weights read in place.

Tile sizes come from ``choose_tile`` (register budget, padding waste, core count) or from a tuning
record (``qiao.compiler.schedules.tuning``). ``schedule_microkernel`` is the reusable core for
kernels that tile their own outer loops. Kernels that read a weight in place, unpacked
(``W[rows, K]``, ``K`` contiguous: the MoE grouped GEMM), take ``dot_microkernel`` instead, which
vectorises the reduction; ``register_tiles`` decides the register blocks of both.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

from qiao.compiler.schedules.cpu_conv import MAX_WINDOW, deinterleaved
from qiao.compiler.schedules.cpu_info import CACHE_LINE_BYTES, CPUInfo, CPURule, cpu_info
from qiao.compiler.schedules.tir_util import (
    ACTIVATION_PARAMS,
    PACKING_MARK,
    packing_first,
    replace_vars,
    root_statements,
    seq,
    static_int,
    uses_var,
    with_root_body,
    written_buffers,
)
from qiao.compiler.tvmscript import fast_frames

fast_frames()  # the micro-kernels below are nested TVMScript macros

log = logging.getLogger("qiao.schedules")

# Float dtypes the micro-kernel handles; integer GEMMs go to the generic rules.
GEMM_DTYPES = ("float32", "float16", "bfloat16", "float64")

# Rows of the middle variant's micro-tile (see ``with_few_rows_variant``): 4 x 2 vectors keeps
# the 8 accumulators two FMA pipes of latency 4 need.
MID_ROWS = 4
# Symbolic rows against a weight take column tasks (each sweeps every row over its own columns, so
# a large weight comes from memory once). Every task then reads all of ``A``: once ``A`` outgrows
# this many bytes (an L2) while the whole packed weight fits ``ROW_TASKS_B_BYTES``, a variant of
# row tasks (each row tile against every column, the weight from L2) is taken at run time
# (``row_tasks_tile``). The built-in transformer layer's GEMMs against weights passed per call
# (``benchmarks/test_gemm.py``, Intel AVX-512 host, 2026-12-04; qiao / NumPy GFLOP/s, column tasks
# -> row tasks): 2048x688 @ 688x256 0.85-0.88 -> 1.06, 1024 rows 0.92 -> 1.05, 512 rows 1.00 ->
# 1.05, 256 rows 1.10 -> 1.08; 2048x256 @ 256x688 0.86 -> 1.01, 1024 rows 0.98 either way, 512
# rows 1.19 -> 1.07; at 128 rows column tasks win by 0.25-0.3; 1024³ (a 4 MB weight) 0.92 -> 0.49.
ROW_TASKS_A_BYTES = 1 << 20
ROW_TASKS_B_BYTES = 1 << 20
# Widest micro-tile of the few-rows variant, in SIMD vectors (see ``few_rows_tile``): 8 measured
# best for 1024 x 1024 at one row on AVX2 (4: 25 % slower).
FEW_ROWS_VECTORS = 8
# A micro-tile of other than two vectors is taken only when it saves more than this fraction of
# padded work: a 7x7 feature map (49 positions, 64 padded) still ran faster with 6 x 2 vectors
# than with 14 x 1 (AVX2, ResNet-18's last stage, 2026-12-01).
NV_PENALTY = 0.2
# Bytes of the im2col panel one convolution task packs (K x its positions): half a Zen/Skylake L2.
CONV_PANEL_BYTES = 256 * 1024
# A convolution keeps its image positions as the vector axis ``J`` unless padding them to whole
# two-vector tiles would waste more than this fraction of the work while the output channels would
# waste at most half as much (a 7x7 map: 49 positions padded to 64, 31 %): the positions then
# become the broadcast rows ``I`` and the channels the vector columns (see ``gemm_orientation``).
J_WASTE_SWAP = 0.15
# ``B`` is read in place (``_reads_b_in_place``) while one column tile (all of ``K`` by ``nr``)
# fits this many bytes (a share of a 32 KB L1 data cache, next to the ``A`` stream) and at most
# this many row tiles reuse it (more reuse amortises the packing copy over more work).
IN_PLACE_B_BYTES = 24 * 1024
IN_PLACE_B_ROW_TILES = 8
# A task whose ``B`` block (``K`` by its columns) fits this many bytes (in L2, as a convolution
# task's im2col block does, ``CONV_PANEL_BYTES``) sweeps its columns inside each row tile
# (``_rows_outside``).
ROWS_OUTSIDE_B_BYTES = 256 * 1024
# Block annotation: ``normalize_gemm`` took that orientation (``gemm_shape`` reads it).
IMAGE_ROWS = "qiao.gemm_image_rows"
# ``dot_microkernel``'s ``prefetch_rows``: every next weight row (all bits of the mask set).
PREFETCH_ALL = -1
# Block annotation: a windowed convolution whose positions are rows read in place (its value:
# the window's taps; see ``direct_rows``).
DIRECT_ROWS = "qiao.gemm_direct_rows"
# Block annotation: ``A`` is a weight against an activation ``B`` (an NCHW convolution: its output
# channels are the rows, its image positions the columns; ``gemm_shape`` reads it).
WEIGHT_ROWS = "qiao.gemm_weight_rows"
# Block annotation: with ``WEIGHT_ROWS``, a 1x1 convolution of unit stride
# (``GemmShape.pointwise``).
POINTWISE = "qiao.gemm_pointwise"
# Largest window (taps, the reduction unroll of ``direct_rows``) read in place: a 7x7 stem.
DIRECT_MAX_TAPS = 49
# Shortest reduction read in place: below it the strided write-back of each register tile (16
# channels x a few positions) outweighs the saved packing (a 3-channel 3x3 stem, 27: 3.96 ->
# 4.46 ms at batch 8 in place; ResNet's 7x7 stem, 147, gains).
DIRECT_MIN_K = 64


@dataclass(frozen=True)
class GemmTile:
    """Tile sizes of one CPU GEMM schedule.

    Parameters
    ----------
    mr : int
        Rows of ``C`` per micro-kernel (register block height).
    nr_vectors : int
        SIMD vectors per micro-kernel row; ``nr = nr_vectors * lanes`` columns of ``C``.
    mc_tiles : int
        Micro-tiles of ``I`` per parallel task (``mc = mr * mc_tiles`` packed rows of ``A``);
        ``0`` puts all of ``I`` in every task (tasks then split ``J`` only, and each ``B`` panel
        is reused across every row: the choice for a symbolic ``I`` against a weight).
    nc_tiles : int
        Micro-tiles of ``J`` per parallel task (``nc = nr * nc_tiles`` columns, the ``B`` panel
        reused across the task's rows); ``0`` puts all of ``J`` in every task (the only choice
        for a symbolic ``J``).
    k_unroll : int
        Unroll factor of the reduction loop (``K`` is zero-padded to a multiple when needed).
    """

    mr: int = 8
    nr_vectors: int = 2
    mc_tiles: int = 1
    nc_tiles: int = 8
    k_unroll: int = 4

    def nr(self, lanes: int) -> int:
        return self.nr_vectors * lanes

    def to_json(self) -> dict:
        return {
            "mr": self.mr,
            "nr_vectors": self.nr_vectors,
            "mc_tiles": self.mc_tiles,
            "nc_tiles": self.nc_tiles,
            "k_unroll": self.k_unroll,
        }


@dataclass
class GemmShape:
    """Extents of a normalised GEMM; ``None`` for a symbolic extent (``rows``: the row extent as
    an expression, symbolic or not; read by the few-rows variant)."""

    s: int | None
    m: int | None
    n: int | None
    k: int | None
    dtype: str
    rows: Any = field(default=None, compare=False, repr=False)
    # The rows are a convolution's image positions and the columns its output channels (see
    # ``J_WASTE_SWAP``): the weights are ``B``, the im2col rows ``A``.
    image_rows: bool = False
    # Taps of the window when those rows are read in place from the input (``direct_rows``); 0
    # when ``A`` is packed.
    taps: int = 0
    # ``A`` is a weight and ``B`` an activation (an NCHW convolution's output channels x image
    # positions): a static batch is then scheduled as a symbolic one is.
    weight_rows: bool = False
    # With ``weight_rows``: a 1x1 convolution of unit stride, whose ``B`` columns are the input's
    # own positions (see ``_long_reduction_tile``).
    pointwise: bool = False
    # The static extent of ``S`` alone (``s`` counts ``IO`` and ``JO`` too): a grouped
    # convolution's groups (``split_group_axis``), 1 for a dense one.
    groups: int = 1


# -- tile selection -------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def register_tiles(cpu: CPUInfo, order: str = "outer") -> list[tuple[int, int]]:
    """Register-block shapes that fit the target's SIMD registers, for either accumulation order.

    The one register budget of qiao's CPU GEMM micro-kernels: accumulators plus the operand
    registers one step needs must fit ``cpu.vector_registers``.

    - ``order="outer"`` (``schedule_microkernel``: ``B`` packed, vectors along the output
      columns): ``(mr, nr_vectors)`` with ``mr * nr_vectors`` accumulators, ``nr_vectors`` loaded
      ``B`` vectors and one broadcast ``A`` element; the largest ``mr`` per ``nr_vectors`` is
      listed, capped at 16 rows (beyond that the broadcast stream dominates).
    - ``order="dot"`` (``dot_microkernel``: a weight ``W[rows, K]`` read in place, vectors along the
      reduction): ``(rows of A, rows of W)`` with one accumulator per pair, one register per ``A``
      row and one for the weight stream; tiles using at least half the registers as accumulators,
      with 1-8 rows of ``A`` and 2-16 rows of ``W`` (the candidates ``qiao tune moe`` measures).
    """
    regs = cpu.vector_registers
    if order == "dot":
        return [
            (m, n)
            for m in (1, 2, 3, 4, 6, 8)
            for n in (2, 4, 6, 8, 12, 16)
            if m * n + m + 1 <= regs and m * n >= regs // 2
        ]
    if order != "outer":
        raise ValueError(f"order must be 'outer' or 'dot', not {order!r}")
    tiles = []
    for nv in (1, 2, 3, 4):
        mr = min((regs - nv - 1) // nv, 16)
        if mr >= 2:
            tiles.append((mr, nv))
    return tiles


def fits_registers(cpu: CPUInfo, rows: int, cols: int, order: str = "dot") -> bool:
    """Whether a ``rows x cols`` register block of ``order`` (see ``register_tiles``) fits."""
    operands = rows + 1 if order == "dot" else cols + 1
    return rows * cols + operands <= cpu.vector_registers


def _divisors_up_to(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def choose_tile(cpu: CPUInfo, shape: GemmShape) -> GemmTile:
    """A default tile for ``shape`` on ``cpu``: no tuning, decided from extents and registers.

    ``nr`` wastes the least ``J`` padding (ties favour two vectors, the best measured micro-kernel);
    ``mr`` fills the registers (shrunk for a short static ``I``). Task blocks ``mc_tiles`` /
    ``nc_tiles`` always divide the tile counts (a ragged split would put a predicate into the
    micro-kernel), and are as large as possible while every core keeps several tasks; a
    convolution with few column tasks splits its rows so that the tasks share out evenly over the
    cores (``task_balance``: TVM's parallel loops split statically, so 7 tasks on two cores run as
    4, the other core idle for one).
    """

    lanes = cpu.lanes(shape.dtype)
    best = None
    for mr, nv in register_tiles(cpu):
        nr = nv * lanes
        waste = 0.0 if shape.n is None else _pad_waste(shape.n, nr)
        # Prefer two vectors (measured best with 16 or 32 registers); others only when they save
        # more than NV_PENALTY of the padded work.
        key = (waste + (0.0 if nv == 2 else NV_PENALTY), -mr * nv)
        if best is None or key < best[0]:
            best = (key, mr, nv)
    _, mr, nv = best
    if nv == 2:
        mr = _two_vector_rows(cpu)
    if shape.m is not None:
        mr = max(1, min(mr, shape.m))
    nr = nv * lanes
    k_unroll = 4
    if shape.k is not None:
        # Unroll by what divides K; an odd K of some length (a 3-channel convolution's 27) is
        # zero-padded to a multiple of 4 rather than left without unrolling.
        k_unroll = next((u for u in (8, 4, 2) if shape.k % u == 0), 4 if shape.k >= 16 else 1)
    mc_tiles, nc_tiles = 1, 0
    tasks_wanted = 4 * cpu.num_cores
    direct_nv = direct_vectors(lanes, shape.n) if shape.taps else 0
    direct_mr = direct_rows_height(cpu, shape.m, direct_nv) if direct_nv else 0
    if direct_mr:
        # A convolution read in place (``direct_rows``): the tallest register tile dividing the
        # positions, one weight panel per task, unrolled by the window's taps (so that each
        # unrolled step's input offset is a constant), row blocks as large as enough tasks allow.
        mr, nv, k_unroll = direct_mr, direct_nv, shape.taps
        m_tiles, n_tiles = shape.m // mr, _ceil_div(shape.n, nv * lanes)
        blocks = [
            d
            for d in _divisors_up_to(m_tiles, m_tiles)
            if shape.groups * (m_tiles // d) * n_tiles >= tasks_wanted
        ]
        return GemmTile(mr, nv, max(blocks or [1]), 1, k_unroll)
    if shape.image_rows and shape.n is not None and shape.m is not None:
        # A convolution over a small map, its positions as rows (``J_WASTE_SWAP``): the tile
        # height padding the fewest rows (at least 4, so that 8 accumulators hide the FMA
        # latency; ties take the taller), every row in every task (the im2col rows are packed
        # once, up front, and each task reads them from cache against its own weight panels).
        mr = min(range(4, max(mr, 4) + 1), key=lambda r: (_ceil_div(shape.m, r) * r, -r))
        mc_tiles, nc_tiles = 0, _column_blocks(_ceil_div(shape.n, nr), tasks_wanted, cpu.num_cores)
    elif shape.n is not None and shape.m is not None and (shape.s is None or shape.weight_rows):
        # Both tile extents static, a batch outside (a convolution: I = output channels, J =
        # image positions; a static batch as a symbolic one: exported with a fixed batch of 1,
        # EfficientNet-B0's 1x1 convolutions took the dense layers' row tasks and ran 1.5-1.9x
        # as long). Every task holds every output channel and a block of positions,
        # and packs the im2col columns of its own positions (a panel that stays in L2 while the
        # task sweeps the weights), so the packed image is never written out whole: at batch 8 a
        # 3x3 convolution's im2col matrix is tens of MB. The blocks are as wide as the panel
        # budget allows while one image still makes a task or more per core. A pointwise
        # convolution takes a tall one-vector tile instead (``_long_reduction_tile``).
        tall = _long_reduction_tile(cpu, shape, k_unroll)
        if tall is not None:
            return tall
        m_tiles, n_tiles = _ceil_div(shape.m, mr), _ceil_div(shape.n, nr)
        mc_tiles = m_tiles
        panel_bytes = _b_bytes(shape, nr)
        # the groups of a grouped convolution are tasks too
        wanted = _ceil_div(tasks_wanted, shape.groups)
        fits = [
            d
            for d in _divisors_up_to(n_tiles, n_tiles)
            if d * panel_bytes <= CONV_PANEL_BYTES and n_tiles // d >= min(n_tiles, wanted)
        ]
        nc_tiles = max(fits or [1])
        # Few column tasks that do not share out evenly over the cores (a 14x14 map: 7 tiles of
        # 32 positions, 4 + 3 on two cores) take the output channels in as many row blocks as
        # even them out (each block packs its own copy of the task's im2col columns).
        mc_tiles = m_tiles // _balancing_split(
            shape.groups * (n_tiles // nc_tiles), m_tiles, cpu.num_cores
        )
        nc_tiles = 0 if nc_tiles == n_tiles else nc_tiles
    elif shape.n is not None and shape.m == 1:
        # One static row (a batch-1 classifier head, a decode step exported with static shapes):
        # the symbolic-rows schedule's one-row tile, as wide as the registers allow, not a
        # 1 x 2-vector tile whose two accumulators wait on the FMA latency. ResNet-18's 512 -> 1000
        # head at batch 1, interleaved with ONNX Runtime (Intel AVX-512 host): 61.8 -> 48.4 us
        # alone, 180 -> 150 us in the network. (Two rows keep the 2-row tile: 16.7 against 21.3
        # us with the one-row tile.)
        return few_rows_tile(cpu, GemmTile(mr, nv, 0, 0, k_unroll), shape)
    elif shape.n is not None and shape.m is not None:
        n_tiles = _ceil_div(shape.n, nr)
        m_tiles = _ceil_div(shape.m, mr)
        row_tasks = shape.s * m_tiles
        if row_tasks < tasks_wanted:
            # Too few row blocks to feed the cores (a short static M): split N as well, into the
            # fewest column blocks that make enough tasks (each task packs its few rows of A).
            for nc in sorted(_divisors_up_to(n_tiles, n_tiles), reverse=True):
                nc_tiles = nc
                if row_tasks * (n_tiles // nc) >= tasks_wanted:
                    break
            nc_tiles = 0 if nc_tiles == n_tiles else nc_tiles
        else:
            # Enough rows: bigger row blocks reuse each B panel more, while keeping the tasks.
            for cand in (8, 4, 2):
                if m_tiles % cand == 0 and shape.s * (m_tiles // cand) >= tasks_wanted:
                    mc_tiles = cand
                    break
    elif shape.n is not None and _ceil_div(shape.n, nr) >= 2 * cpu.num_cores:
        # Symbolic rows (tokens) against enough static columns (a weight): every task sweeps all
        # the rows over its own block of columns, so each B panel comes from memory once per call
        # and serves every row tile from cache. Row tasks would each stream all of B (a 12 MB
        # weight per 6 rows), and a few rows would leave cores idle. The fewest column blocks
        # that make enough tasks (at least two panels per core to get here), each block within
        # ROWS_OUTSIDE_B_BYTES, so that a task sweeps its block (from L2) inside each row tile
        # rather than all of A (from L3) inside each column tile: 1024³, qiao / NumPy, Intel
        # AVX-512 host (2026-12-04), 0.92-0.94 -> 0.99-1.04 (8 tasks of 1024 x 128 -> 16 of
        # 1024 x 64); its x86-64-v3 code against NumPy's Haswell kernels 0.88-0.90 -> 0.98-1.00.
        widest = max(1, ROWS_OUTSIDE_B_BYTES // _b_bytes(shape, nr))
        mc_tiles, nc_tiles = (
            0,
            _column_blocks(_ceil_div(shape.n, nr), tasks_wanted, cpu.num_cores, widest),
        )
    return GemmTile(mr, nv, mc_tiles, nc_tiles, k_unroll)


def _long_reduction_tile(cpu: CPUInfo, shape: GemmShape, k_unroll: int) -> GemmTile | None:
    """A one-vector row-task tile for a pointwise convolution (1x1, unit stride:
    ``GemmShape.pointwise``) on a target with 32 vector registers; ``None`` otherwise.

    A two-vector column panel (all of K by two vectors of positions) beyond the L1 data cache
    streams from L2 at every step of K; one-vector tiles as tall as the registers allow load one
    vector of it per ``mr`` FMAs instead of two per ``2 * mr``. EfficientNet-B0's 1x1 projections
    in the model (Intel AVX-512 host, batch 1, 2026-12-04, per call): 672 -> 112 over 14x14 140
    -> 124 us, 480 -> 112 100 -> 86 us, 480 -> 80 87 -> 77 us. Pointwise ones take it whatever
    their K: each row task then writes whole output planes of its own channels and pads less
    (196 positions: 13 vectors, not 7 two-vector tiles). Per call in the model against the
    two-vector tile, AMD AVX-512 host, batch 8, 2026-12-05, interleaved: MobileNetV3-Small 16 ->
    72 over 56x56 0.62x the time, 24 -> 88 and 88 -> 24 over 28x28 0.63x / 0.67x, 240 -> 40 over
    14x14 0.83x; EfficientNet-B0 144 -> 40 over 28x28 0.59x, 112 -> 672 over 14x14 0.85-0.95x.
    Other convolutions keep the two-vector tile: ResNet-18's strided 1x1 downsampling moved
    either way (0.89x, 1.08x, 1.09x), and a windowed one packs its im2col columns per task, so
    each row task would pack all of them again (3x3 over 28x28, one Conv node against ONNX
    Runtime, AMD Zen 5 VM, 2026-12-07: 40 -> 40 channels 0.256 -> 0.102 ms with the two-vector
    tile, 160 -> 40 0.98 -> 0.40 ms).

    ``mr``: at least 8 rows (accumulators for two FMA pipes of latency 4), at most the one-vector
    register tile's; row tiles that share out evenly over the cores first (``task_balance``:
    112 channels as 8 tiles of 14, not 7 of 16), then the fewest padded rows, then the tallest.
    One row tile per task, every position in it."""
    if (
        cpu.vector_registers < 32
        or not shape.weight_rows
        or shape.taps
        or shape.image_rows
        or not shape.pointwise
    ):
        return None
    tallest = max(mr for mr, nv in register_tiles(cpu) if nv == 1)

    def key(mr: int) -> tuple:
        tiles = _ceil_div(shape.m, mr)
        return (task_balance(tiles, cpu.num_cores) < TASK_BALANCE, tiles * mr - shape.m, -mr)

    rows = [mr for mr in range(8, tallest + 1) if _ceil_div(shape.m, mr) >= cpu.num_cores]
    if not rows:
        return None
    return GemmTile(min(rows, key=key), 1, 1, 0, k_unroll)


def _two_vector_rows(cpu: CPUInfo) -> int:
    """Rows of the default two-vector micro-tile: 8 with 32 registers, 6 with 16 (the classic
    AVX2 6x16 kernel)."""
    return 8 if cpu.vector_registers >= 32 else 6


def direct_rows_height(cpu: CPUInfo, positions: int | None, vectors: int = 2) -> int:
    """Rows of a ``vectors``-vector register tile (``direct_vectors``) for a convolution read in
    place (``direct_rows``): at most the default height (``_two_vector_rows`` for two vectors, as
    many as the registers hold for one or three, 16 at most), at least 4 (8 accumulators: two FMA
    pipes of latency 4; one vector: 8), dividing the ``positions`` (no row padding: a padded row
    would read past the input; ``passes.pad_conv_rows`` gives a map that none divides an output
    row more instead); 0 when none does."""
    if positions is None:
        return 0
    tallest = {nv: mr for mr, nv in register_tiles(cpu)}.get(vectors, 0)
    if vectors == 2:
        tallest = _two_vector_rows(cpu)
    lowest = 8 if vectors == 1 else 4
    return next((mr for mr in range(tallest, lowest - 1, -1) if positions % mr == 0), 0)


def _b_bytes(shape: GemmShape, cols: int) -> int:
    """Bytes of ``cols`` columns of ``B`` over the whole reduction (``K`` taken as 1 when
    symbolic)."""
    from tvm import DataType

    return (shape.k or 1) * cols * DataType(shape.dtype).bits // 8


def task_balance(tasks: int, cores: int) -> float:
    """Share of the cores' time spent working when ``tasks`` equal tasks are split statically
    over ``cores`` (TVM's parallel loops give each thread one contiguous run of tasks)."""
    return tasks / (_ceil_div(tasks, cores) * cores)


# A task count whose static split keeps the cores at least this busy needs no further split
# (``_balancing_split``): 25 tasks on two cores, 0.96.
TASK_BALANCE = 0.95


def _balancing_split(tasks: int, m_tiles: int, cores: int) -> int:
    """Row blocks (a divisor of ``m_tiles``) by which to multiply ``tasks`` so that they share
    out over ``cores`` evenly (``TASK_BALANCE``): the fewest that do, else the best balance among
    splits up to four (1: leave them)."""
    return max(
        _divisors_up_to(m_tiles, 4),
        key=lambda r: (min(task_balance(tasks * r, cores), TASK_BALANCE), -r),
    )


def _column_blocks(n_tiles: int, tasks_wanted: int, cores: int, widest: int | None = None) -> int:
    """``nc_tiles`` for column tasks with every row in every task: the widest block of column
    tiles (at most ``widest``) that still makes ``tasks_wanted`` tasks, sharing out evenly over
    ``cores`` where some block does (``task_balance``: 18 tiles as 18 tasks rather than 9 on two
    cores); ``0``: all columns in one task."""
    divisors = _divisors_up_to(n_tiles, widest or n_tiles)
    enough = [d for d in divisors if n_tiles // d >= tasks_wanted] or [1]
    even = [d for d in enough if task_balance(n_tiles // d, cores) >= TASK_BALANCE]
    nc_tiles = max(even or enough)
    return 0 if nc_tiles == n_tiles else nc_tiles


def check_tile(tile: GemmTile, shape: GemmShape, lanes: int) -> None:
    """Raise ``ValueError`` when ``tile`` would split an extent of ``shape`` raggedly."""
    nr = tile.nr(lanes)
    if tile.mc_tiles > 1 and (shape.m is None or _ceil_div(shape.m, tile.mr) % tile.mc_tiles):
        raise ValueError(f"mc_tiles={tile.mc_tiles} does not divide the row tiles of {shape}")
    if tile.nc_tiles > 0 and (shape.n is None or _ceil_div(shape.n, nr) % tile.nc_tiles):
        raise ValueError(f"nc_tiles={tile.nc_tiles} does not divide the column tiles of {shape}")
    if min(tile.mr, tile.nr_vectors, tile.k_unroll) < 1 or min(tile.mc_tiles, tile.nc_tiles) < 0:
        raise ValueError(f"tile sizes must be positive: {tile}")


# -- analysis -------------------------------------------------------------------------------------


def find_gemm_block(sch) -> Any | None:
    """The single reduction block of a GEMM-like function (others spatial), or ``None``."""
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks

    blocks = sch.get_child_blocks(get_root_block(sch))
    reductions = get_reduction_blocks(sch, blocks)
    if not reductions:
        return None
    block = reductions[0]
    stmt = sch.get(block)
    if gemm_orientation(stmt) is None:
        return None
    if str(stmt.writes[0].source.dtype) not in GEMM_DTYPES:
        return None
    if not is_multiply_accumulate(stmt):
        return None
    return block


def split_group_axis(func) -> Any | None:
    """``func`` with the output-channel iterator of a grouped convolution split into (group,
    channel in the group), or ``None`` when its one reduction block is no grouped convolution or
    one the window rule takes.

    A grouped convolution reads its input at channel ``f // (F / G) · (C / G) + c``: the output
    channel ``f`` is in every operand, so no iterator is a GEMM row and ``find_gemm_block`` turns
    it down. Split as ``g = f // (F / G)``, ``i = f % (F / G)`` (``transform_block_layout``, then
    simplified under the new iterators' bounds), the input reads ``g · (C / G) + c`` and the block
    is a GEMM batched over the groups: ``g`` in every operand, ``i`` in the weight and the output
    only, the positions in the input and the output, ``c`` and the window's taps the reduction;
    one kernel for all groups, each group's weight slice packed at load time.

    One 3x3 Conv node (+ ReLU) at batch 1, host code, AMD Zen 5 VM, 2026-12-07, before (one
    dense convolution per group for at most 16 groups, else TVM's generic schedule) -> after, ONNX
    Runtime in parentheses: ResNeXt's 32 groups of 8 channels over 28x28 8.40 -> 0.174 ms (0.274),
    of 16 over 14x14 7.99 -> 0.068 ms (0.097), of 32 over 7x7 8.42 -> 0.066 ms (0.096), RegNet's
    54 of 8 over 14x14 3.32 -> 0.063 ms (0.150), 189 of 8 over 7x7 2.80 -> 0.151 ms (0.190); 3
    groups of 80 over 28x28 3.11 -> 0.687 ms (0.619), 16 of 48 over 14x14 3.05 -> 0.276 ms
    (0.276); AlexNet's 5x5 in 2 groups 1.32 -> 1.20 ms (1.01); ShuffleNet's 1x1 in 3 groups 0.078
    -> 0.026 ms (0.037); wav2vec2's positional convolution (1-D, 16 groups, kernel 128, 500
    frames) 31.9 -> 13.4 ms (13.7-15.7). Left alone: a
    window (more than one tap) of at most ``cpu_conv.MAX_WINDOW`` products per output
    (``C / G`` times the taps: depthwise convolutions with a channel multiplier, groups of 2-7
    channels under a 3x3 window), which ``CPUWindowReduction`` computes in place faster than
    this GEMM: one Conv node at batch 1, window rule / batched GEMM, AMD Zen 5 VM, host code,
    2026-12-07: 32 groups of 4 channels over 56x56 0.19 / 0.40 ms, of 2 channels 0.044 / 0.25 ms
    (0.036 / 0.093 at stride 2), a depthwise one with 2 outputs a channel 0.023 / 0.155 ms.
    """
    import tvm
    import tvm_ffi
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks

    sch = s_tir.Schedule(func)
    reductions = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    if not reductions or len(reductions) != 1:
        return None
    block = reductions[0]
    stmt = sch.get(block)
    if len(stmt.reads) != 2 or len(stmt.writes) != 1:
        return None
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduce = {
        iv.var: static_int(iv.dom.extent)
        for iv in stmt.iter_vars
        if iv.iter_type == tirx.IterVar.CommReduce
    }
    splits, channel_index = set(), []

    def on_div(node):
        if isinstance(node.b, tirx.IntImm) and any(node.a.same_as(v) for v in spatial):
            splits.add((next(v for v in spatial if node.a.same_as(v)), int(node.b.value)))

    for read in stmt.reads:
        for r in read.region:
            before = len(splits)
            tvm_ffi.structural_walk(r.min, [(tirx.FloorDiv, on_div)])
            if len(splits) > before:
                channel_index.append(r.min)
    if len(splits) != 1 or len(channel_index) != 1 or None in reduce.values():
        return None
    ((var, factor),) = splits
    extent = static_int(next(iv for iv in stmt.iter_vars if iv.var.same_as(var)).dom.extent)
    if extent is None or factor < 2 or extent % factor or extent == factor:
        return None
    window = math.prod(reduce.values())
    taps = math.prod(n for v, n in reduce.items() if not uses_var(channel_index[0], v))
    if taps > 1 and window <= MAX_WINDOW:
        return None  # CPUWindowReduction's

    def remap(*ivs):
        out = []
        for iv, v in zip(stmt.iter_vars, ivs):
            out += [v // factor, v % factor] if iv.var.same_as(var) else [v]
        return out

    try:
        sch.transform_block_layout(block, tirx.IndexMap.from_func(remap, ndim=len(stmt.iter_vars)))
    except (s_tir.ScheduleError, tvm.TVMError, RuntimeError) as err:
        log.debug("grouped convolution: group axis not split: %s", str(err).splitlines()[0])
        return None
    name = stmt.name_hint

    def on_block(node, mutator):
        node = mutator.default_mutate(node)
        if node.name_hint != name:
            return node
        analyzer = tvm.sym.Analyzer()
        for iv in node.iter_vars:
            analyzer.bind(iv.var, iv.dom)
        # ``(g · (F / G) + i) // (F / G)`` is ``g`` under ``i < F / G``
        return tvm_ffi.structural_mutate(
            node, [(tirx.FloorDiv, lambda e, _m: analyzer.simplify(e))]
        )

    return tvm_ffi.structural_mutate(sch.mod["main"], [(s_tir.SBlock, on_block)])


def bound_group_channels(func):
    """``func`` (a scheduled grouped convolution, ``split_group_axis``) with every store at
    output channel ``g · (F / G) + i`` whose ``i`` runs past ``F / G`` predicated on ``i <
    F / G``.

    A register tile pads a group's ``F / G`` channels to whole vectors or rows; the write-back
    stores only the real ones (its predicate) until the epilogue (bias, ReLU) is folded into it:
    TVM's ``reverse_compute_inline`` then bounds the store by the epilogue's own domain, ``g ·
    (F / G) + i < F``, and drops the tile's bound, so a group's padding lands on the next group's
    first channels (a race between the two groups' tasks). The bound is put back here."""
    import tvm
    import tvm_ffi
    from tvm import s_tir, tirx

    def channel_overflow(index, extents):
        # ``g * F + i`` (either order) with ``i`` a block iterator longer than ``F``
        if not isinstance(index, tirx.Add):
            return None
        for mul, var in ((index.a, index.b), (index.b, index.a)):
            if (
                isinstance(mul, tirx.Mul)
                and isinstance(mul.b, tirx.IntImm)
                and isinstance(var, tirx.Var)
                and extents.get(var, 0) > int(mul.b.value)
            ):
                return var, int(mul.b.value)
        return None

    def on_realize(node, mutator):
        node = mutator.default_mutate(node)
        block = node.block
        extents = {iv.var: static_int(iv.dom.extent) or 0 for iv in block.iter_vars}
        binding = dict(zip([iv.var for iv in block.iter_vars], node.iter_values))
        bounds = []

        def on_store(store):
            for index in store.indices:
                found = channel_overflow(index, extents)
                if found is not None:
                    var, channels = found
                    bounds.append(binding[var] < tirx.const(channels, binding[var].ty.dtype))

        tvm_ffi.structural_walk(block.body, [(tirx.BufferStore, on_store)])
        if not bounds:
            return node
        predicate = node.predicate
        for bound in bounds:
            predicate = tirx.And(predicate, bound)
        return s_tir.SBlockRealize(node.iter_values, tvm.sym.Analyzer().simplify(predicate), block)

    return tvm_ffi.structural_mutate(func, [(s_tir.SBlockRealize, on_realize)])


def is_multiply_accumulate(stmt) -> bool:
    """``C[...] = C[...] + A[...] * B[...]`` (casts allowed), the only reduction the kernel does."""
    from tvm import tirx
    from tvm.ir.expr import TensorLoad

    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return False
    add = body.value

    def strip(e):
        while isinstance(e, tirx.Cast):
            e = e.value
        return e

    def is_acc(e) -> bool:
        return isinstance(e, TensorLoad) and e.source.same_as(body.buffer)

    lhs, rhs = strip(add.a), strip(add.b)
    if is_acc(rhs):
        lhs, rhs = rhs, lhs
    return is_acc(lhs) and isinstance(strip(rhs), tirx.Mul)


def gemm_lanes(cpu: CPUInfo, sch, block) -> int:
    """SIMD lanes of ``block``'s output dtype on ``cpu`` (what ``normalize_gemm`` weighs)."""
    return cpu.lanes(str(sch.get(block).writes[0].source.dtype))


def gemm_shape(sch, block) -> GemmShape:
    """Extents of a normalised ``(S, IO, JO, I, J, K)`` block (``s`` counts ``S × IO × JO``)."""
    iters = sch.get(block).iter_vars
    s, io, jo, m, n, k = (static_int(iv.dom.extent) for iv in iters)
    batch = None if None in (s, io, jo) else s * io * jo
    dtype = str(sch.get(block).writes[0].source.dtype)
    annotations = sch.get(block).annotations
    image_rows = IMAGE_ROWS in annotations
    taps = int(annotations[DIRECT_ROWS]) if DIRECT_ROWS in annotations else 0
    return GemmShape(
        batch,
        m,
        n,
        k,
        dtype,
        rows=iters[3].dom.extent,
        image_rows=image_rows,
        taps=taps,
        weight_rows=WEIGHT_ROWS in annotations,
        pointwise=POINTWISE in annotations,
        groups=static_int(iters[0].dom.extent) or 1,
    )


# -- schedule -------------------------------------------------------------------------------------


def _writer_of(sch, blocks, buffer):
    for b in blocks:
        if any(w.source.same_as(buffer) for w in sch.get(b).writes):
            return b
    return None


def gemm_orientation(stmt, nr: int | None = None) -> int | None:
    """Which read of a GEMM-like block plays ``A`` (0 or 1), or ``None`` when it is not GEMM-like.

    ``B``'s column axis ``J`` is the one the micro-kernel vectorises and the write-back stores
    whole vectors along, so ``B`` is preferably the operand that carries the output's innermost
    (contiguous) axis: the weight of ``x @ w``, but the input of an NCHW convolution (whose output
    is contiguous along the image), with the weights as ``A``. Unless that ``J`` is short and
    static (a 2×2 feature map) while the other orientation's is static and longer: padding ``J`` to
    whole vectors would then waste most of the work. A squeeze-excitation block's 1×1
    convolutions over a 1×1 map (``J`` = 1) against two output channels take the weights as ``B``
    too: with ``J`` = 1 the image panel could not even be laid out (TVM's ``transform_layout``
    refused it and a slower rule took the kernel: the zoo's EfficientNet and RegNet). A symbolic
    alternative (the tokens of a 10-class head) is not taken: at one row it would pad that row to
    a whole vector instead. Given the micro-tile width ``nr``, a static ``J`` that pads to whole
    tiles with much waste (``J_WASTE_SWAP``: a 7x7 map's 49 positions) also gives way to a static
    alternative that pads with little (512 output channels).
    """
    from tvm.tirx.analysis import undefined_vars

    valid = [a for a in (0, 1) if _iter_traits(stmt, a) is not None]
    if not valid:
        return None
    inner = set(undefined_vars(stmt.writes[0].region[-1].min))

    def contiguous(a: int) -> bool:
        b_vars, a_vars = set(), set()
        for r in stmt.reads[1 - a].region:
            b_vars |= set(undefined_vars(r.min))
        for r in stmt.reads[a].region:
            a_vars |= set(undefined_vars(r.min))
        return bool(inner) and inner <= b_vars and not inner & a_vars

    preferred = next((a for a in valid if contiguous(a)), valid[0])
    others = [a for a in valid if a != preferred]
    if others and _j_extent(stmt, preferred) is not None:
        short, alternative = _j_extent(stmt, preferred), _j_extent(stmt, others[0])
        if short < 16 and alternative is not None and alternative > short:
            return others[0]
        if nr and alternative is not None:
            waste, other = _pad_waste(short, nr), _pad_waste(alternative, nr)
            if waste > J_WASTE_SWAP and other <= waste / 2:
                return others[0]
    return preferred


def _pad_waste(extent: int, tile: int) -> float:
    """Fraction of padded work when ``extent`` is padded to a multiple of ``tile``."""
    return (_ceil_div(extent, tile) * tile - extent) / extent


def _j_extent(stmt, a_index: int) -> int | None:
    """Static extent of the ``J`` axis (image positions, output features) in an orientation."""
    from tvm import tirx
    from tvm.s_tir.dlight.gpu.matmul import IterKind

    traits = _iter_traits(stmt, a_index)
    static = [
        int(t.extent.value)
        for t in traits[3]
        if t.kind == IterKind.kIter_J and isinstance(t.extent, tirx.IntImm)
    ]  # symbolic J axes go to the outer JO loop
    if not static:
        return None
    extent = 1
    for value in static:
        extent *= value
    return extent


def gemm_index_maps(stmt, a_index: int = 0, image_rows: bool = False):
    """Index maps taking a GEMM-like block to ``(S, IO, JO, I, J, K)`` and its operands to
    ``A[S, IO, I, K]``, ``B[S, JO, J, K]``, ``C[S, IO, JO, I, J]``; ``None`` when not GEMM-like.

    ``S`` fuses the iterators every operand has (batch), ``K`` the reduction. Of the iterators
    only ``A`` and ``C`` have, the last is ``I`` (tiled by the micro-kernel) and the others fuse
    into ``IO``, an outer loop: fusing ``batch × seq`` into one ``I`` would index every element
    through ``// seq`` and ``% seq``. Likewise the symbolic iterators only ``B`` and ``C`` have
    (the batch of a convolution whose ``J`` is the image) go to ``JO`` and the static ones to
    ``J``, so ``J`` keeps a static extent the tiles can divide. With ``image_rows`` (a convolution
    whose positions are the rows, ``J_WASTE_SWAP``) the rows are split the same way: the static
    ones (``y``, ``x``) fuse into ``I``, the batch goes to ``IO``.
    """
    from tvm import tirx
    from tvm.s_tir.dlight.gpu.matmul import IterKind

    traits = _iter_traits(stmt, a_index)
    if traits is None:
        return None
    a_traits, b_traits, c_traits, block_traits = traits
    i_traits = [t for t in block_traits if t.kind == IterKind.kIter_I]
    j_traits = [t for t in block_traits if t.kind == IterKind.kIter_J]
    j_outer = [t for t in j_traits if not isinstance(t.extent, tirx.IntImm)]
    if len(j_outer) == len(j_traits):
        j_outer = j_outer[:-1]
    i_inner = [t for t in i_traits if isinstance(t.extent, tirx.IntImm)] if image_rows else []
    i_inner = i_inner or i_traits[-1:]
    label = {}
    for t in block_traits:
        if t.kind == IterKind.kIter_I:
            label[id(t)] = "I" if any(t is i for i in i_inner) else "IO"
        elif t.kind == IterKind.kIter_J:
            label[id(t)] = "JO" if any(t is o for o in j_outer) else "J"
        else:
            label[id(t)] = {IterKind.kIter_S: "S", IterKind.kIter_K: "K", IterKind.kIter_T: "T"}[
                t.kind
            ]

    def fusion_map(trait_list, order):
        fused: dict[str, Any] = {}
        inputs = []
        for n, t in enumerate(trait_list):
            v = tirx.Var(f"i{n}", t.extent.ty)
            inputs.append(v)
            kind = label[id(t)]
            if kind == "T":
                continue
            fused[kind] = fused[kind] * t.extent + v if kind in fused else v
        zero = tirx.IntImm(trait_list[0].extent.ty, 0)
        return tirx.IndexMap(inputs, [fused.get(k, zero) for k in order], None)

    return (
        fusion_map(block_traits, ["S", "IO", "JO", "I", "J", "K"]),
        fusion_map(a_traits, ["S", "IO", "I", "K"]),
        fusion_map(b_traits, ["S", "JO", "J", "K"]),
        fusion_map(c_traits, ["S", "IO", "JO", "I", "J"]),
    )


def _iter_traits(stmt, a_index: int = 0):
    """dlight's ``detect_iter_traits``, except that an extent-1 iterator is classified by the
    operands that use it like any other: a one-row product (``x[1, k] @ w[k, n]``, a batch-1
    dense layer with static shapes) is a GEMM with ``M = 1`` rather than no GEMM at all."""
    from tvm import tirx
    from tvm.s_tir.dlight.gpu.matmul import IterKind, IterTrait
    from tvm.tirx.analysis import undefined_vars

    if len(stmt.reads) != 2 or len(stmt.writes) != 1:
        return None

    def axes(region) -> set:
        out = set()
        for r in region:
            if not (isinstance(r.extent, tirx.IntImm) and int(r.extent.value) == 1):
                return None
            out |= set(undefined_vars(r.min))
        return out

    a_read, b_read = stmt.reads[a_index], stmt.reads[1 - a_index]
    a_axes, b_axes, c_axes = (axes(x.region) for x in (a_read, b_read, stmt.writes[0]))
    if a_axes is None or b_axes is None or c_axes is None:
        return None
    traits = {}
    for iv in stmt.iter_vars:
        var = iv.var
        in_a, in_b, in_c = var in a_axes, var in b_axes, var in c_axes
        if iv.iter_type == tirx.IterVar.DataPar:
            if in_a and in_b and in_c:
                kind = IterKind.kIter_S
            elif in_a and in_c:
                kind = IterKind.kIter_I
            elif in_b and in_c:
                kind = IterKind.kIter_J
            elif not (in_a or in_b or in_c) or _is_unit(iv):
                kind = IterKind.kIter_T
            else:
                return None
        elif iv.iter_type == tirx.IterVar.CommReduce and in_a and in_b and not in_c:
            kind = IterKind.kIter_K
        elif iv.iter_type == tirx.IterVar.CommReduce and _is_unit(iv):
            kind = IterKind.kIter_T
        else:
            return None
        if _is_unit(iv) and kind == IterKind.kIter_S:
            kind = IterKind.kIter_T
        traits[var] = IterTrait(kind, iv.dom.extent)
    kinds = {t.kind for t in traits.values()}
    if not {IterKind.kIter_I, IterKind.kIter_J, IterKind.kIter_K} <= kinds:
        return None
    order = [iv.var for iv in stmt.iter_vars]
    return (
        [traits[v] for v in order if v in a_axes],
        [traits[v] for v in order if v in b_axes],
        [traits[v] for v in order if v in c_axes],
        [traits[v] for v in order],
    )


def _is_unit(iv) -> bool:
    from tvm import tirx

    return isinstance(iv.dom.extent, tirx.IntImm) and int(iv.dom.extent.value) == 1


def direct_rows(sch, block, cpu: CPUInfo) -> int:
    """The window's taps when a convolution's image positions are read in place as the rows of
    the GEMM (0 when not).

    A convolution ``C[n, f, y, x] += P[n, c, y·s + ry, x·s + rx] · W[f, c, ry, rx]`` is then
    computed with the positions as the broadcast rows ``I`` and the output channels as the vector
    columns ``J``; the micro-kernel broadcasts each input element straight from ``P`` (no im2col
    panel: packing it cost 10-15 % of a 3x3 convolution) against weight panels packed at load
    time. Unrolled by the taps, every step reads at constant offsets from one row's pointer. It
    applies to a windowed reduction (taps > 1; a 1x1 convolution keeps its panels) at least
    ``DIRECT_MIN_K`` long, of an activation against a static weight, whose positions divide into
    register tiles of at least 4 rows (``_direct_rows_height``: a padded row would read past the
    input) and whose channels fill two-vector tiles with little padding (``J_WASTE_SWAP``).
    Measured on a 2-core AVX2 EPYC, convolution + ReLU, packed -> in place, interleaved in one
    process: 3x3 64 channels over 56x56 14.3 -> 12.7 ms at batch 8 and 2.19 -> 2.00 ms at batch
    1, 128 over 28x28 16.2 -> 13.4 ms (batch 8), 256 over 14x14 14.9 -> 14.4 ms (batch 8) and
    1.95 -> 1.61 ms (batch 1); ResNet-18's 7x7 stride-2 stem 16.7 -> 15.2 ms (batch 8); its
    stride-2 3x3 convolutions within 2 %. ResNet-18 end to end, ONNX Runtime's time / qiao's:
    0.81 -> 0.84 (batch 1), 0.81 -> 0.86 (batch 8).
    """
    from tvm import tirx

    stmt = sch.get(block)
    preferred = gemm_orientation(stmt)
    if preferred is None or _iter_traits(stmt, 1 - preferred) is None:
        return 0
    reads = stmt.reads
    if not _is_param(sch, reads[preferred].source) or _is_param(sch, reads[1 - preferred].source):
        return 0  # not weights against an activation
    positions, channels = _j_extent(stmt, preferred), _j_extent(stmt, 1 - preferred)
    vectors = direct_vectors(gemm_lanes(cpu, sch, block), channels)
    if not vectors or not direct_rows_height(cpu, positions, vectors):
        return 0
    # The reduction is (input channels, window rows, window columns) in that order.
    reduction = [
        static_int(iv.dom.extent)
        for iv in stmt.iter_vars
        if iv.iter_type == tirx.IterVar.CommReduce
    ]
    if len(reduction) < 2 or None in reduction:
        return 0
    taps = 1
    for extent in reduction[1:]:
        taps *= extent
    if not direct_window(gemm_lanes(cpu, sch, block), channels, reduction[0], taps):
        return 0
    return taps


# Read in place, a convolution's channels pad to whole vectors, yet that beats packed im2col
# panels by far. One 3x3 Conv node at batch 1, packed -> in place (``direct_vectors``), ONNX
# Runtime's time in parentheses, AMD Zen 5 VM, host code (16 lanes), 2026-12-07: 48 -> 48
# channels over 14x14 0.165 -> 0.020 ms (0.022: three vectors, no padding), 80 -> 80 over 28x28
# 0.31 -> 0.22 ms (0.23: one vector), 40 -> 40 over 28x28 0.102 -> 0.063 ms (0.077: three
# vectors, 20 % padding), 64 -> 17 0.138 -> 0.063 ms (0.069: 88 % padding), 64 -> 24 0.138 ->
# 0.066 ms (0.070), 128 -> 33 0.334 -> 0.180 ms (0.184).
def direct_vectors(lanes: int, channels: int | None) -> int:
    """SIMD vectors of ``lanes`` per register-tile row when a convolution's output ``channels``
    (per group) are the vector columns of ``direct_rows``: two where they pad to whole two-vector
    tiles with little waste (``J_WASTE_SWAP``), else the one, two or three that pad the fewest
    (ties: the wider), 0 for a symbolic count. Read in place, even much padding beats packed
    im2col panels (measured: the comment above)."""
    if channels is None:
        return 0
    if _pad_waste(channels, 2 * lanes) <= J_WASTE_SWAP:
        return 2
    return min((3, 2, 1), key=lambda nv: _ceil_div(channels, nv * lanes) * nv)


def direct_window(lanes: int, channels: int | None, in_channels: int, taps: int) -> int:
    """The vectors of a tile row (``direct_vectors``) where a convolution qualifies for
    ``direct_rows`` by all but its positions, else 0: its ``channels`` (output, per group) fill
    vector tiles of ``lanes`` with little padding, its window has 2 .. ``DIRECT_MAX_TAPS`` taps
    and its reduction (``in_channels`` per group times the taps) is at least ``DIRECT_MIN_K``
    long. The positions are ``direct_rows_height``'s question (``passes.pad_conv_rows`` asks
    both)."""
    if not 1 < taps <= DIRECT_MAX_TAPS or in_channels * taps < DIRECT_MIN_K:
        return 0
    return direct_vectors(lanes, channels)


def normalize_gemm(sch, block, lanes: int | None = None, cpu: CPUInfo | None = None):
    """Rewrite ``block`` to iterate ``(S, IO, JO, I, J, K)`` over reindexed operands (see
    ``gemm_index_maps``, ``gemm_orientation``: ``lanes``, the target's SIMD lanes, lets a
    convolution over a small map take its positions as rows, judged on two-vector tiles; given
    ``cpu``, a convolution read in place takes them too, ``direct_rows``). Returns the blocks
    writing the reindexed ``A`` and ``B``, and the read index of ``A``."""
    taps = direct_rows(sch, block, cpu) if cpu is not None else 0
    preferred = gemm_orientation(sch.get(block))
    a_index = (
        1 - preferred if taps else gemm_orientation(sch.get(block), 2 * lanes if lanes else None)
    )
    image_rows = a_index != preferred
    # The weight's copy must come first: its packing is lifted out of the function only as a
    # leading statement. Each reindex puts its copy right before the block, so the weight goes
    # first: B's (x @ w), or A's when the weights are the rows (an NCHW convolution).
    original = sch.get(block)
    reads = original.reads
    output = original.writes[0].source
    weight_rows = _is_param(sch, reads[a_index].source) and not _is_param(
        sch, reads[1 - a_index].source
    )
    if weight_rows:
        ra = sch.reindex(block, ("read", a_index))
        rb = sch.reindex(block, ("read", 1 - a_index))
    else:
        rb = sch.reindex(block, ("read", 1 - a_index))
        ra = sch.reindex(block, ("read", a_index))
    rc = sch.reindex(block, ("write", 0))
    block_map, a_map, b_map, c_map = gemm_index_maps(sch.get(block), a_index, image_rows)
    sch.transform_layout(ra, ("write", 0), a_map)
    sch.transform_layout(rb, ("write", 0), b_map)
    sch.transform_layout(rc, ("read", 0), c_map)
    sch.transform_block_layout(block, block_map)
    if image_rows:
        sch.annotate(block, IMAGE_ROWS, 1)
    if taps:
        sch.annotate(block, DIRECT_ROWS, taps)
    if weight_rows:
        sch.annotate(block, WEIGHT_ROWS, 1)
        if _same_positions(original, reads[1 - a_index].source, output):
            sch.annotate(block, POINTWISE, 1)
    return ra, rb, a_index


def _same_positions(block, source, output) -> bool:
    """Whether the convolution ``block`` reading the activation ``source`` into ``output`` is
    pointwise: it reduces over the channels alone (no window taps) and keeps the image
    positions (the same static extents past the channel axis: unit stride, no padding)."""
    from tvm import tirx

    reduce = [
        iv
        for iv in block.iter_vars
        if iv.iter_type == tirx.IterVar.CommReduce and static_int(iv.dom.extent) != 1
    ]
    if len(reduce) != 1 or len(source.shape) != len(output.shape) or len(output.shape) < 3:
        return False
    inner = [(static_int(a), static_int(b)) for a, b in zip(source.shape[2:], output.shape[2:])]
    return all(a is not None and a == b for a, b in inner)


def _pad_and_find_stages(sch, block, ra, rb, a_index: int, mr: int, nr: int, k_pad: int):
    """Pad the normalised block; return the blocks producing its ``A`` and ``B`` operands."""
    sch.pad_einsum(block, [1, 1, 1, mr, nr, k_pad])
    stmt = sch.get(block)
    a_read, b_read = stmt.reads[a_index].source, stmt.reads[1 - a_index].source
    producers = sch.get_producers(block)
    a_stage = _writer_of(sch, producers, a_read)
    b_stage = _writer_of(sch, producers, b_read)
    # pad_einsum inserts "<buf>_pad" copies after the reindex blocks when it pads; fold the
    # reindex copy into them so one block does gather + zero-pad (+ transpose for B).
    for stage, reindex in ((a_stage, ra), (b_stage, rb)):
        if not sch.get(stage).same_as(sch.get(reindex)):
            sch.compute_inline(reindex)
    a_stage = _writer_of(sch, sch.get_producers(block), a_read)
    b_stage = _writer_of(sch, sch.get_producers(block), b_read)
    return a_stage, b_stage


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception:  # a schedule primitive refused: leave the IR as it is
        return False


def inline_producers(sch, block, keep_padding: bool = False) -> list:
    """Inline every elementwise producer chain of ``block`` (transposes, broadcasts, casts).

    With ``keep_padding``, zero-padding copies (a convolution's padded input) stay separate: an
    im2col packing reads every input element up to ``ry × rx`` times, and inlined, each read would
    carry the bounds test (and a gather where the window strides). Returns the kept blocks."""
    while any(
        _try(sch.compute_inline, p)
        for p in _all_producers(sch, block)
        if not (keep_padding and _is_padding(sch.get(p)))
    ):
        pass
    return [p for p in _all_producers(sch, block) if keep_padding and _is_padding(sch.get(p))]


def _is_padding(stmt) -> bool:
    """A block storing ``if_then_else(in_bounds, X[...], pad value)``: a padding copy."""
    from tvm import tirx

    value = getattr(stmt.body, "value", None)
    if value is None:
        return False
    if isinstance(value, tirx.Select):
        return True
    return getattr(getattr(value, "op", None), "name", "").endswith("if_then_else")


def _all_producers(sch, block) -> list:
    out = []
    for p in sch.get_producers(block):
        out.append(p)
        out.extend(_all_producers(sch, p))
    return out


def _all_consumers(sch, block) -> list:
    out = []
    for c in sch.get_consumers(block):
        out.append(c)
        out.extend(_all_consumers(sch, c))
    return out


def _inline_one_consumer(sch, block) -> bool:
    """Fold one consumer of ``block`` (or a side input of one) into its neighbour; the block
    handles go stale after a successful inline, so the caller re-queries."""
    for consumer in _all_consumers(sch, block):
        for producer in sch.get_producers(consumer):
            if sch.get(producer).same_as(sch.get(block)):
                continue
            if producer_chain_inlined(sch, producer):
                return True
        # A consumer whose own consumer broadcasts it (a squeeze-excitation's sigmoid) joins the
        # write-back only: computed once per output, not again for every element broadcast.
        forward = not _broadcast_later(sch, consumer) and _try(sch.compute_inline, consumer)
        if forward or _try(sch.reverse_compute_inline, consumer):
            return True
    return False


def _broadcast_later(sch, block) -> bool:
    """Whether a consumer of ``block`` writes more elements than it (a broadcast: the same
    symbolic extents, a larger static product); a reshape or a transpose writes as many."""

    def size(b):
        static, symbolic = 1, []
        for extent in sch.get(b).writes[0].source.shape:
            value = static_int(extent)
            if value is None:
                symbolic.append(str(extent))
            else:
                static *= value
        return static, sorted(symbolic)

    mine = size(block)
    return any(
        theirs[1] == mine[1] and theirs[0] > mine[0]
        for theirs in map(size, sch.get_consumers(block))
    )


def producer_chain_inlined(sch, block) -> bool:
    """Inline ``block`` (a side input such as a mask or a broadcast bias) and its own producers
    into their consumers; true when anything changed."""
    for p in _all_producers(sch, block):
        if _try(sch.compute_inline, p):
            return True
    return _try(sch.compute_inline, block)


def inline_epilogue(sch, block) -> list:
    """Fold the consumers of ``block`` (copy-outs, bias, activations, masks) into it.

    Side inputs of an epilogue (a mask computed from iota, a broadcast bias) are inlined into the
    epilogue first. Returns the consumers that could not be folded (scheduled separately).
    """
    while _inline_one_consumer(sch, block):
        pass
    return _all_consumers(sch, block)


def schedule_microkernel(
    sch,
    block,
    i_loop,
    j_loop,
    k_loop,
    *,
    mr: int,
    nr_vectors: int,
    lanes: int,
    k_unroll: int = 1,
    rows_inside: bool = True,
):
    """Register-block one GEMM tile loop nest: the reusable CPU micro-kernel.

    The loops ``i_loop`` (extent a multiple of ``mr``), ``j_loop`` (a multiple of ``nr_vectors *
    lanes``) and ``k_loop`` (a multiple of ``k_unroll``) must be the three innermost loops of
    ``block``, in that order, and ``block`` a multiply-accumulate reduction
    ``C[.., i, j] += A[.., i, k] * B[.., k, j]`` whose ``B`` is contiguous along ``j`` (packed or
    not). Afterwards ``C`` is computed in an ``mr × nr`` register tile:

        for j0: for i0:                 # micro-tiles (i0 outside j0 with rows_inside=False)
          acc[mr, nr] = 0               # SIMD registers
          for k0: for k1 (unrolled):
            for i1 (unrolled): for j1 (unrolled vectors × SIMD lanes):
              acc[i1, j1] += A[i0*mr+i1, k] * B[k, j0*nr+j1]
          C[tile] = acc                 # write-back block (fold epilogues into it)

    Parameters
    ----------
    sch : tvm.s_tir.Schedule
    block : SBlockRV
        The reduction block.
    i_loop, j_loop, k_loop : LoopRV
        Row, column and reduction loops of one task's tile.
    mr, nr_vectors, lanes : int
        Register block: ``mr`` rows × ``nr_vectors`` SIMD vectors of ``lanes`` elements
        (``cpu_info(target).lanes(dtype)``; ``register_tiles`` lists shapes that fit).
    k_unroll : int
        Unroll factor of the reduction.
    rows_inside : bool
        Sweep the rows of the tile inside each ``nr``-wide column panel (``B`` panel reused from L1,
        the BLIS order for packed ``A``); ``False`` sweeps columns inside rows.

    Returns
    -------
    tuple
        ``(write_back, init)``: the block that stores the register tile to ``C`` and the block that
        zeroes it.
    """
    nr = nr_vectors * lanes
    i0, i1 = sch.split(i_loop, [None, mr])
    j0, j1 = sch.split(j_loop, [None, nr])
    k0, k1 = sch.split(k_loop, [None, k_unroll])
    tile_loops = (j0, i0) if rows_inside else (i0, j0)
    sch.reorder(*tile_loops, k0, k1, i1, j1)
    j1v, j1l = sch.split(j1, [None, lanes])
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, tile_loops[1], preserve_unit_loops=True)
    sch.unroll(k1)
    sch.unroll(i1)
    sch.unroll(j1v)
    sch.vectorize(j1l)
    init = sch.decompose_reduction(block, k0)
    _vectorize_write_back(sch, write_back, lanes)
    return write_back, init


def _vectorize_write_back(sch, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    inner = loops[-1]
    outer_rows = loops[-2]
    _, vec = sch.split(inner, [None, lanes])
    sch.vectorize(vec)
    sch.unroll(outer_rows)


def dot_accumulators(rows: int, cols: int, lanes: int) -> tuple[tuple, tuple]:
    """Shapes of the two accumulator buffers ``dot_microkernel`` takes for a ``rows x cols`` block.

    The ``cols`` accumulators of a row are split in two buffers so each stays under TVM's 1 KB
    stack-array limit (larger scratch goes to a heap workspace, which LLVM cannot keep in
    registers); allocate them with ``T.alloc_buffer(shape, "float32")``.
    """
    first, second = (cols + 1) // 2, cols // 2
    return (rows, first, lanes), (rows, max(second, 1), lanes)


def dot_microkernel(
    *,
    rows: int,
    cols: int,
    lanes: int,
    k_vectors: int,
    w_row,
    prefetch: int,
    widen: bool = False,
    prefetch_lines: int = 1,
    row_masks: bool = False,
    per_line: bool = False,
):
    """The register-blocked micro-kernel of a GEMM that reads its weight in place (TIR macro).

    ``schedule_microkernel`` needs ``B`` packed into column panels; a weight read in place in
    ONNX's linear layout ``W[e, rows, K]`` (``K`` contiguous: the MoE grouped GEMM, whose experts
    are too big to copy) vectorises the reduction instead. For ``m < rows`` and ``r < cols``::

        red[m, r] = sum_k A[arow[m], k] * W[e, w_row(r0 + r), k]

    with ``rows * cols`` SIMD accumulators (one per pair, ``lanes`` wide along ``k``), ``k`` walked
    in ``k_vectors`` vector steps from vector ``k0`` (a chunk of the reduction, or all of it from
    0), and the lanes summed at the end. With ``prefetch`` each step also prefetches the same
    ``k`` of the weight rows ``w_row(r_next + r)`` (a later group; those its ``prefetch_rows``
    mask names), so they stream from memory while these are multiplied.
    ``register_tiles(cpu, "dot")`` lists the blocks that fit; a GEMV (decode) is the ``rows=1``
    block.

    Parameters
    ----------
    rows, cols : int
        Rows of ``A`` (tokens) and of ``W`` (weight rows) in the register block.
    lanes : int
        SIMD lanes of the reduction (``cpu_info(target).lanes(dtype)`` or a divisor of ``K``).
    k_vectors : int
        ``K // lanes``.
    w_row : callable
        Tile row (a TIR expression) → row index of ``W``.
    prefetch : int
        Software-prefetch the next weight rows into this cache level: 1 (L1, ``prefetcht0``), 2
        (L2 only, ``prefetcht1``: the core's L2 streams them on while L1's fill buffers stay free
        for the operands), 0 never.
    widen : bool
        ``W`` is float16/bfloat16 (``A`` float32): each loaded weight vector is widened to float32
        in registers (bfloat16: a 16-bit shift; float16: ``vcvtph2ps`` on F16C hosts), so the
        stream read from memory is half the bytes.
    prefetch_lines : int
        Vector steps of each next row prefetched per step: 1 the step's own, 2 also the following
        one, so that every line is asked for twice: a software prefetch that finds the core's
        miss buffers full is dropped, and the second one gets it in. The last steps of a row ask
        for lines past its end (a prefetch never faults): no clamp in the loop (its scalar ops
        took 1-5 % of the AVX2 grouped GEMM's time at 8-12 tokens an expert).
    row_masks : bool
        ``prefetch_rows`` names rows one by one (a bit test per row and step); without, any
        nonzero mask asks for every row (one test: the flags of a 1 x 12 block's rows, hoisted
        out of the loop, spilled general registers on AVX2).
    per_line : bool
        Walk the reduction one cache line of the weight rows per loop step (two steps of 8
        float32 on AVX2, one on AVX-512), where ``k_vectors`` allows: the prefetches and their
        row-mask tests come once per line instead of once per vector step, each line of the rows
        ahead still asked for twice. On the AVX-512 EPYC VM (2026-12-05, AVX2 code, the 3 x 4
        blocks, L3-resident experts of 8 tokens on average, 5 interleaved rounds, two runs) the
        gate/up GEMM took 0.95-0.97x and the down GEMM 0.84-0.94x the time of one step per loop
        step; at 32 tokens an expert the down GEMM 0.89-0.98x. Asking once per line was faster
        at 8 tokens (0.92x / 0.90x) but took 1.07x the time on the down GEMM of the
        Qwen3-30B-A3B block at T = 512 (32 tokens an expert, 7 rounds), and 1.04x / 1.2x on the
        streaming GEMVs at T = 1 (which keep single steps: ``group_gemm``).

    Returns
    -------
    tvm.script macro
        ``tile(A, W, arow, e, r0, r_next, acc0, acc1, red, prefetch_rows, k0)``: ``arow`` holds
        the ``rows`` row indices of ``A``; ``acc0``/``acc1`` have the ``dot_accumulators``
        shapes; ``red`` (at least ``rows x cols``) receives the sums; ``prefetch_rows`` (an int32
        bit mask, a TIR expression; ``PREFETCH_ALL`` for all, 0 for none) says which rows of the
        later group this call prefetches: bit ``r`` for ``w_row(r_next + r)`` (``row_masks``).
    """
    from tvm.script import tirx as T

    MR, VL, KO = rows, lanes, k_vectors
    NA, NB = (cols + 1) // 2, cols // 2
    row_sums = _row_sums(MR, NA, NB, VL)
    # ``per_line``: U vector steps per loop step (one cache line of a weight row), the prefetches
    # of the rows ahead asked for twice per line, as U single steps with ``prefetch_lines`` 2 did
    U = max(1, CACHE_LINE_BYTES // (VL * (2 if widen else 4))) if per_line else 1
    U = U if KO % U == 0 else 1
    # the lines that steps s .. s + U + prefetch_lines - 2 (what U single steps asked for) span
    LINES = (U + prefetch_lines - 2) // U + 1
    NPF, STRIDE = LINES * min(U, 2), U // min(U, 2)  # requests per loop step, steps apart

    def w_value(x):
        return T.Cast("float32", x) if widen else x

    def wanted(mask, r):
        return T.bitwise_and(T.shift_right(mask, r), 1) == 1 if row_masks else True

    @T.macro
    def tile(A, W, arow, e, r0, r_next, acc0, acc1, red, prefetch_rows, k0):
        for m in T.unroll(MR):
            for r in T.unroll(NA):
                for lane in T.vectorized(VL):
                    acc0[m, r, lane] = T.float32(0)
            for r in T.unroll(NB):
                for lane in T.vectorized(VL):
                    acc1[m, r, lane] = T.float32(0)
        for kl in range(KO // U):
            if prefetch > 0 and prefetch_rows != 0:
                for r in T.unroll(NA + NB):
                    if wanted(prefetch_rows, r):
                        for j in T.unroll(NPF):
                            T.evaluate(
                                T.call_llvm_intrin(
                                    "void",
                                    "llvm.prefetch.p0",
                                    T.address_of(
                                        W[e, w_row(r_next + r), (k0 + kl * U + j * STRIDE) * VL]
                                    ),
                                    0,
                                    4 - prefetch,  # LLVM's locality: 3 = L1 (T0), 2 = L2 (T1)
                                    1,
                                )
                            )
            for u in T.unroll(U):
                # weight row outer, token inner: the block's rows of A and one weight vector
                # are live at a time (the budget ``register_tiles`` counts)
                for r in T.unroll(NA):
                    for m in T.unroll(MR):
                        for lane in T.vectorized(VL):
                            acc0[m, r, lane] = acc0[m, r, lane] + A[
                                arow[m], (k0 + kl * U + u) * VL + lane
                            ] * w_value(W[e, w_row(r0 + r), (k0 + kl * U + u) * VL + lane])
                for r in T.unroll(NB):
                    for m in T.unroll(MR):
                        for lane in T.vectorized(VL):
                            acc1[m, r, lane] = acc1[m, r, lane] + A[
                                arow[m], (k0 + kl * U + u) * VL + lane
                            ] * w_value(W[e, w_row(r0 + NA + r), (k0 + kl * U + u) * VL + lane])
        row_sums(acc0, acc1, red)

    return tile


def _quad_sum(lanes: int, a, b, c, d):
    """The lane sums of four ``lanes``-wide vectors (``lanes`` a multiple of 4) as one 4-wide
    vector ``[sum(a), sum(b), sum(c), sum(d)]`` (a TIR expression): two rounds of pairwise adds
    within each group of 4 lanes (``[a0 + a1, a2 + a3, b0 + b1, b2 + b3]``, then the same of two
    of those: LLVM emits ``vhaddps`` on AVX2, shuffles and adds on AVX-512; NEON code not
    inspected), then the groups halved onto each other."""
    from tvm import tirx

    def shuffle(vectors, indices):
        return tirx.Shuffle(vectors, [tirx.const(i, "int32") for i in indices])

    def pair_add(x, y):
        even, odd = [], []
        for g in range(0, lanes, 4):
            even += [g, g + 2, lanes + g, lanes + g + 2]
            odd += [g + 1, g + 3, lanes + g + 1, lanes + g + 3]
        return shuffle([x, y], even) + shuffle([x, y], odd)

    h = pair_add(pair_add(a, b), pair_add(c, d))
    width = lanes
    while width > 4:
        width //= 2
        h = shuffle([h], range(width)) + shuffle([h], range(width, 2 * width))
    return h


def _row_sums(MR: int, NA: int, NB: int, lanes: int):
    """TIR macro ``sums(acc0, acc1, red)``: ``red[m, r]`` = the lane sum of ``dot_microkernel``'s
    accumulator ``(m, r)`` (``r < NA`` in ``acc0``, the others in ``acc1``). Where the lanes are
    a multiple of 4 and each row's accumulators make whole fours, four at a time through
    ``_quad_sum`` (one vector store of four sums); otherwise one by one (``_lane_sum``). On the
    AVX-512 EPYC VM (2026-12-06, L3-resident experts of 8 tokens on average, 7 interleaved
    rounds, GFLOP/s medians) the MoE gate/up GEMM ran at 1.03x (AVX2 code) / 1.02x (AVX-512
    code) the rate of summing the accumulators one by one, the down GEMM (K = 768) at 1.05x /
    1.04x: the sums of a 3 x 4 block took 72 instructions one by one, 15 four at a time."""
    from tvm.script import tirx as T

    lane_sum = _lane_sum(lanes)
    fours = lanes % 4 == 0

    def vec(acc, m, r):
        return acc[m, r, T.ramp(0, 1, lanes)]

    if fours and NA == 2 and NB == 2:  # a row of four split two and two

        @T.macro
        def one_quad(acc0, acc1, red):
            for m in T.unroll(MR):
                red[m, T.ramp(0, 1, 4)] = _quad_sum(
                    lanes, vec(acc0, m, 0), vec(acc0, m, 1), vec(acc1, m, 0), vec(acc1, m, 1)
                )

        return one_quad

    if fours and NA % 4 == 0 and NB % 4 == 0:

        @T.macro
        def by_quads(acc0, acc1, red):
            for m in T.unroll(MR):
                for q in T.unroll(NA // 4):
                    red[m, T.ramp(4 * q, 1, 4)] = _quad_sum(
                        lanes, *[vec(acc0, m, 4 * q + j) for j in range(4)]
                    )
                for q in T.unroll(NB // 4):
                    red[m, T.ramp(NA + 4 * q, 1, 4)] = _quad_sum(
                        lanes, *[vec(acc1, m, 4 * q + j) for j in range(4)]
                    )

        return by_quads

    @T.macro
    def single(acc0, acc1, red):
        for m in T.unroll(MR):
            for r in T.unroll(NA):
                lane_sum(acc0, m, r)
                red[m, r] = acc0[m, r, 0]
            for r in T.unroll(NB):
                lane_sum(acc1, m, r)
                red[m, NA + r] = acc1[m, r, 0]

    return single


def _lane_sum(lanes: int):
    """TIR macro ``sum(acc, m, r)``: ``acc[m, r, 0] = sum(acc[m, r, :lanes])`` by halving (add
    the upper half onto the lower, ``log2(lanes)`` times), which LLVM emits as a few extracts,
    shuffles and vector adds per accumulator. Adding the lanes one by one cost ~20 instructions
    per accumulator: on the MoE down projection (K = 768, 48 vector steps per block) the
    horizontal sums of a 6 x 4 block were about a third of its instructions."""
    from tvm.script import tirx as T

    if lanes == 1:

        @T.macro
        def done(acc, m, r):
            T.evaluate(0)

        return done
    if lanes % 2:

        @T.macro
        def serial(acc, m, r):
            for lane in T.serial(1, lanes):
                acc[m, r, 0] = acc[m, r, 0] + acc[m, r, lane]

        return serial
    half = lanes // 2
    rest = _lane_sum(half)

    @T.macro
    def fold(acc, m, r):
        for lane in T.vectorized(half):
            acc[m, r, lane] = acc[m, r, lane] + acc[m, r, lane + half]
        rest(acc, m, r)

    return fold


def lanes_microkernel(
    *, vectors: int, cols: int, lanes: int, k_len: int, w_row, widen: bool = False
):
    """The register-blocked micro-kernel of a weight read in place with the tokens in SIMD lanes
    (TIR macro): the outer-product order of ``schedule_microkernel`` with the roles turned round,
    so the weight ``W[e, rows, K]`` (``K`` contiguous) needs no packing. For ``t < vectors *
    lanes`` and ``r < cols``::

        red[t, r] = sum_k AT[a0 + k, t] * W[e, w_row(r0 + r), k]

    ``AT[a0 + k, t]`` is the transposed token panel (the caller gathers it; ``a0``: its first
    row, where one buffer holds the panels of several passes). Each step loads
    ``vectors`` vectors of ``AT`` and broadcasts ``cols`` weights (a memory operand of the FMA),
    ``vectors * cols`` accumulators: no horizontal sums, and the weight rows stream from memory
    once per panel of ``vectors * lanes`` tokens. On the Intel AVX-512 host (2026-12-03) a
    2 x 12 block ran 211 GFLOP/s on one core over 6 MB of weights against the ``dot_microkernel``
    6 x 4 block's 114-150. Software prefetch of the next rows (``prefetcht1`` once per cache
    line) made the MoE gate/up GEMM slower (127 against 117 ms at T = 512), so there is none.

    Parameters
    ----------
    vectors : int
        1, 2 or 3: token vectors in the block.
    cols : int
        Weight rows in the block.
    lanes : int
        SIMD float32 lanes.
    k_len : int
        The reduction length.
    w_row : callable
        Tile row (a TIR expression) -> row index of ``W``.
    widen : bool
        ``W`` is float16/bfloat16, widened to float32 as it is broadcast.

    Returns
    -------
    tvm.script macro
        ``tile(AT, W, e, r0, acc0, acc1, acc2, red, a0)``; ``acc0`` .. ``acc2`` are ``(cols,
        lanes)`` float32 buffers (one per token vector; the others unused), ``red`` at least
        ``(vectors * lanes, cols)``.
    """
    from tvm.script import tirx as T

    if vectors not in (1, 2, 3):
        raise ValueError(f"lanes_microkernel: vectors must be 1, 2 or 3, got {vectors}")
    VL, NRL, TWO, THREE = lanes, cols, vectors >= 2, vectors == 3

    def w_value(x):
        return T.Cast("float32", x) if widen else x

    @T.macro
    def tile(AT, W, e, r0, acc0, acc1, acc2, red, a0):
        for r in T.unroll(NRL):
            for lane in T.vectorized(VL):
                acc0[r, lane] = T.float32(0)
            if TWO:
                for lane in T.vectorized(VL):
                    acc1[r, lane] = T.float32(0)
            if THREE:
                for lane in T.vectorized(VL):
                    acc2[r, lane] = T.float32(0)
        for k in range(k_len):
            for r in T.unroll(NRL):
                for lane in T.vectorized(VL):
                    acc0[r, lane] = acc0[r, lane] + AT[a0 + k, lane] * w_value(
                        W[e, w_row(r0 + r), k]
                    )
                if TWO:
                    for lane in T.vectorized(VL):
                        acc1[r, lane] = acc1[r, lane] + AT[a0 + k, VL + lane] * w_value(
                            W[e, w_row(r0 + r), k]
                        )
                if THREE:
                    for lane in T.vectorized(VL):
                        acc2[r, lane] = acc2[r, lane] + AT[a0 + k, 2 * VL + lane] * w_value(
                            W[e, w_row(r0 + r), k]
                        )
        for r in T.unroll(NRL):
            for lane in T.unroll(VL):
                red[lane, r] = acc0[r, lane]
            if TWO:
                for lane in T.unroll(VL):
                    red[VL + lane, r] = acc1[r, lane]
            if THREE:
                for lane in T.unroll(VL):
                    red[2 * VL + lane, r] = acc2[r, lane]

    return tile


def canonicalize_stage(sch, block) -> None:
    """Make a copy block iterate over its output buffer's indices, in order (one loop per dim)."""
    from tvm import tirx

    stmt = sch.get(block)
    iters = [iv.var for iv in stmt.iter_vars]
    indices = list(stmt.body.indices)
    if len(sch.get_loops(block)) == len(indices) and all(
        isinstance(x, tirx.Var) and x.same_as(v) for x, v in zip(indices, iters)
    ):
        return
    sch.transform_block_layout(block, tirx.IndexMap(iters, indices, None))


def _schedule_b_pack(sch, b_stage, at_loop, nr: int, lanes: int, preproc: bool) -> None:
    # B[S, JO, J, K] → panels Bp[S, JO, J / nr, K, nr]: up front, or per task (its columns).
    canonicalize_stage(sch, b_stage)
    sch.transform_layout(b_stage, ("write", 0), lambda s, jo, j, k: (s, jo, j // nr, k, j % nr))
    if at_loop is not None:
        sch.compute_at(b_stage, at_loop, preserve_unit_loops=True)
    s, jo, j, k = sch.get_loops(b_stage)[-4:]
    j_panel, ji = sch.split(j, [None, nr])
    sch.reorder(j_panel, k, ji)
    if at_loop is None:
        sch.parallel(sch.fuse(s, jo, j_panel))
    _, jl = sch.split(ji, [None, lanes])
    sch.vectorize(jl)
    if preproc:
        sch.annotate(b_stage, PACKING_MARK, True)


def _schedule_a_pack(sch, a_stage, at_loop, mr: int, preproc: bool) -> None:
    # A[S, IO, I, K] → panels Ap[S, IO, I / mr, K, mr]: per task (its own rows), or up front.
    canonicalize_stage(sch, a_stage)
    sch.transform_layout(a_stage, ("write", 0), lambda s, io, i, k: (s, io, i // mr, k, i % mr))
    if at_loop is not None:
        sch.compute_at(a_stage, at_loop, preserve_unit_loops=True)
    s, io, i, k = sch.get_loops(a_stage)[-4:]
    i_panel, i_row = sch.split(i, [None, mr])
    sch.reorder(i_panel, k, i_row)
    sch.unroll(i_row)
    if at_loop is None:
        sch.parallel(sch.fuse(s, io, i_panel))
    if preproc:
        sch.annotate(a_stage, PACKING_MARK, True)


def _rows_outside(shape: GemmShape, tile: GemmTile, nr: int, single_j_task: bool) -> bool:
    """Whether a task sweeps its column tiles inside each row tile (``rows_inside=False``).

    When all of a task's ``B`` columns (``K`` by the task's columns) fit in
    ``ROWS_OUTSIDE_B_BYTES`` they stay in L2 (L1 when small), each row tile's ``A`` panel stays
    in L1 while it sweeps them, and each row tile writes one contiguous run per output row
    instead of ``nr`` elements at a time (NCHW output planes). Measured on a 2-core AVX2 EPYC at
    batch 8, one process, orders interleaved: 1x1 convolution 16->72 channels over 56x56 1.52 ->
    0.92 ms, 144->24 3.2 -> 3.0 ms; 3x3 64->64 over 56x56 15.1 -> 13.3 ms, 128->128 over 28x28
    15.1 -> 14.1 ms; the 3->16 stride-2 stem 2.0 -> 1.7 ms. A larger block (a dense layer's
    column tile over a long reduction, where blocks cannot be capped below it) keeps the BLIS
    order, one ``B`` panel reused by every row tile."""
    if shape.k is None or shape.n is None:
        return False
    cols = _ceil_div(shape.n, nr) * nr if single_j_task else nr * tile.nc_tiles
    return cols > nr and _b_bytes(shape, cols) <= ROWS_OUTSIDE_B_BYTES


def _reads_b_in_place(sch, b_stage, shape: GemmShape, mr: int, nr: int) -> bool:
    """Whether the micro-kernel can load ``B`` straight from its source instead of packed panels.

    ``b_stage`` must be a plain copy (no zero padding of ``J`` or ``K``: ``J`` a static multiple
    of the tile, so no lane is ever masked) whose source offset, flattened, moves by exactly one
    element per column: each ``nr``-wide row of ``B`` is then a contiguous run of the source (a
    1x1 convolution's input planes, ``x[n, k, j]`` with ``j`` the fused image positions). The
    packing copy would only reorder it. ``K`` is capped so that a column tile (``K`` rows of
    ``nr`` elements, reused by every row tile) stays within ``IN_PLACE_B_BYTES``, and the rows
    (output channels) at ``IN_PLACE_B_ROW_TILES`` tiles: the fewer rows share a packed panel, the
    more the copy costs per multiply-add. Measured on a 2-core AVX2 EPYC, 1x1 convolutions with
    ReLU, packed -> in place: 144->24 channels over 56x56 0.38 -> 0.32 ms at batch 1 and 3.5 ->
    2.8 ms at batch 8, 240->40 over 28x28 0.25 -> 0.21 ms; expanding ones (16->72, 24->88: 12-15
    row tiles) were 6-11 % slower in place, so they stay packed."""
    import tvm
    from tvm import tirx
    from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds

    from qiao.compiler.schedules.tir_util import flat_indices

    stmt = sch.get(b_stage)
    if shape.m is None or shape.n is None or shape.k is None or _is_padding(stmt):
        return False
    if _ceil_div(shape.m, mr) > IN_PLACE_B_ROW_TILES:
        return False
    if _b_bytes(shape, nr) > IN_PLACE_B_BYTES:
        return False
    store = stmt.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, TensorLoad):
        return False
    # The stage is (s, jo, j, k) after normalisation: its third iterator walks B's columns.
    if len(stmt.iter_vars) != 4:
        return False
    j = stmt.iter_vars[2].var
    load = flat_indices(stmt).body.value
    if not isinstance(load, TensorLoad) or len(load.indices) != 1:
        return False
    coeffs = tvm.sym.detect_linear_equation(load.indices[0], [j])
    return len(coeffs) == 2 and static_int(coeffs[0]) == 1


def _is_weight(sch, stage) -> bool:
    """Whether a packing block only reads a static-shaped function parameter (maybe a weight:
    the pipeline can then pack it once at load time instead of at every call) that no other
    block reads: TVM's ``SplitLayoutRewritePreproc`` replaces the parameter by its packed form,
    so another reader (a residual ``x + conv(x)`` of a static input) would read an undefined
    buffer ("Buffer x is used before its definition"; found by ``qiao.compiler.fuzzing``)."""
    import tvm_ffi
    from tvm import s_tir

    stmt = sch.get(stage)
    if len(stmt.reads) != 1 or not _is_param(sch, stmt.reads[0].source):
        return False
    source = stmt.reads[0].source
    others = []

    def on_block(block):
        if block.name_hint != stmt.name_hint:
            others.extend(r for r in block.reads if r.source.same_as(source))

    tvm_ffi.structural_walk(sch.mod["main"].body, [(s_tir.SBlock, on_block)])
    return not others


def _is_param(sch, buffer) -> bool:
    """Whether ``buffer`` is a static-shaped parameter of the function (maybe a weight) that no
    call binds to a model input or a value computed from one (``ACTIVATION_PARAMS``: a
    static-shaped model's activations are static-shaped parameters too; taken for weights, a 1x1
    convolution's input was packed whole up front instead of read in place: EfficientNet-B0
    exported with a static batch took 7.1 against 6.5 ms)."""
    from tvm import tirx

    func = sch.mod["main"]
    index = next((i for i, p in enumerate(func.params) if buffer.same_as(p)), None)
    if index is None:
        return False
    inputs = (func.attrs or {}).get(ACTIVATION_PARAMS, [])
    if any(int(i) == index for i in inputs):
        return False
    return all(isinstance(d, tirx.IntImm) for d in buffer.ty.shape)


def packed_first(sch):
    """A schedule of ``sch``'s function whose weight-packing stages lead (``packing_first``), so
    the pipeline lifts them to load time; the mark is dropped from any that still does not lead
    (``SplitLayoutRewritePreproc`` requires them before any other computation)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import get_root_block

    func = packing_first(sch.mod["main"])
    if func is not sch.mod["main"]:
        sch = s_tir.Schedule(func)
    seen_other = False
    for child in sch.get_child_blocks(get_root_block(sch)):
        marked = PACKING_MARK in (sch.get(child).annotations or {})
        if marked and seen_other:
            sch.unannotate(child, PACKING_MARK)
        seen_other = seen_other or not marked
    return sch


def schedule_gemm(
    sch,
    block,
    target: Any,
    tile: GemmTile | None = None,
    panel_vectors: int | None = None,
    few_rows: bool = False,
) -> tuple[GemmTile, GemmShape]:
    """Schedule the GEMM-like ``block`` of ``sch`` for a CPU target (see the module docstring).

    Parameters
    ----------
    sch : tvm.s_tir.Schedule
        Schedule of the function holding ``block``; producers and consumers of ``block`` are
        elementwise (they are inlined into the packing stages and the write-back).
    block : SBlockRV
        A reduction block found by ``find_gemm_block``.
    target : tvm.target.Target
        LLVM target; SIMD width and core count are read from it.
    tile : GemmTile, optional
        Tile sizes; default ``choose_tile``.
    panel_vectors : int, optional
        Width of the packed ``B`` panels in SIMD vectors (default ``tile.nr_vectors``); a divisor
        of ``tile.nr_vectors``, so a micro-tile spans several panels (the few-rows variant's wider
        tile reading the many-rows variant's packing).
    few_rows : bool
        Scheduling a variant for a few rows: each task packs the rows of ``A`` it reads itself,
        all of them if need be (cheaper than one more parallel region).

    Returns
    -------
    tuple
        ``(tile, shape)``: the tile used and the extents of the normalised GEMM.
    """
    cpu = cpu_info(target)
    ra, rb, a_index = normalize_gemm(sch, block, gemm_lanes(cpu, sch, block), cpu)
    shape = gemm_shape(sch, block)
    tile = tile or choose_tile(cpu, shape)
    lanes = cpu.lanes(shape.dtype)
    check_tile(tile, shape, lanes)
    nr = tile.nr(lanes)
    panel = (panel_vectors or tile.nr_vectors) * lanes
    if nr % panel or (panel != nr and (shape.n is None or _ceil_div(shape.n, panel) * panel % nr)):
        raise ValueError(f"a {nr}-column tile cannot span {panel}-column panels of {shape}")
    k_pad = tile.k_unroll if shape.k is None or shape.k % tile.k_unroll else 1
    a_stage, b_stage = _pad_and_find_stages(sch, block, ra, rb, a_index, tile.mr, panel, k_pad)
    # A convolution read in place (``direct_rows``) needs rows and reduction that divide into
    # whole tiles (a tuned tile may not): no padded row or step, no bounds test in the kernel.
    direct = bool(shape.taps) and shape.m % tile.mr == 0 and shape.k % tile.k_unroll == 0
    padding = inline_producers(sch, a_stage, keep_padding=direct)
    padding += inline_producers(sch, b_stage, keep_padding=True)

    s, io, jo, i, j, k = sch.get_loops(block)
    single_i_task = tile.mc_tiles == 0 or (
        shape.m is not None and _ceil_div(shape.m, tile.mr) == tile.mc_tiles
    )
    i_task, i_tile = sch.split(i, [1, None] if single_i_task else [None, tile.mr * tile.mc_tiles])
    single_j_task = tile.nc_tiles == 0 or _ceil_div(shape.n, panel) * panel == nr * tile.nc_tiles
    j_task, j_tile = sch.split(j, [1, None] if single_j_task else [None, nr * tile.nc_tiles])
    sch.reorder(s, io, jo, i_task, j_task, j_tile, i_tile, k)
    task = sch.fuse(s, io, jo, i_task, j_task)
    sch.parallel(task)
    # Inside a task: for each nr-wide B panel, sweep the task's rows of packed A.
    write_back, _ = schedule_microkernel(
        sch,
        block,
        i_tile,
        j_tile,
        k,
        mr=tile.mr,
        nr_vectors=tile.nr_vectors,
        lanes=lanes,
        k_unroll=tile.k_unroll,
        rows_inside=not _rows_outside(shape, tile, nr, single_j_task),
    )
    # Weights are packed once, up front (and lifted to load time by the pipeline); activations
    # per task when the task's slice is all that is needed (A: its rows; B: its columns, when one
    # task holds every row), else once up front (A when every task holds every row: each task
    # would pack them all again; except for a few rows, which cost less than another parallel
    # region).
    a_weight, b_weight = _is_weight(sch, a_stage), _is_weight(sch, b_stage)
    a_up_front = a_weight or (tile.mc_tiles == 0 and not few_rows)
    if direct:
        # The micro-kernel broadcasts the (padded) input where it is: no im2col panel.
        sch.compute_inline(a_stage)
    else:
        _schedule_a_pack(sch, a_stage, None if a_up_front else task, tile.mr, preproc=a_weight)
    unpadded_activation = not b_weight and not padding and panel == nr
    b_at = None
    if unpadded_activation and _reads_b_in_place(sch, b_stage, shape, tile.mr, nr):
        # B's columns are already contiguous rows of the source (a 1x1 convolution's input
        # planes): the micro-kernel loads them where they are, no panel copy.
        sch.compute_inline(b_stage)
    else:
        # A windowed convolution whose output channels split into row blocks
        # (``_balancing_split``) packs each task's im2col columns once per block rather than the
        # whole image up front (with its padded input: two more parallel passes). A 3-channel
        # 3x3 stride-2 stem over 299x299 at batch 8 (2-core AVX-512 EPYC VM, 2026-12-07): 16.2
        # -> 7.2 ms. Pointwise ones keep the up-front panel: packing it again per block took
        # MobileNetV3-Small and EfficientNet-B0 1.09-1.15x the time.
        windowed = shape.weight_rows and not shape.pointwise
        b_at = task if not b_weight and (single_i_task or windowed) else None
        _schedule_b_pack(sch, b_stage, b_at, panel, lanes, preproc=b_weight)
    for pad in padding:
        # The padded input rows a task's packing reads, made by that task (after the weight
        # packing, which must stay the first statement to be lifted).
        if b_at is None or not _try(sch.compute_at, pad, task, True):
            _parallel_rows(sch, pad)
            continue
        inner = sch.get_loops(pad)[-1]
        _, vec = sch.split(inner, [None, lanes])
        sch.vectorize(vec)
    leftover = inline_epilogue(sch, write_back)
    for consumer in leftover:
        _schedule_leftover(sch, consumer, lanes)
    return tile, shape


def _parallel_rows(sch, block) -> None:
    """Run a padding copy made up front in parallel over all but its two innermost loops (the
    batch alone would leave one core busy at batch 1)."""
    loops = sch.get_loops(block)
    if len(loops) > 2:
        sch.parallel(sch.fuse(*loops[:-2]))
    elif loops:
        sch.parallel(loops[0])


def _schedule_leftover(sch, block, lanes: int) -> None:
    """An epilogue block the write-back could not absorb (a broadcast multiply): parallel over
    all its loops but the innermost when they fuse (over the batch alone, batch 1 would keep one
    core busy), the outermost otherwise; the innermost vectorised. Rows narrower than a few
    vectors that whole vectors do not divide (a 14x14 or 7x7 map's) first fuse with the loop
    above them into one contiguous run: vectors of 16 over 14-wide rows were all tail, scalar."""
    loops = sch.get_loops(block)
    if not loops:
        return
    if len(loops) > 2:
        inner, above = (static_int(sch.get(lp).extent) for lp in loops[-1:-3:-1])
        if None not in (inner, above) and inner % lanes and inner < 4 * lanes:
            sch.fuse(loops[-2], loops[-1])
            loops = sch.get_loops(block)
    if len(loops) > 1:
        with contextlib.suppress(Exception):
            _, vec = sch.split(loops[-1], [None, lanes])
            sch.vectorize(vec)
        loops = sch.get_loops(block)
    outer = loops[:-2] if len(loops) > 2 else loops[:1]
    try:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    except Exception:  # noqa: BLE001 - a reduction loop among them: the outermost alone
        with contextlib.suppress(Exception):
            sch.parallel(loops[0])


def candidate_tiles(cpu: CPUInfo, shape: GemmShape) -> list[GemmTile]:
    """Tiles worth measuring for ``shape``, the default first, then by distance from it.

    Varies the register block (every ``register_tiles`` shape, and 4/6/8-row variants), the
    unroll, and — where the extents are static — the task grid (a symbolic row count against
    static columns: row tasks or column tasks); only tiles ``check_tile`` accepts.
    """
    base = choose_tile(cpu, shape)
    lanes = cpu.lanes(shape.dtype)
    blocks = set()
    for mr, nv in register_tiles(cpu):
        for rows in {mr, 8, 6, 4}:
            if rows <= mr and (shape.m is None or rows <= shape.m):
                blocks.add((rows, nv))
    blocks.add((base.mr, base.nr_vectors))
    found = []
    for mr, nv in sorted(blocks):
        nr = nv * lanes
        m_tiles = None if shape.m is None else _ceil_div(shape.m, mr)
        n_tiles = None if shape.n is None else _ceil_div(shape.n, nr)
        mcs = [1] if m_tiles is None else [d for d in (1, 2, 4, 8) if m_tiles % d == 0]
        if m_tiles is None and n_tiles is not None:
            mcs = [0, 1]  # every row in every task (column tasks), or row tasks
        ncs = [0] if n_tiles is None else [0] + [d for d in (1, 2, 4, 8) if n_tiles % d == 0]
        for mc in mcs:
            for nc in ncs:
                for ku in (1, 2, 4, 8):
                    tile = GemmTile(mr, nv, mc, nc, ku)
                    try:
                        check_tile(tile, shape, lanes)
                    except ValueError:
                        continue
                    found.append(tile)

    def distance(t: GemmTile) -> tuple:
        return (
            t != base,
            abs(t.mr * t.nr_vectors - base.mr * base.nr_vectors),
            t.nr_vectors != base.nr_vectors,
            t.k_unroll != base.k_unroll,
            t.mc_tiles != base.mc_tiles,
            t.nc_tiles != base.nc_tiles,
            t.mr,
            t.nr_vectors,
            t.k_unroll,
            t.mc_tiles,
            t.nc_tiles,
        )

    unique = sorted(set(found) | {base}, key=distance)
    return unique


class CPUMatmul(CPURule):
    """Schedule rule: GEMM-like PrimFuncs (see the module docstring) on LLVM CPU targets.

    Follows TVM's dlight ``ScheduleRule`` protocol (``apply(func, target, tunable)`` returns a
    schedule or ``None``). ``tile`` overrides ``choose_tile`` (tuning uses it); ``GemmTile``
    records of the tuning database reach it through ``ApplyScheduleRules``.
    """

    def __init__(self, tile: GemmTile | None = None):
        self.tile = tile

    def apply(self, func, target, tunable: bool):
        from tvm import s_tir

        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        block = find_gemm_block(sch)
        if block is not None:
            return self._schedule(func, sch, block, target)
        grouped = split_group_axis(func)
        if grouped is None:
            return None
        sch = s_tir.Schedule(grouped)
        block = find_gemm_block(sch)
        if block is None:
            return None
        scheduled = self._schedule(grouped, sch, block, target)
        return s_tir.Schedule(bound_group_channels(scheduled.mod["main"]))

    def _schedule(self, func, sch, block, target):
        from tvm import s_tir

        # A strided convolution's padded input is stored as stride phase planes, so the im2col
        # packing reads consecutive output positions as whole vectors (the window rules' layout).
        # Over symbolic image dims that layout may not schedule (SegFormer's stride-2 patch
        # embeddings: TVM finds the padded planes no stage pipeline); the plain layout then does.
        pad = next((p for p in sch.get_producers(block) if _is_padding(sch.get(p))), None)
        if pad is not None:
            try:
                strided = deinterleaved(sch, block, pad)
            except (s_tir.ScheduleError, RuntimeError):
                strided = None
            if strided is not None:
                trial = s_tir.Schedule(strided)
                try:
                    tile, shape = schedule_gemm(trial, find_gemm_block(trial), target, self.tile)
                    return with_few_rows_variant(strided, packed_first(trial), tile, shape, target)
                except (s_tir.ScheduleError, RuntimeError) as err:
                    log.debug("strided convolution: plain layout (%s)", str(err).splitlines()[0])
            sch = s_tir.Schedule(func)  # deinterleaved() transformed the layout in place
            block = find_gemm_block(sch)
        tile, shape = schedule_gemm(sch, block, target, self.tile)
        return with_few_rows_variant(func, packed_first(sch), tile, shape, target)


# -- few rows -------------------------------------------------------------------------------------
#
# A symbolic row count is padded to whole ``mr``-row register tiles: one token through a dense layer
# (decode, batch-1 inference) computes ``mr`` rows for one. Kernels with symbolic rows therefore
# carry a second schedule, one row per micro-tile and no padding, taken at run time for the fewest
# rows (``few_rows_max``). Both read the same packed weights: the weight-packing stage is shared.


def merge_row_variants(func_many, func_few, use_few):
    """One PrimFunc running ``func_few``'s schedule when ``use_few`` holds, else ``func_many``'s.

    Both must be schedules of the same function whose leading weight-packing stages write buffers
    of the same shapes; the few-rows body is rewired to the many-rows packed buffers, so packing
    happens (and is lifted to load time) once."""
    import tvm_ffi
    from tvm import tirx

    root_a, lead_a, rest_a = root_statements(func_many)
    root_b, lead_b, rest_b = root_statements(func_few)
    packed_a, packed_b = written_buffers(lead_a), written_buffers(lead_b)
    if len(packed_a) != len(packed_b) or not all(
        tvm_ffi.structural_equal(a.ty, b.ty) for a, b in zip(packed_a, packed_b)
    ):
        return None
    pairs = list(zip(packed_b, packed_a))
    few = replace_vars(seq(rest_b), pairs)
    body = seq([*lead_a, tirx.IfThenElse(use_few, few, seq(rest_a))])
    allocs = list(root_a.alloc_buffers) + [
        b for b in root_b.alloc_buffers if not any(b.same_as(old) for old, _ in pairs)
    ]
    return with_root_body(func_many, body, allocs)


def few_rows_max(tile: GemmTile, cpu: CPUInfo) -> int:
    """Most rows the few-rows variant of ``tile`` runs: a one-row micro-tile streams its ``B``
    panels from L2 and runs at about half the FMA rate of the full ``mr``-row tile, which computes
    its padding too; the one-row tile wins below about a third of ``mr`` (measured on AVX2, 1024 x
    1024 and 1024 x 3072: 1-2 rows faster, 3 rows slower than six padded rows). With 32 vector
    registers (``cpu``; AVX-512) and a ``MID_ROWS``-row tile to take the rest, one row: there two
    rows ran 0.78-0.96x the time on the 4-row tile (one sweep of ``B``, two rows padded) as on two
    one-row sweeps (AMD Zen 5 VM, 2026-12-07, 1024 x 1024 / 2048 / 4096 and 2048 x 2048, 9
    interleaved rounds; AVX2 code on the same host 1.27-1.37x: it keeps two)."""
    if cpu.vector_registers >= 32 and tile.mr > MID_ROWS:
        return 1
    return max(1, tile.mr // 3)


def few_rows_tile(cpu: CPUInfo, tile: GemmTile, shape: GemmShape) -> GemmTile:
    """The tile of the few-rows variant of ``tile`` (the many-rows schedule of ``shape``).

    One row per micro-tile, and every row in every task (tasks split the columns), so a task
    reads its ``B`` panels from memory once and sweeps them for each row from cache. One row
    leaves the register file mostly free: the micro-tile spans as many of the many-rows packed
    panels as fit (``FEW_ROWS_VECTORS`` SIMD vectors at most: more independent accumulators hide
    the FMA latency), as long as the padded columns split into whole micro-tiles.
    """
    lanes = cpu.lanes(shape.dtype)
    nv = tile.nr_vectors
    if shape.n is not None:
        padded = _ceil_div(shape.n, nv * lanes) * nv * lanes
        for wide in range(FEW_ROWS_VECTORS, nv, -1):
            if wide % nv == 0 and padded % (wide * lanes) == 0 and wide + 2 <= cpu.vector_registers:
                nv = wide
                break
    nc_tiles = 0
    if shape.n is not None:
        n_tiles = _ceil_div(shape.n, nv * lanes)
        wanted = 4 * cpu.num_cores
        nc_tiles = min(_divisors_up_to(n_tiles, n_tiles), key=lambda d: (n_tiles // d < wanted, -d))
        nc_tiles = 0 if nc_tiles == n_tiles else nc_tiles
    return GemmTile(1, nv, 0, nc_tiles, tile.k_unroll)


def row_tasks_tile(tile: GemmTile, shape: GemmShape, lanes: int) -> GemmTile | None:
    """The tile of the many-rows variant (see ``ROW_TASKS_A_BYTES``) of ``tile``, a column-tasks
    tile for symbolic rows against a static weight: one row tile per task, every column in it;
    ``None`` when ``tile`` is not such a tile or the packed weight outgrows
    ``ROW_TASKS_B_BYTES``."""
    if shape.m is not None or None in (shape.n, shape.k) or tile.mc_tiles != 0 or not tile.nc_tiles:
        return None
    k_padded = _ceil_div(shape.k, tile.k_unroll) * tile.k_unroll
    n_padded = _ceil_div(shape.n, tile.nr(lanes)) * tile.nr(lanes)
    if _b_bytes(replace(shape, k=k_padded), n_padded) > ROW_TASKS_B_BYTES:
        return None
    return replace(tile, mc_tiles=1, nc_tiles=0)


def with_few_rows_variant(func, sch, tile: GemmTile, shape: GemmShape, target: Any):
    """``sch`` (``func``'s GEMM scheduled with ``tile``; ``shape`` from ``schedule_gemm``), plus a
    one-row-per-tile schedule (``few_rows_tile``) for when the symbolic row count is at most
    ``few_rows_max(tile, cpu)`` (see the section comment), and for column tasks a row-tasks schedule
    (``row_tasks_tile``) for when the rows of ``A`` outgrow ``ROW_TASKS_A_BYTES``; ``sch`` itself
    when the rows are static, the tile is one row already, or the variants cannot share their
    packing."""
    from tvm import s_tir, tirx

    if shape.m is not None or tile.mr == 1:
        return sch

    def scheduled(variant: GemmTile):
        other = s_tir.Schedule(func)
        schedule_gemm(other, find_gemm_block(other), target, variant, tile.nr_vectors, True)
        return packed_first(other).mod["main"]

    rows = shape.rows

    def const(value: int):
        return tirx.const(value, rows.ty.dtype)

    cpu = cpu_info(target)
    low = scheduled(few_rows_tile(cpu, tile, shape))
    use_low = rows < const(few_rows_max(tile, cpu) + 1)
    if tile.mr > MID_ROWS:
        # Rows that a MID_ROWS-row tile pads an eighth less than the full one (3-4, 7-8 of 6):
        # that tile, a little less efficient per row than the full one.
        mid = merge_row_variants(scheduled(replace(tile, mr=MID_ROWS)), low, use_low)
        if mid is not None:
            padded_mid = (rows + const(MID_ROWS - 1)) // const(MID_ROWS) * const(MID_ROWS)
            padded = (rows + const(tile.mr - 1)) // const(tile.mr) * const(tile.mr)
            low, use_low = mid, tirx.Or(use_low, padded_mid * const(8) < padded * const(7))
    merged = merge_row_variants(sch.mod["main"], low, use_low)
    if merged is None:
        return sch
    many = row_tasks_tile(tile, shape, cpu.lanes(shape.dtype))
    if many is not None:
        a_bytes = rows * const(_b_bytes(shape, 1))  # one row of A: K elements
        with_rows = merge_row_variants(merged, scheduled(many), a_bytes > const(ROW_TASKS_A_BYTES))
        merged = merged if with_rows is None else with_rows
    return s_tir.Schedule(merged)
