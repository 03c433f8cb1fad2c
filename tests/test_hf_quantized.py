"""Hugging Face GPTQ / AWQ int4 checkpoints compiled as ``com.microsoft::MatMulNBits``
(``qiao.compiler.hf_quant`` + ``export_genai``).

A random tiny 2-layer Qwen3 (``hf_qwen3_folder``) has its q/k/v/o and gate/up/down projections
(and ``lm_head`` in one case) replaced by random 4-bit codes, zero points and fp16 scales, packed
by this file's own packers written from the format descriptions (GPTQ: ``qweight`` int32
``[K/8, N]`` along K, ``qzeros`` int32 ``[G, N/8]`` along N, v1 storing ``z - 1``; AWQ GEMM:
``qweight`` ``[K, N/8]`` and ``qzeros`` along N in the order 0, 2, 4, 6, 1, 3, 5, 7). Checked:
the ONNX model's MatMulNBits hold exactly those codes, scales and zero points; qiao's logits and
ONNX Runtime's on that ONNX match transformers' Qwen3 with the weights dequantized here
(``(q - z) * s`` in float32) within 1e-4 of max|logits| (float32 sums in another order: ~1e-6);
the refused layouts fail through the CLI with exit 2 and one line.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qiao.compiler import compile, export_genai
from qiao.compiler.testing import hf_qwen3_folder, run_cli

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("safetensors") is None,
    reason="transformers and safetensors are needed: pip install -e '.[test]'",
)

VOCAB = 304  # a multiple of 8: lm_head's N packs into qzeros words
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
TOL = 1e-4
_DTYPES = {"tensor(int64)": "int64", "tensor(float)": "float32"}


def _modules(layers: int, lm_head: bool) -> list[str]:
    out = []
    for i in range(layers):
        out += [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkvo"]
        out += [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    return out + (["lm_head"] if lm_head else [])


def _words(nibbles: np.ndarray) -> np.ndarray:
    """``[..., 8]`` 4-bit values → int32 words, nibble i in bits 4i..4i+3."""
    word = np.zeros(nibbles.shape[:-1], np.uint32)
    for i in range(8):
        word |= nibbles[..., i].astype(np.uint32) << np.uint32(4 * i)
    return word.view(np.int32)


def _pack_k(q: np.ndarray) -> np.ndarray:
    """GPTQ qweight: ``[K, N]`` → ``[K/8, N]``, row 8r+i in nibble i of row r."""
    k, n = q.shape
    return _words(q.reshape(k // 8, 8, n).transpose(0, 2, 1))


def _pack_n(v: np.ndarray, order=range(8)) -> np.ndarray:
    """``[R, N]`` → ``[R, N/8]``: nibble i of word c holds column 8c + order[i]."""
    r, n = v.shape
    cols = v.reshape(r, n // 8, 8)
    return _words(cols[:, :, list(order)])


def _quantized_folder(root, method, fmt="gptq", group=32, sym=False, lm_head=False, seed=0):
    """A quantized copy of a random Qwen3 folder; ``(folder, float folder, {module: (q [K, N],
    z [G, N], s [G, N] fp16)})``."""
    import torch
    from safetensors.torch import load_file, save_file

    base = hf_qwen3_folder(root / "float", seed=seed, vocab_size=VOCAB)
    folder = root / method
    shutil.copytree(base, folder)
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    rng = np.random.default_rng(seed)
    truth = {}
    for m in _modules(config["num_hidden_layers"], lm_head):
        n, k = tensors.pop(f"{m}.weight").shape
        g = k if group == -1 else group
        q = rng.integers(0, 16, (k, n)).astype(np.uint8)
        z = np.full((k // g, n), 8, np.uint8) if sym else rng.integers(0, 16, (k // g, n))
        z = z.astype(np.uint8)
        s = (rng.uniform(0.005, 0.03, (k // g, n)) * rng.choice([-1, 1], (k // g, n))).astype(
            np.float16
        )
        truth[m] = (q, z, s)
        if method == "gptq":
            stored = z if fmt == "gptq_v2" else (z.astype(np.int16) - 1) & 0xF  # v1: z - 1
            tensors[f"{m}.qweight"] = torch.from_numpy(_pack_k(q))
            tensors[f"{m}.qzeros"] = torch.from_numpy(_pack_n(stored.astype(np.uint8)))
            g_idx = (np.arange(k) // g).astype(np.int32)
            tensors[f"{m}.g_idx"] = torch.from_numpy(g_idx)
        else:
            tensors[f"{m}.qweight"] = torch.from_numpy(_pack_n(q, AWQ_ORDER))
            tensors[f"{m}.qzeros"] = torch.from_numpy(_pack_n(z, AWQ_ORDER))
        tensors[f"{m}.scales"] = torch.from_numpy(s)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym}
        qc |= {"desc_act": False, "checkpoint_format": fmt, "lm_head": lm_head}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True}
        qc |= {"version": "gemm"}
    config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config))
    return folder, base, truth


def _dequantized(q, z, s) -> np.ndarray:
    """``nn.Linear`` weight ``[N, K]``: ``(q - z) * s`` in float32."""
    g = q.shape[0] // z.shape[0]
    idx = np.arange(q.shape[0]) // g
    return ((q.astype(np.float32) - z[idx].astype(np.float32)) * s[idx].astype(np.float32)).T


def _reference_logits(base, truth, ids) -> np.ndarray:
    import torch
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for m, qzs in truth.items():
            params[f"{m}.weight"].copy_(torch.from_numpy(np.ascontiguousarray(_dequantized(*qzs))))
        return model(torch.from_numpy(ids)).logits.numpy()


def _unpack_bytes(packed: np.ndarray, count: int) -> np.ndarray:
    low, high = packed & 0xF, packed >> 4
    return np.stack([low, high], -1).reshape(*packed.shape[:-1], -1)[..., :count]


def _check_nodes(folder, truth) -> int:
    """Every MatMulNBits holds the stacked modules' codes, scales and zero points exactly."""
    proto = onnx.load(str(folder / export_genai.MODEL_FILE))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    checked = 0
    for node in proto.graph.node:
        if node.op_type == "MatMul":
            assert not any(x in node.name for x in ("qkv", "o_proj", "_proj")), node.name
        if node.op_type != "MatMulNBits":
            continue
        assert node.domain == "com.microsoft"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == 4 and attrs["accuracy_level"] == 0
        if node.name == "/lm_head/MatMulNBits":
            modules = ["lm_head"]
        else:
            layer = node.name.split("/")[2].removeprefix("layers.")
            kind = node.name.split("/")[4].removesuffix("_proj")
            if kind == "qkv":
                modules = [f"model.layers.{layer}.self_attn.{p}_proj" for p in "qkv"]
            elif kind == "o":
                modules = [f"model.layers.{layer}.self_attn.o_proj"]
            else:
                modules = [f"model.layers.{layer}.mlp.{kind}_proj"]
        q = np.concatenate([truth[m][0] for m in modules], axis=1)  # [K, N]
        z = np.concatenate([truth[m][1] for m in modules], axis=1)
        s = np.concatenate([truth[m][2] for m in modules], axis=1).astype(np.float32)
        k, n = q.shape
        assert (attrs["K"], attrs["N"]) == (k, n), node.name
        block = attrs["block_size"]
        n_blocks = -(-k // block)
        group_of_block = (np.arange(n_blocks) * block) // (k // z.shape[0])
        b, scales, zp = (inits[x] for x in node.input[1:4])
        assert b.dtype == np.uint8 and b.shape == (n, n_blocks, block // 2)
        np.testing.assert_array_equal(_unpack_bytes(b.reshape(n, -1), k), q.T, node.name)
        np.testing.assert_array_equal(scales.reshape(n, n_blocks), s[group_of_block].T)
        np.testing.assert_array_equal(
            _unpack_bytes(zp.reshape(n, -1), n_blocks), z[group_of_block].T, node.name
        )
        checked += len(modules)
    return checked


@pytest.mark.parametrize(
    "method, fmt, group, sym, lm_head, with_qiao",
    [
        ("gptq", "gptq", 32, True, True, True),  # v1 (zeros stored - 1), sym, quantized lm_head
        ("gptq", "gptq_v2", 16, False, False, False),
        ("gptq", "gptq", -1, False, False, False),  # one group per column: blocks of K
        ("awq", "gemm", 32, False, False, True),
    ],
)
def test_quantized_checkpoint(tmp_path, method, fmt, group, sym, lm_head, with_qiao):
    """Exact codes in the ONNX; ONNX Runtime's logits (and, for one GPTQ and the AWQ case,
    qiao's: the other layouts differ only in the export checked here, and a compile is the
    slow part) vs transformers on the dequantized weights."""
    import onnxruntime as ort

    folder, base, truth = _quantized_folder(tmp_path, method, fmt, group, sym, lm_head)
    genai = Path(export_genai.hf_folder(folder))
    assert _check_nodes(genai, truth) == len(truth)
    weights = json.loads((genai / export_genai.WEIGHTS_FILE).read_text())
    assert weights["method"] == method and weights["modules"] == len(truth)
    assert "_qiao_weights" not in (genai / export_genai.CONFIG_FILE).read_text()

    sess = ort.InferenceSession(
        str(genai / export_genai.MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in sess.get_outputs()]
    decoder = export_genai.decoder_manifest(export_genai.read_genai_folder(genai)[1], None)
    assert decoder["weights"]["method"] == method
    assert "_qiao_weights" not in decoder["genai_config"]
    specs = [{"name": i.name, "dtype": _DTYPES[i.type]} for i in sess.get_inputs()]
    feeds = export_genai.example_feeds(specs, decoder, seed=3, batch=2, prompt=7)
    want = _reference_logits(base, truth, feeds["input_ids"])
    scale = float(np.abs(want).max())
    if with_qiao:
        artifact = compile(str(folder), "cpu", tmp_path / "artifact")
        assert artifact.manifest["decoder"]["weights"]["method"] == method
        got = artifact.run(feeds)["logits"]
        # a decoder artifact computes the LM head on each entry's last row only (what
        # generation reads)
        assert got.shape == (2, 1, VOCAB), got.shape
        err = np.abs(got[:, 0] - want[:, -1]).max()
        assert err <= TOL * scale, (err, scale)
    err = np.abs(sess.run(None, feeds)[names.index("logits")] - want).max()  # every row
    assert err <= TOL * scale, (err, scale)


def test_block_split_matches_groups():
    """A group above 256 (or per column) becomes blocks of 256 repeating its scale and zero
    point: qiao's MatMulNBits dequantization of the inputs equals ``(q - z) * s``."""
    from qiao.compiler.frontend.convert_quant import dequantize_nbits
    from qiao.compiler.hf_quant import QuantLinear

    rng = np.random.default_rng(1)
    for group, k in ((512, 1024), (768, 768), (48, 96)):
        n = 8
        lin = QuantLinear(
            rng.integers(0, 16, (n, k)).astype(np.uint8),
            rng.uniform(-1, 1, (n, k // group)).astype(np.float32),
            rng.integers(0, 16, (n, k // group)).astype(np.uint8),
            group,
        )
        block, b, scales, zp = lin.nbits_inputs()
        assert block == {512: 256, 768: 256, 48: 16}[group]
        got = dequantize_nbits(b, scales, zp, None, k, n, 4, block)
        np.testing.assert_array_equal(got, lin.dequantized().T)


def _edit(folder, config=None, g_idx=None):
    import torch
    from safetensors.torch import load_file, save_file

    if config:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"].update(config)
        (folder / "config.json").write_text(json.dumps(cfg))
    if g_idx is not None:
        tensors = load_file(folder / "model.safetensors")
        name = "model.layers.0.self_attn.q_proj.g_idx"
        tensors[name] = torch.from_numpy(g_idx(tensors[name].numpy()))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(config={"bits": 3}), "GPTQ bits=3 is not supported"),
        (dict(config={"quant_method": "bitsandbytes"}), "quant_method 'bitsandbytes'"),
        (dict(config={"checkpoint_format": "marlin"}), "checkpoint_format 'marlin'"),
        (
            dict(config={"desc_act": True}, g_idx=lambda g: np.ascontiguousarray(g[::-1])),
            "act-order (desc_act) g_idx",
        ),
    ],
)
def test_refused_layouts(tmp_path, change, message):
    """One line on stderr naming the layout and the fix, exit 2, no artifact."""
    folder, _, _ = _quantized_folder(tmp_path, "gptq")
    _edit(folder, **change)
    out = tmp_path / "artifact"
    proc = run_cli("compile", str(folder), "--target", "cpu", "-o", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and message in lines[0] and "fix:" in lines[0], proc.stderr
    assert not out.exists()
