"""Validation: run an artifact, compare with ONNX Runtime (always) and PyTorch eager (built-ins)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from qiao.compiler import artifact as art
from qiao.compiler.errors import QiaoError, ToolchainMissing, ValidationMismatch

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-4


@dataclass
class Comparison:
    """One output against one reference."""

    output: str
    reference: str
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    ok: bool
    note: str = ""


@dataclass
class ValidationReport:
    artifact: str
    backend: str
    comparisons: list[Comparison] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # references that could not run, with why
    # quantized artifacts: the error against the float model, reported, not a pass/fail check
    vs_float: list[Comparison] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.comparisons) and all(c.ok for c in self.comparisons)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "backend": self.backend,
            "comparisons": [c.__dict__ for c in self.comparisons],
            "skipped": self.skipped,
            "vs_float_model": [c.__dict__ for c in self.vs_float],
        }

    def format(self) -> str:
        header = f"{'output':<20} {'reference':<12} {'max abs err':>12} {'max rel err':>12}"
        lines = [f"{header}  {'tolerance':<16} verdict"]
        for c in self.comparisons:
            tol = f"rtol={c.rtol:g} atol={c.atol:g}"
            verdict = "ok" if c.ok else "MISMATCH" + (f" ({c.note})" if c.note else "")
            row = f"{c.output:<20} {c.reference:<12} {c.max_abs:>12.3e} {c.max_rel:>12.3e}"
            lines.append(f"{row}  {tol:<16} {verdict}")
        for s in self.skipped:
            lines.append(f"(not compared: {s})")
        for c in self.vs_float:  # quantization error: what the scheme costs, not a verdict
            if c.note:  # e.g. a decoder compiled to last-token logits vs the file's full ones
                lines.append(
                    f"(vs the float model, {c.reference}: {c.output} not compared: {c.note})"
                )
                continue
            lines.append(
                f"(quantized weights vs the float model, {c.reference}: {c.output} max abs err "
                f"{c.max_abs:.3e}, max rel err {c.max_rel:.3e}; not a pass/fail check)"
            )
        lines.append(f"{'PASS' if self.ok else 'FAIL'}: {self.artifact} [{self.backend}]")
        return "\n".join(lines)


def compare(name: str, reference: str, actual, expected, rtol: float, atol: float) -> Comparison:
    """Compare two arrays the way ``assert_close`` does: shape, then dtype, then values."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    mismatch = None
    if actual.shape != expected.shape:
        mismatch = f"shape {actual.shape} vs {expected.shape}"
    elif actual.dtype != expected.dtype:
        mismatch = f"dtype {actual.dtype} vs {expected.dtype}"
    if mismatch:
        inf = float("inf")
        return Comparison(name, reference, inf, inf, rtol, atol, False, mismatch)
    if actual.size == 0:
        return Comparison(name, reference, 0.0, 0.0, rtol, atol, True)
    if actual.dtype.kind in "biu":
        diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
        ok = bool((diff == 0).all())
        return Comparison(name, reference, float(diff.max()), float(diff.max()), 0, 0, ok)
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    nan_mismatch = np.isnan(a) != np.isnan(e)
    finite = np.isfinite(a) & np.isfinite(e)
    inf_mismatch = ~finite & ~np.isnan(a) & ~np.isnan(e) & (a != e)
    diff = np.where(finite, np.abs(a - e), 0.0)
    rel = diff / np.maximum(np.abs(e), np.finfo(np.float32).tiny)
    ok = bool(((diff <= atol + rtol * np.abs(np.where(finite, e, 0))) | ~finite).all())
    ok = ok and not nan_mismatch.any() and not inf_mismatch.any()
    note = "NaN/inf pattern differs" if (nan_mismatch.any() or inf_mismatch.any()) else ""
    return Comparison(name, reference, float(diff.max()), float(rel.max()), rtol, atol, ok, note)


def onnxruntime_reference(
    model_path: str, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """ONNX Runtime's outputs on the CPU (``qiao.compiler.bench.OnnxRuntimeEngine``)."""
    from qiao.compiler.bench.engines import HOST, OnnxRuntimeEngine

    return OnnxRuntimeEngine(model_path, HOST).outputs(inputs)


def torch_reference(
    source: Mapping, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray] | None:
    """Eager PyTorch outputs for a built-in model (rebuilt from its seed), else ``None``
    (``qiao.compiler.bench.TorchEngine`` on the CPU)."""
    if source.get("kind") != "builtin":
        return None
    from qiao.compiler.bench.engines import HOST, TorchEngine

    return TorchEngine(source, HOST).outputs(inputs)


def example_inputs(artifact) -> dict[str, np.ndarray]:
    """The built-in model's own example inputs, or seeded random inputs that fit the manifest."""
    source = artifact.manifest.get("source", {})
    if artifact.manifest.get("decoder"):  # random masks and caches are no decoder step
        from qiao.compiler.export_genai import example_feeds

        return example_feeds(artifact.inputs, artifact.manifest["decoder"])
    if source.get("kind") == "builtin":
        from qiao.models import get_model

        spec = get_model(source["name"], **source.get("options", {}))
        return {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs)}
    return artifact.random_inputs()


# Default tolerance when GEMM activations are rounded to a half dtype (tensor-core GEMMs: the
# manifest's dtype.compute names it): a few roundings of 2^-11 (float16) or 2^-8 (bfloat16) through
# the model's layers, against the float32-compute reference.
HALF_ACTIVATION_TOLERANCE = {"float16": 5e-3, "bfloat16": 3e-2}


def tolerances(artifact, rtol: float | None, atol: float | None) -> tuple[float, float]:
    source = artifact.manifest.get("source", {})
    d_rtol, d_atol = DEFAULT_RTOL, DEFAULT_ATOL
    if source.get("kind") == "builtin":
        from qiao.models import get_model

        spec = get_model(source["name"], **source.get("options", {}))
        d_rtol, d_atol = spec.rtol, spec.atol
    compute = str((artifact.manifest.get("dtype") or {}).get("compute", ""))
    half = HALF_ACTIVATION_TOLERANCE.get(compute.split(" ", 1)[0])
    if half is not None:
        d_rtol, d_atol = max(d_rtol, half), max(d_atol, half)
    return (rtol if rtol is not None else d_rtol, atol if atol is not None else d_atol)


def load_inputs(path: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file by name. A damaged file (truncated, bad CRC, an array header
    declaring more bytes than the file holds, pickled objects) is a ``QiaoError`` raised before
    anything it declares is allocated."""
    import zipfile
    import zlib

    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array (an .npy file), not named arrays")
        with data:
            out = {}
            for key in data.files:
                _check_npz_member(data.zip, key)
                out[key] = data[key]
            return out
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise QiaoError(
            f"cannot read inputs from {path}: {type(err).__name__}: {err}. fix: pass an .npz "
            "written by numpy.savez"
        ) from err


def _check_npz_member(archive, key: str) -> None:
    """Refuse an array whose ``.npy`` header declares more bytes than its zip member holds."""
    name = key if key in archive.namelist() else f"{key}.npy"
    size = archive.getinfo(name).file_size
    with archive.open(name) as f:
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(f)
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > size:
        raise ValueError(
            f"array {key!r} declares shape {shape} of {dtype} ({declared} bytes) but holds "
            f"{size} bytes"
        )


def validate(
    model,
    target: str = "cpu",
    inputs: Mapping[str, np.ndarray] | str | None = None,
    *,
    arch: str | None = None,
    output_dir: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    raise_on_mismatch: bool = False,
    **compile_options,
) -> ValidationReport:
    """Compile (unless ``model`` is an artifact directory), run, and compare with the references.

    Parameters
    ----------
    model : str, os.PathLike, Artifact or anything ``compile`` takes
    target : str
        Backend to compile for when ``model`` is not an artifact yet.
    inputs : dict or str, optional
        Input arrays or an ``.npz`` path; default: the built-in model's example inputs, else seeded
        random ones.
    rtol, atol : float, optional
        Tolerances; default: the built-in model's own, else 1e-4 / 1e-4.

    Returns
    -------
    ValidationReport
        Also recorded in the artifact's manifest.
    """
    from qiao.compiler.driver import Artifact, compile, load

    if isinstance(model, Artifact):
        artifact = model
    elif isinstance(model, (str, os.PathLike)) and os.path.isfile(
        os.path.join(os.fspath(model), art.MANIFEST)
    ):  # an artifact; other directories are decoder sources (GenAI / Hugging Face folders)
        artifact = load(model)
    else:
        artifact = compile(model, target, output_dir, arch=arch, **compile_options)

    if isinstance(inputs, (str, os.PathLike)):
        inputs = load_inputs(os.fspath(inputs))
    if inputs is None:
        inputs = example_inputs(artifact)
    rtol, atol = tolerances(artifact, rtol, atol)

    backend_name = artifact.manifest["backend"]["name"]
    availability = artifact.backend.availability()
    if not availability.can_run:
        raise ToolchainMissing(
            f"cannot validate on {backend_name!r} here: "
            f"{'; '.join(availability.missing) or 'no device'}. The artifact is ready in "
            f"{artifact.directory}; copy it to a machine with the device and run "
            f"`qiao validate {artifact.directory}` there"
        )
    from qiao.compiler.bench.engines import QiaoEngine

    actual = QiaoEngine(artifact).outputs(inputs)
    report = ValidationReport(artifact.directory, backend_name)

    ordered_inputs = dict(zip([s["name"] for s in artifact.inputs], artifact.check_inputs(inputs)))
    references = {"onnxruntime": None, "torch": None}
    try:
        references["onnxruntime"] = onnxruntime_reference(
            os.path.join(artifact.directory, art.SOURCE_MODEL), ordered_inputs
        )
    except Exception as err:  # ORT lacks some ops or dtypes; say so instead of failing validation
        report.skipped.append(
            f"onnxruntime could not run the model: {str(err).splitlines()[0][:200]}"
        )
    if not artifact.manifest.get("decoder"):  # a decoder's torch model is transformers' (KV cache)
        references["torch"] = torch_reference(artifact.manifest.get("source", {}), ordered_inputs)
    if artifact.manifest.get("quantization") or artifact.manifest.get("dtype"):
        # The ONNX Runtime reference ran the quantized (or half-precision weight) graph; the
        # float model (PyTorch eager, or the original .onnx in ONNX Runtime) measures the
        # quantization (rounding) error instead.
        float_refs = {"torch": references.pop("torch")}
        source = artifact.manifest.get("source", {})
        if float_refs["torch"] is None and os.path.isfile(source.get("path") or ""):
            float_refs = {"onnxruntime": onnxruntime_reference(source["path"], ordered_inputs)}
        for ref_name, ref in float_refs.items():
            for name, value in actual.items():
                if ref is not None and name in ref:
                    c = compare(name, f"float {ref_name}", value, ref[name], rtol, atol)
                    report.vs_float.append(c)
    for ref_name, ref in references.items():
        if ref is None:
            continue
        for name, value in actual.items():
            if name in ref:
                report.comparisons.append(compare(name, ref_name, value, ref[name], rtol, atol))
    if not report.comparisons:
        report.skipped.append("no reference could run; nothing was compared")
    art.record_validation(artifact.directory, report.to_json())
    if raise_on_mismatch and not report.ok:
        raise ValidationMismatch(report.format())
    return report
