"""Build a device-check folder: compile and pack the built-in models for a target, with reference
inputs and outputs, into one folder that the device machine runs with Python and NumPy only.

``check.sh`` drives this; see its header. The folder::

    DIR/check.json        target, arch, models, sizes
    DIR/run_bundles.py    the device side (benchmarks/device/run_bundles.py)
    DIR/runtime/          lib/ and vendor/ of the bundles, stored once (restored into each bundle
                          on the device; each bundle's sha256 manifest still checks them)
    DIR/bundles/NAME/     one `qiao pack --with-reference` bundle per model
    DIR/torch/NAME.pt     the model traced with TorchScript, for the PyTorch eager timing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

# The built-in models (small ones: the folder must travel under 60 MB), the MoE block, the MoE
# model and the decoder; 30B-sized weights would have to be generated on the device, which
# bundles do not do yet, so the MoE block has Qwen3-30B-A3B's structure at small dimensions.
DEFAULT_MODELS = ("mlp", "cnn", "transformer", "moe-block", "qwen3-moe-tiny", "qwen3-small")
# check name -> (built-in model, builder options)
VARIANTS = {
    "moe-block": (
        "qwen3-moe-30b-a3b-block",
        {
            "hidden_size": 64,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
        },
    ),
}
VARIANTS["transformer-fp16"] = ("transformer", {})
VARIANTS["moe-block-fp16"] = VARIANTS["moe-block"]
# check name -> compile options (``--dtype float16``: half weights; on CUDA the GEMMs and the MoE
# grouped GEMMs run on tensor cores with float16 activations and float32 accumulation)
COMPILE_OPTIONS = {
    "transformer-fp16": {"dtype": "float16"},
    "moe-block-fp16": {"dtype": "float16"},
}
# Opt-in (``--models transformer-fp16,moe-block-fp16``): the reference is ONNX Runtime on the
# float16-weight graph computing in float32, and the CUDA artifact's float16 activations put it
# ~1e-3 away, past the float32 tolerance the bundle states (validation does not yet widen it for
# tensor-core builds), so these report FAIL there; read their max_abs_err.
HALF_NOTE = (
    "float16 weights; on CUDA tensor cores the activations are float16 too, so max_abs_err "
    "(expected ~1e-3) matters, not the float32 tolerance"
)
SIZE_LIMIT = 60 * 2**20
HERE = os.path.dirname(os.path.abspath(__file__))


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def trace_torch(name: str, path: str) -> str | None:
    """Save the built-in model traced with TorchScript; returns why not, or ``None``."""
    try:
        import torch

        from qiao.models import ModelSpec, get_model

        model, options = VARIANTS.get(name, (name, {}))
        spec = get_model(model, **options)
        if not isinstance(spec, ModelSpec):
            return "a decoder (no single traced module)"
        with torch.no_grad():
            traced = torch.jit.trace(spec.module, tuple(spec.example_inputs), check_trace=False)
        if "qiao::" in str(traced.inlined_graph):
            # qiao's custom MoE op exists only where qiao.models is imported, not on the device.
            return "uses qiao's custom MoE op, which TorchScript cannot carry"
        traced.save(path)
        return None
    except Exception as err:  # the check still runs qiao; only the baseline is missing
        return f"not traceable: {type(err).__name__}: {str(err).splitlines()[0][:120]}"


def build(
    target: str,
    arch: str | None,
    out: str,
    models: list[str],
    artifacts: dict[str, str] | None = None,
    python: str | None = None,
) -> dict:
    """Compile (unless ``artifacts`` maps the name to an artifact already compiled for the
    target), pack and dedupe; returns the plan written to ``check.json``."""
    from qiao.compiler import compile, load
    from qiao.compiler.pack import pack

    out = os.path.abspath(out)
    if os.path.exists(out):
        if not os.path.isfile(os.path.join(out, "check.json")):
            sys.exit(f"check: {out} exists and is not a device-check folder; choose another -o")
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "bundles"))
    os.makedirs(os.path.join(out, "torch"))
    plan: dict = {"target": target, "arch": arch, "python": python}
    plan.update(models=[], sizes={}, notes={})
    with open(os.path.join(out, "check.json"), "w") as f:  # marks the folder (rebuilt if it fails)
        json.dump(dict(plan, complete=False), f)
    artifacts = {k: os.path.abspath(v) for k, v in (artifacts or {}).items()}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="qiao-check-") as work:
        # Built-in names resolve as paths first: a folder called "mlp" here must not shadow them.
        os.chdir(work)
        for name in models:
            start = time.perf_counter()
            print(f"[check] {name} for {target}{':' + arch if arch else ''}", flush=True)
            if name in artifacts:
                artifact = load(artifacts[name])
            else:
                model, options = VARIANTS.get(name, (name, {}))
                out_dir = os.path.join(work, name)
                artifact = compile(
                    model,
                    target,
                    out_dir,
                    arch=arch,
                    model_options=options,
                    **COMPILE_OPTIONS.get(name, {}),
                )
            bundle = os.path.join(out, "bundles", name)
            pack(artifact.directory, bundle, with_reference=True, python=python)
            if not os.path.isdir(os.path.join(out, "runtime")):
                os.makedirs(os.path.join(out, "runtime"))
                for part in ("lib", "vendor"):
                    shutil.copytree(os.path.join(bundle, part), os.path.join(out, "runtime", part))
            plan["sizes"][name] = folder_size(bundle)
            for part in ("lib", "vendor"):  # identical in every bundle (same target, same Python)
                shutil.rmtree(os.path.join(bundle, part))
            why = trace_torch(name, os.path.join(out, "torch", f"{name}.pt"))
            if why:
                plan["notes"][name] = f"pytorch: {why}"
            if name in COMPILE_OPTIONS:
                plan["notes"][name] = "; ".join(filter(None, (plan["notes"].get(name), HALF_NOTE)))
            plan["models"].append(name)
            print(f"[check] {name}: {time.perf_counter() - start:.0f} s", flush=True)
        os.chdir(cwd)
    shutil.copy2(os.path.join(HERE, "run_bundles.py"), out)
    plan["folder_bytes"] = folder_size(out)
    with open(os.path.join(out, "check.json"), "w") as f:
        json.dump(plan, f, indent=1)
    mb = 2**20
    for name in plan["models"]:
        print(f"[check] bundle {name}: {plan['sizes'][name] / mb:.1f} MB alone")
    print(f"[check] folder {out}: {plan['folder_bytes'] / mb:.1f} MB (limit {SIZE_LIMIT // mb} MB)")
    if plan["folder_bytes"] > SIZE_LIMIT:
        sys.exit(f"check: the folder is {plan['folder_bytes'] / mb:.1f} MB, over the 60 MB limit")
    return plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("target", help="cpu, cuda or rocm")
    p.add_argument("--arch", default=None, help="e.g. sm_90 for cuda (default: the backend's)")
    p.add_argument("-o", "--output", default=None, help="folder (default: device-check-TARGET)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated names")
    p.add_argument(
        "--from",
        dest="artifacts",
        action="append",
        default=[],
        metavar="NAME=ARTIFACT",
        help="pack this already compiled artifact as model NAME instead of compiling it",
    )
    p.add_argument("--python", default=None, metavar="X.Y", help="the device's Python")
    args = p.parse_args(argv)
    artifacts = dict(a.split("=", 1) for a in args.artifacts)
    out = args.output or f"device-check-{args.target}{'-' + args.arch if args.arch else ''}"
    models = [m for m in args.models.split(",") if m]
    build(args.target, args.arch, out, models, artifacts, args.python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
