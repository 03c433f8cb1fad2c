"""The MoE op (``com.microsoft::MoE``) through qiao's four-stage lowering on the CPU, against ONNX
Runtime, an independent NumPy reference and PyTorch eager: token counts from 1 up on one symbolic-T
artifact, experts with no tokens, one expert with every token, k = 1, k = E, duplicate router
scores, the activation/layout/bias variants ONNX allows, and the stage kernels alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qiao.compiler.testing import assert_close

RTOL, ATOL = 1e-4, 1e-5


# ------------------------------------------------------------------------------------------------
# The op's reference and builders (qiao.compiler.moe_op), in the call forms these tests use
# ------------------------------------------------------------------------------------------------
def _spec(k=1, normalize=1, activation="swiglu", fusion=1, **attrs):
    from qiao.compiler.moe_op import MoESpec

    return MoESpec(
        k=k,
        normalize_routing_weights=int(normalize),
        activation_type=activation,
        swiglu_fusion=fusion if activation == "swiglu" else 0,
        **attrs,
    )


def numpy_moe(
    x,
    logits,
    fc1,
    fc2,
    k,
    normalize=True,
    activation="swiglu",
    layout="interleaved",
    b1=None,
    b2=None,
    alpha=1.0,
    beta=0.0,
    limit=None,
):
    """``qiao.compiler.moe_op.reference`` (NumPy, float64; ties in the probabilities go to the
    higher expert index, as ONNX Runtime's CPU kernel)."""
    from qiao.compiler.moe_op import reference

    spec = _spec(
        k,
        normalize,
        activation,
        {"interleaved": 1, "concat": 2}[layout],
        activation_alpha=alpha,
        activation_beta=beta,
        swiglu_limit=limit,
    )
    return reference(spec, x, logits, dict(fc1=fc1, fc2=fc2, b1=b1, b2=b2))


def make_weights(E, H, INTER, activation="swiglu", bias=False, seed=0):
    """Seeded weights (``moe_op.random_weights``); SwiGLU's fc1 holds gate and up rows."""
    from qiao.compiler.moe_op import random_weights

    return random_weights(_spec(activation=activation), E, H, INTER, seed=seed, bias=bias)


def moe_model(weights, k, normalize=1, activation="swiglu", fusion=1, rank=2, **attrs):
    """One MoE node (``moe_op.make_model``); weights are initializers; the token dimension is
    symbolic. ``attrs`` are further node attributes (ONNX names)."""
    from qiao.compiler.moe_op import make_model

    return make_model(_spec(k, normalize, activation, fusion, **attrs), weights, rank=rank)


def ort_run(model, x, logits):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "logits": logits})[0]


@pytest.fixture(scope="module")
def compile_moe(tmp_path_factory):
    """``compile_moe(key, model)`` → an Artifact, compiled once per key for the CPU."""
    from qiao.compiler import compile

    cache = {}

    def get(key, model):
        if key not in cache:
            path = tmp_path_factory.mktemp("moe") / f"{key}.onnx"
            onnx.save(model, str(path))
            cache[key] = compile(str(path), "cpu", tmp_path_factory.mktemp("art") / key)
        return cache[key]

    return get


def inputs(T, H, E, seed, rank=2):
    rng = np.random.default_rng(seed)
    shape = (1, T) if rank == 3 else (T,)  # router logits are (tokens, E) in both forms
    return (
        rng.standard_normal((*shape, H)).astype(np.float32),
        (2 * rng.standard_normal((T, E))).astype(np.float32),
    )


E, H, INTER = 8, 64, 32
BASE = make_weights(E, H, INTER)


@pytest.fixture(scope="module")
def base_k2(compile_moe):
    return compile_moe("base_k2", moe_model(BASE, k=2))


def run_against_references(art, x, logits, weights=BASE):
    """Run ``art`` (the k = 2 MoE of ``weights``, ``BASE`` unless given) and check it against
    ONNX Runtime and NumPy; returns its output. A run on other inputs comes first, so that an
    output the kernels leave unwritten holds that run's values, not right ones (a skipped token
    passed a single run on host code, 2026-12-06)."""
    rng = np.random.default_rng(99)
    other = {"x": rng.standard_normal(x.shape).astype(x.dtype)}
    other["logits"] = rng.standard_normal(logits.shape).astype(logits.dtype)
    art.run(other)
    y = art.run({"x": x, "logits": logits})["y"]
    assert_close(y, ort_run(moe_model(weights, 2), x, logits), RTOL, ATOL, "vs onnxruntime")
    assert_close(y, numpy_moe(x, logits, weights["fc1"], weights["fc2"], 2), RTOL, ATOL, "vs numpy")
    return y


def routed_counts(logits, k=2):
    """Tokens each expert receives under top-``k`` routing of ``logits``."""
    return np.bincount(np.argsort(-logits, axis=1)[:, :k].ravel(), minlength=logits.shape[1])


# ------------------------------------------------------------------------------------------------
# The ONNX contract itself (what ORT computes), checked independently of qiao
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, normalize", [(1, 1), (2, 1), (2, 0), (8, 1)])
def test_onnxruntime_moe_contract(k, normalize):
    """ORT's com.microsoft::MoE takes router logits (softmax over all experts, then top-k),
    normalize_routing_weights renormalises, swiglu_fusion=1 means interleaved gate/up rows."""
    x, logits = inputs(5, H, E, seed=1)
    got = ort_run(moe_model(BASE, k, normalize), x, logits)
    assert_close(
        got, numpy_moe(x, logits, BASE["fc1"], BASE["fc2"], k, bool(normalize)), RTOL, ATOL
    )


def test_onnxruntime_breaks_ties_toward_higher_expert_index():
    """All-equal logits with k=3: ORT picks experts 7, 6, 5 (std::partial_sort with std::greater on
    (probability, index) pairs); the reference and qiao follow that rule."""
    x, _ = inputs(2, H, E, seed=2)
    logits = np.zeros((2, E), np.float32)
    got = ort_run(moe_model(BASE, 3), x, logits)

    def only(e):
        return np.where(np.arange(E) == e, 10.0, 0.0)[None].repeat(2, 0).astype(np.float32)

    by_hand = sum(numpy_moe(x, only(e), BASE["fc1"], BASE["fc2"], 1) for e in (5, 6, 7)) / 3
    assert_close(got, by_hand, RTOL, ATOL)


# ------------------------------------------------------------------------------------------------
# qiao vs ORT, NumPy and PyTorch eager
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 17, 64])
def test_moe_op_all_token_counts_one_artifact(base_k2, T):
    import torch

    from qiao.compiler.export_moe import moe_reference

    assert base_k2.inputs[0]["shape"][0] == "tokens"  # one artifact, symbolic T
    x, logits = inputs(T, H, E, seed=T)
    y = run_against_references(base_k2, x, logits)
    with torch.no_grad():
        ref = moe_reference(
            torch.from_numpy(x),
            torch.from_numpy(logits),
            torch.from_numpy(BASE["fc1"]),
            torch.from_numpy(BASE["fc2"]),
            2,
            True,
        )
    assert_close(y, ref.numpy(), RTOL, ATOL, "vs torch eager")


def test_moe_op_one_expert_gets_every_token(base_k2):
    x, logits = inputs(37, H, E, seed=3)
    logits[:, 3] += 50.0  # expert 3 first for all 37 tokens; the rest spread over the others
    y = base_k2.run({"x": x, "logits": logits})["y"]
    assert_close(y, ort_run(moe_model(BASE, 2), x, logits), RTOL, ATOL)


def test_moe_op_experts_without_tokens(base_k2):
    x, logits = inputs(6, H, E, seed=4)
    logits[:, :2] += 40.0  # every token picks experts 0 and 1; experts 2..7 get nothing
    y = base_k2.run({"x": x, "logits": logits})["y"]
    assert_close(y, ort_run(moe_model(BASE, 2), x, logits), RTOL, ATOL)
    assert_close(y, numpy_moe(x, logits, BASE["fc1"], BASE["fc2"], 2), RTOL, ATOL)


def test_moe_op_duplicate_router_scores(base_k2):
    """Ties inside the top-k (any order gives the same sum: ORT, NumPy and torch agree) and ties
    across the top-k boundary (the choice matters: qiao follows ORT's higher-index-first rule)."""
    import torch

    from qiao.compiler.export_moe import moe_reference

    x, _ = inputs(4, H, E, seed=5)
    inside = np.array(
        [
            [3, 3, 0, 0, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0, 0, -1],
            [0, 0, 0, 0, 0, 0, 2, 2],
            [5, 0, 0, 5, 0, 0, 0, 0],
        ],
        np.float32,
    )
    y = base_k2.run({"x": x, "logits": inside})["y"]
    assert_close(y, ort_run(moe_model(BASE, 2), x, inside), RTOL, ATOL)
    with torch.no_grad():
        ref = moe_reference(
            torch.from_numpy(x),
            torch.from_numpy(inside),
            torch.from_numpy(BASE["fc1"]),
            torch.from_numpy(BASE["fc2"]),
            2,
            True,
        )
    assert_close(y, ref.numpy(), RTOL, ATOL, "vs torch")
    across = np.array(
        [[0] * 8, [1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 2, 0, 0, 2, 0, 2], [1, 1, 1, 1, 1, 1, 1, 1]],
        np.float32,
    )
    y = base_k2.run({"x": x, "logits": across})["y"]
    assert_close(y, ort_run(moe_model(BASE, 2), x, across), RTOL, ATOL)
    assert_close(y, numpy_moe(x, across, BASE["fc1"], BASE["fc2"], 2), RTOL, ATOL)


def check_blocks_and_passes(art, micro_m: int, seed: int):
    """Run ``art`` (the k = 2 MoE of ``BASE``) on 41 tokens routed so that expert 3 takes several
    passes of two register blocks with a lone last token, and experts 4 .. a full block and a
    partial one of 2 .. micro_m - 1 tokens (two full blocks where micro_m is 2); against ONNX
    Runtime and NumPy."""
    x, logits = inputs(41, H, E, seed=seed)
    n3 = 4 * micro_m + 1
    sizes = [micro_m + r for r in range(2, max(micro_m, 3))]
    assert len(sizes) <= E - 4 and sum(sizes) <= 41
    logits[:, 3:] -= 50.0  # the unboosted picks fall on experts 0 .. 2
    logits[:n3, 3] += 100.0
    first = 0
    for j, size in enumerate(sizes):
        logits[first : first + size, 4 + j] += 100.0
        first += size
    counts = routed_counts(logits)
    assert counts[3] == n3 and list(counts[4 : 4 + len(sizes)]) == sizes
    run_against_references(art, x, logits)


def check_token_counts(art, sizes: list[int], seed: int, weights=BASE):
    """Run ``art`` (the k = 2 MoE of ``weights``, ``BASE`` unless given) with expert e routed
    exactly ``sizes[e]`` tokens (every count from a lone token to more than a register block);
    against ONNX Runtime and NumPy."""
    picks = [e for e, n in enumerate(sizes) for _ in range(n)]
    T = len(picks) // 2
    assert len(picks) == 2 * T and max(sizes) <= T
    hidden, experts = weights["fc1"].shape[2], weights["fc1"].shape[0]
    x, logits = inputs(T, hidden, experts, seed=seed)
    for t in range(T):  # token t: picks t and t + T of the sorted list, two different experts
        logits[t, picks[t]] += 100.0
        logits[t, picks[t + T]] += 90.0
    assert list(routed_counts(logits)) == sizes
    run_against_references(art, x, logits, weights)


@pytest.mark.parametrize(
    "prefetch, lines, few",
    [(0, 1, 0), (1, 1, 0), (2, 1, 0), (1, 2, 0), (2, 2, 0), (1, 2, 3), (2, 1, 99)],
)
def test_moe_op_token_blocks_and_passes(tmp_path, monkeypatch, prefetch, lines, few):
    """The CPU grouped GEMMs walk each weight row group over all of an expert's tokens in passes
    of ``token_panel_rows`` tokens: full register blocks, a partial block of every size from 2 to
    ``micro_m - 1`` (each through the kernel of its own row count), a last lone token (the
    one-row kernel) and several passes per expert, under every prefetch mode (one or two steps of
    each next row asked for per step), and with experts of up to ``few`` tokens (3, or every one
    that fits a register block) on their own path prefetching 4 steps. The pass is shrunk
    to two register blocks so small weights take them all."""
    from qiao.backends import get_backend
    from qiao.compiler import compile
    from qiao.compiler.kernels import group_gemm
    from qiao.compiler.schedules.moe_table import lookup

    micro_m = lookup(get_backend("cpu").target(None)).micro_m
    monkeypatch.setattr(group_gemm, "TOKEN_PANEL_BYTES", 2 * micro_m * 4 * INTER)
    assert group_gemm.token_panel_rows(INTER, micro_m) == 2 * micro_m
    path = tmp_path / "m.onnx"
    onnx.save(moe_model(BASE, k=2), str(path))
    schedule = {"prefetch": prefetch, "prefetch_lines": lines, "few_tokens": few}
    schedule["few_prefetch_lines"] = 4 if few else 1
    art = compile(str(path), "cpu", tmp_path / "art", moe_schedule=schedule)
    check_blocks_and_passes(art, micro_m, seed=21)
    check_token_counts(art, [1, 2, 3, 4, 5, 6, 7, 8], seed=22)


@pytest.mark.parametrize("arch", [None, "x86-64-v3"], ids=["host", "avx2"])
def test_moe_op_few_lead(tmp_path, arch):
    """With ``few_lead`` an expert of 2 .. ``micro_m`` tokens runs its first token through the
    GEMV, then the others as one block (a second GEMV for 2 tokens): experts of every count
    from 1 to 8 tokens (1 alone, 2 as two GEMVs, 3 .. ``micro_m`` as a GEMV and a block, more
    through the passes). Against ONNX Runtime and NumPy."""
    from qiao.backends import get_backend
    from qiao.compiler import compile
    from qiao.compiler.schedules.cpu_info import missing_here

    if arch and missing_here(get_backend("cpu").target(arch)):
        pytest.skip(f"this CPU cannot run {arch} code (the host-code case runs)")
    path = tmp_path / "m.onnx"
    onnx.save(moe_model(BASE, k=2), str(path))
    schedule = {"few_tokens": 99, "few_lead": 1, "prefetch": 1, "lanes_min": 0}
    art = compile(str(path), "cpu", tmp_path / "art", arch=arch, moe_schedule=schedule)
    check_token_counts(art, [1, 2, 3, 4, 5, 6, 7, 8], seed=24)


def test_few_token_prefetch_lines_zero_leaves_the_streams_to_the_hardware():
    """``few_prefetch_lines`` 0: the decode GEMV and the few-token blocks issue no software
    prefetch (the other paths keep theirs): the gate/up kernel's LLVM IR has fewer prefetches
    than with 1 line, and with ``prefetch`` 0 none at all."""
    from qiao.backends import get_backend
    from qiao.compiler.kernels.group_gemm import group_gemm_up
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules.moe_table import _compile_kernel, lookup

    target = get_backend("cpu").target("x86-64-v3")  # only compiled: runs nowhere
    cfg = MoEConfig(num_experts=4, hidden=64, inter=32, top_k=2)

    def prefetches(**fields):
        sched = lookup(target, {"prefetch": 1, "few_tokens": 3, **fields})
        ll = _compile_kernel(group_gemm_up(cfg, sched), target).mod.inspect_source("ll")
        return ll.count("call void @llvm.prefetch")

    one, none = prefetches(few_prefetch_lines=1), prefetches(few_prefetch_lines=0)
    assert 0 < none < one
    assert prefetches(prefetch=0, few_prefetch_lines=1) == 0


def _stream_prefetch_value(families, monkeypatch, env):
    """What ``group_gemm.stream_prefetch(families)`` evaluates to in a compiled kernel run here
    with ``QIAO_CPU_FAMILY`` set to ``env`` (``None``: unset)."""
    import tvm
    from tvm.script import tirx as T

    from qiao.compiler.kernels.group_gemm import stream_prefetch
    from qiao.compiler.schedules.cpu_info import CPU_FAMILY_ENV

    @T.prim_func
    def probe(out: T.Buffer((1,), "int32")):
        out[0] = stream_prefetch(families)

    if env is None:
        monkeypatch.delenv(CPU_FAMILY_ENV, raising=False)
    else:
        monkeypatch.setenv(CPU_FAMILY_ENV, env)
    lib = tvm.compile(tvm.IRModule({"main": probe}), target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros(1, "int32"))
    lib["main"](out)
    return int(out.numpy()[0])


def test_stream_prefetch_reads_the_running_cpu_family(monkeypatch):
    """``stream_prefetch`` is decided when the kernel runs: no prefetch (0) on a listed family
    (its code in ``QIAO_CPU_FAMILY``), every row (``PREFETCH_ALL``) on another family, an unset
    or unreadable variable, or with no families listed."""
    from qiao.compiler.schedules.cpu_gemm import PREFETCH_ALL
    from qiao.compiler.schedules.cpu_info import cpu_family_code

    listed = ("amd-26", "intel-6")
    for env, expected in [
        (str(cpu_family_code("amd-26")), 0),
        (str(cpu_family_code("intel-6")), 0),
        (str(cpu_family_code("amd-25")), PREFETCH_ALL),
        ("0", PREFETCH_ALL),
        ("junk", PREFETCH_ALL),
        (None, PREFETCH_ALL),
    ]:
        assert _stream_prefetch_value(listed, monkeypatch, env) == expected, env
    assert _stream_prefetch_value((), monkeypatch, "282") == PREFETCH_ALL


@pytest.mark.parametrize("few_lead", [0, 1])
def test_few_prefetch_off_masks_every_few_token_stream(few_lead):
    """``few_prefetch_off`` reaches every few-token stream and only those: in the gate/up
    kernel each of their micro-kernels (decode's GEMV, the few-token blocks of 2 and 3 rows,
    with ``few_lead`` the leading GEMV) tests the run-time mask, once read from the
    environment; without families, or with ``few_prefetch_lines`` 0, nothing is read."""
    from qiao.backends import get_backend
    from qiao.compiler.kernels.group_gemm import group_gemm_up
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules.moe_table import lookup

    target = get_backend("cpu").target("x86-64-v3")  # only lowered: runs nowhere
    cfg = MoEConfig(num_experts=4, hidden=64, inter=32, top_k=2)

    def script(**fields):
        base = {"prefetch": 1, "few_tokens": 3, "few_lead": few_lead, "few_prefetch_lines": 3}
        return group_gemm_up(cfg, lookup(target, {**base, **fields})).script()

    masked = script(few_prefetch_off=["amd-26"])
    assert masked == script()  # ``cpu/avx2``'s own
    assert masked.count("spf != 0") == 3 + few_lead
    assert masked.count('"getenv", "QIAO_CPU_FAMILY"') == 2  # (null test, then atoi) once
    assert "== 282" in masked
    for plain in (script(few_prefetch_off=[]), script(few_prefetch_lines=0)):
        assert "getenv" not in plain


def test_moe_op_few_prefetch_off_at_run_time(tmp_path, monkeypatch):
    """An artifact whose few-token streams lose their prefetch on this machine's CPU family
    (``few_prefetch_off``) gives the right answer with the family published, another one, and
    an unknown one: experts of every count from 1 to 8 tokens, against ONNX Runtime and NumPy."""
    from qiao.compiler import compile
    from qiao.compiler.schedules.cpu_info import CPU_FAMILY_ENV, cpu_family_code, host_cpu_family

    here = host_cpu_family() or "amd-26"
    path = tmp_path / "m.onnx"
    onnx.save(moe_model(BASE, k=2), str(path))
    schedule = {"few_tokens": 99, "few_prefetch_lines": 3, "prefetch": 1, "lanes_min": 0}
    schedule["few_prefetch_off"] = [here]
    art = compile(str(path), "cpu", tmp_path / "art", moe_schedule=schedule)
    for env in (str(cpu_family_code(here)), "1", "0"):
        monkeypatch.setenv(CPU_FAMILY_ENV, env)
        check_token_counts(art, [1, 2, 3, 4, 5, 6, 7, 8], seed=25)


@pytest.mark.parametrize("split_blocks", [5, 1])
def test_moe_op_split_prefetch(tmp_path, monkeypatch, split_blocks):
    """The split prefetch (``MoESchedule.prefetch`` 3): the rows two groups ahead shared out among
    a pass's token blocks, in passes of up to ``SPLIT_BLOCKS`` blocks. The passes are not shrunk,
    so expert 3 takes one pass of four full blocks and a lone token: with ``SPLIT_BLOCKS`` 5 the
    four blocks after the first share the rows, with 1 every block of a pass prefetches the next
    group instead (the others of two blocks too). Against ONNX Runtime and NumPy."""
    from qiao.backends import get_backend
    from qiao.compiler import compile
    from qiao.compiler.kernels import group_gemm
    from qiao.compiler.schedules.moe_table import lookup

    micro_m = lookup(get_backend("cpu").target(None)).micro_m
    assert group_gemm.token_panel_rows(INTER, micro_m) >= 4 * micro_m + 1
    monkeypatch.setattr(group_gemm, "SPLIT_BLOCKS", split_blocks)
    path = tmp_path / "m.onnx"
    onnx.save(moe_model(BASE, k=2), str(path))
    art = compile(str(path), "cpu", tmp_path / "art", moe_schedule={"prefetch": 3, "k_chunk": 0})
    check_blocks_and_passes(art, micro_m, seed=31)
    check_token_counts(art, [1, 2, 3, 4, 5, 6, 7, 8], seed=32)


@pytest.mark.parametrize("arch", [None, "x86-64-v3"], ids=["host", "avx2"])
@pytest.mark.parametrize("lanes_min, sweep_kb", [(2, 0), (17, 0), (2, 16)])
def test_moe_op_token_lanes_order(tmp_path, lanes_min, sweep_kb, arch):
    """Experts with at least ``lanes_min`` tokens take the token-lanes gate/up GEMM (tokens in
    SIMD lanes, transposed per pass of up to three vectors, an expert's vectors shared out evenly
    among its passes): at 8 lanes 55 tokens run as 3 + 2 + 2 vectors (the last partial), 40 as
    3 + 2, 12 as 2 (partial), 5 and 2 as 1; at 16 lanes 55 as 2 + 2, 40 as 3 (partial), 12, 5
    and 2 as 1; with ``lanes_min`` 17 the experts of 12 tokens and fewer take the dot-product
    kernels. With ``lanes_sweep_kb`` 16 (panels of 2 KB a vector at 8 lanes, 4 KB at 16) and
    groups of 1 KB of weight rows (4 of the 64), the passes meet each group in turn: at 8 lanes
    55 tokens as a sweep of 3 + 2 vectors then one of 2, 40 as one sweep of 3 + 2; at 16 lanes
    55 as one sweep of 2 + 2. Against ONNX Runtime and NumPy."""
    from qiao.backends import get_backend
    from qiao.compiler import compile
    from qiao.compiler.schedules.cpu_info import missing_here

    if arch and missing_here(get_backend("cpu").target(arch)):
        pytest.skip(f"this CPU cannot run {arch} code (the host-code case runs)")
    path = tmp_path / "m.onnx"
    onnx.save(moe_model(BASE, k=2), str(path))
    art = compile(
        str(path),
        "cpu",
        tmp_path / "art",
        arch=arch,
        moe_schedule={"lanes_min": lanes_min, "lanes_sweep_kb": sweep_kb, "lanes_group_kb": 1},
    )
    x, logits = inputs(60, H, E, seed=23)
    sizes = {3: 55, 4: 40, 5: 5, 6: 2, 7: 12}
    logits[:, 3:] -= 50.0  # the unboosted picks fall on experts 0 .. 2
    logits[: sizes[3], 3] += 100.0
    first = 0
    for e in (4, 5, 6, 7):
        logits[first : first + sizes[e], e] += 100.0
        first += sizes[e]
    counts = routed_counts(logits)
    assert {e: counts[e] for e in sizes} == sizes
    run_against_references(art, x, logits)


@pytest.mark.parametrize("arch", [None, "x86-64-v3"], ids=["host", "avx2"])
@pytest.mark.parametrize("k_chunk", [0, 32])
def test_moe_op_lone_merge(tmp_path, monkeypatch, arch, k_chunk):
    """With ``lone_merge`` a pass of ``q * micro_m + 1`` tokens runs its last ``micro_m + 1`` as
    two blocks of about half (3 + 1 -> 2 + 2 on AVX2, 6 + 1 -> 4 + 3 on AVX-512), with and
    without reduction chunks: experts of every count from 1 to 8 tokens (4 and 7 merge with
    blocks of 3, 7 with blocks of 6), then, with passes shrunk to two register blocks, an
    expert of several passes and the others full and partial blocks. Against ONNX Runtime and
    NumPy."""
    from qiao.backends import get_backend
    from qiao.compiler import compile
    from qiao.compiler.kernels import group_gemm
    from qiao.compiler.schedules.cpu_info import missing_here
    from qiao.compiler.schedules.moe_table import lookup

    target = get_backend("cpu").target(arch)
    if arch and missing_here(target):
        pytest.skip(f"this CPU cannot run {arch} code (the host-code case runs)")
    micro_m = lookup(target).micro_m
    path = tmp_path / "m.onnx"
    onnx.save(moe_model(BASE, k=2), str(path))
    schedule = {"lone_merge": 1, "k_chunk": k_chunk, "lanes_min": 0, "few_tokens": 0}
    art = compile(str(path), "cpu", tmp_path / "a", arch=arch, moe_schedule=schedule)
    check_token_counts(art, [1, 2, 3, 4, 5, 6, 7, 8], seed=36)
    monkeypatch.setattr(group_gemm, "TOKEN_PANEL_BYTES", 2 * micro_m * 4 * INTER)
    monkeypatch.setattr(group_gemm, "CHUNK_PANEL_BYTES", 2 * micro_m * 4 * max(k_chunk, 1))
    art = compile(str(path), "cpu", tmp_path / "b", arch=arch, moe_schedule=schedule)
    check_blocks_and_passes(art, micro_m, seed=37)


@pytest.mark.parametrize("arch", [None, "x86-64-v3"], ids=["host", "avx2"])
@pytest.mark.parametrize(
    "overrides",
    [{"few_tokens": 0}, {"few_tokens": 0, "lone_merge": 1}, {"few_tokens": 99, "few_lead": 1}],
    ids=["blocks", "lone_merge", "few_lead"],
)
def test_down_gemm_writes_every_token_once(arch, overrides):
    """The down grouped GEMM alone, its output filled with NaN first, so a token block that
    skips or repeats a token shows: experts of 1 .. 13 tokens (every remainder of blocks of 3
    and 6, ``lone_merge``'s ``q * micro_m + 1`` among them; with ``few_lead`` the experts of up
    to ``micro_m`` tokens as a GEMV and a block), against NumPy."""
    import tvm

    from qiao.backends import get_backend
    from qiao.compiler.kernels.group_gemm import group_gemm_down
    from qiao.compiler.kernels.moe_common import MoEConfig, num_blocks
    from qiao.compiler.schedules import moe_table
    from qiao.compiler.schedules.cpu_info import cpu_device, missing_here

    target = get_backend("cpu").target(arch)
    if arch and missing_here(target):
        pytest.skip(f"this CPU cannot run {arch} code (the host-code case runs)")
    n_exp, hidden, inter, k = 14, 64, 32, 2
    cfg = MoEConfig(num_experts=n_exp, hidden=hidden, inter=inter, top_k=k)
    sched = moe_table.lookup(target, overrides)
    sizes = list(range(1, n_exp)) + [13]  # an even number of picks: two experts per token
    picks = [e for e, n in enumerate(sizes) for _ in range(n)]
    tokens = len(picks) // 2
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((tokens, n_exp)).astype(np.float32)
    for t in range(tokens):
        logits[t, picks[t]] += 100.0
        logits[t, picks[t + tokens]] += 90.0
    dev, bm = cpu_device(), sched.block_m
    blocks = num_blocks(tokens, k, n_exp, bm)

    def empty(shape, dtype):
        return tvm.runtime.empty(shape, dtype, dev)

    def put(a):
        return tvm.runtime.tensor(np.ascontiguousarray(a), dev)

    ids, tw = empty((tokens, k), "int32"), empty((tokens, k), "float32")
    gating, align = moe_table._dispatch_kernels(n_exp, k, True, bm, str(target))
    gating["main"](put(logits), ids, tw)
    tables = [empty((n_exp,), "int32"), empty((n_exp + 1,), "int32"), empty((n_exp,), "int32")]
    tables += [empty((1,), "int32"), empty((blocks * bm,), "int32"), empty((blocks,), "int32")]
    tables += [empty((1,), "int32"), empty((tokens, k), "int32")]
    align["main"](ids, *tables)
    counts, offsets, pairs = tables[0].numpy(), tables[1].numpy(), tables[4].numpy()
    assert list(counts) == sizes
    act = rng.standard_normal((blocks * bm, inter)).astype(np.float32)
    fc2 = rng.standard_normal((n_exp, hidden, inter)).astype(np.float32)
    out = put(np.full((tokens, k, hidden), np.nan, np.float32))
    lib = moe_table._compile_kernel(group_gemm_down(cfg, sched), target)
    bias = put(np.zeros(1, np.float32))
    lib["main"](put(act), put(fc2), bias, ids, tw, tables[4], tables[1], tables[0], *tables[2:4],
                *tables[5:], out)  # fmt: skip
    expected = np.full((tokens, k, hidden), np.nan, np.float32)
    weights = tw.numpy()
    for e, n in enumerate(sizes):
        for slot in range(offsets[e], offsets[e] + n):
            t, j = divmod(int(pairs[slot]), k)
            expected[t, j] = weights[t, j] * (fc2[e] @ act[slot])
    assert not np.isnan(expected).any()
    assert_close(out.numpy(), expected, 1e-4, 1e-4, "down GEMM vs numpy")


@pytest.mark.parametrize("chunks, lanes_min", [(3, 0), (2, 2), (4, 0), (1, 0)])
def test_moe_op_task_chunks(tmp_path, chunks, lanes_min):
    """With ``task_chunks`` the grouped GEMMs' tasks run chunk by chunk of each expert's output
    tiles (``group_gemm.expert_task``): H = 96 and I = 48 give 6 tiles per expert in both GEMMs
    (gate/up tiles of 8 units, down tiles of 16 columns), dealt out in 3 chunks of 2, in 2 of 3,
    in 3 for 4 (the largest divisor of 6 up to 4), or the experts in a run (1); with
    ``lanes_min`` 2 the gate/up GEMM takes the token-lanes tasks. Experts of every count from 1
    to 8 tokens, against ONNX Runtime and NumPy."""
    from qiao.compiler import compile

    weights = make_weights(E, 96, 48)
    path = tmp_path / "m.onnx"
    onnx.save(moe_model(weights, k=2), str(path))
    schedule = {"task_chunks": chunks, "tile_up": 8, "tile_down": 16, "lanes_min": lanes_min}
    art = compile(str(path), "cpu", tmp_path / "art", moe_schedule=schedule)
    check_token_counts(art, [1, 2, 3, 4, 5, 6, 7, 8], seed=35, weights=weights)


@pytest.mark.parametrize("tiles, chunks", [(6, 1), (6, 2), (6, 3), (6, 6), (4, 2)])
def test_expert_task_gives_each_thread_a_chunk_of_every_expert(tiles, chunks):
    """``expert_task`` is a bijection of the tasks onto (expert, tile), and TVM's static split of
    the parallel loop over ``chunks`` threads (contiguous runs of the tasks) gives each thread the
    same tiles of every active expert; with one chunk, runs of whole experts."""
    from qiao.compiler.kernels.group_gemm import expert_task

    active = [5, 0, 7, 2, 3]
    nact = [len(active)]
    pairs = [expert_task(t, nact, active, tiles, chunks) for t in range(len(active) * tiles)]
    assert sorted(pairs) == sorted((e, j) for e in active for j in range(tiles))
    run = len(pairs) // chunks
    for thread in range(chunks):
        mine = pairs[thread * run : (thread + 1) * run]
        share = range(thread * tiles // chunks, (thread + 1) * tiles // chunks)
        assert sorted(mine) == sorted((e, j) for e in active for j in share)
        if chunks > 1:  # expert by expert within the chunk
            assert [e for e, _ in mine] == [e for e in active for _ in share]


def test_task_chunks_default_to_the_targets_cores():
    """``lookup`` turns ``task_chunks`` 0 into the CPU target's cores; an override stays."""
    import tvm

    from qiao.compiler.schedules.moe_table import lookup

    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 3})
    assert lookup(target).task_chunks == 3
    assert lookup(target, {"task_chunks": 1}).task_chunks == 1


@pytest.mark.parametrize("arch", [None, "x86-64-v3"], ids=["host", "avx2"])
@pytest.mark.parametrize("k_chunk, prefetch", [(16, None), (32, 3)])
def test_moe_op_reduction_chunks(tmp_path, monkeypatch, k_chunk, prefetch, arch):
    """With ``k_chunk`` the gate/up GEMM walks the hidden size in chunks, the partial sums of a
    pass's tokens added in memory: 4 and 2 chunks of H = 64, one and two vectors each at 16
    lanes, two and four at 8; passes shrunk to two register blocks, so an expert takes several
    passes with a lone last token and the others full and partial blocks; then experts of every
    count from 1 to 8 tokens. The entry's prefetch, or the split one (3). Against ONNX Runtime
    and NumPy."""
    from qiao.backends import get_backend
    from qiao.compiler import compile
    from qiao.compiler.kernels import group_gemm
    from qiao.compiler.schedules.cpu_info import missing_here
    from qiao.compiler.schedules.moe_table import lookup

    target = get_backend("cpu").target(arch)
    if arch and missing_here(target):
        pytest.skip(f"this CPU cannot run {arch} code (the host-code case runs)")
    micro_m = lookup(target).micro_m
    monkeypatch.setattr(group_gemm, "CHUNK_PANEL_BYTES", 2 * micro_m * 4 * k_chunk)
    path = tmp_path / "m.onnx"
    onnx.save(moe_model(BASE, k=2), str(path))
    art = compile(
        str(path),
        "cpu",
        tmp_path / "art",
        arch=arch,
        moe_schedule={
            "k_chunk": k_chunk,
            "lanes_min": 0,
            **({"prefetch": prefetch} if prefetch else {}),
        },
    )
    check_blocks_and_passes(art, micro_m, seed=29)
    # every count from 1 to 8: the table's experts of few tokens skip the chunks, the rest chunk
    check_token_counts(art, [1, 2, 3, 4, 5, 6, 7, 8], seed=30)


@pytest.mark.parametrize("arch", [None, "x86-64-v3"], ids=["host", "avx2"])
def test_moe_op_padded_token_rows(tmp_path, arch):
    """Token rows of 4 KB (H = 1024): the gate/up GEMM reads the tokens from ``moe_pad_rows``'
    copy, rows ``x_pad`` float32 apart (the lowered module holds the kernel and passes its
    (T, H + x_pad) output on); with ``x_pad`` 0 nothing is copied. Experts of 1 to 24 tokens, so
    that the GEMV, the few-token block, the dot blocks (in reduction chunks on AVX2) and the
    token lanes all read the padded rows. Against ONNX Runtime and NumPy."""
    from qiao.backends import get_backend
    from qiao.compiler import compile
    from qiao.compiler.frontend import import_onnx
    from qiao.compiler.passes import LowerMoE
    from qiao.compiler.schedules.cpu_info import missing_here
    from qiao.compiler.schedules.moe_table import lookup

    target = get_backend("cpu").target(arch)
    hidden, pad = 1024, lookup(target).x_pad
    assert pad > 0  # the shipped CPU entries pad
    weights = make_weights(8, hidden, 16, seed=5)
    model = moe_model(weights, k=2)
    for x_pad, copies in ((pad, True), (0, False)):
        lowered = LowerMoE(target, overrides={"x_pad": x_pad})(import_onnx(model).mod)
        prims = {gv.name_hint: f for gv, f in lowered.functions_items()}
        assert ("moe_pad_rows" in prims) == copies
        columns = hidden + (x_pad if copies else 0)
        assert f'X: T.Buffer((n, {columns}), "float32")' in prims["group_gemm_up"].script()
        assert ("R.call_tir(moe_pad_rows, (x,)" in lowered["main"].script()) == copies
    if arch and missing_here(target):
        pytest.skip(f"this CPU cannot run {arch} code (the host-code case runs)")
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    art = compile(str(path), "cpu", tmp_path / "art", arch=arch)
    check_token_counts(art, [1, 2, 3, 5, 8, 13, 20, 24], seed=31, weights=weights)


@pytest.mark.parametrize("k, normalize", [(1, 0), (E, 1)], ids=["k1", "k_equals_E"])
def test_moe_op_k_extremes(compile_moe, k, normalize):
    art = compile_moe(f"k{k}", moe_model(BASE, k, normalize))
    for T in (1, 3, 19):
        x, logits = inputs(T, H, E, seed=10 + T)
        y = art.run({"x": x, "logits": logits})["y"]
        assert_close(y, ort_run(moe_model(BASE, k, normalize), x, logits), RTOL, ATOL)
        assert_close(
            y, numpy_moe(x, logits, BASE["fc1"], BASE["fc2"], k, bool(normalize)), RTOL, ATOL
        )


VARIANTS = {
    # name: (E, H, I, k, make_weights kwargs, node kwargs, ORT can run it)
    "odd_dims": (5, 40, 24, 3, {}, {}, True),
    "bias_limit_alpha_beta": (
        6,
        32,
        16,
        2,
        {"bias": True},
        {"swiglu_limit": 1.5, "activation_alpha": 1.702, "activation_beta": 1.0},
        True,
    ),
    "concat_gate_up": (6, 32, 16, 2, {}, {"fusion": 2}, False),
    "silu_bias": (6, 32, 16, 2, {"activation": "silu", "bias": True}, {"activation": "silu"}, True),
    "relu_unnormalized": (
        6,
        32,
        16,
        2,
        {"activation": "relu"},
        {"activation": "relu", "normalize": 0},
        True,
    ),
    "gelu": (6, 32, 16, 2, {"activation": "gelu"}, {"activation": "gelu"}, True),
    "identity": (6, 32, 16, 3, {"activation": "identity"}, {"activation": "identity"}, True),
    "input_3d": (6, 32, 16, 2, {}, {"rank": 3}, True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_moe_op_variants(compile_moe, name):
    e, h, i, k, wkw, nkw, ort_ok = VARIANTS[name]
    w = make_weights(e, h, i, seed=7, **wkw)
    model = moe_model(w, k, **nkw)
    art = compile_moe(name, model)
    rank = nkw.get("rank", 2)
    ref_kw = dict(
        normalize=bool(nkw.get("normalize", 1)),
        activation=nkw.get("activation", "swiglu"),
        layout="concat" if nkw.get("fusion") == 2 else "interleaved",
        b1=w.get("b1"),
        b2=w.get("b2"),
        alpha=nkw.get("activation_alpha", 1.0),
        beta=nkw.get("activation_beta", 0.0),
        limit=nkw.get("swiglu_limit"),
    )
    for T in (1, 6):
        x, logits = inputs(T, h, e, seed=20 + T, rank=rank)
        y = art.run({"x": x, "logits": logits})["y"]
        expected = numpy_moe(x.reshape(-1, h), logits, w["fc1"], w["fc2"], k, **ref_kw).reshape(
            y.shape
        )
        assert_close(y, expected, RTOL, ATOL, f"{name} vs numpy")
        if ort_ok:
            assert_close(y, ort_run(model, x, logits), RTOL, ATOL, f"{name} vs onnxruntime")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_sparse_mixer": 1}, "use_sparse_mixer"),
        ({"fusion": 0}, "swiglu_fusion=0"),
        ({"fc3": True}, "fc3"),
    ],
)
def test_moe_unsupported_forms_fail_with_a_fix(tmp_path, change, message):
    from qiao.compiler import compile
    from qiao.compiler.errors import QiaoError

    w = make_weights(4, 16, 8, seed=1)
    if change.pop("fc3", False):
        model = moe_model(w, 2)
        node = model.graph.node[0]
        node.input.extend(["", "fc3"])
        model.graph.initializer.append(
            numpy_helper.from_array(w["fc2"].transpose(0, 2, 1).copy(), "fc3")
        )
    else:
        model = moe_model(w, 2, **change)
    with pytest.raises(QiaoError, match=message) as err:
        compile(model, "cpu", tmp_path / "art")
    assert "fix:" in str(err.value)
    assert not (tmp_path / "art").exists()


# ------------------------------------------------------------------------------------------------
# The lowering and the stage kernels
# ------------------------------------------------------------------------------------------------
def test_lower_moe_emits_the_four_stages_as_scheduled_kernels():
    import tvm

    from qiao.compiler.frontend import import_onnx
    from qiao.compiler.passes import LowerMoE

    mod = import_onnx(moe_model(BASE, 2)).mod
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    lowered = LowerMoE(target)(mod)
    prims = {
        gv.name_hint: f for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    }
    assert set(prims) == {
        "moe_gating",
        "moe_align",
        "group_gemm_up",
        "group_gemm_down",
        "moe_combine",
    }
    for name, f in prims.items():
        assert f.attrs["tirx.is_scheduled"] and f.attrs["tir.is_scheduled"], name
    text = lowered["main"].script()
    assert "qiao.moe" not in text and text.count("R.call_tir") == 5
    # one artifact for every T: the token dimension stays a variable in the Relax signature
    x_shape = lowered["main"].params[0].ty.shape
    assert isinstance(x_shape[0], tvm.tirx.Var) and x_shape[0].name == "tokens"


def _run_prim(func, args):
    import tvm

    lib = tvm.compile(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
        target=tvm.target.Target({"kind": "llvm"}),
    )
    nd = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*nd)
    return [a.numpy() for a in nd]


@pytest.mark.parametrize("E_, k, normalize", [(8, 2, True), (8, 8, False), (16, 3, True)])
def test_gating_kernel_order_and_weights(E_, k, normalize):
    from qiao.compiler.kernels.moe_gating import moe_gating

    rng = np.random.default_rng(k)
    logits = rng.standard_normal((9, E_)).astype(np.float32)
    logits[0] = 0.0  # all tied
    logits[1, ::2] = 1.0  # half tied at the top
    _, ids, w = _run_prim(
        moe_gating(E_, k, normalize),
        [logits, np.zeros((9, k), np.int32), np.zeros((9, k), np.float32)],
    )
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for t in range(9):
        order = np.lexsort((-np.arange(E_), -p[t]))[:k]
        np.testing.assert_array_equal(ids[t], order, err_msg=f"token {t}")
        ref = p[t, order] / (p[t, order].sum() if normalize else 1)
        assert_close(w[t], ref.astype(np.float32), 1e-6, 1e-7, f"weights of token {t}")


@pytest.mark.parametrize("T, block_m", [(1, 4), (13, 3), (40, 16)])
def test_align_kernel_tables(T, block_m):
    from qiao.compiler.kernels.moe_align import moe_align
    from qiao.compiler.kernels.moe_common import num_blocks

    E_, k = 8, 2
    rng = np.random.default_rng(T)
    ids = np.stack([rng.choice(E_, k, replace=False) for _ in range(T)]).astype(np.int32)
    ids[: T // 2, 0] = 5  # a popular expert
    B = num_blocks(T, k, E_, block_m)
    outs = [
        np.zeros(s, np.int32)
        for s in ((E_,), (E_ + 1,), (E_,), (1,), (B * block_m,), (B,), (1,), (T, k))
    ]
    _, cnt, off, active, nact, pairs, bexp, nblk, pslot = _run_prim(
        moe_align(E_, k, block_m), [ids, *outs]
    )
    counts = np.bincount(ids.ravel(), minlength=E_)
    np.testing.assert_array_equal(cnt, counts)
    padded = -(-counts // block_m) * block_m
    np.testing.assert_array_equal(off, np.concatenate([[0], np.cumsum(padded)]))
    hit = np.nonzero(counts)[0]
    assert nact[0] == hit.size
    np.testing.assert_array_equal(active[: hit.size], hit)
    assert nblk[0] == padded.sum() // block_m
    np.testing.assert_array_equal(bexp[: nblk[0]], np.repeat(np.arange(E_), padded // block_m))
    for e in range(E_):
        run = pairs[off[e] : off[e + 1]]
        np.testing.assert_array_equal(run[: counts[e]], np.nonzero(ids.ravel() == e)[0])
        assert (run[counts[e] :] == -1).all()
    assert (pairs[off[E_] :] == -1).all()
    np.testing.assert_array_equal(pairs[pslot.ravel()], np.arange(T * k))
