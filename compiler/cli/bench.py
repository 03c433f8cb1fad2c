"""Benchmark a model on one or more targets against ONNX Runtime and PyTorch eager.

MODEL is a built-in name, an .onnx file or an artifact directory. --tokens (LLM blocks: the sequence
/ token dimension) or --batch binds a symbolic dimension to each size; one artifact per target
serves all of them. Prints a table (progress on stderr when it is a terminal); --json prints the
result document instead; -o writes it for `qiao report`. Exits 1 when an output differs from a
baseline's.
"""

from __future__ import annotations

import json
import sys

from qiao.compiler.cli.common import add_dim_range_argument, parse_dim_ranges, parse_key_values


def add_arguments(p):
    p.add_argument("model", help="built-in model name, .onnx file, or artifact directory")
    p.add_argument(
        "--target",
        "-t",
        default=None,
        help="backend(s), comma-separated; TARGET:ARCH picks a preset per target, e.g. "
        "cpu,cuda:sm_90 (default: cpu, or the artifact's own target)",
    )
    p.add_argument("--arch", default=None, help="device preset when there is one target")
    p.add_argument(
        "--baseline",
        default="onnxruntime,torch",
        help="comma-separated baselines: onnxruntime, torch, or none (default: onnxruntime,torch)",
    )
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--tokens", default=None, help="token counts, e.g. 1,16,128 (LLM blocks)")
    sizes.add_argument("--batch", default=None, help="batch sizes, e.g. 1,16")
    p.add_argument(
        "--dim",
        action="append",
        metavar="NAME=SIZE",
        help="value of another symbolic dimension (default 1; repeatable)",
    )
    add_dim_range_argument(p)
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per case (default 3)")
    p.add_argument("--repeat", type=int, default=30, help="timed samples per case (default 30)")
    p.add_argument(
        "--min-time",
        type=float,
        default=0.5,
        metavar="S",
        help="minimum seconds of timed calls per engine and case (default 0.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("-o", "--output", default=None, help="write the result JSON to this file")
    p.add_argument("--json", action="store_true", help="print the result JSON, nothing else")
    p.add_argument("--label", default=None, help="name of this machine in reports")
    p.add_argument(
        "--artifact-dir", default=None, help="keep the compiled artifacts in this directory"
    )
    p.add_argument(
        "--no-roofs",
        action="store_true",
        help="skip measuring this CPU's GEMM / copy ceilings for the roofline view",
    )
    p.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT", help="TVM RPC tracker")
    p.add_argument("--rpc-key", default=None, help="device key of the RPC server to run on")
    gen = p.add_argument_group(
        "decoders (--generate)",
        "MODEL is then a decoder artifact, built-in decoder, ONNX Runtime GenAI folder or Hugging "
        "Face folder; each engine runs in its own process; --batch gives the batch sizes",
    )
    gen.add_argument(
        "--generate",
        action="store_true",
        help="time token generation: time to first token, time per output token, tokens/s, "
        "peak memory, against the memory-bandwidth roofline",
    )
    gen.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    gen.add_argument("--new-tokens", type=int, default=128, help="new tokens (default 128)")
    gen.add_argument(
        "--engines",
        default="qiao,ort-genai,transformers",
        help="comma-separated: qiao, ort-genai, transformers (default: all three)",
    )
    gen.add_argument(
        "--past",
        default=None,
        metavar="LENGTHS",
        help="also time decode steps at these past lengths, e.g. 16,2048",
    )
    gen.add_argument(
        "--runs", type=int, default=1, help="timed generations per engine and case (default 1)"
    )
    gen.add_argument(
        "--hf-dir", default=None, help="Hugging Face folder of the weights for transformers"
    )


def _progress(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None

    def show(message: str) -> None:
        sys.stderr.write(f"\r\033[K{message}")
        sys.stderr.flush()

    return show


def main(args) -> int:
    from qiao.compiler.bench import bench, format_result, parse_sizes

    if args.generate:
        return _generate(args)
    baselines = [b.strip() for b in args.baseline.split(",") if b.strip() not in ("", "none")]
    show = _progress(args.json)
    try:
        result = bench(
            args.model,
            args.target,
            arch=args.arch,
            baselines=baselines,
            tokens=parse_sizes(args.tokens, "--tokens"),
            batch=parse_sizes(args.batch, "--batch"),
            dims=parse_key_values(args.dim, "--dim"),
            dim_ranges=parse_dim_ranges(args.dim_range),
            warmup=args.warmup,
            repeat=args.repeat,
            min_time=args.min_time,
            seed=args.seed,
            rpc_tracker=args.rpc_tracker,
            rpc_key=args.rpc_key,
            artifact_dir=args.artifact_dir,
            label=args.label,
            roofs=not args.no_roofs,
            progress=show,
        )
    finally:
        if show is not None:
            sys.stderr.write("\r\033[K")
    return _report(
        args,
        result,
        format_result,
        "outputs differ from a baseline ({}): these timings are of wrong results. fix: run "
        "`qiao validate` on the model and report it",
    )


def _generate(args) -> int:
    from qiao.compiler.bench import parse_sizes
    from qiao.compiler.bench.generate import bench_generate, format_generate

    if args.tokens:
        from qiao.compiler.errors import QiaoError

        raise QiaoError("--tokens does not apply to --generate. fix: use --prompt-len")
    show = _progress(args.json)
    try:
        result = bench_generate(
            args.model,
            engines=[e.strip() for e in args.engines.split(",") if e.strip()],
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            batch=parse_sizes(args.batch, "--batch") or [1],
            past=parse_sizes(args.past, "--past") or [],
            runs=args.runs,
            seed=args.seed,
            target=args.target or "cpu",
            hf_dir=args.hf_dir,
            label=args.label,
            roofs=not args.no_roofs,
            progress=show,
        )
    finally:
        if show is not None:
            sys.stderr.write("\r\033[K")
    return _report(
        args,
        result,
        format_generate,
        "greedy tokens differ from a baseline's ({}). fix: run `qiao generate` on both and "
        "report it",
    )


def _report(args, result: dict, formatter, mismatch: str) -> int:
    """Write ``result`` (``--output``), print it (JSON or ``formatter``'s table); 1 where an
    engine's outputs differ from a baseline's (``mismatch``, its ``{}`` the differences), else
    0."""
    from qiao.compiler.bench import mismatches, write_result

    if args.output:
        write_result(result, args.output)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(formatter(result))
        if args.output:
            print(f"wrote {args.output}")
    bad = mismatches(result)
    if bad:
        print(f"qiao bench: {mismatch.format('; '.join(bad))}", file=sys.stderr)
        return 1
    return 0
