"""Measure schedules on this machine and keep the fastest in your tuning store.

  qiao tune [moe] [--arch CPU] [--quick] ...   MoE kernel schedule table (the default)
  qiao tune model MODEL [--trials N] ...       GEMM tiles of a model's kernels (= compile --tune)
  qiao tune show                               where the store is and what it holds

`moe` times the MoE gate/up and down grouped GEMMs (decode: the GEMV kernel; prefill: register
micro-kernels and task tiles, the gate/up ones on ~8 tokens per expert, where they run) for one
MoE shape — by default Qwen3-30B-A3B's expert shape with 16
experts, which keeps the same per-expert work at a fraction of the memory — and writes the winner as
the entry of the target's CPU (`cpu/<mcpu>`) in the user's MoE table. `model` measures the model's
GEMM-like kernels not yet tuned on this device (what `qiao compile --tune` does, without keeping an
artifact unless -o is given). Both write only to the tuning store, `$QIAO_CACHE_DIR/tuning`
(default `~/.cache/qiao/tuning`; --tuning-db replaces it), each file replaced atomically; the
defaults shipped in the package are read-only and apply wherever the store has no entry."""

from __future__ import annotations

import argparse
import os

from qiao.compiler.cli.common import add_target_arguments, add_tuning_arguments, parse_key_values


def _add_moe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        default=None,
        help="cpu preset or LLVM CPU name to tune for (default: this machine's CPU)",
    )
    p.add_argument("--experts", type=int, default=16, help="experts of the tuning shape (16)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (2048)")
    p.add_argument("--inter", type=int, default=768, help="expert intermediate size (768)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token (8)")
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="prefill tokens to tune on (default: ~32 tokens per expert)",
    )
    p.add_argument("--repeat", type=int, default=5, help="timing repeats per candidate (5)")
    p.add_argument(
        "--table",
        default=None,
        help="MoE table file to update (default: moe_table.json in the tuning store)",
    )
    p.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    p.add_argument(
        "--quick",
        action="store_true",
        help="two micro-kernel candidates and one tile size each (a smoke run)",
    )
    _add_store_argument(p)


def _add_store_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tuning-db",
        metavar="DIR",
        default=None,
        help="tuning store to use instead of $QIAO_CACHE_DIR/tuning (~/.cache/qiao/tuning)",
    )


def add_arguments(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    # `qiao tune --quick` (no subcommand) stays the MoE tuning it always was.
    _add_moe_arguments(p)
    sub = p.add_subparsers(dest="what", metavar="{moe,model,show}")
    moe = sub.add_parser(
        "moe", help="tune the MoE kernel schedule for a CPU (the default)", description=__doc__
    )
    moe.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_moe_arguments(moe)
    model = sub.add_parser(
        "model",
        help="tune the GEMM-like kernels of a model (what `qiao compile --tune` does)",
        description="Measure the model's GEMM-like kernels not yet tuned on this device and "
        "record the fastest tiles in the tuning store; later compiles for the device use them.",
    )
    model.add_argument(
        "model", help="path to an .onnx file, or a built-in model name (see `qiao models`)"
    )
    add_target_arguments(model)
    add_tuning_arguments(model, "candidates per kernel (16)")
    model.add_argument(
        "--model-option",
        action="append",
        metavar="NAME=VALUE",
        help="option of a built-in model's builder, e.g. batch=8 (repeatable)",
    )
    model.add_argument(
        "-o", "--output", default=None, help="keep the tuned artifact in this directory"
    )
    _add_store_argument(model)
    show = sub.add_parser("show", help="print where the tuning store is and what it holds")
    _add_store_argument(show)


def main(args) -> int:
    what = getattr(args, "what", None) or "moe"
    return {"moe": _main_moe, "model": _main_model, "show": _main_show}[what](args)


def _main_moe(args) -> int:
    from qiao.backends import get_backend
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules.moe_table import RESOLVED_BY_LOOKUP, tune_cpu, write_entry

    target = get_backend("cpu").target(args.arch)
    cfg = MoEConfig(args.experts, args.hidden, args.inter, args.top_k)
    narrow = (
        dict(
            candidates=[(2, 4), (4, 4)],
            gemv_rows=(8,),
            tiles_up=(16,),
            tiles_down=(64,),
            prefetch_options=(0,),
            k_chunks=(),
            prefetch_lines=(),
            few_prefetch_lines=(),
            lanes_sweeps=(),
        )
        if args.quick
        else {}
    )
    key, best, measured = tune_cpu(
        target,
        cfg,
        tokens_prefill=args.tokens,
        repeat=args.repeat,
        log=lambda line: print("  " + line, flush=True),
        root=args.tuning_db,
        **narrow,
    )
    values = {
        k: v
        for k, v in best.to_json().items()
        if not k.startswith("gpu_") and k not in RESOLVED_BY_LOOKUP
    }
    print(f"best for {key}: " + ", ".join(f"{k}={v}" for k, v in values.items() if k != "device"))
    if not args.dry_run:
        path = write_entry(key, values, measured, path=args.table, root=args.tuning_db)
        print(f"written to {path}")
    return 0


def _main_model(args) -> int:
    import tempfile

    from qiao.backends import get_backend
    from qiao.compiler import compile
    from qiao.compiler.errors import QiaoError
    from qiao.compiler.schedules.tuning import TuningDatabase

    backend = get_backend(args.target)
    if backend.is_gpu:
        raise QiaoError(
            f"`qiao tune model` tunes CPU GEMM kernels; {args.target!r} is a GPU backend. fix: "
            "use --target cpu"
        )
    target = backend.target(args.arch)
    database = TuningDatabase.for_target(target, args.tuning_db)
    before = len(database.records())
    options = dict(
        tune=True,
        trials=args.trials,
        tune_dims=parse_key_values(args.tune_dim, "--tune-dim"),
        tuning_db=args.tuning_db,
    )
    with tempfile.TemporaryDirectory(prefix="qiao-tune-model-") as scratch:
        artifact = compile(
            args.model,
            args.target,
            args.output or os.path.join(scratch, "artifact"),
            arch=args.arch,
            model_options=parse_key_values(args.model_option, "--model-option"),
            **options,
        )
        name = artifact.manifest["model"]
    after = len(TuningDatabase.for_target(target, args.tuning_db).records())
    print(
        f"tuned {name}: {after - before} kernel(s) measured, {after} recorded for this device "
        f"in {database.directory}"
    )
    if args.output:
        print(f"  artifact: {args.output}")
    return 0


def _main_show(args) -> int:
    import json

    from qiao.compiler.schedules.moe_table import (
        TABLE_PATH,
        read_measurements,
        read_table,
        user_table_path,
    )
    from qiao.compiler.schedules.tuning import RECORDS, tuning_root

    root = tuning_root(args.tuning_db)
    print(f"tuning store: {root}")
    user = user_table_path(args.tuning_db)
    mine, shipped = read_table(user), read_table(TABLE_PATH)
    print(f"MoE schedule table: {user}" + ("" if os.path.exists(user) else " (none yet)"))
    measured = read_measurements(user)
    for key in sorted(mine):
        print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in sorted(mine[key].items())))
        whole = measured.get(key, {}).get("overall")
        if isinstance(whole, dict) and isinstance(whole.get("gain"), (int, float)):
            loads = " + ".join(str(t) for t in whole.get("tokens", []))
            print(
                f"    when tuned: {whole['gain']:.2f}x as fast as {whole.get('against')} "
                f"(T={loads}, both GEMMs)"
            )
            found = whole.get("result")
            if isinstance(found, dict) and any(mine[key].get(k) != v for k, v in found.items()):
                print(
                    "    found, not kept (slower as a whole): "
                    + ", ".join(f"{k}={v}" for k, v in sorted(found.items()))
                )
    print(f"  shipped defaults (read-only, {TABLE_PATH}): {', '.join(sorted(shipped))}")
    devices = sorted(os.listdir(root)) if os.path.isdir(root) else []
    shown = 0
    for device in devices:
        path = os.path.join(root, device, RECORDS)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                count = len(json.load(f).get("records", {}))
        except (OSError, ValueError, AttributeError):
            count = "unreadable"
        print(f"GEMM records: {device}: {count}")
        shown += 1
    if not shown:
        print("GEMM records: none yet (`qiao tune model MODEL` or `qiao compile MODEL --tune`)")
    return 0
