"""TVMScript parsing without reading the source line of every frame on the stack.

TVM 0.27's script parser walks the stack twice over: ``ScriptMacro._find_parser_def`` calls
``inspect.getouterframes`` at every macro call (to find the parser in a frame's globals), and the
decorators (``T.prim_func``, ``I.ir_module``, ``R.function``) take ``inspect.stack()`` for the
frames' locals. Both build an ``inspect.FrameInfo`` per frame with its source line; for a frame
without a source file (``<frozen importlib._bootstrap>`` when functions are parsed while a module
is imported, the parser's evaluated ``<ast>`` code, ``<stdin>``) ``inspect`` searches every module
in ``sys.modules`` each time.

``fast_frames()`` installs two replacements, which read no source:

- the macro lookup walks the frame chain (innermost first, as TVM's) for the parser. qiao's
  kernels are nested macros (the MoE grouped GEMM's token blocks, dot micro-kernels, lane sums):
  compiling one small MoE node spent 17 of its 22 s in TVM's lookup, in about 33,000 source
  lookups;
- the decorators' module ``inspect`` gives ``stack`` records with the same fields (``frame``,
  ``filename``, ``lineno``, ``function``, ``code_context``, ``index``; ``positions`` is None), the
  line number taken with the stack and the source line read from ``linecache`` only when a caller
  asks for it (TVM reads it for one frame per parsed function); everything else is ``inspect``
  itself. Importing ``tvm.s_tir.tensor_intrin`` (every target's tensor-core intrinsics, parsed at
  import; the CUDA half-precision GEMM schedules need it) took 26 s on a 2-core host with the
  macro lookup alone, 2 s with both.

Installed once per process: importing the kernels package or the CPU GEMM rules installs it,
and the GPU rules call it before TVM's tensor-core intrinsics are imported; a TVM without these
hooks is left as it is.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import linecache
import sys
from typing import Any

# The TVM modules whose decorators take ``inspect.stack()`` (TVM 0.27).
PARSER_MODULES = (
    "tvm.script.parser.ir.entry",
    "tvm.tirx.script.parser.entry",
    "tvm.relax.script.parser.entry",
)


class FrameRecord:
    """``inspect.FrameInfo``'s fields for one frame; the source line read on first use."""

    __slots__ = ("frame", "lineno")
    _FIELDS = ("frame", "filename", "lineno", "function", "code_context", "index")

    def __init__(self, frame: Any):
        self.frame = frame
        self.lineno = frame.f_lineno  # where the frame is now, as inspect records it

    @property
    def filename(self) -> str:
        return self.frame.f_code.co_filename

    @property
    def function(self) -> str:
        return self.frame.f_code.co_name

    @property
    def code_context(self) -> list[str] | None:
        line = linecache.getline(self.filename, self.lineno, self.frame.f_globals)
        return [line] if line else None

    @property
    def index(self) -> int | None:
        return 0 if self.code_context else None

    positions = None

    def __getitem__(self, i):
        return getattr(self, self._FIELDS[i])

    def __iter__(self):
        return (getattr(self, name) for name in self._FIELDS)


def outer_frames(frame: Any) -> list[FrameRecord]:
    """``frame`` and every frame that called it, innermost first."""
    records = []
    while frame is not None:
        records.append(FrameRecord(frame))
        frame = frame.f_back
    return records


class _ParserInspect:
    """``inspect`` for TVM's parser modules: ``stack`` gives ``FrameRecord`` lists; every other
    name is ``inspect``'s."""

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    @staticmethod
    def stack(context: int = 1) -> list[FrameRecord]:
        return outer_frames(sys._getframe(1))


def _fast_macro_lookup() -> None:
    """``ScriptMacro._find_parser_def`` walking the frame chain (see the module docstring)."""
    from tvm.script.parser.core import parser as core

    macro = getattr(core, "ScriptMacro", None)
    name = getattr(macro, "parser_object_name", None)
    if macro is None or name is None or not hasattr(macro, "_find_parser_def"):
        return

    def _find_parser_def(self):
        frame = inspect.currentframe()
        while frame is not None:
            parser = frame.f_globals.get(name)
            if parser is not None:
                return parser
            frame = frame.f_back
        raise RuntimeError(f"{name} not available")

    _find_parser_def.__wrapped__ = macro._find_parser_def  # TVM's own (the tests compare them)
    macro._find_parser_def = _find_parser_def


@functools.cache
def fast_frames() -> None:
    """Install the macro lookup and the decorators' frame records (see the module docstring)."""
    _fast_macro_lookup()
    for name in PARSER_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "inspect", None) is inspect:  # a TVM that still uses the module
            module.inspect = _ParserInspect()
