"""PyTorch → ONNX.

``export`` wraps ``torch.onnx.export`` (the dynamo exporter) with qiao's defaults: named inputs and
outputs, symbolic dimensions, quiet logs, and a clear error when the model does not export. MoE
blocks are recognised here and emitted as one ``com.microsoft::MoE`` node
(``qiao.compiler.export_moe``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from qiao.compiler.errors import QiaoError

DEFAULT_OPSET = 18


class ExportError(QiaoError):
    """PyTorch could not export the model to ONNX."""


def _translation_table() -> dict:
    """Custom op translations (MoE blocks...) registered by qiao's modules."""
    from qiao.compiler.export_moe import translation_table

    return translation_table()


def _prepare_module(module):
    """Swap recognised sub-blocks (e.g. Hugging Face MoE blocks) for export-friendly equivalents."""
    from qiao.compiler.export_moe import prepare_for_export

    return prepare_for_export(module)


def export(
    module,
    args: Sequence[Any],
    path: str | os.PathLike,
    kwargs: Mapping[str, Any] | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = DEFAULT_OPSET,
) -> str:
    """Export ``module(*args, **kwargs)`` to an ONNX file at ``path``.

    Parameters
    ----------
    module : torch.nn.Module
    args : tuple of torch.Tensor
        Example inputs.
    path : str or os.PathLike
        Where to write the ``.onnx`` file (weights over 2 GB go to external data beside it).
    kwargs : dict, optional
        Example keyword inputs.
    input_names, output_names : list of str, optional
    dynamic_axes : dict, optional
        ``{name: {axis: "dim_name"}}`` — these dimensions stay symbolic.
    opset : int
        The ai.onnx opset.

    Returns
    -------
    str
        ``path``.
    """
    import torch

    path = os.fspath(path)
    module = _prepare_module(module)
    if isinstance(module, torch.nn.Module):
        module.eval()
    quiet = io.StringIO()
    loggers = [
        logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")
    ]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                tuple(args),
                None,
                kwargs=dict(kwargs) if kwargs else None,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                dynamic_axes=dict(dynamic_axes) if dynamic_axes else None,
                opset_version=opset,
                dynamo=True,
                custom_translation_table=_translation_table() or None,
                verbose=False,
            )
            program.save(path, external_data=_needs_external_data(program))
    except ExportError:
        raise
    except Exception as err:
        msg = str(err).strip().splitlines()
        raise ExportError(
            f"PyTorch could not export {type(module).__name__} to ONNX: "
            f"{msg[0] if msg else type(err).__name__}. "
            "fix: check the example inputs match forward(); "
            "export it yourself with torch.onnx.export and pass the .onnx file"
        ) from err
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return path


def _needs_external_data(program) -> bool:
    try:
        total = sum(
            t.nbytes for t in program.model.graph.initializers.values() if t.const_value is not None
        )
    except Exception:
        return False
    return total > (1 << 31) - (64 << 20)
