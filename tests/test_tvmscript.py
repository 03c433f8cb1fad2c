"""``qiao.compiler.tvmscript``: TVM's script decorators take lazy frame records that carry what
``inspect.stack()`` gives, and parse as before with them (the macro lookup's own test:
``test_microkernel``)."""

from __future__ import annotations

import inspect
import sys

import numpy as np


def _both_stacks():
    """(qiao's records, ``inspect.stack()``) taken on one line, so every frame is at one place."""
    from qiao.compiler.tvmscript import outer_frames

    return outer_frames(sys._getframe()), inspect.stack()  # one line: one lineno


def test_records_carry_what_inspect_stack_gives():
    ours, ref = _both_stacks()
    assert len(ours) == len(ref) > 3
    for mine, theirs in zip(ours, ref):
        assert mine.frame is theirs.frame
        assert (mine.filename, mine.lineno, mine.function) == (
            theirs.filename,
            theirs.lineno,
            theirs.function,
        )
        assert mine.code_context == theirs.code_context
        assert mine.index == theirs.index
        assert tuple(mine)[:4] == tuple(theirs)[:4] and mine[4] == theirs[4]
    assert ours[0].code_context[0].strip().startswith("return outer_frames(")


def test_parser_modules_take_the_records_and_still_parse():
    """After ``fast_frames`` (twice: once installed) the decorators' modules see the records,
    and a function using a closure variable and a macro, and a class-scoped ``ir_module``,
    parse and run."""
    import importlib

    import tvm
    from tvm.script import ir as I
    from tvm.script import tirx as T

    from qiao.compiler.tvmscript import PARSER_MODULES, fast_frames

    fast_frames()
    fast_frames()
    for name in PARSER_MODULES:
        assert type(importlib.import_module(name).inspect).__name__ == "_ParserInspect"

    def build(scale: float):
        @T.macro
        def store(buf, i, value):
            buf[i] = value

        @T.prim_func(s_tir=True)
        def scaled(a: T.Buffer((8,), "float32"), b: T.Buffer((8,), "float32")):
            for i in range(8):
                store(b, i, a[i] * T.float32(scale))

        return scaled

    @I.ir_module
    class Module:
        @T.prim_func(s_tir=True)
        def main(a: T.Buffer((8,), "float32"), b: T.Buffer((8,), "float32")):
            for i in range(8):
                b[i] = a[i] + T.float32(1)

    x = np.arange(8, dtype="float32")
    for func, expected in ((build(2.5), x * 2.5), (Module["main"], x + 1)):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), "llvm")
        a, b = tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros(8, "float32"))
        lib["main"](a, b)
        np.testing.assert_array_equal(b.numpy(), expected)
