"""Compile if needed, run, and compare with ONNX Runtime (always) and PyTorch eager (built-in
models).

Exits 1 when any output differs beyond tolerance."""

from __future__ import annotations

from qiao.compiler.cli.common import add_target_arguments
from qiao.compiler.cli.compile import add_quantize_arguments, quantize_option


def add_arguments(p):
    p.add_argument("model", help="artifact directory, .onnx file, or built-in model name")
    add_target_arguments(p)
    p.add_argument(
        "--inputs", "-i", default=None, help=".npz file of inputs (default: example/random)"
    )
    p.add_argument("-o", "--output", default=None, help="artifact directory when compiling")
    p.add_argument(
        "--rtol", type=float, default=None, help="relative tolerance (default: per model)"
    )
    p.add_argument(
        "--atol", type=float, default=None, help="absolute tolerance (default: per model)"
    )
    add_quantize_arguments(p)


def main(args) -> int:
    from qiao.compiler.validate import validate

    report = validate(
        args.model,
        args.target,
        args.inputs,
        arch=args.arch,
        output_dir=args.output,
        rtol=args.rtol,
        atol=args.atol,
        **quantize_option(args),
    )
    print(report.format())
    return 0 if report.ok else 1
