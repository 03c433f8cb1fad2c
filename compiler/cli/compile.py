"""Compile a model (an .onnx file or a built-in model name) for a target into an artifact
directory."""

from __future__ import annotations

from qiao.compiler.cli.common import (
    add_dim_range_argument,
    add_target_arguments,
    add_tuning_arguments,
    parse_dim_ranges,
    parse_key_values,
)


def add_arguments(p):
    p.add_argument(
        "model", help="path to an .onnx file, or a built-in model name (see `qiao models`)"
    )
    add_target_arguments(p)
    p.add_argument(
        "-o", "--output", default=None, help="artifact directory (default: <model>-<target>)"
    )
    p.add_argument(
        "--model-option",
        action="append",
        metavar="NAME=VALUE",
        help="option of a built-in model's builder, e.g. batch=8 (repeatable)",
    )
    p.add_argument(
        "--dump-ir", metavar="DIR", default=None, help="write the IR after each lowering phase"
    )
    p.add_argument(
        "--initializer-inputs",
        choices=("constants", "inputs"),
        default="constants",
        help="initializers the graph also lists as inputs (ONNX IR < 4, Caffe2-converted files): "
        "take them as constants (default) or as run-time inputs you feed",
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="measure GEMM-like kernels not yet tuned on this device and record the fastest in "
        "the tuning store, as `qiao tune model` does (slow; later compiles reuse the records)",
    )
    add_dim_range_argument(p)
    add_tuning_arguments(p, "candidates per kernel with --tune")
    add_quantize_arguments(p)


def add_quantize_arguments(p) -> None:
    """Add ``--quantize int4|int8 [--block-size N] [--symmetric] [--accuracy-level L]`` and
    ``--dtype`` (compile and validate)."""
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16"),
        default=None,
        help="store the MatMul/Gemm, MoE expert and embedding weights in this dtype (half the "
        "bytes); compute stays float32 with float32 accumulation",
    )
    p.add_argument(
        "--quantize",
        choices=("int4", "int8"),
        default=None,
        help="weight-only round-to-nearest quantization of the MatMul/Gemm/MoE/embedding weights "
        "(ONNX Runtime's MatMulNBits/QMoE/GatherBlockQuantized); embeddings stay packed on every "
        "target (int4: half a byte each; the gathered rows are dequantized at run time); on CPUs "
        "the MatMul weights and the MoE experts stay packed too (experts whose sizes the packed "
        "kernels' tiles do not fit are widened to float32), on GPUs they are widened to float32",
    )
    p.add_argument(
        "--block-size", type=int, default=32, help="input features per scale with --quantize"
    )
    p.add_argument(
        "--symmetric",
        action="store_true",
        help="with --quantize: no zero points (default: per-block zero points)",
    )
    p.add_argument(
        "--accuracy-level",
        type=int,
        choices=(0, 1, 2, 3, 4),
        default=0,
        help="with --quantize: MatMulNBits accuracy_level; 0 exact float32 (default), 4 int8 "
        "activations and integer dot products (fastest; ~1%% of max|y| off, as ONNX Runtime)",
    )


def quantize_option(args) -> dict:
    """The ``quantize`` and ``dtype`` compile options of ``add_quantize_arguments``' flags ({}
    without them)."""
    options = {"dtype": args.dtype} if getattr(args, "dtype", None) else {}
    if not getattr(args, "quantize", None):
        return options
    bits = {"int4": 4, "int8": 8}[args.quantize]
    scheme = {
        "bits": bits,
        "block_size": args.block_size,
        "symmetric": args.symmetric,
        "accuracy_level": args.accuracy_level,
    }
    return dict(options, quantize=scheme)


def main(args) -> int:
    from qiao.compiler import compile

    options = {"dump_ir": args.dump_ir} if args.dump_ir else {}
    if args.initializer_inputs != "constants":
        options["initializer_inputs"] = args.initializer_inputs
    options.update(quantize_option(args))
    if args.dim_range:
        options["dim_ranges"] = parse_dim_ranges(args.dim_range)
    if args.tune:
        options.update(
            tune=True,
            trials=args.trials,
            tune_dims=parse_key_values(args.tune_dim, "--tune-dim"),
        )
    artifact = compile(
        args.model,
        args.target,
        args.output,
        arch=args.arch,
        model_options=parse_key_values(args.model_option, "--model-option"),
        **options,
    )
    m = artifact.manifest
    sig = ", ".join(f"{s['name']}: {s['dtype']}{list(s['shape'])}" for s in m["inputs"])
    print(
        f"compiled {m['model']} for {m['backend']['name']} ({m['backend'].get('arch')})"
        f" → {artifact.directory}"
    )
    print(f"  inputs: {sig}")
    taken = m.get("initializer_inputs") or {}
    if taken.get("names"):
        print(
            f"  {len(taken['names'])} initializers listed as graph inputs taken as "
            f"{taken['taken_as']} (--initializer-inputs)"
        )
    if m.get("quantization"):
        q = m["quantization"]
        ops = ", ".join(f"{n} {op}" for op, n in q["ops"].items())
        sym = "symmetric" if q["symmetric"] else "zero points"
        level = q.get("accuracy_level", 0)
        print(
            f"  quantized int{q['bits']} block {q['block_size']} ({sym}, accuracy_level "
            f"{level}): {ops}"
        )
        if q["kept_float"]:
            print(f"  kept float: {', '.join(q['kept_float'])}")
    if m.get("dtype"):
        d = m["dtype"]
        ops = ", ".join(f"{n} {op}" for op, n in d["ops"].items()) or "no weights"
        print(f"  {d['note']}: {ops}")
    return 0
