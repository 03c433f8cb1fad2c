"""Compile options: one typed, documented object, checked when ``compile`` is called.

``qiao.compiler.compile(model, target, out, **options)`` turns its keyword options into a
``CompileOptions``; a misspelled or unknown name, or a value of the wrong kind, is an error listing
what is valid (exit 2 in the CLI) instead of being silently ignored. Backends read it as a read-only
mapping (``options.get("dump_ir")``) or by attribute.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from qiao.compiler.errors import QiaoError

INITIALIZER_INPUT_MODES = ("constants", "inputs")
WEIGHT_DTYPES = ("bfloat16", "float16")  # cast_dtype.DTYPES (importing it would pull in onnx)
KV_CACHE_MODES = ("copy", "inplace")  # convert_genai.KV_CACHE_MODES (the frontend imports TVM)


@dataclass(frozen=True)
class CompileOptions(Mapping):
    """Everything ``compile`` accepts besides the model, target, output directory and arch.

    Parameters
    ----------
    dump_ir : str, optional
        Directory to write the IR into after each lowering phase.
    initializer_inputs : {"constants", "inputs"}
        Initializers the graph also lists as inputs (ONNX IR < 4): constants (default), or the
        floating-point ones as run-time inputs.
    tune : bool
        Measure GEMM-like kernels not yet tuned on this device and record the fastest (CPU).
    trials : int, optional
        Candidates per kernel when tuning (default ``tuning.DEFAULT_TRIALS``).
    tune_dims : dict, optional
        ``{symbolic dim: size}`` to tune at (default 64 each).
    tuning_db : str, optional
        Directory replacing the per-user tuning database root.
    use_tuning_db : bool
        ``False`` ignores recorded schedules (measure the defaults).
    moe_schedule : dict, optional
        MoE schedule parameters overriding the device table (block sizes...).
    static_dims : dict, optional
        Hand-off backends: ``{symbolic dim: size}`` fixed in the vendor model.
    dim_ranges : dict, optional
        ``{symbolic dim: (min, max)}`` of ``main``'s inputs: hand-off backends pass the range to
        the vendor compiler; TVM backends plan memory once for ``max`` (buffers reused across
        layers, as for static shapes: ``BoundSymbolicDims``). The manifest records the ranges
        and inputs outside them are refused (``--dim-range NAME=LO:HI``).
    quantize : str or dict, optional
        Weight-only quantization before import: ``"int4"``, ``"int8"`` or ``{"bits": 4|8,
        "block_size": 32, "symmetric": False, "accuracy_level": 0}`` (``qiao.compiler.quantize``).
    dtype : {"bfloat16", "float16"}, optional
        Store the MatMul/Gemm, MoE expert and embedding weights in this dtype (half the bytes in
        the artifact and read per call); compute stays float32 with float32 accumulation
        (``qiao.compiler.frontend.cast_dtype``). Default: the weights' own dtypes.
    kv_cache : {"copy", "inplace"}, optional
        ``GroupQueryAttention``'s cache update: ``"copy"`` (``present`` is a new tensor; the
        default for a plain ONNX file) or ``"inplace"`` (the new rows are written into the past
        buffers, which ``present`` then is: past buffers must hold every token, GenAI's shared
        buffer; the default for decoder sources).
    """

    dump_ir: str | None = None
    initializer_inputs: str = "constants"
    tune: bool = False
    trials: int | None = None
    tune_dims: Mapping[str, int] | None = None
    tuning_db: str | None = None
    use_tuning_db: bool = True
    moe_schedule: Mapping[str, Any] | None = None
    static_dims: Mapping[str, int] | None = None
    dim_ranges: Mapping[str, tuple] | None = field(default=None)
    quantize: str | Mapping[str, Any] | None = None
    dtype: str | None = None
    kv_cache: str | None = None

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any] | None = None, **kwargs) -> CompileOptions:
        """Check and build; ``options`` may already be a ``CompileOptions`` (returned as is, or
        with ``kwargs`` applied)."""
        if isinstance(options, CompileOptions):
            return dataclasses.replace(options, **kwargs) if kwargs else options
        given = {**dict(options or {}), **kwargs}
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise QiaoError(
                f"unknown compile option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}. fix: use one of {', '.join(cls.names())}"
            )
        opts = cls(**given)
        opts.check()
        return opts

    def check(self) -> None:
        """Raise ``QiaoError`` naming the first option whose value is of the wrong kind."""

        def bad(name: str, want: str):
            raise QiaoError(
                f"compile option {name}={getattr(self, name)!r} is not {want}. fix: pass {want}"
            )

        if self.dump_ir is not None and not isinstance(self.dump_ir, (str, os.PathLike)):
            bad("dump_ir", "a directory path")
        if self.initializer_inputs not in INITIALIZER_INPUT_MODES:
            bad("initializer_inputs", " or ".join(map(repr, INITIALIZER_INPUT_MODES)))
        for name in ("tune", "use_tuning_db"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        if self.trials is not None and (
            isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1
        ):
            bad("trials", "a positive integer")
        if self.tuning_db is not None and not isinstance(self.tuning_db, (str, os.PathLike)):
            bad("tuning_db", "a directory path")
        for name in ("tune_dims", "static_dims"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, Mapping)
                and all(isinstance(k, str) and _is_size(v) for k, v in value.items())
            ):
                bad(name, "a mapping of dimension names to positive integers")
        if self.dim_ranges is not None and not (
            isinstance(self.dim_ranges, Mapping)
            and all(
                isinstance(k, str)
                and isinstance(v, (tuple, list))
                and len(v) == 2
                and all(_is_size(x) for x in v)
                and v[0] <= v[1]
                for k, v in self.dim_ranges.items()
            )
        ):
            bad("dim_ranges", "a mapping of dimension names to (min, max) sizes")
        if self.moe_schedule is not None and not isinstance(self.moe_schedule, Mapping):
            bad("moe_schedule", "a mapping of MoE schedule parameters")
        if self.quantize is not None:
            from qiao.compiler.quantize import QuantScheme

            try:
                QuantScheme.parse(self.quantize)
            except QiaoError as err:  # the scheme's own message names the valid forms
                raise QiaoError(f"compile option quantize={self.quantize!r}: {err}") from None
        if self.dtype is not None and self.dtype not in WEIGHT_DTYPES:
            bad("dtype", " or ".join(map(repr, WEIGHT_DTYPES)))
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_MODES:
            bad("kv_cache", " or ".join(map(repr, KV_CACHE_MODES)))

    # A read-only mapping of the options that are set (not None): what backends ``.get``.
    def _set(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def __getitem__(self, name: str) -> Any:
        values = self._set()
        if name not in values:
            raise KeyError(name)
        return values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._set())

    def __len__(self) -> int:
        return len(self._set())


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
