"""Built-in, seeded PyTorch models with example inputs (``qiao models`` lists them).

Each entry builds a ``ModelSpec``: the module, example inputs, their names and which dimensions are
dynamic. Models register with ``register_model``; the MoE family lives in ``qwen3_moe``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qiao.compiler.errors import UnknownModel


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model ready to export.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"mlp"``.
    module : torch.nn.Module
        The model in eval mode with seeded weights.
    example_inputs : tuple of torch.Tensor
        Inputs used for export and as validation data.
    input_names, output_names : list of str
        ONNX graph names.
    dynamic_axes : dict
        ``{input_name: {axis: dim_name}}``: these dimensions stay symbolic in the artifact.
    rtol, atol : float
        Tolerances for validating this model against its references (fp32).
    """

    name: str
    module: torch.nn.Module
    example_inputs: tuple
    input_names: list
    output_names: list
    dynamic_axes: dict = field(default_factory=dict)
    rtol: float = 1e-4
    atol: float = 1e-4
    description: str = ""


@dataclass(frozen=True)
class DecoderSpec:
    """A built-in language-model decoder: compiled from an ONNX Runtime GenAI folder (with a KV
    cache and a tokenizer) that ``qiao.compiler.export_genai`` writes once and caches, not from a
    torch export of ``module``.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"qwen3-small"``.
    config : dict
        The model's Hugging Face ``config.json`` (``architectures`` names the transformers class).
    seed : int
        Seed of the random weights (with ``config``, the export's cache key).
    build : callable
        ``build() -> transformers model`` (float32, eval mode, seeded weights).
    write_tokenizer : callable
        ``write_tokenizer(directory)`` writes ``tokenizer.json`` and ``tokenizer_config.json``.
    context_length : int
        GenAI's ``context_length`` (the shared KV buffer's length).
    """

    name: str
    config: dict
    seed: int
    build: Callable
    write_tokenizer: Callable
    context_length: int
    description: str = ""
    rtol: float = 1e-4  # validation tolerances against ONNX Runtime (float32)
    atol: float = 1e-4

    @property
    def hf_model(self):
        """A fresh transformers model with this spec's weights (``build()``)."""
        return self.build()


_REGISTRY: dict[str, tuple[str, str, str]] = {}
# Modules whose import registers models; imported lazily by list_models()/get_model().
_MODEL_MODULES = (
    "qiao.models.mlp",
    "qiao.models.cnn",
    "qiao.models.vision",
    "qiao.models.transformer",
    "qiao.models.qwen3_moe",
    "qiao.models.qwen3",
)
_loaded = False


def register_model(name: str, description: str):
    """Decorator: register ``fn(**overrides) -> ModelSpec`` (or ``DecoderSpec``) under ``name``."""

    def wrap(fn: Callable[..., ModelSpec]):
        if name in _REGISTRY:
            raise ValueError(f"built-in model {name!r} registered twice")
        _REGISTRY[name] = (fn.__module__, fn.__name__, description)
        return fn

    return wrap


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _MODEL_MODULES:
        importlib.import_module(mod)
    _loaded = True


def list_models() -> dict[str, str]:
    """Return ``{name: description}`` of every built-in model."""
    _load_all()
    return {name: desc for name, (_, _, desc) in sorted(_REGISTRY.items())}


def get_model(name: str, **overrides) -> ModelSpec | DecoderSpec:
    """Build the built-in model ``name`` (seeded, deterministic)."""
    _load_all()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownModel(
            f"unknown model {name!r}: it is neither an existing .onnx file nor a built-in model.\n"
            f"fix: pass a path to an .onnx file or one of: {known} (see `qiao models`)"
        )
    module, fn_name, _ = _REGISTRY[name]
    return getattr(importlib.import_module(module), fn_name)(**overrides)


__all__ = ["DecoderSpec", "ModelSpec", "get_model", "list_models", "register_model"]
