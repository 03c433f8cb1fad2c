"""Sizes: which symbolic dimension ``--tokens`` / ``--batch`` binds, and what one call processes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qiao.compiler.errors import QiaoError

# Symbolic dimension names that --tokens binds (LLM blocks) and that --batch binds.
TOKEN_DIMS = (
    "tokens",
    "num_tokens",
    "n_tokens",
    "seq",
    "seq_len",
    "sequence",
    "sequence_length",
    "seqlen",
)
BATCH_DIMS = ("batch", "batch_size", "n", "N")


def parse_sizes(text: str | Sequence[int] | None, flag: str) -> list[int] | None:
    """``"1,16,128"`` → ``[1, 16, 128]`` (sorted, unique); ``None`` stays ``None``."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        sizes = sorted({int(str(i).strip()) for i in items if str(i).strip()})
    except ValueError as err:
        raise QiaoError(
            f"bad {flag} {text!r}. fix: give positive integers separated by commas, e.g. 1,16,128"
        ) from err
    if not sizes or sizes[0] < 1:
        raise QiaoError(f"bad {flag} {text!r}. fix: give positive integers, e.g. 1,16,128")
    return sizes


def symbolic_dims(specs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Symbolic dimension names of the inputs, in order of first appearance."""
    names: list[str] = []
    for spec in specs:
        for d in spec["shape"]:
            if isinstance(d, str) and d not in names:
                names.append(d)
    return names


def _find_dim(names: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {n.lower(): n for n in names}
    for c in candidates:
        if c.lower() in lowered:
            return lowered[c.lower()]
    return None


@dataclass(frozen=True)
class SizePlan:
    """How sizes map onto the model: ``mode`` (tokens / batch / static), the dimension it binds,
    the sizes, the other symbolic dims' values, and the token / batch dimensions found."""

    mode: str
    dim: str | None
    sizes: tuple[int, ...]
    fixed: Mapping[str, int]
    token_dim: str | None
    batch_dim: str | None

    def dims(self, size: int) -> dict[str, int]:
        out = dict(self.fixed)
        if self.dim is not None:
            out[self.dim] = size
        return out

    def items(self, size: int, specs: Sequence[Mapping[str, Any]]) -> tuple[int, int | None]:
        """(samples, tokens) processed by one call at ``size``."""
        dims = self.dims(size)
        tokens = None
        if self.token_dim is not None:
            tokens = dims[self.token_dim] * (dims[self.batch_dim] if self.batch_dim else 1)
        if self.batch_dim is not None:
            samples = dims[self.batch_dim]
        elif self.token_dim is not None:
            samples = tokens
        else:  # static model: its leading dimension
            shape = specs[0]["shape"] if specs else []
            samples = int(shape[0]) if shape and isinstance(shape[0], int) else 1
        return samples, tokens


def plan_sizes(
    specs: Sequence[Mapping[str, Any]],
    tokens: Sequence[int] | None = None,
    batch: Sequence[int] | None = None,
    dims: Mapping[str, int] | None = None,
) -> SizePlan:
    """Decide which symbolic dim each size binds; every other symbolic dim takes ``dims`` or 1.

    ``--tokens`` binds a dim named like a sequence/token count (``seq``, ``tokens``...); ``--batch``
    binds ``batch`` (or the only symbolic dim). Without either: size 1 of the token dim if there is
    one, else of the batch dim; a model without symbolic dims runs once at its static shape."""
    if tokens is not None and batch is not None:
        raise QiaoError("pass either --tokens or --batch, not both. fix: drop one of them")
    names = symbolic_dims(specs)
    dims = dict(dims or {})
    unknown = sorted(set(dims) - set(names))
    if unknown:
        raise QiaoError(
            f"--dim {', '.join(unknown)}: the model has no such symbolic dimension. fix: use one "
            f"of {', '.join(names) or '(none: all shapes are static)'}"
        )
    token_dim = _find_dim(names, TOKEN_DIMS)
    batch_dim = _find_dim([n for n in names if n != token_dim], BATCH_DIMS)
    signature = "; ".join(f"{s['name']}: {s['dtype']}{list(s['shape'])}" for s in specs)
    if tokens is not None:
        if token_dim is None:
            raise QiaoError(
                "--tokens needs a symbolic token dimension (named one of "
                f"{', '.join(TOKEN_DIMS)}); the model's inputs are {signature}. fix: use --batch, "
                "or --dim NAME=SIZE"
            )
        mode, dim, sizes = "tokens", token_dim, tokens
    elif batch is not None:
        if batch_dim is None and len(names) == 1 and token_dim is None:
            batch_dim = names[0]
        if batch_dim is None:
            raise QiaoError(
                f"--batch needs a symbolic batch dimension (named {', '.join(BATCH_DIMS)}); the "
                f"model's inputs are {signature}. fix: use --tokens or --dim NAME=SIZE, or "
                "re-export the model with a dynamic batch axis"
            )
        mode, dim, sizes = "batch", batch_dim, batch
    elif token_dim is not None or batch_dim is not None or names:
        dim = token_dim or batch_dim or names[0]
        mode, sizes = ("tokens" if dim == token_dim else "batch"), [dims.pop(dim, 1)]
        if dim not in (token_dim, batch_dim):
            batch_dim = dim
    else:
        mode, dim, sizes = "static", None, [1]
    if dim is not None and dim in dims:
        raise QiaoError(f"--dim {dim} clashes with --{mode}. fix: drop one of them")
    fixed = {n: int(dims.get(n, 1)) for n in names if n != dim}
    return SizePlan(mode, dim, tuple(sizes), fixed, token_dim, batch_dim)
