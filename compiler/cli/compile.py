"""Compile a model (an .onnx file or a built-in model name) for a target into an artifact
directory."""

from __future__ import annotations

from qiao.compiler.cli.common import add_target_arguments, parse_key_values


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


def main(args) -> int:
    from qiao.compiler import compile

    options = {"dump_ir": args.dump_ir} if args.dump_ir else {}
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
    return 0
