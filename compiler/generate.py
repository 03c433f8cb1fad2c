"""Text generation with a compiled decoder: prefill over the prompts, then one token per step
against a key/value cache that stays on the device.

The artifact is a decoder in ONNX Runtime GenAI's layout (``input_ids``, ``attention_mask``,
``past_key_values.{i}.key|value`` in; ``logits``, ``present.{i}.key|value`` out). The cache is
GenAI's *shared buffer*: one tensor per layer and key/value, ``(batch, kv_heads, L, head)`` with
``L`` = the longest prompt plus the new tokens (never more than the context length), allocated
once per ``generate`` call on the device. Entry ``b`` of a batch holds ``T_b`` tokens; the mask
row ``attention_mask[b, :T_b] = 1`` tells the model where its new rows go (``[T_b - S_b, T_b)``)
and which rows attention reads. Ragged prompts are right-padded.

Two cache modes, recorded in the manifest (``decoder.kv_cache``):

- ``inplace``: the model writes the new rows into the buffers it is given and returns those very
  tensors as ``present``; nothing is copied between steps.
- ``copy``: ``present`` is a new tensor of the buffer's length; it becomes the next step's
  ``past`` (the device tensor is passed on as is, never through the host).
- ``concat``: the decoder joins past and new rows itself (``Concat``; GenAI's
  ``past_present_share_buffer: false``, e.g. its builder's CPU fp16 models): the cache starts
  empty and ``present``, one row longer per step, becomes the next ``past``. Prompts of a batch
  must then have equal lengths.

Sampling is on the host over the last valid row's logits: greedy by default, or temperature, top-k
and top-p (nucleus) with a seeded generator.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qiao.compiler.errors import InputMismatch, QiaoError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclasses.dataclass
class GenerationResult:
    """What ``Generator.generate`` returns.

    Attributes
    ----------
    prompt_ids : list of list of int
        The prompts as given.
    tokens : list of list of int
        The new tokens of each prompt (an end-of-sequence token that stopped it included).
    ttft_s : float
        Time to first token: the prefill call and the first sampling, seconds.
    decode_s : list of float
        Seconds of each decode step (one token for every entry of the batch).
    logits : list of numpy.ndarray, optional
        With ``return_logits``: per step, the ``(batch, vocab)`` logits the token was chosen from.
    """

    prompt_ids: list[list[int]]
    tokens: list[list[int]]
    ttft_s: float
    decode_s: list[float]
    logits: list[np.ndarray] | None = None

    @property
    def tpot_s(self) -> float:
        """Median time per output token after the first (0 when there was one token)."""
        return float(np.median(self.decode_s)) if self.decode_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: new tokens of the whole batch per second of decode steps."""
        if not self.decode_s:
            return 0.0
        return len(self.tokens) * len(self.decode_s) / float(np.sum(self.decode_s))


@dataclasses.dataclass(frozen=True)
class DecoderInfo:
    """The decoder's shape of things, from the manifest."""

    num_layers: int
    kv_heads: int
    head_size: int
    cache_dtype: str
    vocab_size: int | None
    context_length: int | None
    eos_token_id: tuple[int, ...]
    pad_token_id: int
    kv_cache: str
    has_position_ids: bool

    @classmethod
    def from_manifest(cls, manifest: dict) -> DecoderInfo:
        inputs = {spec["name"]: spec for spec in manifest["inputs"]}
        outputs = {spec["name"] for spec in manifest["outputs"]}
        layers = sorted({int(m.group(1)) for n in inputs if (m := _PAST.match(n))})
        if "input_ids" not in inputs or "logits" not in outputs or not layers:
            raise QiaoError(
                "this artifact is not a decoder with a KV cache (it needs inputs input_ids, "
                "attention_mask, past_key_values.N.key/value and outputs logits, present.N.*). "
                "fix: compile an ONNX Runtime GenAI folder, a Hugging Face Qwen3 folder or a "
                "built-in decoder (qiao models)"
            )
        if layers != list(range(len(layers))):
            raise QiaoError(f"decoder inputs name layers {layers}; expected 0..{len(layers) - 1}")
        past = inputs["past_key_values.0.key"]
        decoder = manifest.get("decoder") or {}
        kv_heads, head = past["shape"][1], past["shape"][3]
        kv_heads = decoder.get("kv_heads", kv_heads)
        head = decoder.get("head_size", head)
        if not isinstance(kv_heads, int) or not isinstance(head, int):
            raise QiaoError(
                "the decoder's cache shape (kv heads, head size) is not known: the manifest has "
                f"{past['shape']} and no 'decoder' section. fix: compile it from its GenAI folder "
                "(genai_config.json beside model.onnx)"
            )
        logits = next(spec for spec in manifest["outputs"] if spec["name"] == "logits")
        vocab = decoder.get("vocab_size", logits["shape"][-1])
        eos = decoder.get("eos_token_id", [])
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            num_layers=len(layers),
            kv_heads=int(kv_heads),
            head_size=int(head),
            cache_dtype=past["dtype"],
            vocab_size=int(vocab) if isinstance(vocab, int) else None,
            context_length=decoder.get("context_length"),
            eos_token_id=tuple(int(e) for e in eos),
            pad_token_id=int(decoder.get("pad_token_id") or 0),
            kv_cache=decoder.get("kv_cache", "copy"),
            has_position_ids="position_ids" in inputs,
        )


class Generator:
    """Generates tokens with a compiled decoder artifact (see the module docstring).

    Parameters
    ----------
    artifact : qiao.compiler.Artifact
        A decoder artifact (``qiao compile`` of a GenAI folder, a Hugging Face folder or a built-in
        decoder; a plain ``model.onnx`` in GenAI's layout works too, with no context check).
    """

    def __init__(self, artifact):
        self.artifact = artifact
        self.info = DecoderInfo.from_manifest(artifact.manifest)
        self.input_names = [spec["name"] for spec in artifact.inputs]
        self.output_names = [spec["name"] for spec in artifact.outputs]
        self._dtypes = {spec["name"]: spec["dtype"] for spec in artifact.inputs}
        self._logits_at = self.output_names.index("logits")
        self._present_at = {
            name: self.output_names.index(name.replace("past_key_values", "present"))
            for name in self.input_names
            if _PAST.match(name)
        }

    # --- checks ----------------------------------------------------------------------------------
    def _check(self, prompts, max_new_tokens: int) -> list[list[int]]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if not isinstance(prompts, Sequence) or not len(prompts):
            raise InputMismatch("no prompt given. fix: pass token ids, e.g. [1, 2, 3]")
        if all(isinstance(t, (int, np.integer)) for t in prompts):
            prompts = [prompts]
        batch = []
        for b, prompt in enumerate(prompts):
            if isinstance(prompt, np.ndarray):
                prompt = prompt.tolist()
            if not isinstance(prompt, Sequence) or not len(prompt):
                raise InputMismatch(f"prompt {b} is empty. fix: give at least one token id")
            ids = []
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                    raise InputMismatch(f"prompt {b} holds {t!r}, not a token id. fix: pass ints")
                vocab = self.info.vocab_size
                if t < 0 or (vocab is not None and t >= vocab):
                    raise InputMismatch(
                        f"prompt {b}: token id {t} is outside the vocabulary [0, {vocab}). "
                        "fix: use ids from this model's tokenizer"
                    )
                ids.append(int(t))
            batch.append(ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise InputMismatch(f"max_new_tokens={max_new_tokens!r} is not an integer")
        if max_new_tokens < 1:
            raise InputMismatch(f"max_new_tokens={max_new_tokens} must be at least 1")
        longest = max(len(p) for p in batch)
        context = self.info.context_length
        if context is not None and longest + max_new_tokens > context:
            raise InputMismatch(
                f"context length overflow: a prompt of {longest} tokens plus {max_new_tokens} new "
                f"tokens needs {longest + max_new_tokens} positions; the model's context length "
                f"is {context}. fix: shorten the prompt or ask for at most "
                f"{max(context - longest, 0)} new tokens"
            )
        return batch

    # --- the loop --------------------------------------------------------------------------------
    def generate(
        self,
        prompts,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        on_token: Callable[[int, list[int]], Any] | None = None,
        return_logits: bool = False,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after each prompt.

        Parameters
        ----------
        prompts : list of int, or list of list of int
            One prompt, or a batch of prompts of any lengths (right-padded internally).
        max_new_tokens : int
            New tokens per prompt; an entry stops early at an end-of-sequence token.
        temperature, top_k, top_p, seed
            Sampling: ``temperature`` 0 is greedy (the default); otherwise logits / temperature,
            kept to the ``top_k`` largest (0: all) and the smallest set reaching probability
            ``top_p``, sampled with ``numpy.random.default_rng(seed)``.
        eos_token_id : int or list of int, optional
            Stop tokens; default the model's (manifest ``decoder.eos_token_id``).
        on_token : callable, optional
            ``on_token(step, tokens)`` after each step with the new token of every entry (a
            finished entry repeats its stop token's pad).
        return_logits : bool
            Keep each step's ``(batch, vocab)`` logits in the result.

        Returns
        -------
        GenerationResult

        Raises
        ------
        InputMismatch
            Bad token ids, or prompt plus new tokens longer than the context length.
        """
        batch = self._check(prompts, max_new_tokens)
        _check_sampling(temperature, top_k, top_p)
        stops = self.info.eos_token_id if eos_token_id is None else eos_token_id
        stops = {int(stops)} if isinstance(stops, (int, np.integer)) else {int(s) for s in stops}
        rng = np.random.default_rng(seed)
        runner = self.artifact.runner
        info = self.info
        count = len(batch)
        lengths = np.array([len(p) for p in batch], np.int64)
        longest = int(lengths.max())
        length = longest + max_new_tokens  # positions the buffers hold
        if info.kv_cache == "concat":
            if len(set(lengths.tolist())) > 1:
                raise InputMismatch(
                    "this decoder joins its KV cache in the graph (no shared buffer), so the "
                    f"prompts of one batch must have equal lengths; got {sorted(set(lengths))}. "
                    "fix: generate them one at a time, or pad them to one length yourself"
                )
            length = 0  # the cache grows by `present`, one call at a time
        caches = {
            name: runner.empty((count, info.kv_heads, length, info.head_size), info.cache_dtype)
            for name in self._present_at
        }
        ids = np.full((count, longest), info.pad_token_id, np.int64)
        for b, prompt in enumerate(batch):
            ids[b, : len(prompt)] = prompt
        totals = lengths.copy()  # tokens in the cache after the step, per entry
        last_rows = lengths - 1  # the row of each entry's next-token logits
        new_tokens: list[list[int]] = [[] for _ in batch]
        done = np.zeros(count, bool)
        kept_logits: list[np.ndarray] | None = [] if return_logits else None
        ttft, decode = 0.0, []
        for step in range(max_new_tokens):
            start = time.perf_counter()
            logits = self._step(runner, ids, totals, caches)
            if logits.shape[1] == 1:  # the decoder returns each entry's last row only
                rows = logits[:, 0]
            else:
                rows = logits[np.arange(count), last_rows]  # (B, V)
            chosen = _sample(rows, temperature, top_k, top_p, rng)
            elapsed = time.perf_counter() - start
            if step == 0:
                ttft = elapsed
            else:
                decode.append(elapsed)
            if kept_logits is not None:
                kept_logits.append(rows.copy())
            for b in range(count):
                if not done[b]:
                    new_tokens[b].append(int(chosen[b]))
                    done[b] = int(chosen[b]) in stops
            if on_token is not None:
                on_token(step, [int(t) for t in chosen])
            if done.all() or step == max_new_tokens - 1:
                break
            ids = np.where(done, info.pad_token_id, chosen).astype(np.int64)[:, None]
            totals = totals + 1
            last_rows = np.zeros(count, np.int64)
        return GenerationResult(batch, new_tokens, ttft, decode, kept_logits)

    def _step(self, runner, ids: np.ndarray, totals: np.ndarray, caches: dict) -> np.ndarray:
        """One call: ``ids`` ``(B, S)`` with entry ``b`` holding ``totals[b]`` tokens after it;
        updates ``caches`` (replaced by ``present`` in copy mode) and returns the logits."""
        width = int(totals.max())
        mask = (np.arange(width)[None] < totals[:, None]).astype(np.int64)
        host = {"input_ids": ids, "attention_mask": mask}
        if self.info.has_position_ids:
            seq = ids.shape[1]
            first = totals - np.minimum(totals, seq)
            host["position_ids"] = (first[:, None] + np.arange(seq)[None]).astype(np.int64)
        args = []
        for name in self.input_names:
            if name in caches:
                args.append(caches[name])
            elif name in host:
                args.append(runner.to_device(host[name].astype(self._dtypes[name])))
            else:
                raise QiaoError(
                    f"the decoder takes an input {name!r} that qiao's generation loop does not "
                    "know how to fill. fix: export the decoder in ONNX Runtime GenAI's layout"
                )
        outputs = runner.call(args)
        if self.info.kv_cache != "inplace":
            for name, at in self._present_at.items():
                caches[name] = outputs[at]
        return runner.to_host(outputs[self._logits_at])


def _check_sampling(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise InputMismatch(f"temperature={temperature!r} must be a number >= 0 (0 is greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise InputMismatch(f"top_k={top_k!r} must be an integer >= 0 (0 keeps every token)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InputMismatch(f"top_p={top_p!r} must be in (0, 1]")


def _sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> np.ndarray:
    """One token per row of ``logits`` ``(B, V)``: greedy when ``temperature`` is 0."""
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    out = np.empty(len(logits), np.int64)
    for b, row in enumerate(logits.astype(np.float64) / temperature):
        order = np.argsort(-row, kind="stable")
        if top_k:
            order = order[:top_k]
        probs = np.exp(row[order] - row[order[0]])
        probs /= probs.sum()
        if top_p < 1:
            keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        out[b] = order[rng.choice(len(order), p=probs)]
    return out
