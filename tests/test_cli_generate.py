"""``qiao generate`` on the small built-in decoder ``qwen3-small``: the --json document, its tokens
against qiao's ``Generator`` and against ONNX Runtime GenAI (greedy) on the same ONNX folder, the
streamed text against the model's tokenizer, the compile cache, and every error path: exit 2, one
line on stderr, no traceback. Also the pieces of ``qiao bench --generate`` that need no timing:
the decode weight bytes against a count made by hand from the weights' shapes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper

from qiao.compiler import artifact as art
from qiao.compiler.cli.__main__ import main as cli_main
from qiao.compiler.cli.generate import TextStream, parse_ids
from qiao.compiler.decoder_source import NotADecoder, open_decoder
from qiao.compiler.testing import run_cli

MODEL = "qwen3-small"
PROMPT = [5, 17, 300, 42, 9]
NEW = 12


@pytest.fixture(scope="module")
def small():
    """qwen3-small compiled into the decoder cache (the test process's own QIAO_CACHE_DIR), which
    the CLI subprocesses inherit."""
    return open_decoder(MODEL)


def _tokenizer(artifact):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(artifact.directory, "tokenizer", "tokenizer.json"))


def _copy_without(artifact, tmp_path, drop_tokenizer=False, drop_decoder=False) -> str:
    """A copy of ``artifact`` without its tokenizer or its decoder section, manifest rehashed."""
    out = str(tmp_path / "variant")
    shutil.copytree(artifact.directory, out)
    manifest = dict(artifact.manifest)
    manifest.pop("files", None)
    if drop_tokenizer:
        shutil.rmtree(os.path.join(out, "tokenizer"))
        manifest["decoder"] = dict(manifest["decoder"], tokenizer=None)
    if drop_decoder:
        del manifest["decoder"]
    art.write_manifest(out, manifest)
    return out


def _reference_tokens(artifact, prompt, count) -> list[int]:
    """ONNX Runtime GenAI's greedy tokens on the folder qiao compiled (an independent engine)."""
    import onnxruntime_genai as og

    model = og.Model(artifact.manifest["source"]["folder"])
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + count, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], np.int32))
    out = []
    while not gen.is_done() and len(out) < count:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def test_json_tokens_equal_generator_and_ort_genai(small):
    proc = run_cli(
        "generate", MODEL, "--prompt-ids", ",".join(map(str, PROMPT)),
        "--max-new-tokens", str(NEW), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "compiling" not in proc.stderr  # the fixture's compile is reused from the cache
    doc = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert set(doc) == {"prompt_ids", "tokens", "text", "ttft_ms", "tpot_ms", "tokens_per_s"}
    assert doc["prompt_ids"] == PROMPT
    expected = small.generate(PROMPT, max_new_tokens=NEW).tokens[0]
    assert doc["tokens"] == expected
    reference = _reference_tokens(small, PROMPT, NEW)
    assert doc["tokens"] == reference[: len(doc["tokens"])]
    eos = set(small.manifest["decoder"]["eos_token_id"])
    assert len(doc["tokens"]) == NEW or doc["tokens"][-1] in eos
    assert doc["text"] == _tokenizer(small).decode(doc["tokens"], skip_special_tokens=True)
    assert doc["ttft_ms"] > 0 and doc["tpot_ms"] > 0 and doc["tokens_per_s"] > 0


def test_prompt_text_is_tokenized_and_streamed(small, capsys, monkeypatch):
    """--prompt goes through the artifact's tokenizer; the text comes out piece by piece as the
    tokens arrive and adds up to the decoded tokens."""
    writes: list[str] = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            writes.append("<flush>")

    monkeypatch.setattr("sys.stdout", Recorder())
    assert cli_main(["generate", MODEL, "--prompt", "the cat sat", "--max-new-tokens", "8"]) == 0
    tok = _tokenizer(small)
    ids = tok.encode("the cat sat").ids
    tokens = small.generate(ids, max_new_tokens=8).tokens[0]
    text = "".join(w for w in writes if w != "<flush>")
    assert text == tok.decode(tokens, skip_special_tokens=True) + "\n"
    assert writes.count("<flush>") >= len(tokens)  # flushed once per token: streamed
    assert "tokens; time to first token" in capsys.readouterr().err


def test_text_stream_holds_back_cut_characters():
    """A character whose UTF-8 bytes span two tokens is printed once, whole."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab, [], byte_fallback=True))
    tok.decoder = decoders.ByteFallback()
    stream = TextStream(tok)
    pieces = [stream.push(b) for b in "é!".encode()]  # é is 0xC3 0xA9
    assert pieces == ["", "é", "!"]


def test_ids_stream_without_tokenizer(small, tmp_path, capsys):
    bare = _copy_without(small, tmp_path, drop_tokenizer=True)
    assert cli_main(["generate", bare, "--prompt-ids", "5,6,7", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    expected = small.generate([5, 6, 7], max_new_tokens=4).tokens[0]
    assert out == " ".join(map(str, expected)) + "\n"
    assert cli_main(["generate", bare, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer" in err[0] and "fix:" in err[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["nope-not-a-model", "--prompt-ids", "1"], ["unknown decoder source", "qiao models"]),
        ([MODEL, "--prompt-ids", "1,x"], ["'x' is not a token id"]),
        ([MODEL, "--prompt-ids", "1,-3"], ["negative"]),
        ([MODEL, "--prompt-ids", "1,99999"], ["99999", "outside the vocabulary"]),
        ([MODEL, "--prompt-ids", "1,2", "--max-new-tokens", "5000"], ["context length overflow"]),
        ([MODEL, "--prompt-ids", "1", "--max-new-tokens", "0"], ["at least 1"]),
        ([MODEL, "--prompt-ids", "1", "--temperature", "-1"], ["temperature"]),
    ],
)
def test_errors_exit_2_with_one_line(small, capsys, args, words):
    assert cli_main(["generate", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("qiao generate: error:") and "Traceback" not in captured.err
    assert all(w in lines[0] for w in words), lines[0]
    assert captured.out == ""


def test_not_a_decoder_artifact(small, tmp_path):
    plain = _copy_without(small, tmp_path, drop_decoder=True)
    with pytest.raises(NotADecoder):
        open_decoder(plain)
    proc = run_cli("generate", plain, "--prompt-ids", "1,2")  # the real exit code, in a process
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a decoder artifact" in lines[0] and "fix:" in lines[0]


def test_parse_ids():
    assert parse_ids("1, 2,3") == [1, 2, 3]
    assert parse_ids("4 5") == [4, 5]


def test_decode_weight_bytes_counts_k_of_e_experts():
    """A graph with a dense MatMul, a tied lm_head reached through a Transpose, a Gather
    embedding (not read whole per token) and a MoE of E=8 experts, k=2: the bytes one decode step
    reads, counted here from the shapes."""
    from qiao.compiler.bench.generate import decode_weight_bytes

    hidden, inter, experts, k, vocab = 16, 24, 8, 2, 50
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [
        init("embed", vocab, hidden),
        init("w_dense", hidden, hidden),
        init("router", hidden, experts),
        init("fc1", experts, 2 * inter, hidden),
        init("fc2", experts, hidden, inter),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "w_dense"], ["h"]),
        helper.make_node("MatMul", ["h", "router"], ["logits_r"]),
        helper.make_node(
            "MoE", ["h", "logits_r", "fc1", "", "fc2"], ["m"], domain="com.microsoft", k=k
        ),
        helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["m", "embed_t"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TP.INT64, [1])],
        [helper.make_tensor_value_info("logits", TP.FLOAT, [1, vocab])],
        inits,
    )
    got = decode_weight_bytes(helper.make_model(graph))
    dense = 4 * (hidden * hidden + hidden * experts + vocab * hidden)
    expert = 4 * (2 * inter * hidden + hidden * inter)
    assert got == {"dense": dense, "experts": k * expert, "total": dense + k * expert}


def test_bench_generate_cli(small):
    """`qiao bench --generate` through the CLI: each engine in its own process, a result document
    `qiao report` reads, ONNX Runtime GenAI's greedy tokens equal to qiao's."""
    from qiao.compiler.bench import check_result

    proc = run_cli(
        "bench", small.directory, "--generate", "--engines", "qiao,ort-genai",
        "--prompt-len", "6", "--new-tokens", "4", "--no-roofs", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = check_result(json.loads(proc.stdout))
    (case,) = doc["cases"]
    assert case["size"] == {"prompt_len": 6, "new_tokens": 4, "batch": 1}
    assert set(case["engines"]) == {"qiao", "ort-genai"}
    assert case["check"]["ort-genai"] == {
        "ok": True, "max_abs": None, "matching": [4], "compared": [4],
    }  # fmt: skip
    for timed in case["engines"].values():
        assert timed["ttft_s"] > 0 and timed["latency_s"]["n"] == 3  # 4 tokens: 3 decode steps
        assert timed["peak_rss_mib"] > 0


def test_cache_key_follows_content(tmp_path):
    """The cache key of a folder changes with any file's bytes and not with its modification time
    alone; a built-in's key is its name's."""
    from qiao.compiler.decoder_source import cache_key

    folder = tmp_path / "genai"
    folder.mkdir()
    (folder / "genai_config.json").write_text("{}")
    (folder / "model.onnx").write_bytes(b"weights-1")
    root = str(tmp_path / "cache")
    first = cache_key(folder, root=root)
    assert first.startswith("genai-cpu-") and cache_key(folder, root=root) == first
    os.utime(folder / "model.onnx", ns=(1, 1))  # same bytes, new stamp: hashed again, same key
    assert cache_key(folder, root=root) == first
    (folder / "model.onnx").write_bytes(b"weights-2")
    assert cache_key(folder, root=root) != first
    assert cache_key(MODEL, root=root) == cache_key(MODEL, root=root) != cache_key("qwen3-0.6b")
