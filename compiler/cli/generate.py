"""Generate text with a decoder: prefill over the prompt, then one token at a time against a KV
cache, streaming the text to stdout as the tokens arrive (token ids when the model has no
tokenizer).

SOURCE is a decoder artifact directory, a built-in decoder (`qiao models`), an ONNX Runtime GenAI
folder or a Hugging Face folder; the last three are compiled on the way into a cache under
$QIAO_CACHE_DIR/decoders keyed by their content, and reused on the next call. Greedy by default;
--temperature > 0 samples (with --top-k, --top-p, --seed). Stops at the model's end-of-sequence
token or after --max-new-tokens. --json prints one JSON object and nothing else on stdout.
"""

from __future__ import annotations

import json
import os
import sys

from qiao.compiler.errors import InputMismatch, QiaoError


def add_arguments(p):
    p.add_argument(
        "source",
        help="decoder artifact directory, built-in decoder name, ONNX Runtime GenAI folder or "
        "Hugging Face folder",
    )
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", default=None, help="prompt text (needs the model's tokenizer)")
    prompt.add_argument(
        "--prompt-ids", default=None, metavar="IDS", help="prompt token ids, e.g. 1,2,3"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="new tokens (default 64)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)"
    )
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling probability (default 1)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.add_argument(
        "--target",
        "-t",
        default="cpu",
        help="backend to compile for when SOURCE is not an artifact (default: cpu)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"prompt_ids", "tokens", "text", "ttft_ms", "tpot_ms", "tokens_per_s"} only',
    )


def parse_ids(text: str) -> list[int]:
    """``"1, 2,3"`` → ``[1, 2, 3]``; ``InputMismatch`` naming the bad item otherwise."""
    items = [t.strip() for t in text.replace(" ", ",").split(",") if t.strip()]
    if not items:
        raise InputMismatch("--prompt-ids is empty. fix: pass token ids, e.g. --prompt-ids 1,2,3")
    ids = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise InputMismatch(
                f"--prompt-ids: {item!r} is not a token id. fix: pass non-negative integers "
                "separated by commas, e.g. --prompt-ids 1,2,3"
            ) from None
        if value < 0:
            raise InputMismatch(
                f"--prompt-ids: {value} is negative. fix: pass non-negative token ids"
            )
        ids.append(value)
    return ids


def load_tokenizer(artifact):
    """The artifact's ``tokenizers.Tokenizer`` (``decoder.tokenizer`` dir), or ``None``."""
    name = (artifact.manifest.get("decoder") or {}).get("tokenizer")
    if not name:
        return None
    path = os.path.join(artifact.directory, name, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


class TextStream:
    """Incremental detokenisation: the text of all new tokens so far, decoded again at each token
    (so merges across tokens come out right), emitting only what was not printed yet; a trailing
    U+FFFD (a UTF-8 sequence cut in the middle of a token) is held back until it completes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def push(self, token: int) -> str:
        """The new text after appending ``token`` ("" while a character is incomplete)."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.printed) :] if text.startswith(self.printed) else text
        self.printed = text
        return new

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def main(args) -> int:
    from qiao.compiler.decoder_source import open_decoder
    from qiao.compiler.generate import Generator

    ids = parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
    if args.max_new_tokens < 1:
        raise InputMismatch(
            f"--max-new-tokens {args.max_new_tokens}: fix: ask for at least 1 new token"
        )

    def note(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    artifact = open_decoder(args.source, args.target, progress=note)
    tokenizer = load_tokenizer(artifact)
    if ids is None:
        if tokenizer is None:
            raise QiaoError(
                f"{args.source} has no tokenizer, so --prompt cannot be turned into token ids. "
                "fix: pass --prompt-ids, or compile a folder that has tokenizer.json"
            )
        ids = tokenizer.encode(args.prompt).ids
        if not ids:
            raise InputMismatch("--prompt encodes to no tokens. fix: give a non-empty prompt")
    generator = Generator(artifact)
    vocab = generator.info.vocab_size
    bad = [t for t in ids if vocab is not None and t >= vocab]
    if bad:
        raise InputMismatch(
            f"--prompt-ids: token id {bad[0]} is outside the vocabulary [0, {vocab}). fix: use "
            "ids from this model's tokenizer"
        )
    stream = TextStream(tokenizer) if tokenizer is not None else None

    def show(step: int, tokens: list[int]) -> None:
        if args.json:
            return
        if stream is None:
            sys.stdout.write(("" if step == 0 else " ") + str(tokens[0]))
        else:
            sys.stdout.write(stream.push(tokens[0]))
        sys.stdout.flush()

    result = generator.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        on_token=show,
    )
    tokens = result.tokens[0]
    if args.json:
        text = None
        if tokenizer is not None:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
        doc = {
            "prompt_ids": ids,
            "tokens": tokens,
            "text": text,
            "ttft_ms": result.ttft_s * 1e3,
            "tpot_ms": result.tpot_s * 1e3,
            "tokens_per_s": result.tokens_per_s,
        }
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("\n")
        note(
            f"{len(tokens)} tokens; time to first token {result.ttft_s * 1e3:.1f} ms, "
            f"{result.tpot_s * 1e3:.2f} ms per token ({result.tokens_per_s:.1f} tokens/s)"
        )
    return 0
