"""Measure qiao's MoE kernel schedules on this CPU and store the best in the per-device table.

Times the gate/up and down grouped GEMMs (decode: the GEMV kernel; prefill: register micro-kernels
and task tiles) for one MoE shape — by default Qwen3-30B-A3B's expert shape with 16 experts, which
keeps the same per-expert work at a fraction of the memory — and writes the winner as the table
entry for the target's CPU (``cpu/<mcpu>``) in ``qiao/compiler/schedules/moe_table.json`` (or
``--table``)."""

from __future__ import annotations


def add_arguments(p):
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
        "--table", default=None, help="table file to update (default: the package's moe_table.json)"
    )
    p.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    p.add_argument(
        "--quick",
        action="store_true",
        help="two micro-kernel candidates and one tile size each (a smoke run)",
    )


def main(args) -> int:
    from qiao.backends import get_backend
    from qiao.compiler.kernels.moe_common import MoEConfig
    from qiao.compiler.schedules.moe_table import tune_cpu, write_entry

    target = get_backend("cpu").target(args.arch)
    cfg = MoEConfig(args.experts, args.hidden, args.inter, args.top_k)
    narrow = (
        dict(
            candidates=[(2, 4), (4, 4)],
            gemv_rows=(8,),
            tiles_up=(16,),
            tiles_down=(64,),
            prefetch_options=(0,),
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
        **narrow,
    )
    values = {k: v for k, v in best.to_json().items() if not k.startswith("gpu_")}
    print(f"best for {key}: " + ", ".join(f"{k}={v}" for k, v in values.items() if k != "device"))
    if not args.dry_run:
        path = write_entry(key, values, measured, path=args.table)
        print(f"written to {path}")
    return 0
