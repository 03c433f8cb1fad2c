"""TVMScript parsing without reading source lines of every frame on the stack.

TVM's script parser (``T.prim_func``, ``I.ir_module``, ``R.function``, and every ``T.macro`` call
while a function is parsed) takes ``inspect.stack()`` / ``inspect.getouterframes()`` for the
frames' globals and locals. Those build an ``inspect.FrameInfo`` per frame with its source line,
and for a frame without a source file (``<frozen importlib._bootstrap>`` when functions are
parsed while a module is imported, the parser's evaluated ``<ast>`` code, ``<stdin>``)
``inspect`` searches every module in ``sys.modules`` for it each time. Importing
``tvm.s_tir.tensor_intrin`` (every target's tensor-core intrinsics, parsed at import; the CUDA
half-precision GEMM schedules need it) took 26 s on a 2-core host that way, 2 s with the frames
below.

``fast_frames()`` gives those parser modules an ``inspect`` whose ``stack`` and
``getouterframes`` return frame records with the same fields (``frame``, ``filename``,
``lineno``, ``function``, ``code_context``, ``index``; ``positions`` is None), the line number
taken with the stack, the source line read from ``linecache`` only when a caller asks for it
(TVM reads it for one frame per parsed function). Everything else is ``inspect`` itself.
Idempotent; only those modules see it.
"""

from __future__ import annotations

import importlib
import inspect
import linecache
import sys
from typing import Any

# The TVM modules whose parsing walks the stack (TVM 0.27).
PARSER_MODULES = (
    "tvm.script.parser.core.parser",
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
    """``inspect`` for TVM's parser modules: ``stack`` and ``getouterframes`` give
    ``FrameRecord`` lists; every other name is ``inspect``'s."""

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    @staticmethod
    def stack(context: int = 1) -> list[FrameRecord]:
        return outer_frames(sys._getframe(1))

    @staticmethod
    def getouterframes(frame: Any, context: int = 1) -> list[FrameRecord]:
        return outer_frames(frame)


def fast_frames() -> None:
    """Give TVM's script parser modules the lazy frame records (see the module docstring)."""
    for name in PARSER_MODULES:
        module = importlib.import_module(name)
        if isinstance(getattr(module, "inspect", None), _ParserInspect):
            continue
        if getattr(module, "inspect", None) is inspect:  # a TVM that still uses the module
            module.inspect = _ParserInspect()
