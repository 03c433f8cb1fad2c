"""Reading Hugging Face-format checkpoints from a local path: ``*.safetensors`` files (single or
sharded with ``model.safetensors.index.json``) and ``config.json``. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch

from qiao.compiler.errors import QiaoError


class CheckpointError(QiaoError):
    """A local checkpoint is missing, unreadable or does not fit the model."""


def safetensors_files(path: str | os.PathLike) -> list[str]:
    """The ``.safetensors`` files of a checkpoint file or directory (shard order of the index)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError(
                f"{path} is not a .safetensors file. "
                "fix: pass a .safetensors file or a Hugging Face "
                "checkpoint directory"
            )
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(
            f"checkpoint {path} does not exist. fix: pass a local .safetensors file or a directory "
            "holding one (qiao never downloads weights)"
        )
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(
            f"no .safetensors files in {path}. fix: point to a Hugging Face checkpoint directory"
        )
    return [os.path.join(path, f) for f in files]


def load_tensors(
    path: str | os.PathLike, prefixes: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (only names starting with one of ``prefixes`` when given)."""
    from safetensors import safe_open

    wanted = tuple(prefixes) if prefixes is not None else None
    out: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if wanted is None or name.startswith(wanted):
                        out[name] = f.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"cannot read {file}: {err}. fix: check the file is a complete safetensors file"
            ) from err
    return out


def load_config(path: str | os.PathLike) -> dict | None:
    """``config.json`` beside the checkpoint, or ``None``."""
    path = os.fspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    cfg = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg) as f:
        return json.load(f)


def take(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensors[name]`` as float32, checking its shape; a clear error when absent or mis-shaped."""
    if name not in tensors:
        raise CheckpointError(
            f"checkpoint has no tensor {name!r}. fix: check the checkpoint is a Qwen3-MoE model "
            "with the model's configuration (config.json)"
        )
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(
            f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, the model expects "
            f"{tuple(shape)}. fix: pass the matching configuration (or a config.json)"
        )
    return t.to(torch.float32)


__all__ = ["CheckpointError", "load_config", "load_tensors", "safetensors_files", "take"]
