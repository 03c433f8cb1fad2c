"""qiao's own Qwen3 / Qwen3-MoE exports in ONNX Runtime GenAI's layout
(``compiler/export_genai.py``) against transformers, the independent reference:

- ONNX Runtime runs the export (a ragged batch of two prompts, right-padded, into GenAI's shared KV
  buffer of the context length, then decode steps): every defined logits row equals transformers'
  forward of the same tokens, and the cache rows equal transformers' KV cache (keys after q/k norm
  and rotary). Dense and MoE.
- ONNX Runtime GenAI's greedy loop on the Qwen3-MoE export makes the same 64 tokens as
  transformers' ``generate`` (greedy, float32).
- The built-in tokenizer loads in ``tokenizers`` and ONNX Runtime GenAI with the same ids.
- Folder sources through the driver: a Hugging Face folder is exported once (content-hash cache),
  broken or unsupported folders raise one ``QiaoError`` naming the problem and the fix.

Tolerance 1e-4 abs/rel on logits (float32; observed differences ~4e-6 on unit-scale logits: the
same matmuls in another order, GroupQueryAttention's fused softmax).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qiao.compiler import export_genai
from qiao.compiler.driver import resolve_model
from qiao.compiler.errors import QiaoError
from qiao.compiler.testing import assert_close, ort_genai_greedy
from qiao.models import DecoderSpec, get_model, list_models, qwen3

TOL = 1e-4


def _builtin(name: str, **overrides) -> tuple[DecoderSpec, str]:
    spec = get_model(name, **overrides)
    return spec, export_genai.builtin_folder(spec)


def _session(folder: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"]
    )


@pytest.mark.parametrize("name", ["qwen3-small", "qwen3-moe-small"])
def test_export_matches_transformers_prefill_and_decode(name):
    spec, folder = _builtin(name)
    config = json.loads(open(os.path.join(folder, "genai_config.json")).read())
    assert config["search"]["past_present_share_buffer"] is True
    context = config["model"]["context_length"]
    assert context == qwen3.CONTEXT_LENGTH
    decoder = config["model"]["decoder"]
    layers, kv_heads, head = (
        decoder["num_hidden_layers"],
        decoder["num_key_value_heads"],
        decoder["head_size"],
    )
    graph = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False).graph
    moe_nodes = [n for n in graph.node if n.op_type == "MoE"]
    assert len(moe_nodes) == (layers if "moe" in name else 0)
    model = spec.build()
    sess = _session(folder)
    out_names = [o.name for o in sess.get_outputs()]

    rng = np.random.default_rng(3)
    lengths = [7, 4]  # ragged prompts, right-padded
    full = rng.integers(3, spec.config["vocab_size"], (2, 10)).astype(np.int64)
    with torch.no_grad():  # each entry alone: its prompt plus the tokens decoded after it
        want = [
            model(torch.from_numpy(full[b : b + 1, : lengths[b] + 3]), use_cache=True)
            for b in range(2)
        ]
    buffers = {
        f"past_key_values.{i}.{kv}": np.zeros((2, kv_heads, context, head), np.float32)
        for i in range(layers)
        for kv in ("key", "value")
    }
    totals = np.array(lengths)
    ids = np.zeros((2, max(lengths)), np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = full[b, :n]
    for step in range(4):  # the prefill, then three decode steps
        if step:
            ids = np.stack([full[b, totals[b] : totals[b] + 1] for b in range(2)])
            totals = totals + 1
        mask = (np.arange(totals.max())[None] < totals[:, None]).astype(np.int64)
        got = dict(
            zip(out_names, sess.run(None, {"input_ids": ids, "attention_mask": mask} | buffers))
        )
        for b in range(2):
            rows = lengths[b] if step == 0 else 1
            first = totals[b] - rows
            expected = want[b].logits[0, first : totals[b]].numpy()
            assert_close(got["logits"][b, :rows], expected, TOL, TOL, f"{name} step {step} [{b}]")
        buffers = {p: got[p.replace("past_key_values", "present")] for p in buffers}
    for b in range(2):  # the shared buffer holds transformers' cache, row for row
        cache = want[b].past_key_values
        for i in range(layers):
            assert_close(
                buffers[f"past_key_values.{i}.key"][b, :, : totals[b]],
                cache.layers[i].keys[0].numpy(),
                TOL,
                TOL,
                f"{name} layer {i} keys [{b}]",
            )


def test_genai_greedy_on_moe_export_matches_transformers_generate():
    og = pytest.importorskip("onnxruntime_genai")  # an optional runtime (test extra)
    spec, folder = _builtin("qwen3-moe-small")
    model = spec.build()
    tok = og.Tokenizer(og.Model(folder))
    prompt = list(tok.encode("Attention computes a weighted sum of values"))
    new_tokens = 64
    got = ort_genai_greedy(folder, prompt, new_tokens, ignore_eos=False)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=spec.config["eos_token_id"],
            pad_token_id=spec.config["pad_token_id"],
        )
    want = out[0, len(prompt) :].tolist()
    assert got == want
    assert len(got) == new_tokens or got[-1] == spec.config["eos_token_id"]


def test_builtin_tokenizer_loads_everywhere():
    og = pytest.importorskip("onnxruntime_genai")
    from tokenizers import Tokenizer

    _, folder = _builtin("qwen3-small")
    text = "The quick brown fox: 1000 experts!"
    ids = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).encode(text).ids
    tok = og.Tokenizer(og.Model(folder))
    assert list(tok.encode(text)) == ids
    assert tok.decode(ids) == text
    assert max(ids) < 1024


def test_builtins_are_decoders_and_cached():
    names = {"qwen3-small", "qwen3-moe-small", "qwen3-0.6b", "qwen3-30b-a3b-2l"}
    assert names <= set(list_models())
    assert all(isinstance(get_model(n), DecoderSpec) for n in names)
    big = get_model("qwen3-30b-a3b-2l").config
    assert (big["num_experts"], big["num_experts_per_tok"], big["vocab_size"]) == (128, 8, 151936)
    a = export_genai.builtin_folder(get_model("qwen3-small"))
    assert export_genai.builtin_folder(get_model("qwen3-small")) == a  # cached
    other = export_genai.builtin_folder(get_model("qwen3-small", seed=1, num_hidden_layers=1))
    assert other != a
    # every weight lives in model.onnx.data: the graph file stays small whatever the model's size
    graph = onnx.load(os.path.join(a, "model.onnx"), load_external_data=False).graph
    big_inline = [
        t.name
        for t in graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1024
    ]
    assert not big_inline
    with pytest.raises(QiaoError, match="no option 'checkpoint'.*fix"):
        get_model("qwen3-moe-small", checkpoint="/some/where")


def _hf_folder(path, architectures=("Qwen3MoeForCausalLM",), **overrides) -> str:
    """A tiny Qwen3-MoE (dense Qwen3 when ``architectures`` says so) saved as a Hugging Face
    folder with the built-in tokenizer."""
    tiny = dict(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        max_position_embeddings=128,
        mlp_only_layers=[1],  # one dense layer among the sparse ones
    )
    base = qwen3.QWEN3_MOE_SMALL if "Qwen3MoeForCausalLM" in architectures else qwen3.QWEN3_SMALL
    tiny = {k: v for k, v in tiny.items() if k in base}
    config = dict(base, **dict(tiny, **overrides), architectures=list(architectures))
    model = qwen3.build_hf_model(config, seed=5)
    model.config.architectures = list(architectures)
    model.save_pretrained(path, safe_serialization=True)
    qwen3.save_tokenizer(str(path))
    return str(path)


def test_hf_folder_source(tmp_path):
    folder = _hf_folder(tmp_path / "hf")
    resolved = resolve_model(folder)
    decoder = resolved.decoder
    assert resolved.source["kind"] == "huggingface"
    assert (decoder["num_layers"], decoder["kv_heads"], decoder["head_size"]) == (2, 2, 16)
    assert decoder["context_length"] == 128 and decoder["eos_token_id"] == [2]
    assert decoder["bos_token_id"] is None and decoder["tokenizer"] == "tokenizer"
    assert resolve_model(folder).source["path"] == resolved.source["path"]  # exported once
    short = resolve_model(folder, model_options={"context_length": 32}).decoder
    assert short["context_length"] == 32
    with pytest.raises(QiaoError, match="'seed' do not apply to the folder.*fix"):
        resolve_model(folder, model_options={"seed": 1})
    ops = [n.op_type for n in resolved.proto.graph.node]
    assert ops.count("MoE") == 1  # layer 1 is in mlp_only_layers
    # the export's prefill logits equal the folder's model in transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="float32")
    ids = np.random.default_rng(0).integers(3, 1024, (1, 9)).astype(np.int64)
    sess = _session(resolved.source["folder"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feeds |= {
        i.name: np.zeros((1, 2, 16, 16), np.float32)
        for i in sess.get_inputs()
        if i.name.startswith("past")
    }
    got = sess.run(["logits"], feeds)[0]
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    assert_close(got, want, TOL, TOL, "logits")


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QiaoError, match="without genai_config.json or config.json.*fix"):
        resolve_model(str(empty))

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(QiaoError, match="LlamaForCausalLM.*not supported.*fix: export it with"):
        resolve_model(str(llama))

    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(QiaoError, match="no \\*.safetensors.*fix"):
        resolve_model(str(no_weights))

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(QiaoError, match="cannot read config.json.*fix"):
        resolve_model(str(broken))

    genai = tmp_path / "genai"
    genai.mkdir()
    (genai / "genai_config.json").write_text(json.dumps({"model": {"vocab_size": 8}}))
    with pytest.raises(QiaoError, match="lacks a field.*fix: regenerate"):
        resolve_model(str(genai))

    _, good = _builtin("qwen3-small")
    config = json.loads(open(os.path.join(good, "genai_config.json")).read())
    config["model"]["decoder"]["filename"] = "missing.onnx"
    (genai / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(QiaoError, match="'missing.onnx', which is not in the folder.*fix"):
        resolve_model(str(genai))

    with pytest.raises(QiaoError, match="rope_type 'yarn' is not supported.*fix"):
        export_genai.export_model(
            qwen3.build_hf_model(
                dict(
                    qwen3.QWEN3_SMALL,
                    num_hidden_layers=1,
                    rope_scaling={"rope_type": "yarn", "factor": 2.0},
                )
            ),
            tmp_path / "yarn",
        )


@pytest.mark.slow  # one decoder compile (~40 s on 2 idle cores)
def test_validate_compiles_an_hf_folder(tmp_path):
    """``validate`` on a Hugging Face folder (not an artifact directory): compiled through the
    driver (manifest ``decoder``, tokenizer copied, in-place KV cache), run on a prefill step and
    compared with ONNX Runtime on the same graph."""
    from qiao.compiler.validate import validate

    dense = {"architectures": ("Qwen3ForCausalLM",)}  # MoE kernels add a minute of compile
    folder = _hf_folder(tmp_path / "hf", num_hidden_layers=1, intermediate_size=128, **dense)
    report = validate(folder, "cpu", output_dir=str(tmp_path / "artifact"))
    assert report.ok and report.comparisons
    assert {c.reference for c in report.comparisons} == {"onnxruntime"}
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["decoder"]["kv_cache"] == "inplace"
    assert manifest["decoder"]["num_layers"] == 1
    assert (tmp_path / "artifact" / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow  # the builder's subprocess imports torch and transformers (~30 s)
def test_dense_export_equals_genai_builder(tmp_path):
    """On a dense Qwen3 the export is ONNX Runtime GenAI's own builder's model: the same
    genai_config.json and, in ONNX Runtime, the same logits and KV buffers (observed: bit for bit;
    checked at 1e-6)."""
    import subprocess
    import sys

    pytest.importorskip("onnxruntime_genai")  # its model builder is the reference here
    folder = _hf_folder(
        tmp_path / "hf", architectures=("Qwen3ForCausalLM",), max_position_embeddings=64
    )
    builder = tmp_path / "builder"
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        folder,
        "-o",
        str(builder),
    ]
    subprocess.run(cmd + ["-p", "fp32", "-e", "cpu"], check=True, capture_output=True, timeout=600)
    mine = export_genai.export_hf_folder(folder, tmp_path / "mine")
    configs = [
        json.loads(open(os.path.join(d, "genai_config.json")).read()) for d in (builder, mine)
    ]
    # the builder writes a bos_token_id of its own when config.json has none (Qwen3); qiao omits it
    assert configs[1]["model"].get("bos_token_id") is None
    configs[0]["model"].pop("bos_token_id", None)
    assert configs[0] == configs[1]
    rng = np.random.default_rng(1)
    feeds = {
        "input_ids": rng.integers(3, 1024, (2, 7)),
        "attention_mask": np.ones((2, 7), np.int64),
    }
    feeds["attention_mask"][1, 5:] = 0  # entry 1: 5 tokens, right-padded
    feeds |= {
        f"past_key_values.{i}.{kv}": np.zeros((2, 2, 64, 16), np.float32)
        for i in range(2)
        for kv in ("key", "value")
    }
    runs = []
    for d in (builder, mine):
        sess = _session(str(d))
        runs.append(dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds))))
    want, got = runs
    for b, rows in enumerate((7, 5)):  # rows past an entry's length are unspecified
        assert_close(got["logits"][b, :rows], want["logits"][b, :rows], 1e-6, 1e-6, "logits")
        for name in want:
            if name.startswith("present"):
                assert_close(got[name][b, :, :rows], want[name][b, :, :rows], 1e-6, 1e-6, name)
