"""Run a compiled artifact; without --inputs, on seeded random inputs that fit its manifest."""

from __future__ import annotations

import numpy as np

from qiao.compiler.cli.common import parse_key_values


def add_arguments(p):
    p.add_argument("artifact", help="artifact directory written by `qiao compile`")
    p.add_argument(
        "--inputs", "-i", default=None, help=".npz file whose keys are the model's input names"
    )
    p.add_argument("-o", "--output", default=None, help="write outputs to this .npz file")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs (default 0)")
    p.add_argument(
        "--dim",
        action="append",
        metavar="NAME=SIZE",
        help="size of a symbolic dimension for random inputs, e.g. batch=4 (default 2)",
    )


def main(args) -> int:
    from qiao.compiler import load
    from qiao.compiler.validate import load_inputs

    artifact = load(args.artifact)
    if args.inputs:
        inputs = load_inputs(args.inputs)
    else:
        inputs = artifact.random_inputs(args.seed, parse_key_values(args.dim, "--dim"))
    outputs = artifact.run(inputs)
    for name, value in outputs.items():
        print(
            f"{name}: {value.dtype}{list(value.shape)} mean={float(np.mean(value)):.6g} "
            f"std={float(np.std(value)):.6g}"
        )
    if args.output:
        np.savez(args.output, **outputs)
        print(f"wrote {args.output}")
    return 0
