"""Merge `qiao bench -o` result files (from any number of machines) into a Markdown report with PNG
plots: latency per model and target, speed-up over the baselines, and a roofline-style view."""

from __future__ import annotations


def add_arguments(p):
    p.add_argument(
        "results", nargs="+", help="result JSON files (or directories of them) from `qiao bench -o`"
    )
    p.add_argument("-o", "--output", default="report", help="output directory (default: report/)")


def main(args) -> int:
    from qiao.compiler.report import load_results, write_report

    results = load_results(args.results)
    written = write_report(results, args.output)
    print(f"merged {len(results)} result file(s)")
    for kind, path in written.items():
        print(f"  {kind}: {path}")
    return 0
