"""``compile`` and ``load``: the one entry point that the CLI, the tests and users share."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from qiao.compiler import artifact as art
from qiao.compiler.errors import QiaoError, ToolchainMissing

__version__ = "0.1.0"


@dataclass
class ResolvedModel:
    """A model in ONNX form plus where it came from."""

    proto: onnx.ModelProto
    name: str
    source: dict  # manifest "source" section
    spec: Any = None  # qiao.models.ModelSpec for built-in models
    decoder: dict | None = None  # the manifest's "decoder" section for a decoder source
    tokenizer_dir: str | None = None  # folder holding the decoder's tokenizer files
    # Where ``proto``'s weights still are, as external data (``load_onnx``'s ``keep_external``).
    external_dir: str | None = None


def _resolve_genai(
    folder: str, name: str, source: dict, keep_external: bool = False
) -> ResolvedModel:
    """A GenAI folder (genai_config.json + decoder file) as a decoder source."""
    from qiao.compiler import export_genai
    from qiao.compiler.frontend import load_onnx

    path, config = export_genai.read_genai_folder(folder)
    tokenizer = folder if export_genai.has_tokenizer(folder) else None
    decoder = export_genai.decoder_manifest(config, "tokenizer" if tokenizer else None)
    source = dict(source, path=os.path.abspath(path), folder=os.path.abspath(folder))
    proto = load_onnx(path, keep_external)
    external = os.path.dirname(os.path.abspath(path)) if keep_external else None
    return ResolvedModel(
        proto, name, source, decoder=decoder, tokenizer_dir=tokenizer, external_dir=external
    )


def _resolve_folder(
    folder: str, model_options: Mapping | None = None, keep_external: bool = False
) -> ResolvedModel:
    """A directory: an ONNX Runtime GenAI folder, or a Hugging Face Qwen3 / Qwen3-MoE folder
    (exported to a cached GenAI folder on the way; ``model_options`` may set its
    ``context_length``)."""
    from qiao.compiler import export_genai

    options = dict(model_options or {})
    unknown = sorted(set(options) - {"context_length"})
    if unknown:
        raise QiaoError(
            f"model option(s) {', '.join(map(repr, unknown))} do not apply to the folder "
            f"{folder}. fix: use only context_length (Hugging Face folders)"
        )

    name = os.path.basename(os.path.abspath(folder))
    if export_genai.is_genai_folder(folder):
        if options:
            raise QiaoError(
                f"{folder} is an ONNX Runtime GenAI folder: its context length is fixed by its "
                "genai_config.json. fix: drop the model options (or export it again)"
            )
        return _resolve_genai(folder, name, {"kind": "genai"}, keep_external)
    if export_genai.is_hf_folder(folder):
        context = options.get("context_length")
        exported = export_genai.hf_folder(folder, int(context) if context else None)
        source = {"kind": "huggingface", "hf_folder": os.path.abspath(folder)}
        return _resolve_genai(exported, name, source, keep_external)
    raise export_genai.DecoderSourceError(
        f"{folder} is a directory without genai_config.json or config.json. fix: pass an .onnx "
        "file, an ONNX Runtime GenAI folder (genai_config.json + model.onnx) or a Hugging Face "
        "Qwen3 / Qwen3-MoE folder (config.json + *.safetensors)"
    )


def resolve_model(
    model, example_args=None, model_options: Mapping | None = None, keep_external: bool = False
) -> ResolvedModel:
    """Turn a path, built-in name, ``ModelProto`` or ``torch.nn.Module`` into ONNX.

    ``keep_external``: weights an ONNX file keeps as external data stay there (``load_onnx``);
    ``external_dir`` then says where."""
    from qiao.compiler.frontend import load_onnx

    if isinstance(model, onnx.ModelProto):
        return ResolvedModel(model, model.graph.name or "model", {"kind": "onnx"})
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if os.path.isdir(path):
            return _resolve_folder(path, model_options, keep_external)
        if os.path.exists(path) or path.endswith(".onnx"):
            proto = load_onnx(path, keep_external)
            name = os.path.splitext(os.path.basename(path))[0]
            external = os.path.dirname(os.path.abspath(path)) if keep_external else None
            source = {"kind": "onnx", "path": os.path.abspath(path)}
            return ResolvedModel(proto, name, source, external_dir=external)
        from qiao.models import DecoderSpec, get_model

        spec = get_model(path, **dict(model_options or {}))
        if isinstance(spec, DecoderSpec):  # exported once to a cached GenAI folder
            from qiao.compiler import export_genai

            source = {"kind": "builtin", "name": spec.name, "options": dict(model_options or {})}
            folder = export_genai.builtin_folder(spec)
            resolved = _resolve_genai(folder, spec.name, source, keep_external)
            resolved.spec = spec
            return resolved
        options = dict(model_options or {})
        proto = _builtin_proto(spec, options)
        source = {"kind": "builtin", "name": spec.name, "options": options}
        return ResolvedModel(proto, spec.name, source, spec)
    import torch  # a dependency of qiao; imported here only to keep `import qiao` fast

    if isinstance(model, torch.nn.Module):
        if example_args is None:
            raise QiaoError(
                "compiling a torch.nn.Module needs example inputs. "
                "fix: pass example_args=(tensor, ...)"
            )
        proto = _export_to_proto(model, example_args)
        return ResolvedModel(
            proto, type(model).__name__.lower(), {"kind": "torch", "class": type(model).__name__}
        )
    raise QiaoError(
        f"cannot compile an object of type {type(model).__name__}. fix: pass a path to an .onnx "
        "file, a built-in model name, an onnx.ModelProto or a torch.nn.Module with example_args"
    )


def _export_to_proto(module, args, **kwargs) -> onnx.ModelProto:
    from qiao.compiler.export import export

    with tempfile.TemporaryDirectory(prefix="qiao-export-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        export(module, args, path, **kwargs)
        return onnx.load(path)  # loads external data too


# A built-in model's export is cached only below this much weight (a larger one is exported each
# time rather than copied into the cache), and the cache keeps its most recently used exports up to
# EXPORT_CACHE_TOTAL_BYTES.
BUILTIN_EXPORT_CACHE_BYTES = 1 << 30
EXPORT_CACHE_TOTAL_BYTES = 4 << 30


def _builtin_proto(spec, options: dict) -> onnx.ModelProto:
    """A built-in model's ONNX, exported once for its content and kept in
    ``$QIAO_CACHE_DIR/onnx``: the key hashes qiao's code, the exporting packages' versions, the
    options, and the weights and example inputs the builder made (torch's export of one small model
    takes seconds; the CLI and every test that names a built-in paid it each time)."""
    import torch

    from qiao.compiler.content_cache import cached_folder, code_fingerprint
    from qiao.compiler.fingerprint import dist_version
    from qiao.compiler.schedules.tuning import cache_dir

    kwargs = dict(
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_axes=spec.dynamic_axes,
    )
    tensors = [*spec.module.state_dict().items(), *enumerate(spec.example_inputs)]
    if (
        not all(isinstance(t, torch.Tensor) for _, t in tensors)
        or sum(t.numel() * t.element_size() for _, t in tensors) > BUILTIN_EXPORT_CACHE_BYTES
    ):
        return _export_to_proto(spec.module, spec.example_inputs, **kwargs)
    digest = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().reshape(-1).contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    key = {
        "builtin": spec.name,
        "options": options,
        "export": kwargs,
        "tensors": digest.hexdigest(),
        "code": code_fingerprint(),
        "versions": {p: dist_version(p) for p in ("torch", "torchvision", "onnxscript", "onnx")},
    }

    def make(tmp: str) -> None:
        from qiao.compiler.export import export

        export(spec.module, spec.example_inputs, os.path.join(tmp, "model.onnx"), **kwargs)

    root = os.path.join(cache_dir(), "onnx")
    folder = cached_folder(root, spec.name, key, make, max_bytes=EXPORT_CACHE_TOTAL_BYTES)
    return onnx.load(os.path.join(folder, "model.onnx"))  # loads external data too


def model_files_sha256(path: str) -> str:
    """sha256 of an ONNX file and the external data files it names, read by path in chunks (a
    model over 2 GB is never serialised to hash it)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from qiao.compiler.frontend import iter_tensors

    graph = onnx.load(path, load_external_data=False).graph
    base = os.path.dirname(os.path.abspath(path))
    locations = sorted(
        {ExternalDataInfo(t).location for t in iter_tensors(graph) if uses_external_data(t)}
    )
    digest = hashlib.sha256()
    for file in [path] + [os.path.join(base, loc) for loc in locations]:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def default_output_dir(model_name: str, target: str, arch: str | None) -> str:
    parts = [model_name, target] + ([arch] if arch else [])
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def compile(
    model,
    target: str = "cpu",
    output_dir: str | os.PathLike | None = None,
    *,
    arch: str | None = None,
    example_args=None,
    model_options: Mapping | None = None,
    **options,
) -> Artifact:
    """Compile a model for ``target`` into an artifact directory.

    Parameters
    ----------
    model : str, os.PathLike, onnx.ModelProto or torch.nn.Module
        An ``.onnx`` path, a built-in model name (``qiao models``), a ``ModelProto``, or a module
        (with ``example_args``).
    target : str
        A backend name (``qiao targets``).
    output_dir : str, optional
        Artifact directory; default ``<model>-<target>[-<arch>]`` in the working directory.
    arch : str, optional
        Device preset or chip name for the backend (``--arch``).
    example_args : tuple, optional
        Example inputs when ``model`` is a ``torch.nn.Module``.
    model_options : dict, optional
        Overrides for a built-in model's builder (e.g. ``{"batch": 8}``).
    **options
        Compile options (``qiao.compiler.options.CompileOptions``: ``dump_ir``,
        ``initializer_inputs``, ``tune``, ``trials``, ``tune_dims``, ``tuning_db``,
        ``use_tuning_db``, ``moe_schedule``, ``static_dims``, ``dim_ranges``, ``kv_cache``,
        ``quantize``, ``dtype``); an unknown name or a value of the wrong kind raises
        ``QiaoError`` listing the valid ones.

    Returns
    -------
    Artifact
    """
    from qiao.backends import get_backend
    from qiao.compiler.frontend import fits_protobuf, import_onnx, save_proto
    from qiao.compiler.options import CompileOptions

    caller_options = set(options)
    options = CompileOptions.from_kwargs(options)  # a misspelt option fails before any work
    backend = get_backend(target)
    if arch is not None:
        backend.target(arch)  # reject an unknown arch before any slow work
    availability = backend.availability()
    if not availability.can_compile:
        raise ToolchainMissing(
            f"backend {target!r} cannot compile on this machine: {'; '.join(availability.missing)}"
        )
    # Weights stay in their external data files (mapped, never copied) unless quantization or a
    # hand-off backend reads them from the proto.
    keep_external = backend.imports_relax and options.quantize is None and options.dtype is None
    resolved = resolve_model(model, example_args, model_options, keep_external)
    quantization = None
    if options.quantize is not None:  # before import: ONNX Runtime validates the same graph
        from qiao.compiler.quantize import quantize_model

        resolved.proto, quantization = quantize_model(resolved.proto, options.quantize)
    weights_dtype = None
    if options.dtype is not None:  # before import, like quantize: ONNX Runtime runs the same graph
        from qiao.compiler.frontend.cast_dtype import cast_weights

        resolved.proto, weights_dtype = cast_weights(resolved.proto, options.dtype)
    # A decoder without GroupQueryAttention joins its cache in the graph (Concat of past and new
    # rows, GenAI's past_present_share_buffer false): the generator grows the cache by `present`.
    concat_cache = resolved.decoder is not None and not any(
        node.op_type == "GroupQueryAttention" for node in resolved.proto.graph.node
    )
    if resolved.decoder is not None and "kv_cache" not in caller_options:
        # decoder sources run with GenAI's shared buffer: present written in place
        options = CompileOptions.from_kwargs(options, kv_cache="inplace")
    if resolved.decoder is not None:
        from qiao.compiler.frontend.decoder_graph import last_token_logits

        # generation reads one row per entry: the LM head runs on that row only
        logits_rows = "last" if last_token_logits(resolved.proto) else "all"
    imported = import_onnx(
        resolved.proto,
        to_relax=backend.imports_relax,
        initializer_inputs=options.initializer_inputs,
        kv_cache=options.kv_cache,
        external_dir=resolved.external_dir,
    )
    _check_dim_ranges(options.dim_ranges, imported.inputs)
    out = os.fspath(output_dir) if output_dir else default_output_dir(resolved.name, target, arch)
    source = dict(resolved.source, sha256=None)
    if "path" in source and os.path.isfile(source["path"]):
        source["sha256"] = model_files_sha256(source["path"])
    elif fits_protobuf(resolved.proto):
        source["sha256"] = hashlib.sha256(resolved.proto.SerializeToString()).hexdigest()

    import tvm

    with art.staging_dir(out) as tmp:
        # The model as compiled (initializer inputs resolved): the ONNX Runtime reference must
        # take the same inputs as the artifact.
        save_proto(imported.proto, os.path.join(tmp, art.SOURCE_MODEL), imported.external_dir)
        param_names = art.save_params(tmp, imported.params) if imported.params else []
        if resolved.tokenizer_dir is not None:
            from qiao.compiler.export_genai import copy_tokenizer

            copy_tokenizer(resolved.tokenizer_dir, os.path.join(tmp, "tokenizer"))
        backend_section = backend.build(imported, arch, tmp, options)
        target_obj = backend.target(arch)
        manifest = {
            "format_version": art.FORMAT_VERSION,
            "qiao_version": __version__,
            "tvm_version": tvm.__version__,
            "model": resolved.name,
            "source": source,
            "backend": dict(
                backend_section, name=backend.name, arch=arch or backend.default_preset
            ),
            "target": _target_json(target_obj),
            "inputs": [s.to_json() for s in imported.inputs],
            "outputs": [s.to_json() for s in imported.outputs],
            "params": {"file": art.PARAMS if param_names else None, "names": param_names},
            "initializer_inputs": {
                "taken_as": imported.initializer_inputs_as,
                "names": imported.initializer_inputs,
            },
            "validation": None,
        }
        if quantization is not None:
            manifest["quantization"] = quantization
        if weights_dtype is not None:
            manifest["dtype"] = _tensor_core_compute(weights_dtype, target_obj)
        if options.dim_ranges:
            manifest["dim_ranges"] = {
                k: [int(lo), int(hi)] for k, (lo, hi) in options.dim_ranges.items()
            }
        if resolved.decoder is not None:
            kv_cache = "concat" if concat_cache else options.get("kv_cache") or "copy"
            manifest["decoder"] = dict(resolved.decoder, kv_cache=kv_cache, logits=logits_rows)
        manifest = art.write_manifest(tmp, manifest)
    artifact = Artifact(os.path.abspath(out), manifest)
    # Hand-off backends without their vendor toolchain raise here: the package is complete and kept.
    backend.after_write(artifact.directory, manifest)
    return artifact


def _tensor_core_compute(section: dict, target) -> dict:
    """The manifest's ``dtype`` section for ``target``: where its tensor cores take the weights'
    dtype (``FoldWeightCasts`` on CUDA), GEMM activations are rounded to it at the GEMM input and
    only the accumulation stays float32; ``qiao validate`` widens its default tolerance by that."""
    from qiao.compiler.schedules.gpu import tensor_core_dtypes

    dtype = section.get("weights")
    if isinstance(target, Mapping) or dtype not in tensor_core_dtypes(target):
        return section
    note = (
        f"weights {dtype}; tensor-core GEMMs round their activations to {dtype} at the input "
        "and accumulate in float32; everything else computes float32"
    )
    return dict(section, compute=f"{dtype} GEMM inputs, float32 elsewhere", note=note)


def _target_json(target) -> Any:
    """TVM's JSON form of a target (its ``str`` is JSON in TVM 0.27); vendor targets are dicts."""
    import json

    if isinstance(target, Mapping):
        return dict(target)
    return {k: v for k, v in json.loads(str(target)).items() if v != ""}


def load(directory: str | os.PathLike) -> Artifact:
    """Open an artifact directory, checking its format version and file hashes."""
    directory = os.path.abspath(os.fspath(directory))
    return Artifact(directory, art.read_manifest(directory))


class Artifact:
    """A compiled model on disk. ``run`` executes it on the backend's device.

    Thread safety: ``run`` may be called from any number of threads at once; the calls take turns
    (a lock per artifact: TVM's Relax VM keeps its registers in the VM object, so two calls at
    once on one VM corrupt each other). For parallel calls, load the artifact once per thread.
    ``runner`` and ``generate`` take no lock: one thread at a time."""

    def __init__(self, directory: str, manifest: dict):
        self.directory = directory
        self.manifest = manifest
        self._runner = None
        self._lock = threading.Lock()

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["outputs"]

    @property
    def backend(self):
        from qiao.backends import get_backend

        return get_backend(self.manifest["backend"]["name"])

    @property
    def runner(self):
        if self._runner is None:
            self._runner = _load_runner(self.backend, self.directory, self.manifest)
        return self._runner

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return art.check_inputs(self.inputs, inputs, self.manifest.get("dim_ranges"))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. ``inputs`` maps every input name to an array of the manifest's dtype/shape."""
        from qiao.compiler.frontend import lowprec

        ordered = self.check_inputs(inputs)
        # float8/float4/int4/int2 tensors run as their storage type (see ``lowprec``).
        with self._lock:  # one call at a time on this artifact's VM (see the class docstring)
            outputs = self.runner.run(lowprec.inputs_to_storage(self.inputs, ordered))
        outputs = lowprec.outputs_from_storage(self.outputs, outputs)
        return dict(zip([o["name"] for o in self.outputs], outputs))

    def random_inputs(
        self, seed: int = 0, dims: Mapping[str, int] | None = None
    ) -> dict[str, np.ndarray]:
        """Seeded random inputs that fit the manifest; symbolic dims take ``dims`` or 2 (the
        nearest size in a compiled ``dim_ranges`` range)."""
        ranges = self.manifest.get("dim_ranges") or {}
        defaults = {k: min(max(2, lo), hi) for k, (lo, hi) in ranges.items()}
        return random_inputs(self.inputs, seed, dict(defaults, **(dims or {})))

    def generate(self, prompts, max_new_tokens: int = 64, **options):
        """Generate tokens with a decoder artifact: ``qiao.compiler.generate.Generator``'s
        ``generate`` (prompts: one list of token ids or a ragged batch of them)."""
        from qiao.compiler.generate import Generator

        if getattr(self, "_generator", None) is None:
            self._generator = Generator(self)
        return self._generator.generate(prompts, max_new_tokens, **options)

    def __repr__(self) -> str:
        return f"Artifact({self.directory!r}, backend={self.manifest['backend']['name']!r})"


def _load_runner(backend, directory: str, manifest: dict):
    """``backend.load``; a library or weights file that will not load (damaged in a way its hash
    did not catch: rewritten along with the manifest) is ``ArtifactCorrupt``, not a crash."""
    try:
        return backend.load(directory, manifest)
    except QiaoError:
        raise
    except Exception as err:  # TVM's loader, numpy's npz reader: a damaged file
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else "no detail"
        raise art.ArtifactCorrupt(
            f"artifact {directory} does not load ({type(err).__name__}: {detail[:300]}). "
            "fix: recompile the model"
        ) from err


def random_inputs(
    specs, seed: int = 0, dims: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    from qiao.compiler.frontend import lowprec

    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    _check_random_sizes(specs, dims)
    out = {}
    for spec in specs:
        shape = tuple(d if isinstance(d, int) else int(dims.get(d, 2)) for d in spec["shape"])
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[spec["name"]] = rng.integers(0, 8, shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec["name"]] = rng.integers(0, 2, shape).astype(bool)
        elif (low := lowprec.random_array(rng, shape, spec["dtype"])) is not None:
            out[spec["name"]] = low  # float8/float4/int4/int2 (ml_dtypes, NumPy kind "V")
        else:
            raise QiaoError(
                f"cannot make random inputs of dtype {dtype} for {spec['name']!r}; pass --inputs"
            )
    return out


def _check_dim_ranges(ranges: Mapping[str, tuple] | None, specs) -> None:
    """Refuse a ``dim_ranges`` entry naming no symbolic dimension of the model's inputs."""
    symbolic = sorted({d for s in specs for d in s.shape if isinstance(d, str)})
    unknown = sorted(set(ranges or {}) - set(symbolic))
    if unknown:
        have = ", ".join(symbolic) or "none (all static)"
        raise QiaoError(
            f"dim_ranges names {', '.join(map(repr, unknown))}, which the model's inputs do not "
            f"have. fix: range its symbolic dimensions: {have}"
        )


def _check_random_sizes(specs, dims: Mapping[str, int]) -> None:
    """Refuse random inputs that would not fit in this machine's memory (or a negative or
    non-integer dim) before allocating any, naming the size."""
    from qiao.compiler.frontend.guards import format_bytes, host_memory_bytes
    from qiao.compiler.frontend.lowprec import ml_dtype

    bad = {k: v for k, v in dims.items() if not isinstance(v, int) or v < 0}
    if bad:
        raise QiaoError(f"dimension sizes must be whole numbers >= 0, got {bad}. fix: --dim NAME=4")
    total = 0
    for spec in specs:
        shape = [d if isinstance(d, int) else int(dims.get(d, 2)) for d in spec["shape"]]
        total += int(np.prod(shape, dtype=object)) * ml_dtype(spec["dtype"]).itemsize
    if total > host_memory_bytes():
        raise QiaoError(
            f"random inputs of these sizes take {format_bytes(total)}, more than this machine's "
            f"{format_bytes(host_memory_bytes())}; refused before allocating them. fix: smaller "
            "--dim values"
        )
