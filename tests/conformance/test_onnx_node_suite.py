"""The ONNX backend node conformance suite, run through qiao's CPU compile path.

Every case of ``onnx.backend.test.case.node`` (1884 with onnx 1.23) is compiled by
``QiaoBackend.prepare`` — ``import_onnx`` plus the CPU backend's pipeline, as ``qiao compile``
does — and checked against the expected outputs that onnx computes with its NumPy reference
implementations. Cases in ``exclusions.py`` are strict xfails (a case that starts passing fails the
run until its exclusion is removed) or skips, each with its reason.

``QIAO_CONFORMANCE`` picks the cases:

* ``ci`` (default): a deterministic, representative subset — the first case of every tested op
  type (plain and function-expanded separately) plus every case whose name hashes to 0 mod 10 —
  about 400 cases, a few minutes on 2 cores.
* ``full``: all cases.
* ``off``: none (for quick local runs of the rest of the suite).

Compiling this suite's ~1900 small models takes 10-15 minutes on 2 cores, which is why CI runs the
subset; ``tests/conformance/survey.py`` runs everything crash-proof and tabulates failures by cause.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.conformance.exclusions import exclusion_for
from tests.conformance.node_cases import all_cases, check_case, op_type, stable_hash
from tests.conformance.qiao_backend import QiaoBackend

MODES = ("ci", "full", "off")
MODE = os.environ.get("QIAO_CONFORMANCE", "ci").strip().lower() or "ci"
SAMPLE_MODULUS = 10


def case_key(name: str, cases) -> tuple[str, bool]:
    """(tested op type, function-expanded?): an expanded case counts as the op it expands."""
    base = re.sub(r"_expanded(_ver\d+)?$", "", name)
    return op_type(cases.get(base, cases[name])), base != name


def ci_subset(cases) -> list[str]:
    """First case per (op type, expanded) plus a stable 1-in-10 sample, in onnx's order."""
    seen: set = set()
    chosen = []
    for name in cases:
        key = case_key(name, cases)
        if key not in seen or stable_hash(name) % SAMPLE_MODULUS == 0:
            seen.add(key)
            chosen.append(name)
    return chosen


def selected_cases() -> list[str]:
    if MODE not in MODES:
        raise ValueError(f"QIAO_CONFORMANCE={MODE!r}: use one of {', '.join(MODES)}")
    if MODE == "off":
        return []
    cases = all_cases()
    return list(cases) if MODE == "full" else ci_subset(cases)


def _params():
    params = []
    for name in selected_cases():
        marks = []
        excluded = exclusion_for(name)
        if excluded is not None:
            if excluded.kind == "skip":
                marks.append(pytest.mark.skip(reason=excluded.reason))
            else:
                marks.append(pytest.mark.xfail(reason=excluded.reason, strict=True))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("name", _params())
def test_node_case(name):
    check_case(all_cases()[name], QiaoBackend)


def test_ci_subset_covers_every_op_type():
    cases = all_cases()
    subset = ci_subset(cases)
    assert {case_key(n, cases) for n in subset} == {case_key(n, cases) for n in cases}
    assert subset == ci_subset(cases)  # deterministic
    assert len(subset) < len(cases) / 3


def test_backend_adapter_contract():
    """``run_node`` builds a one-node model; ``supports_device`` is CPU only."""
    import numpy as np
    from onnx import helper

    from qiao.compiler.testing import assert_close

    assert QiaoBackend.supports_device("CPU")
    assert not QiaoBackend.supports_device("CUDA")
    x = np.array([[1.0, -2.0], [3.0, -4.0]], np.float32)
    y = np.array([0.5, 0.25], np.float32)
    (out,) = QiaoBackend.run_node(helper.make_node("Mul", ["x", "y"], ["z"]), [x, y])
    assert_close(out, x * y)
