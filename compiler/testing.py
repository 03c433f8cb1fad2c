"""Test helpers shared by qiao's test and benchmark suites (and usable by backend authors).

``assert_close`` is the one numeric comparison every test uses; ``run_cli`` runs ``qiao`` in a
subprocess; ``has_command`` and the device probes (``has_cuda_gpu``, ``has_rocm_gpu``, ``has_nvcc``,
``can_compile_for``) are cached, never-raising probes for ``skipif`` gates; ``fused_module``
and ``prim_func`` build single kernels for schedule tests. They live in the
package (like ``tvm.testing``) rather than in a ``conftest.py`` so that ``tests/`` and
``benchmarks/`` can both import them without their two conftest modules shadowing each other.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import numpy as np


def assert_close(actual, expected, rtol: float = 1e-5, atol: float = 1e-5, name: str = "output"):
    """Check length (for sequences), then shape, then dtype, then values; name what differs."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{name}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_close(actual[key], expected[key], rtol, atol, f"{name}[{key!r}]")
        return
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{name}: {len(actual)} outputs, want {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, rtol, atol, f"{name}[{i}]")
        return
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name, equal_nan=True)


@functools.cache
def has_command(name: str) -> bool:
    """Whether an executable is on ``PATH`` (cached)."""
    return shutil.which(name) is not None


@functools.cache
def backend_availability(name: str):
    """``get_backend(name).availability()``, probed once per process: what every GPU test gates
    on, so all of them agree (backends' probes never raise)."""
    from qiao.backends import get_backend

    return get_backend(name).availability()


def has_cuda_gpu() -> bool:
    """Whether TVM sees an NVIDIA GPU with its driver here."""
    return backend_availability("cuda").can_run


def has_rocm_gpu() -> bool:
    """Whether TVM sees an AMD GPU with the amdgpu driver here."""
    return backend_availability("rocm").can_run


def has_nvcc() -> bool:
    """Whether ``nvcc`` is where the CUDA backend looks (``PATH``, ``$CUDA_HOME/bin``,
    ``/usr/local/cuda/bin``): CUDA artifacts need it, CUDA source generation does not."""
    return backend_availability("cuda").can_compile


def can_compile_for(name: str) -> bool:
    """Whether backend ``name`` has its toolchain here (``nvcc`` for cuda, ``ld.lld`` for rocm)."""
    return backend_availability(name).can_compile


def run_cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run ``qiao ARGS`` in a subprocess; returns the CompletedProcess (text mode)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "qiao.compiler.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def fused_module(build):
    """A Relax module from ``build(bb)`` (which defines ``main`` on the BlockBuilder ``bb``),
    legalised and fused into TIR kernels by the pipeline's own legalize phase."""
    import tvm
    from tvm import relax

    from qiao.compiler.pipeline import legalize_passes

    bb = relax.BlockBuilder()
    build(bb)
    return tvm.transform.Sequential(legalize_passes(None))(bb.get())


def compiled_graph(tmp_path, nodes, inputs, outputs, initializers, dim_ranges, arch=None):
    """A CPU artifact of the opset-13 ONNX graph ``nodes`` (``inputs``/``outputs``: value infos,
    ``initializers``: ``{name: array}``), saved under ``tmp_path`` and compiled with
    ``dim_ranges`` (and ``arch``: ``None`` for this host): the small convolution models of the
    Relax-rewrite tests."""
    import onnx
    from onnx import helper, numpy_helper

    from qiao.compiler import compile

    inits = [numpy_helper.from_array(a, n) for n, a in initializers.items()]
    graph = helper.make_graph(nodes, "graph", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = os.path.join(tmp_path, "model.onnx")
    onnx.save(model, path)
    return compile(path, "cpu", os.path.join(tmp_path, "art"), dim_ranges=dim_ranges, arch=arch)


def marked(func, key: str) -> bool:
    """Whether a block of the TIR function ``func`` carries the annotation ``key`` (the CPU GEMM
    rule's ``IMAGE_ROWS``, ``DIRECT_ROWS``...)."""
    import tvm_ffi
    from tvm import s_tir

    found = []

    def on_block(block):
        found.append(key in block.annotations)

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, on_block)])
    return any(found)


def relax_calls(func, op: str) -> list:
    """The calls of Relax operator ``op`` (``"relax.nn.conv2d"``) in ``func``."""
    import tvm_ffi
    from tvm import relax

    found = []
    tvm_ffi.structural_walk(
        func,
        [(relax.Call, lambda c: found.append(c) if getattr(c.op, "name", None) == op else None)],
    )
    return found


def main_instructions(runner) -> str:
    """The VM instructions of a compiled artifact's ``main`` (``artifact.runner``): the kernels it
    calls on every run."""
    text = runner.executable.as_text()
    start = text.index("@main:")
    return text[start : text.index("\n\n", start)]


def kernels_packing_per_call(runner) -> list[str]:
    """The weight-packing kernels (TVM's ``*_weight_prepack``) that ``main`` calls: packing left
    on the per-call path instead of ``main_transform_params`` (run once at load)."""
    import re

    return sorted(set(re.findall(r"call\s+(\w+_weight_prepack)\b", main_instructions(runner))))


def prim_func(mod, prefix: str):
    """The one PrimFunc of ``mod`` whose name starts with ``prefix`` (or ``fused_<prefix>``)."""
    import tvm

    funcs = {g.name_hint: f for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    names = [n for n in funcs if n.startswith(prefix) or n.startswith(f"fused_{prefix}")]
    assert len(names) == 1, f"expected one kernel named {prefix}*, got {sorted(funcs)}"
    return funcs[names[0]]


def hf_qwen3_folder(folder, seed: int = 0, **config) -> str:
    """A random transformers ``Qwen3ForCausalLM`` saved as a Hugging Face folder (config,
    safetensors, a character-level tokenizer: ids 3.. are printable ASCII; 0 pad, 1 bos, 2 eos).
    ``config`` overrides the tiny defaults (2 layers, hidden 64, 4 heads, 2 KV heads, head 16,
    vocab 300, 64 positions). Returns the folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    values = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(config)
    torch.manual_seed(seed)
    Qwen3ForCausalLM(Qwen3Config(**values)).eval().save_pretrained(folder, safe_serialization=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {chr(c): c - 30 for c in range(33, 127)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(folder)
    return os.fspath(folder)


def genai_builder(hf_folder, out_folder, precision: str = "fp32") -> str:
    """ONNX Runtime GenAI's model builder on a Hugging Face folder (CPU); returns ``out_folder``."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    cmd += ["-i", os.fspath(hf_folder), "-o", os.fspath(out_folder), "-p", precision, "-e", "cpu"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    return os.fspath(out_folder)


def ort_genai_greedy(folder, prompt, new_tokens: int, ignore_eos: bool = True) -> list[int]:
    """ONNX Runtime GenAI's greedy tokens after ``prompt`` on a GenAI folder: exactly
    ``new_tokens`` of them with ``ignore_eos``, else stopping at its end-of-sequence token."""
    import onnxruntime_genai as og

    model = og.Model(os.fspath(folder))
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    search = dict(max_length=total, do_sample=False)
    if ignore_eos:
        search["min_length"] = total
    params.set_search_options(**search)
    generator = og.Generator(model, params)
    generator.append_tokens(list(prompt))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def qdq_matmul(dtype: int, rng, k: int = 96, n: int = 8, block: int = 32):
    """An opset-21 weight-only quantized MatMul in QDQ form, as ONNX Runtime's quantizer writes with
    ``quant_format=QDQ``: ``y = a @ DequantizeLinear(q, s, zp, axis=0, block_size=block)`` with
    random ``dtype`` (``TensorProto.UINT8`` or ``INT4``) codes and zero points. Returns ``(model,
    codes, scale, zero_point)``, the last three as NumPy arrays ``[k, n]``, ``[k / block, n]``
    (float32) and ``[k / block, n]`` (integers)."""
    from onnx import TensorProto, helper, numpy_helper

    lo, hi = (0, 255) if dtype == TensorProto.UINT8 else (-8, 7)
    codes = rng.integers(lo, hi + 1, (k, n))
    scale = (rng.random((k // block, n)) * 0.1).astype(np.float32)
    zp = rng.integers(lo, hi + 1, (k // block, n))
    inits = [
        helper.make_tensor("q", dtype, [k, n], codes.ravel().tolist()),
        numpy_helper.from_array(scale, "s"),
        helper.make_tensor("zp", dtype, [k // block, n], zp.ravel().tolist()),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w"], axis=0, block_size=block),
        helper.make_node("MatMul", ["a", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, codes, scale, zp


def artifact_file_sizes(directory) -> dict[str, int]:
    """Bytes of each file of an artifact directory, by name, without ``model.onnx`` (the copy of
    the source model): what the compiled weights cost on disk."""
    sizes = {}
    for root, _, files in os.walk(directory):
        for f in files:
            if f != "model.onnx":
                sizes[f] = os.path.getsize(os.path.join(root, f))
    return sizes
