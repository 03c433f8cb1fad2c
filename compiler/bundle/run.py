"""Run the model in this qiao bundle: Python >= 3.10 and NumPy, nothing else.

  python run.py --inputs in.npz -o out.npz    run on inputs (an .npz keyed by input name)
  python run.py --check                       run on the stored reference inputs and compare with
                                              the reference outputs (exit 1 on a mismatch)
  python run.py --check --time 50             ... and time 50 calls (median ms)
  python run.py --info                        what the model takes and returns

Exit codes: 0 ok, 1 outputs differ from the reference, 2 unusable bundle or inputs (tampered file,
CPU lacking the code's features, wrong input names/shapes/dtypes), 3 a failure inside the runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.dont_write_bytecode = True  # the bundle may be read-only, and stays as its manifest lists
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import qiao_runtime as rt  # noqa: E402


def _load_npz(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise rt.BundleError(
            f"cannot read {path}: {err}. fix: pass an .npz written by numpy.savez"
        ) from err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n")[0])
    p.add_argument("--inputs", "-i", help=".npz whose keys are the model's input names")
    p.add_argument("-o", "--output", help="write the outputs to this .npz")
    p.add_argument("--check", action="store_true", help="compare with the stored reference")
    p.add_argument("--time", type=int, default=0, metavar="N", help="time N calls of the model")
    p.add_argument("--json", metavar="PATH", help="write the check/timing result as JSON")
    p.add_argument("--info", action="store_true", help="print inputs and outputs, run nothing")
    args = p.parse_args(argv)
    try:
        return _main(args)
    except rt.BundleError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # a bug or a runtime failure: not exit 1, which means "mismatch"
        import traceback

        traceback.print_exc()
        print(f"run.py: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return 3


def _main(args) -> int:
    manifest = rt.read_manifest(HERE)
    if args.info:
        print(json.dumps({k: manifest[k] for k in ("model", "target", "inputs", "outputs")}))
        return 0
    reference = manifest.get("reference")
    if (args.check or not args.inputs) and not reference:
        raise rt.BundleError(
            "this bundle stores no reference inputs/outputs. fix: pass --inputs in.npz, or pack "
            "it with `qiao pack --with-reference`"
        )
    if args.check and args.inputs:
        raise rt.BundleError("--check runs the stored reference inputs; drop --inputs")
    bundle = rt.Bundle(HERE)
    inputs = _load_npz(args.inputs or os.path.join(HERE, reference["inputs"]))
    outputs = bundle.run(inputs)
    for name, value in outputs.items():
        print(f"{name}: {value.dtype}{list(value.shape)}")
    if args.output:
        np.savez(args.output, **outputs)
        print(f"wrote {args.output}")
    result: dict = {"model": manifest["model"], "target": manifest["target"]}
    ok = True
    if args.check:
        expected = _load_npz(os.path.join(HERE, reference["outputs"]))
        rtol, atol = reference["rtol"], reference["atol"]
        result["reference"] = reference["source"]
        result["outputs"] = {}
        for name, value in outputs.items():
            good, err, note = rt.compare(value, expected[name], rtol, atol)
            ok = ok and good
            result["outputs"][name] = {"ok": good, "max_abs_err": err}
            verdict = "ok" if good else f"MISMATCH {note}".rstrip()
            print(
                f"check {name} vs {reference['source']}: max abs err {err:.3e} "
                f"(rtol={rtol:g} atol={atol:g}) {verdict}"
            )
        result["ok"] = ok
    if args.time:
        times = sorted(bundle.time(inputs, repeat=args.time))
        result["time_ms"] = {
            "median": 1e3 * times[len(times) // 2],
            "min": 1e3 * times[0],
            "repeat": len(times),
        }
        result["samples_s"] = times
        print(f"time: median {result['time_ms']['median']:.3f} ms over {len(times)} calls")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.check:
        print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
