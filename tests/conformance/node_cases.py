"""The ONNX backend node test cases, generated in memory, and how one case is checked.

The installed onnx wheel does not ship the node test data (``onnx/backend/test/data/node``), so the
cases come from ``onnx.backend.test.case.node.collect_testcases()``: each holds the model and its
input/expected-output sets, computed by onnx's own NumPy reference implementations — the reference
qiao is checked against. ``check_case`` follows ``onnx.backend.test.runner.Runner``: prepare once,
run every data set, compare output count, then shape, dtype and values with the case's tolerances.
"""

from __future__ import annotations

import functools
import hashlib
import time
import warnings
from dataclasses import dataclass

import numpy as np
import onnx

from qiao.compiler.testing import assert_close

# Dtypes NumPy cannot compare with Python floats; compared as float32 (as onnx's runner does).
_WIDENED = {"bfloat16": 2**-6}  # rtol floor: two bfloat16 ULPs


@functools.cache
def all_cases() -> dict[str, object]:
    """``{case name: onnx TestCase}`` for every node test, in onnx's order."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the generators overflow/divide by zero on purpose
        cases = collect_testcases()
    return {c.name: c for c in cases}


def op_type(case) -> str:
    """The op type a node case tests (its main node; the node suite wraps one op per model)."""
    node = case.model.graph.node
    return node[-1].op_type if node else "<empty>"


def stable_hash(name: str) -> int:
    """A hash of a case name that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def _normalize(value):
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def compare(outputs, expected, rtol: float, atol: float) -> None:
    """Compare like onnx's runner, through ``assert_close`` for every numeric output."""
    assert len(outputs) == len(expected), f"{len(outputs)} outputs, expected {len(expected)}"
    for i, (got, ref) in enumerate(zip(outputs, expected)):
        name = f"output {i}"
        if isinstance(ref, list):
            assert isinstance(got, list), f"{name}: expected a sequence, got {type(got).__name__}"
            compare(got, ref, rtol, atol)
            continue
        got, ref = np.asarray(got), np.asarray(ref)
        if ref.dtype == object:  # strings: exact
            assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
            np.testing.assert_array_equal(got, ref, err_msg=name)
            continue
        if ref.dtype.name in _WIDENED or ref.dtype.name.startswith("float8"):
            assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} != expected {ref.dtype}"
            rtol = max(rtol, _WIDENED.get(ref.dtype.name, 0.0))
            got, ref = got.astype(np.float32), ref.astype(np.float32)
        assert_close(got, ref, rtol=rtol, atol=atol, name=name)


@dataclass
class CaseResult:
    prepare_s: float
    run_s: float


def check_case(case, backend=None) -> CaseResult:
    """Prepare ``case.model`` with ``backend`` (qiao's by default) and check every data set."""
    if backend is None:
        from tests.conformance.qiao_backend import QiaoBackend as backend  # noqa: N813
    t0 = time.perf_counter()
    rep = backend.prepare(case.model, "CPU")
    t1 = time.perf_counter()
    for inputs, ref_outputs in case.data_sets:
        outputs = list(rep.run([_normalize(x) for x in inputs]))
        refs = [_normalize(x) for x in ref_outputs]
        undefined = _undefined_cast_elements(case.model, [_normalize(x) for x in inputs])
        if undefined is not None and outputs and np.asarray(outputs[0]).shape == undefined.shape:
            got = np.array(outputs[0])
            got[undefined] = np.asarray(refs[0])[undefined]
            outputs[0] = got
        compare(outputs, refs, case.rtol, case.atol)
    return CaseResult(t1 - t0, time.perf_counter() - t1)


# Sub-byte integer types and their ranges.
_SUB_BYTE_INT = {"INT4": (-8, 7), "UINT4": (0, 15), "INT2": (-2, 1), "UINT2": (0, 3)}


def _undefined_cast_elements(model, inputs) -> np.ndarray | None:
    """Elements of a float -> int4/uint4/int2/uint2 ``Cast``/``CastLike`` whose value is out of the
    target's range: ONNX leaves them undefined, and onnx's reference (ml_dtypes) changed between
    versions (0.5 wraps modulo 2**bits, as qiao does; 0.7 gives 0), so they are not compared.
    Every in-range element still is. ``None`` for any other case."""
    import onnx

    nodes = [n for n in model.graph.node if n.op_type not in ("Constant",)]
    if not nodes or nodes[0].op_type not in ("Cast", "CastLike") or not inputs:
        return None
    x = np.asarray(inputs[0])
    if x.dtype.kind != "f" and "float" not in x.dtype.name:
        return None
    out_type = model.graph.output[0].type.tensor_type.elem_type
    bounds = _SUB_BYTE_INT.get(onnx.TensorProto.DataType.Name(out_type))
    if bounds is None:
        return None
    value = np.trunc(x.astype(np.float64))
    return ~((value >= bounds[0]) & (value <= bounds[1]))
