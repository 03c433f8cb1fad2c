"""qiao's generation loop (``compiler/generate.py``) on ONNX Runtime GenAI's model builder's Qwen3
(a random 2-layer ``Qwen3ForCausalLM``, 640 positions) against transformers' ``generate`` (fp32,
eager, greedy, with its own KV cache) and ONNX Runtime GenAI on the same ``model.onnx``.

Greedy tokens must be identical; the logits each token was chosen from must match transformers'
within 1e-4 (absolute and relative; two float32 layers computed in a different order differ by
~1e-6). The decoder is compiled once (symbolic batch, prompt and past lengths) and serves every
case: prompt lengths 1..512, batch 1 and a ragged batch of 4, and both cache modes.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from qiao.compiler import compile
from qiao.compiler.errors import InputMismatch, QiaoError
from qiao.compiler.generate import _sample
from qiao.compiler.testing import (
    assert_close,
    genai_builder,
    hf_qwen3_folder,
    ort_genai_greedy,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime_genai") is None
    or importlib.util.find_spec("transformers") is None,
    reason="onnxruntime-genai (its model builder makes the decoder) or transformers is not "
    "installed: pip install -e '.[test]'",
)

CONTEXT = 640
TOL = 1e-4


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """(hf model, GenAI folder, qiao artifact)."""
    from transformers import Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("gen")
    hf = hf_qwen3_folder(root / "hf", max_position_embeddings=CONTEXT)
    folder = genai_builder(hf, root / "genai")
    artifact = compile(folder, "cpu", root / "artifact")
    return Qwen3ForCausalLM.from_pretrained(hf).eval(), folder, artifact


def _transformers(model, prompt, new_tokens):
    """Greedy tokens and the raw logits of each step, EOS ignored."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, np.stack([step[0].numpy() for step in out.logits])


def _prompt(length, seed=0):
    return np.random.default_rng(seed).integers(3, 300, length).tolist()


def test_manifest_describes_the_decoder(decoder):
    _, _, artifact = decoder
    info = artifact.manifest["decoder"]
    assert info["context_length"] == CONTEXT
    assert info["eos_token_id"] == [2]
    assert (info["num_layers"], info["kv_heads"], info["head_size"]) == (2, 2, 16)


def test_last_token_logits_rewrite_matches_ort(decoder, tmp_path):
    """The rewrite (``decoder_graph.last_token_logits``) through ONNX Runtime: its ``(B, 1, V)``
    logits are the original graph's rows ``len_b - 1`` for a ragged prefill and a decode step."""
    import onnx
    import onnxruntime as ort

    from qiao.compiler.frontend.decoder_graph import last_token_logits

    _, folder, artifact = decoder
    assert artifact.manifest["decoder"]["logits"] == "last"
    proto = onnx.load(f"{folder}/model.onnx")
    assert last_token_logits(proto)
    onnx.save(proto, tmp_path / "last.onnx", save_as_external_data=True, location="last.data")
    original = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
    rewritten = ort.InferenceSession(tmp_path / "last.onnx", providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    for seq, totals in ((6, np.array([6, 2, 4])), (1, np.array([9, 3, 7]))):
        ids = rng.integers(3, 300, (3, seq))
        mask = (np.arange(totals.max())[None] < totals[:, None]).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        feeds |= {
            f"past_key_values.{i}.{kv}": rng.standard_normal((3, 2, 12, 16)).astype(np.float32)
            for i in range(2)
            for kv in ("key", "value")
        }
        want = original.run(["logits"], feeds)[0]
        got = rewritten.run(["logits"], feeds)[0]
        assert got.shape == (3, 1, 300)
        rows = np.minimum(seq, totals) - 1
        assert_close(got[:, 0], want[np.arange(3), rows], 1e-6, 1e-6, "last-row logits")


def test_greedy_64_tokens_match_transformers_and_ort_genai(decoder):
    model, folder, artifact = decoder
    prompt = _prompt(7)
    result = artifact.generate(prompt, 64, eos_token_id=[], return_logits=True)
    want, want_logits = _transformers(model, prompt, 64)
    assert result.tokens[0] == want
    assert result.tokens[0] == ort_genai_greedy(folder, prompt, 64)
    assert_close(np.stack([step[0] for step in result.logits]), want_logits, TOL, TOL, "logits")
    assert result.ttft_s > 0 and len(result.decode_s) == 63 and result.tokens_per_s > 0


@pytest.mark.parametrize("length", [1, 2, 17, 128, 512])
def test_prompt_lengths(decoder, length):
    model, _, artifact = decoder
    prompt = _prompt(length, seed=length)
    result = artifact.generate(prompt, 4, eos_token_id=[], return_logits=True)
    want, want_logits = _transformers(model, prompt, 4)
    assert result.tokens[0] == want
    assert_close(np.stack([step[0] for step in result.logits]), want_logits, TOL, TOL, "logits")


def test_ragged_batch_of_four_equals_each_prompt_alone(decoder):
    model, _, artifact = decoder
    prompts = [_prompt(n, seed=n) for n in (1, 9, 30, 4)]
    result = artifact.generate(prompts, 16, eos_token_id=[], return_logits=True)
    for b, prompt in enumerate(prompts):
        want, want_logits = _transformers(model, prompt, 16)
        assert result.tokens[b] == want, f"entry {b}"
        got = np.stack([step[b] for step in result.logits])
        assert_close(got, want_logits, TOL, TOL, f"logits of entry {b}")


def test_eos_stops_an_entry(decoder):
    _, _, artifact = decoder
    prompts = [_prompt(5, seed=1), _prompt(8, seed=2)]
    free = artifact.generate(prompts, 6, eos_token_id=[])
    stop = free.tokens[0][2]  # the first entry's third token becomes its stop token
    stopped = artifact.generate(prompts, 6, eos_token_id=stop)
    assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(stop) + 1]
    if stop in free.tokens[1]:
        assert stopped.tokens[1] == free.tokens[1][: free.tokens[1].index(stop) + 1]
    else:
        assert stopped.tokens[1] == free.tokens[1]


def test_context_overflow_and_bad_ids_are_clear_errors(decoder):
    _, _, artifact = decoder
    with pytest.raises(InputMismatch, match="context length overflow.*640"):
        artifact.generate(_prompt(600), 41)
    artifact.generate(_prompt(600), 40, eos_token_id=[])  # exactly the context length fits
    with pytest.raises(InputMismatch, match="outside the vocabulary"):
        artifact.generate([5, 300], 2)
    with pytest.raises(InputMismatch, match="empty"):
        artifact.generate([[1, 2], []], 2)
    with pytest.raises(InputMismatch, match="max_new_tokens"):
        artifact.generate([1, 2], 0)
    with pytest.raises(InputMismatch, match="top_p"):
        artifact.generate([1, 2], 2, temperature=1.0, top_p=0)


def test_sampling_is_seeded_and_top_k_1_is_greedy(decoder):
    _, _, artifact = decoder
    prompt = _prompt(6, seed=3)
    greedy = artifact.generate(prompt, 8, eos_token_id=[]).tokens
    assert artifact.generate(prompt, 8, eos_token_id=[], temperature=1.5, top_k=1).tokens == greedy
    a = artifact.generate(prompt, 8, eos_token_id=[], temperature=5.0, seed=7).tokens
    b = artifact.generate(prompt, 8, eos_token_id=[], temperature=5.0, seed=7).tokens
    assert a == b


def test_sampler_frequencies_follow_the_truncated_softmax():
    """``_sample`` with top-k 3 at temperature 2 over 20000 draws: the frequencies of the three
    kept tokens within 0.015 of softmax(logits / 2) renormalised over them (independent NumPy),
    nothing else drawn; top-p keeps the smallest prefix reaching p."""
    logits = np.array([[1.0, 3.0, 0.5, 2.5, -1.0, 2.9]])
    rng = np.random.default_rng(0)
    draws = np.array([_sample(logits, 2.0, 3, 1.0, rng)[0] for _ in range(20000)])
    kept = [1, 5, 3]
    assert set(np.unique(draws)) <= set(kept)
    p = np.exp(logits[0, kept] / 2.0)
    p /= p.sum()
    freq = np.array([(draws == k).mean() for k in kept])
    assert np.abs(freq - p).max() < 0.015
    # p(1)=.36.., p(5)=.34.. at temperature 1 over all: top_p 0.5 keeps exactly those two
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert probs[1] < 0.5 < probs[1] + probs[5]
    draws = {int(_sample(logits, 1.0, 0, 0.5, rng)[0]) for _ in range(500)}
    assert draws == {1, 5}


def test_a_non_decoder_artifact_is_refused():
    """The check reads the manifest only: an MLP's (one float input, one output)."""
    from types import SimpleNamespace

    from qiao.compiler.generate import Generator

    manifest = {
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 4]}],
    }
    fake = SimpleNamespace(manifest=manifest, **manifest)
    with pytest.raises(QiaoError, match="not a decoder"):
        Generator(fake)


@pytest.mark.parametrize("name", ["qwen3-small", "qwen3-moe-small"])
def test_builtin_decoders_match_transformers_and_ort_genai(name, tmp_path):
    """qiao's own exports (``compiler/export_genai.py``; Qwen3-MoE with one ``com.microsoft::MoE``
    per block, which ONNX Runtime GenAI's builder cannot make): 64 greedy tokens from a ragged
    batch equal transformers' ``generate`` on the same weights and ONNX Runtime GenAI on the same
    folder; step logits within 1e-4 of transformers'."""
    from qiao.compiler.export_genai import builtin_folder
    from qiao.models import get_model

    spec = get_model(name)
    artifact = compile(name, "cpu", tmp_path / name)
    assert artifact.manifest["decoder"]["kv_cache"] == "inplace"
    prompts = [_prompt(11, seed=11), _prompt(3, seed=3)]
    prompts = [[t % 1000 + 3 for t in p] for p in prompts]
    result = artifact.generate(prompts, 64, eos_token_id=[], return_logits=True)
    model = spec.hf_model
    for b, prompt in enumerate(prompts):
        want, want_logits = _transformers(model, prompt, 64)
        assert result.tokens[b] == want, f"entry {b}"
        got = np.stack([step[b] for step in result.logits])
        assert_close(got, want_logits, TOL, TOL, f"logits of entry {b}")
    assert result.tokens[0] == ort_genai_greedy(builtin_folder(spec), prompts[0], 64)
