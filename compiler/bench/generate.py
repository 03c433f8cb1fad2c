"""``qiao bench SOURCE --generate``: token-level timings of a decoder on every engine that can run
it, in the result document of ``qiao bench`` (``schema``).

Engines (``GENERATE_ENGINES``), each a ``DecodeEngine``:

- ``qiao``: ``qiao.compiler.generate.Generator`` on the compiled artifact;
- ``ort-genai``: ONNX Runtime GenAI (``og.Model`` / ``og.Generator``, greedy) on the same ONNX file
  the artifact was compiled from (its ``model.onnx`` beside the manifest's ``genai_config``);
- ``transformers``: ``generate`` (greedy, float32, eager attention, ``use_cache``) on the Hugging
  Face weights the decoder was made from (a Hugging Face folder source, ``hf_dir``, or a built-in's
  transformers model).

Each engine runs in its own Python process, one per case, so that its peak RSS is its own and the
memory of one (a 7 GB model) is freed before the next starts. Every engine gets the same seeded
random prompts, generates exactly ``new_tokens`` tokens (end-of-sequence disabled) after one
untimed warm-up generation, and reports time to first token (prefill plus the first token),
the per-step decode times (their median is the time per output token) and decode tokens/s. The
greedy tokens of every baseline are compared with qiao's.

The roofline: decoding one token reads every weight a token touches once, so tokens/s cannot
exceed measured bandwidth / bytes of weights per token (``decode_weight_bytes``); each engine's
tokens/s is reported as a fraction of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qiao.compiler.bench.engines import Engine
from qiao.compiler.errors import QiaoError, ToolchainMissing

GENERATE_ENGINES = ("qiao", "ort-genai", "transformers")
SLOW_ENGINE_RUNS = {"transformers": 1}  # timed generations at most, whatever ``runs`` says
RESULT_MARK = "QIAO-BENCH-GENERATE "  # prefix of the worker's result line on stdout
GENERATE_DEFINITIONS = {
    "ttft_s": "time to first token: the prefill over the prompt and the choice of the first new "
    "token, seconds (one timed generation after one untimed warm-up generation)",
    "tpot_s": "time per output token: median of the decode steps' seconds (each step makes one "
    "token for every prompt of the batch); latency_s summarises the same steps",
    "tokens_per_s": "decode throughput: batch * decode steps / their total seconds",
    "peak_rss_mib": "peak RSS of the engine's own process (Linux VmHWM over its lifetime: "
    "imports, model load, warm-up and timed generations)",
    "weight_bytes_per_token": "bytes of weights one decode step reads: every MatMul/Gemm weight "
    "(lm_head included), and for com.microsoft MoE nodes only k of E experts' weights; "
    "embedding rows, norms and the KV cache are not counted",
    "roofline_tokens_per_s": "measured bandwidth (roofs.bandwidth_gbs, the better of a "
    "measurement before and one after the engines) * batch / "
    "weight_bytes_per_token: the decode rate if weights streamed at that bandwidth",
    "roofline_fraction": "an engine's tokens_per_s / roofline_tokens_per_s",
    "speedup": "baseline tpot_s / qiao tpot_s (>1: qiao decodes faster)",
    "check": "greedy tokens of the baseline equal to qiao's (matching: the length of the common "
    "prefix per prompt)",
}


# --- engines (run inside the worker process) -----------------------------------------------------
@dataclass
class DecodeRun:
    """One generation: new tokens per prompt, time to first token, seconds per decode step."""

    tokens: list[list[int]]
    ttft_s: float
    decode_s: list[float] = field(default_factory=list)


class DecodeEngine(Engine):
    """An engine that generates: ``generate(prompts, new_tokens)`` → ``DecodeRun``. ``prepare``
    and ``outputs`` (the ``Engine`` interface) take ``{"input_ids": (B, S) array}``."""

    new_tokens = 1

    def generate(self, prompts: list[list[int]], new_tokens: int) -> DecodeRun:
        """Greedy generation of exactly ``new_tokens`` tokens after each prompt."""
        raise NotImplementedError

    def prepare(self, inputs):
        prompts = np.asarray(inputs["input_ids"]).tolist()
        return lambda: self.generate(prompts, self.new_tokens)

    def outputs(self, inputs):
        run = self.generate(np.asarray(inputs["input_ids"]).tolist(), self.new_tokens)
        return {"tokens": np.asarray(run.tokens, np.int64)}


class QiaoDecode(DecodeEngine):
    """qiao's ``Generator`` on a decoder artifact."""

    name = "qiao"

    def __init__(self, artifact_dir: str):
        from qiao.compiler.driver import load
        from qiao.compiler.generate import Generator

        self.generator = Generator(load(artifact_dir))
        runner = self.generator.artifact.runner  # load the module now, not in the first timing
        self.info = {
            "runner": type(runner).__name__,
            "threads": os.environ.get("TVM_NUM_THREADS", "TVM default"),
            "kv_cache": self.generator.info.kv_cache,
        }

    def generate(self, prompts, new_tokens):
        res = self.generator.generate(prompts, new_tokens, eos_token_id=[])
        return DecodeRun(res.tokens, res.ttft_s, list(res.decode_s))


class OrtGenaiDecode(DecodeEngine):
    """ONNX Runtime GenAI's ``Generator`` on a GenAI folder, greedy."""

    name = "ort-genai"

    def __init__(self, folder: str):
        try:
            import onnxruntime_genai as og
        except ImportError as err:
            raise ToolchainMissing(
                f"onnxruntime-genai is not installed ({err}). fix: pip install onnxruntime-genai"
            ) from None
        self.og = og
        self.model = og.Model(folder)
        self.info = {"version": og.__version__, "folder": folder}

    def generate(self, prompts, new_tokens):
        og = self.og
        ids = np.asarray(prompts, np.int32)
        total = ids.shape[1] + new_tokens
        params = og.GeneratorParams(self.model)
        # min_length keeps end-of-sequence out until the last token: every engine makes as many
        params.set_search_options(
            max_length=total, min_length=total, do_sample=False, batch_size=len(ids)
        )
        # the timer starts after the KV buffers are allocated, as qiao's Generator's does
        gen = og.Generator(self.model, params)
        start = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        out = [np.asarray(gen.get_next_tokens()).reshape(-1)]
        ttft, steps = time.perf_counter() - start, []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            gen.generate_next_token()
            out.append(np.asarray(gen.get_next_tokens()).reshape(-1))
            steps.append(time.perf_counter() - start)
        tokens = np.stack(out, axis=1)
        return DecodeRun([[int(t) for t in row] for row in tokens], ttft, steps)


class TransformersDecode(DecodeEngine):
    """transformers' ``generate`` (greedy, float32, eager attention, ``use_cache``); the step
    times come from a streamer, called once per new token right after it is chosen."""

    name = "transformers"

    def __init__(
        self,
        hf_dir: str | None = None,
        builtin: str | None = None,
        builtin_options: Mapping[str, Any] | None = None,
    ):
        import torch
        import transformers

        self.torch = torch
        if hf_dir:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                hf_dir, torch_dtype=torch.float32, attn_implementation="eager"
            )
        else:
            model = builtin_hf_model(builtin, builtin_options)
        self.model = model.float().eval()
        self.model.config._attn_implementation = "eager"
        self.info = {
            "version": transformers.__version__,
            "threads": torch.get_num_threads(),
            "attention": "eager",
        }

    def generate(self, prompts, new_tokens):
        torch = self.torch
        ids = torch.tensor(prompts, dtype=torch.int64)
        stamps: list[float] = []

        class Clock:  # transformers' BaseStreamer interface: put(prompt), then put(token) per step
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                streamer=Clock(),
                pad_token_id=self.model.config.pad_token_id or 0,
            )
        times = stamps[1:]  # stamps[0]: the prompt, before any work
        steps = [b - a for a, b in zip(times, times[1:])]
        tokens = out[:, ids.shape[1] :].tolist()
        return DecodeRun(tokens, times[0] - start, steps)


def builtin_hf_model(name: str | None, options: Mapping[str, Any] | None = None):
    """The transformers model a built-in decoder was exported from (same seed, same weights)."""
    from qiao.models import get_model

    if not name:
        raise QiaoError(
            "transformers needs the Hugging Face weights of this decoder. fix: pass --hf-dir "
            "with the folder the model was made from, or bench a built-in or Hugging Face folder"
        )
    spec = get_model(name, **dict(options or {}))
    model = getattr(spec, "hf_model", None)  # DecoderSpec: built from its config and seed
    if model is None or not hasattr(model, "generate"):
        raise QiaoError(f"built-in {name!r} has no transformers model to run. fix: pass --hf-dir")
    return model


def make_engine(spec: Mapping[str, Any]) -> DecodeEngine:
    """The engine a worker spec names (``engine`` plus where its model is)."""
    name = spec["engine"]
    if name == "qiao":
        return QiaoDecode(spec["artifact"])
    if name == "ort-genai":
        return OrtGenaiDecode(spec["genai_dir"])
    if name == "transformers":
        return TransformersDecode(
            spec.get("hf_dir"), spec.get("builtin"), spec.get("builtin_options")
        )
    raise QiaoError(f"unknown engine {name!r}. fix: use any of {', '.join(GENERATE_ENGINES)}")


def _hwm_mib() -> float | None:
    """This process's peak RSS so far (VmHWM). Not ``getrusage``: Linux carries the parent's
    ``ru_maxrss`` into a child across fork and exec, so a small worker would report its parent's."""
    from qiao.compiler.bench.memory import _status_kib

    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024.0


def run_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    """In the engine's own process: load, warm up, time ``runs`` generations; the measurements."""
    from qiao.compiler.bench.memory import PeakRSS

    start = time.perf_counter()
    engine = make_engine(spec)
    load_s = time.perf_counter() - start
    prompts, new_tokens = spec["prompts"], int(spec["new_tokens"])
    engine.generate(prompts, min(new_tokens, 4))  # warm-up: threads, allocators, first-call work
    before = _hwm_mib()  # PeakRSS resets the high-water mark: keep the load's peak
    runs = []
    with PeakRSS() as mem:
        for _ in range(int(spec.get("runs", 1))):
            runs.append(engine.generate(prompts, new_tokens))
    peaks = [p for p in (before, _hwm_mib()) if p is not None]
    return {
        "engine": engine.name,
        "info": dict(engine.info),
        "load_s": load_s,
        "tokens": runs[-1].tokens,
        "ttft_s": [r.ttft_s for r in runs],
        "decode_s": [s for r in runs for s in r.decode_s],
        "peak_rss_mib": max(peaks) if peaks else None,
        "peak_rss_delta_mib": mem.delta_mib,
    }


def _worker_main(argv: Sequence[str]) -> int:
    with open(argv[0]) as f:
        spec = json.load(f)
    try:
        result = run_worker(spec)
    except QiaoError as err:
        result = {"error": str(err)}
    except Exception as err:  # reported as a note by the parent: one engine failing is not fatal
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def _run_here(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``run_worker`` in this process, errors as ``{"error": ...}`` like a worker's."""
    try:
        return run_worker(spec)
    except QiaoError as err:
        return {"error": str(err)}


def run_in_subprocess(spec: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``run_worker(spec)`` in a fresh Python process; its result (or ``{"error": ...}``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(dict(spec), f)
        path = f.name
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "qiao.compiler.bench.generate", path],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    finally:
        os.unlink(path)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited {proc.returncode}: {' | '.join(tail)[:400]}"}


# --- what the engines run on ---------------------------------------------------------------------
def decode_weight_bytes(proto) -> dict[str, int]:
    """Bytes of weights one decode step reads (see ``GENERATE_DEFINITIONS``): ``{"dense",
    "experts", "total"}``. ``proto`` may be shape-only (``cost.shape_only``): only dims are read."""
    from onnx import helper

    inits = {}
    for t in proto.graph.initializer:
        size = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        inits[t.name] = int(np.prod(t.dims, dtype=np.int64)) * size
    producer = {out: node for node in proto.graph.node for out in node.output}

    def weight(name: str) -> tuple[str | None, int]:
        # a weight may reach the MatMul through a Transpose/Reshape/Cast (tied embeddings)
        for _ in range(8):
            if name in inits:
                return name, inits[name]
            node = producer.get(name)
            if node is None or node.op_type not in ("Transpose", "Reshape", "Cast", "Identity"):
                return None, 0
            name = node.input[0]
        return None, 0

    seen: set[str] = set()
    dense = experts = 0
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits"):
            names = node.input[1:4] if node.op_type == "MatMulNBits" else node.input[1:2]
            for name in names:
                found, size = weight(name) if name else (None, 0)
                if found and found not in seen:
                    seen.add(found)
                    dense += size
        elif node.op_type == "MoE" and node.domain == "com.microsoft":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            k = int(attrs.get("k", 1))
            for name in node.input[2:8]:
                found, size = weight(name) if name else (None, 0)
                if found and found not in seen:
                    seen.add(found)
                    shape = next(t.dims for t in proto.graph.initializer if t.name == found)
                    num = shape[0] if shape else 1
                    experts += size * min(k, num) // max(num, 1)
    return {"dense": dense, "experts": experts, "total": dense + experts}


def genai_folder_for(artifact, workdir: str) -> str:
    """A GenAI folder for ONNX Runtime GenAI on the artifact's own ONNX file: the source folder
    when the artifact was compiled from one, else ``workdir`` with the manifest's
    ``genai_config.json``, the tokenizer files and links to the artifact's model.onnx and its
    external data."""
    from qiao.compiler import artifact as art

    decoder = artifact.manifest.get("decoder") or {}
    source = artifact.manifest.get("source") or {}
    path = source.get("path")
    for folder in (path, os.path.dirname(path) if path else None):
        if folder and os.path.isfile(os.path.join(folder, "genai_config.json")):
            return folder
    config = decoder.get("genai_config")
    if not config:
        raise QiaoError(
            "the artifact's manifest has no genai_config, so ONNX Runtime GenAI cannot run its "
            "model. fix: compile a decoder source (a GenAI folder, Hugging Face folder or built-in)"
        )
    os.makedirs(workdir, exist_ok=True)
    config = json.loads(json.dumps(config))
    config["model"]["decoder"]["filename"] = art.SOURCE_MODEL
    with open(os.path.join(workdir, "genai_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    for name in os.listdir(artifact.directory):
        src = os.path.join(artifact.directory, name)
        if name.startswith(art.SOURCE_MODEL) or name.endswith(".data"):
            os.symlink(src, os.path.join(workdir, name))
    tokenizer = decoder.get("tokenizer")
    if tokenizer and os.path.isdir(os.path.join(artifact.directory, tokenizer)):
        for name in os.listdir(os.path.join(artifact.directory, tokenizer)):
            os.symlink(
                os.path.join(artifact.directory, tokenizer, name), os.path.join(workdir, name)
            )
    return workdir


def hf_source_for(artifact, hf_dir: str | None) -> dict[str, str]:
    """Where transformers finds the weights: ``{"hf_dir": ...}`` or ``{"builtin": name}``."""
    if hf_dir:
        return {"hf_dir": os.fspath(hf_dir)}
    source = artifact.manifest.get("source") or {}
    for key in ("hf_folder", "folder", "path"):
        path = source.get(key)
        if path and os.path.isfile(os.path.join(path, "config.json")):
            return {"hf_dir": path}
    if source.get("kind") == "builtin" and source.get("name"):
        return {"builtin": source["name"], "builtin_options": source.get("options") or {}}
    # a GenAI folder that qiao exported from a built-in names it (export_genai's qiao_export.json)
    folder = source.get("folder") or os.path.dirname(source.get("path") or "")
    try:
        with open(os.path.join(folder, "qiao_export.json")) as f:
            export = json.load(f)
    except (OSError, ValueError):
        return {}
    if export.get("builtin"):
        return {"builtin": export["builtin"], "builtin_options": {"seed": export.get("seed", 0)}}
    return {}


def prompts_for(vocab: int, batch: int, length: int, avoid: Sequence[int], seed: int):
    """Seeded random prompts of ``length`` ids in [3, vocab) minus the stop tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, length))
    for stop in avoid:
        ids[ids == stop] = 3 if stop != 3 else 4
    return ids.tolist()


# --- the benchmark -------------------------------------------------------------------------------
def _engine_entry(measured: Mapping[str, Any], batch: int) -> dict:
    from qiao.compiler.bench.stats import latency_stats

    steps = measured["decode_s"] or [float("nan")]
    stats = latency_stats(steps)
    ttft = float(np.median(measured["ttft_s"]))
    tokens_per_s = batch * len(steps) / float(np.sum(steps)) if measured["decode_s"] else None
    entry = {
        "latency_s": stats,
        "samples_s": [float(s) for s in steps],
        "number": 1,
        "throughput": {"tokens_per_s": tokens_per_s, "samples_per_s": 1.0 / stats["mean"]},
        "ttft_s": ttft,
        "tpot_s": stats["median"],
        "load_s": measured["load_s"],
        "peak_rss_mib": measured["peak_rss_mib"],
        "peak_rss_delta_mib": measured["peak_rss_delta_mib"],
        "roofline_fraction": None,  # set by _add_roofline once the bandwidth is known
    }
    return entry


def _token_check(mine: list[list[int]], theirs: list[list[int]]) -> dict[str, Any]:
    matching = []
    for a, b in zip(mine, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        matching.append(n)
    ok = len(mine) == len(theirs) and all(
        m == len(a) == len(b) for m, a, b in zip(matching, mine, theirs)
    )
    return {"ok": ok, "max_abs": None, "matching": matching, "compared": [len(a) for a in mine]}


def bench_generate(
    source,
    *,
    engines: Sequence[str] = GENERATE_ENGINES,
    prompt_len: int = 128,
    new_tokens: int = 128,
    batch: Sequence[int] = (1,),
    past: Sequence[int] = (),
    past_tokens: int = 9,
    runs: int = 1,
    seed: int = 0,
    target: str = "cpu",
    hf_dir: str | None = None,
    label: str | None = None,
    roofs: bool = True,
    timeout: float | None = 3600.0,
    isolate: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time a decoder's generation on each engine; returns a ``qiao bench`` result document.

    Parameters
    ----------
    source : str or os.PathLike
        Decoder artifact, built-in decoder, ONNX Runtime GenAI folder or Hugging Face folder
        (``qiao.compiler.decoder_source.open_decoder``).
    engines : list of str
        Any of ``GENERATE_ENGINES``; qiao's tokens are the reference of the check.
    prompt_len, new_tokens : int
        Prompt length and new tokens of the main cases (one per ``batch`` size).
    batch : list of int
        Batch sizes (prompts of equal length).
    past : list of int
        Past lengths for decode-step cases: a prompt of that length, then ``past_tokens`` tokens
        (TPOT at that past).
    runs : int
        Timed generations per engine and case (after one warm-up generation); transformers, an
        order of magnitude slower, runs at most ``SLOW_ENGINE_RUNS`` of them.
    seed : int
        Seed of the random prompts.
    target : str
        Backend to compile for when ``source`` is not an artifact.
    hf_dir : str, optional
        Hugging Face folder for the transformers engine when the source does not say it.
    label : str, optional
        Name of this machine in reports.
    roofs : bool
        Measure the CPU's bandwidth for the roofline.
    timeout : float, optional
        Seconds per engine process.
    isolate : bool
        Run each engine in its own process (default). ``False`` runs them in this one: faster to
        start (for small models and smoke tests), but then peak RSS is not each engine's own.
    progress : callable, optional
        Called with one line of text at each step.

    Returns
    -------
    dict
        The result document (``schema.SCHEMA``), one case per batch size and per past length.
    """
    from qiao.compiler.bench.cost import load_source
    from qiao.compiler.bench.memory import PeakRSS
    from qiao.compiler.bench.roofs import measure_cpu_roofs
    from qiao.compiler.bench.schema import DEFINITIONS, SCHEMA, SCHEMA_VERSION
    from qiao.compiler.bench.timing import settle
    from qiao.compiler.decoder_source import check_decoder, open_decoder
    from qiao.compiler.driver import __version__
    from qiao.compiler.fingerprint import machine_fingerprint, software_versions

    say = progress or (lambda _msg: None)
    unknown = [e for e in engines if e not in GENERATE_ENGINES]
    if unknown or not engines:
        raise QiaoError(
            f"unknown engine(s) {', '.join(unknown) or '(none given)'}. fix: use any of "
            f"{', '.join(GENERATE_ENGINES)}"
        )
    sizes = [prompt_len, new_tokens, runs, past_tokens, *batch, *past]
    if any(not isinstance(v, int) or v < 1 for v in sizes) or new_tokens < 2:
        raise QiaoError(
            "--prompt-len, --batch, --past and --runs must be positive integers and "
            "--new-tokens at least 2. fix: adjust them"
        )
    start = time.perf_counter()
    artifact = open_decoder(source, target, progress=say)
    compile_s = time.perf_counter() - start
    decoder = check_decoder(artifact)
    manifest = artifact.manifest
    vocab = int(decoder.get("vocab_size") or manifest["outputs"][0]["shape"][-1])
    context = decoder.get("context_length")
    longest = max([prompt_len + new_tokens] + [p + past_tokens for p in past])
    if context and longest > context:
        raise QiaoError(
            f"context length overflow: {longest} positions asked for, the model holds {context}. "
            "fix: lower --prompt-len, --new-tokens or --past"
        )
    from qiao.compiler import artifact as art

    proto = load_source(os.path.join(artifact.directory, art.SOURCE_MODEL))
    weights = decode_weight_bytes(proto) if proto is not None else None
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "label": label,
        "machine": machine_fingerprint(),
        "software": dict(software_versions(), qiao=__version__),
        "settings": {
            "mode": "generate",
            "engines": list(engines),
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "batch": list(batch),
            "past": list(past),
            "past_tokens": past_tokens,
            "runs": runs,
            "isolated": isolate,
            "warmup": 1,
            "repeat": runs,
            "seed": seed,
            "baselines": [e for e in engines if e != "qiao"],
            "memory_measured": PeakRSS.supported(),
            "definitions": dict(DEFINITIONS, **GENERATE_DEFINITIONS),
        },
        "model": {
            "name": manifest.get("model"),
            "source": {k: v for k, v in (manifest.get("source") or {}).items() if k != "path"},
            "decoder": {k: v for k, v in decoder.items() if k != "genai_config"},
            "weight_bytes_per_token": weights,
            "inputs": manifest["inputs"],
            "outputs": manifest["outputs"],
        },
        "targets": [],
        "cases": [],
    }
    result["label"] = label or result["machine"]["hostname"]
    entry: dict[str, Any] = {
        "target": manifest["backend"]["name"],
        "arch": manifest["backend"].get("arch"),
        "compile_s": compile_s,
        "artifact": artifact.directory,
        "notes": [],
        "engines": {},
        "status": "ok",
    }
    result["targets"].append(entry)
    if roofs:
        say("measuring this CPU's bandwidth")
        entry["roofs"] = measure_cpu_roofs()
    workdir = tempfile.mkdtemp(prefix="qiao-bench-generate-")
    places: dict[str, dict[str, str]] = {"qiao": {"artifact": artifact.directory}}
    try:
        if "ort-genai" in engines:
            try:
                places["ort-genai"] = {"genai_dir": genai_folder_for(artifact, workdir)}
            except QiaoError as err:
                entry["notes"].append(f"ort-genai: {err}")
        if "transformers" in engines:
            where = hf_source_for(artifact, hf_dir)
            if where:
                places["transformers"] = where
            else:
                entry["notes"].append(
                    "transformers: no Hugging Face weights known for this decoder; pass --hf-dir"
                )
        plan = [
            (
                {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": b},
                b,
                prompt_len,
                new_tokens,
            )
            for b in batch
        ]
        plan += [({"past": p, "batch": 1}, 1, p, past_tokens) for p in past]
        for index, (size, b, length, count) in enumerate(plan):
            prompts = prompts_for(vocab, b, length, decoder.get("eos_token_id") or [], seed)
            case: dict[str, Any] = {
                "target": entry["target"],
                "arch": entry["arch"],
                "size": size,
                "dims": {},
                "samples_per_call": b,
                "tokens_per_call": b,
                "flops": None,
                "bytes": weights["total"] if weights else None,
                "roofline_tokens_per_s": None,
                "engines": {},
                "speedup": {},
                "check": {},
            }
            tokens: dict[str, list[list[int]]] = {}
            for name in engines:
                if name not in places:
                    continue
                label_size = ",".join(f"{k}={v}" for k, v in size.items())
                say(f"[{index + 1}/{len(plan)}] {label_size}: {name}")
                settle()
                # transformers is an order of magnitude slower: one timed generation (its median
                # step over `count` tokens) instead of `runs`, or the run takes most of an hour
                n = min(runs, SLOW_ENGINE_RUNS.get(name, runs))
                spec = dict(places[name], engine=name, prompts=prompts, new_tokens=count, runs=n)
                measured = run_in_subprocess(spec, timeout) if isolate else _run_here(spec)
                if "error" in measured:
                    note = f"{name} ({label_size}): {measured['error']}"
                    entry["notes"].append(note)
                    say(note)
                    continue
                entry["engines"].setdefault(name, measured["info"])
                case["engines"][name] = _engine_entry(measured, b)
                tokens[name] = measured["tokens"]
            qiao = case["engines"].get("qiao")
            for name, timed in case["engines"].items():
                if name == "qiao" or qiao is None:
                    continue
                case["speedup"][name] = timed["tpot_s"] / qiao["tpot_s"]
                case["check"][name] = _token_check(tokens["qiao"], tokens[name])
            if case["engines"]:
                result["cases"].append(case)
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    if roofs:
        # the roof bounds the time from below: keep the best bandwidth seen, before or after
        later = measure_cpu_roofs()
        if later["bandwidth_gbs"] > entry["roofs"]["bandwidth_gbs"]:
            entry["roofs"] = later
        _add_roofline(result["cases"], entry["roofs"]["bandwidth_gbs"], weights)
    return result


def _add_roofline(cases, bandwidth_gbs: float, weights: Mapping[str, int] | None) -> None:
    """Each case's roofline tokens/s and each engine's fraction of it."""
    if not weights or not weights["total"]:
        return
    for case in cases:
        roof = bandwidth_gbs * 1e9 * case["tokens_per_call"] / weights["total"]
        case["roofline_tokens_per_s"] = roof
        for timed in case["engines"].values():
            tps = timed["throughput"].get("tokens_per_s")
            timed["roofline_fraction"] = tps / roof if tps else None


def format_generate(result: Mapping[str, Any]) -> str:
    """The table of a generate result: per case and engine, TTFT, TPOT, tokens/s, the roofline
    fraction, peak RSS, qiao's speed-up and the token check."""
    from qiao.compiler.bench.formatting import format_seconds
    from qiao.compiler.fingerprint import describe

    model = result.get("model") or {}
    weights = model.get("weight_bytes_per_token") or {}
    lines = [f"qiao bench --generate {model.get('name')} · {describe(result['machine'])}"]
    for entry in result["targets"]:
        roofs = entry.get("roofs") or {}
        extra = f", bandwidth {roofs['bandwidth_gbs']:.1f} GB/s" if roofs else ""
        if entry.get("compile_s") is not None:
            extra += f", artifact ready in {entry['compile_s']:.1f} s"
        lines.append(f"target {entry['target']} ({entry.get('arch')}){extra}")
        lines += [f"  note: {n}" for n in entry.get("notes", [])]
    if weights:
        lines.append(
            f"weights read per decode step: {weights['total'] / 2**20:.1f} MiB "
            f"(experts {weights['experts'] / 2**20:.1f} MiB)"
        )
    lines += [
        "",
        f"{'case':<36} {'engine':<13} {'TTFT':>10} {'TPOT':>10} {'tokens/s':>9} "
        f"{'roofline':>8} {'peak RSS':>10}  {'qiao speed-up':<13} check",
    ]
    for case in result["cases"]:
        size = ",".join(f"{k}={v}" for k, v in case["size"].items())
        roof = case.get("roofline_tokens_per_s")
        for name, timed in case["engines"].items():
            tps = timed["throughput"].get("tokens_per_s")
            frac = timed.get("roofline_fraction")
            rss = timed.get("peak_rss_mib")
            speed = f"x{case['speedup'][name]:.2f}" if name in case["speedup"] else ""
            check = case["check"].get(name)
            verdict = ""
            if check is not None:
                verdict = "tokens equal" if check["ok"] else f"DIFFER (match {check['matching']})"
            lines.append(
                f"{size:<36} {name:<13} {format_seconds(timed['ttft_s']):>10} "
                f"{format_seconds(timed['tpot_s']):>10} "
                f"{('-' if tps is None else f'{tps:.2f}'):>9} "
                f"{('-' if frac is None else f'{frac * 100:.0f}%'):>8} "
                f"{('-' if rss is None else f'{rss:.0f} MiB'):>10}  {speed:<13} {verdict}".rstrip()
            )
        if roof:
            lines.append(f"{'':<36} roofline {roof:.2f} tokens/s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
