"""The ``qiao`` command: a dispatch table of subcommands, one module each.

Each subcommand module has ``add_arguments(parser)`` and ``main(args) -> int``; they parse and
print, the work happens in library functions. ``QiaoError`` becomes one line on stderr and its exit
code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# name → (module, one-line help). Modules are imported only for the command being run.
COMMANDS = {
    "compile": (
        "qiao.compiler.cli.compile",
        "compile a model (.onnx file or built-in name) for a target",
    ),
    "run": ("qiao.compiler.cli.run", "run a compiled artifact on inputs from an .npz file"),
    "validate": (
        "qiao.compiler.cli.validate",
        "compile if needed, run, compare with ONNX Runtime / PyTorch",
    ),
    "targets": (
        "qiao.compiler.cli.targets",
        "list backends, their devices and whether they work here",
    ),
    "models": ("qiao.compiler.cli.models", "list the built-in models"),
    "generate": (
        "qiao.compiler.cli.generate",
        "generate text with a decoder (artifact, built-in, GenAI or Hugging Face folder)",
    ),
    "bench": ("qiao.compiler.cli.bench", "benchmark artifacts against ONNX Runtime and PyTorch"),
    "report": (
        "qiao.compiler.cli.report",
        "merge benchmark results into a Markdown report with plots",
    ),
    "tune": ("qiao.compiler.cli.tune", "measure and store schedule parameters for a device"),
    "pack": ("qiao.compiler.cli.pack", "bundle an artifact to run with Python and NumPy only"),
}


def _version() -> str:
    from qiao.compiler.driver import __version__

    return f"qiao {__version__}"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qiao",
        description="qiao (桥): compile PyTorch/ONNX models into validated artifacts for CPU, "
        "CUDA, ROCm, Ascend and Cambricon.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen command's module is imported (start-up stays fast); others get a stub parser.
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module_name, help_text) in COMMANDS.items():
        if chosen is not None and name != chosen:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
        )
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("QIAO_DEBUG") == "1"
    from qiao.compiler.errors import QiaoError

    try:
        return int(args._main(args) or 0)
    except QiaoError as err:
        if debug:
            traceback.print_exc()
        print(f"qiao {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("qiao: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in qiao or TVM: still one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            print(
                f"qiao {args.command}: internal error: {type(err).__name__}: {err}\n"
                "rerun with --debug for the traceback and report it",
                file=sys.stderr,
            )
        return 3


if __name__ == "__main__":
    sys.exit(main())
