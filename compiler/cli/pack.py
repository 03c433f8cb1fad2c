"""Pack a compiled artifact as a bundle that runs with Python and NumPy only (no qiao, apache-tvm,
torch, onnx or onnxruntime): `python BUNDLE/run.py --inputs in.npz -o out.npz`."""

from __future__ import annotations

import sys


def add_arguments(p):
    p.add_argument("artifact", help="artifact folder from `qiao compile` (cpu, cuda, rocm)")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write (replaced)")
    p.add_argument(
        "--with-reference",
        action="store_true",
        help="store example inputs and ONNX Runtime's outputs, for `run.py --check`",
    )
    p.add_argument(
        "--python",
        default=None,
        metavar="X.Y",
        help="Python the bundle runs on (default: this one; another downloads its apache-tvm-ffi "
        "wheel from the package registry)",
    )


def main(args) -> int:
    from qiao.compiler.pack import CPU_SIZE_LIMIT, pack

    bundle = pack(args.artifact, args.output, args.with_reference, args.python)
    size, weights = bundle["size_bytes"], bundle["weights_bytes"]
    mb = 2**20
    print(
        f"packed {bundle['model']} ({bundle['target']}, Python {bundle['python']}) → "
        f"{args.output}: {len(bundle['files'])} files, {size / mb:.1f} MB "
        f"({(size - weights) / mb:.1f} MB without weights)"
    )
    if bundle["reference"]:
        print(f"  reference: {bundle['reference']['source']} outputs on example inputs")
    print(f"  run: python {args.output}/run.py --inputs in.npz -o out.npz")
    if bundle["target"] == "cpu" and size - weights > CPU_SIZE_LIMIT:
        print(
            f"warning: {(size - weights) / mb:.1f} MB without weights exceeds the "
            f"{CPU_SIZE_LIMIT / mb:.0f} MB a CPU bundle should stay under",
            file=sys.stderr,
        )
    return 0
