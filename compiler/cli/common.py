"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse

from qiao.compiler.errors import QiaoError


def add_target_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--target",
        "-t",
        default=None if required else "cpu",
        required=required,
        help="backend name (see `qiao targets`); default: cpu",
    )
    p.add_argument(
        "--arch",
        default=None,
        help="device preset or chip name of the backend (e.g. sm_90, gfx942)",
    )


def add_tuning_arguments(p: argparse.ArgumentParser, trials_help: str) -> None:
    """``--trials`` and ``--tune-dim``: the same flags for ``qiao compile --tune`` and
    ``qiao tune model``."""
    p.add_argument("--trials", type=int, default=None, metavar="N", help=trials_help)
    p.add_argument(
        "--tune-dim",
        action="append",
        metavar="NAME=SIZE",
        help="symbolic dimension value to tune at (default 64; repeatable)",
    )


def parse_key_values(items: list[str] | None, what: str) -> dict:
    """``["batch=4", "seq=16"]`` → ``{"batch": 4, "seq": 16}`` (ints where they parse)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise QiaoError(f"bad {what} {item!r}. fix: write it as NAME=VALUE")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def add_dim_range_argument(p) -> None:
    """``--dim-range NAME=LO:HI`` (repeatable): the ``dim_ranges`` compile option."""
    p.add_argument(
        "--dim-range",
        action="append",
        metavar="NAME=LO:HI",
        help="sizes a symbolic input dimension will take, e.g. batch=1:8 (repeatable): memory is "
        "then planned once for the largest and reused across layers (faster, chiefly for CNNs); "
        "inputs outside the range are refused",
    )


def parse_dim_ranges(items: list[str] | None) -> dict[str, tuple[int, int]]:
    """``["batch=1:8"]`` → ``{"batch": (1, 8)}``; a bad item is one ``QiaoError``."""
    out = {}
    for item in items or []:
        name, _, span = item.partition("=")
        lo, sep, hi = span.partition(":")
        try:
            lo, hi = int(lo), int(hi)
        except ValueError:
            lo = hi = 0
        if not name or not sep or not 1 <= lo <= hi:
            raise QiaoError(f"bad --dim-range {item!r}. fix: write it as NAME=LO:HI, 1 <= LO <= HI")
        out[name] = (lo, hi)
    return out
