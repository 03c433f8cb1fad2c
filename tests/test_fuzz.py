"""Differential fuzzing: random valid ONNX graphs compiled by qiao for the CPU vs ONNX Runtime.

The generator and the per-family tolerances are in ``qiao.compiler.fuzzing``. CI runs a fixed-seed
budget (``derandomize``: the same 100 graphs every run; 18 s on a quiet two-core machine, about
75 s on a loaded one);
``QIAO_FUZZ_EXAMPLES=N`` runs N graphs instead (random, not derandomized, when set). A failure
prints the shrunk graph in ONNX text form: keep it in ``tests/test_fuzz_regressions.py``.
"""

from __future__ import annotations

import os

import onnx
import pytest
from hypothesis import HealthCheck, given, reject, settings

from qiao.compiler import fuzzing

EXAMPLES = int(os.environ.get("QIAO_FUZZ_EXAMPLES", "0"))


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES or 100,
    derandomize=not EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(case=fuzzing.fuzz_cases())
def test_qiao_matches_onnxruntime(tmp_path_factory, case):
    try:
        fuzzing.check_case(case, workdir=str(tmp_path_factory.getbasetemp()))
    except fuzzing.ReferenceUnavailable:
        reject()


@settings(max_examples=200, derandomize=True, deadline=None, database=None)
@given(fuzzing.fuzz_cases())
def test_generated_models_are_valid(case):
    """Every drawn model passes the full ONNX checker and ONNX Runtime runs it (no compile)."""
    onnx.checker.check_model(case.model, full_check=True)
    assert 1 <= len(case.bindings) <= 2
    assert {i.name for i in case.model.graph.input} == set(case.bindings[0])
    try:
        out = fuzzing.onnxruntime_outputs(case.model, case.bindings[-1])
    except fuzzing.ReferenceUnavailable:
        reject()
    assert set(out) == {o.name for o in case.model.graph.output}


def test_tolerance_is_the_loosest_family():
    case = fuzzing.FuzzCase(onnx.ModelProto(), [], frozenset({"exact", "accumulate"}), (), False)
    assert case.tolerance == fuzzing.TOLERANCES["accumulate"]
    case16 = fuzzing.FuzzCase(onnx.ModelProto(), [], frozenset({"exact"}), (), True)
    assert case16.tolerance == fuzzing.FLOAT16_FLOOR
