"""What every zoo family shares: the entry record, the wrapper that makes a Hugging Face model a
positional-input module, and the three exporters (TorchScript, dynamo, Caffe2-style rewrite).

Nothing is downloaded: every model is built from code (a tiny config or a hand-written CNN) with
seeded random weights.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch

TORCHSCRIPT = "torchscript"  # torch.onnx.export(dynamo=False): the exporter of opsets 9-13 files
DYNAMO = "dynamo"  # torch.onnx.export(dynamo=True) through qiao.compiler.export, opset 18+
CAFFE2 = "caffe2"  # TorchScript at opset 8-9, rewritten the way Caffe2-converted zoo files look
EXPORTERS = (TORCHSCRIPT, DYNAMO, CAFFE2)


@dataclass
class Built:
    """A model ready to export.

    ``inputs(size)`` gives the example tensors for one entry size; ``dynamic`` maps input names
    to their symbolic axes (``None``: the file has static shapes and each size is exported and
    compiled on its own, as for the Caffe2-style files).
    """

    module: torch.nn.Module
    names: list[str]
    inputs: Callable[[tuple], tuple]
    dynamic: Mapping[str, Mapping[int, str]] | None


@dataclass(frozen=True)
class Entry:
    """One zoo model: architecture, how it was exported, the two sizes it is checked at."""

    name: str
    arch: str
    family: str
    exporter: str
    opset: int
    build: Callable[[], Built]
    sizes: tuple[tuple, tuple]
    rtol: float = 1e-4
    atol: float = 1e-4
    ci: bool = False  # in the default (CI) subset
    gpu: bool = False  # in the CUDA / ROCm code-generation subset
    xfail: str | None = None  # why the ONNX Runtime match fails (a strict xfail)
    xfail_compile: str | None = None  # why the compile itself fails (every test of the entry)
    xfail_fallback: str | None = None  # why a CPU kernel gets no schedule rule


class HFModel(torch.nn.Module):
    """A Hugging Face model called with keyword inputs in a fixed order, returning one tensor.
    ``forward`` takes named positional parameters (see ``HFModel2``): ``torch.export`` matches
    dynamic shapes to parameters, and ``*args`` would be one tuple to it."""

    def __init__(self, model, names: Sequence[str], output: str = "last_hidden_state"):
        super().__init__()
        self.model, self.names, self.output = model.eval(), list(names), output

    def _call(self, *args):
        kwargs = dict(zip(self.names, args))
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        return out[0] if isinstance(out, tuple) else getattr(out, self.output)

    def forward(self, x):
        return self._call(x)


class HFModel2(HFModel):
    """``HFModel`` of a model with two inputs (ids and attention mask)."""

    def forward(self, x, y):
        return self._call(x, y)


def hf(model, names: Sequence[str], inputs, dynamic, output: str = "last_hidden_state") -> Built:
    """``Built`` for a Hugging Face model (eval mode, seeded by the caller)."""
    wrapper = (HFModel, HFModel2)[len(names) - 1]
    return Built(wrapper(model, names, output), list(names), inputs, dynamic)


def he_init(model: torch.nn.Module, linear: bool = False) -> torch.nn.Module:
    """He-initialise convolutions (and ``linear`` layers): Hugging Face's std-0.02 init leaves deep
    CNN activations numerically zero, and a comparison of zeros proves nothing."""
    kinds = (torch.nn.Conv2d, torch.nn.Linear) if linear else (torch.nn.Conv2d,)
    for module in model.modules():
        if isinstance(module, kinds):
            torch.nn.init.kaiming_normal_(module.weight)
    return model


def images(channels: int = 3):
    """``inputs`` for ``(batch, height[, width])`` sizes: seeded normal images."""

    def make(size):
        batch, height, *rest = size
        width = rest[0] if rest else height
        gen = torch.Generator().manual_seed(batch * 1000 + height)
        return (torch.randn(batch, channels, height, width, generator=gen),)

    return make


def tokens(vocab: int, mask: bool = False):
    """``inputs`` for ``(batch, seq)`` sizes: token ids (and a mask padding half the first row)."""

    def make(size):
        batch, seq = size
        gen = torch.Generator().manual_seed(batch * 1000 + seq)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        if not mask:
            return (ids,)
        attention = torch.ones(batch, seq, dtype=torch.int64)
        attention[0, seq // 2 :] = 0  # the mask must matter
        return (ids, attention)

    return make


def quiet():
    """Silence the exporters' warnings and prints (tracer warnings, deprecation notes)."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(torch.no_grad())
    return stack


def export(entry: Entry, built: Built, size: tuple, path: str) -> str:
    """Export ``built`` with the entry's exporter and opset at ``size``; returns ``path``."""
    args = built.inputs(size)
    outputs = ["out"]
    if entry.exporter == DYNAMO:
        from qiao.compiler import export as qiao_export

        return qiao_export(
            built.module,
            args,
            path,
            input_names=built.names,
            output_names=outputs,
            dynamic_axes=built.dynamic,
            opset=entry.opset,
        )
    with quiet():
        torch.onnx.export(
            built.module.eval(),
            args,
            path,
            dynamo=False,
            opset_version=entry.opset,
            input_names=built.names,
            output_names=outputs,
            dynamic_axes=dict(built.dynamic) if built.dynamic else None,
            do_constant_folding=True,
        )
    if entry.exporter == CAFFE2:
        onnx.save(caffe2_style(onnx.load(path)), path)
    return path


def caffe2_style(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite a TorchScript export the way Caffe2-converted model-zoo files look: IR version 3,
    every initializer also listed in ``graph.input``, names like ``gpu_0/data_0`` (inputs and
    outputs) and ``conv1_w_0`` / ``conv1_b_0`` (weights), numbered blobs for the rest."""
    graph = model.graph
    rename: dict[str, str] = {}
    for i, value in enumerate(graph.input):
        rename[value.name] = f"gpu_0/data_{i}"
    for i, value in enumerate(graph.output):
        rename[value.name] = f"gpu_0/prob_{i}" if i else "gpu_0/softmax_1"
    layer = 0
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul", "BatchNormalization"):
            layer += 1
            stem = {"Conv": "conv", "BatchNormalization": "bn"}.get(node.op_type, "fc")
            suffixes = (
                ["w", "b"] if node.op_type != "BatchNormalization" else ["s", "b", "rm", "riv"]
            )
            for suffix, name in zip(suffixes, node.input[1:]):
                if name and name not in rename:
                    rename[name] = f"{stem}{layer}_{suffix}_0"
    blob = 0
    for node in graph.node:
        for name in node.output:
            if name not in rename:
                blob += 1
                rename[name] = f"blob{blob}_0"
    for init in graph.initializer:
        if init.name not in rename:
            blob += 1
            rename[init.name] = f"const{blob}_0"

    def new(name: str) -> str:
        return rename.get(name, name) if name else name

    for node in graph.node:
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
        node.name = ""
    for collection in (graph.input, graph.output, graph.value_info):
        for value in collection:
            value.name = new(value.name)
    for init in graph.initializer:
        init.name = new(init.name)
    listed = {v.name for v in graph.input}
    for init in graph.initializer:
        if init.name not in listed:
            graph.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    model.ir_version = 3
    del model.metadata_props[:]
    model.producer_name, model.producer_version = "caffe2", "0.8"
    onnx.checker.check_model(model)
    return model


def output_name(path: str | os.PathLike) -> str:
    """The (single) output name of an exported file."""
    return onnx.load(os.fspath(path), load_external_data=False).graph.output[0].name


def feeds(built: Built, size: tuple, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The inputs at ``size`` keyed by the file's input names (the Caffe2 rewrite renames them)."""
    return {n: t.numpy() for n, t in zip(input_names, built.inputs(size))}
