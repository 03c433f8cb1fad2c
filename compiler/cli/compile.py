"""Compile a model (an .onnx file or a built-in model name) for a target into an artifact
directory."""

from __future__ import annotations

from qiao.compiler.cli.common import add_target_arguments, add_tuning_arguments, parse_key_values


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
    add_tuning_arguments(p, "candidates per kernel with --tune")


def main(args) -> int:
    from qiao.compiler import compile

    options = {"dump_ir": args.dump_ir} if args.dump_ir else {}
    if args.initializer_inputs != "constants":
        options["initializer_inputs"] = args.initializer_inputs
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
    return 0
