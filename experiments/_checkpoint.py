"""Pretrained baselines: a user's checkpoint loaded into the task's model, never unpickling code.

A checkpoint is one of:

- a safetensors file (``*.safetensors``);
- a state dict saved with ``torch.save`` (``*.pt``, ``*.pth``, ``*.bin``, ``*.ckpt``), read with
  ``torch.load(weights_only=True)``: tensors and plain containers only, so a file that would run
  code is refused; a Lightning checkpoint's ``state_dict`` is taken from it;
- a Hugging Face model folder (``save_pretrained``): its ``model.safetensors`` (or the shards
  its ``model.safetensors.index.json`` lists), else ``pytorch_model.bin``.

Names may carry one prefix the model's do not (a Lightning module's ``model.``): it is
stripped when that makes them match. Tensors the file leaves out because they are tied to
another (an output layer sharing the embedding table) are accepted when the model ties them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from experiments._data import WorkloadError

#: File suffixes read as a torch state dict.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint (one file, or a model folder's weights).

    Raises:
        WorkloadError: If there is no such file or folder, or the folder holds no weights.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors" and path.suffix not in TORCH_SUFFIXES:
            raise WorkloadError(
                f"checkpoint {str(path)!r}: a checkpoint is a .safetensors file, a state dict "
                f"({', '.join(TORCH_SUFFIXES)}) or a Hugging Face model folder; got a "
                f"{path.suffix or 'suffix-less'} file"
            )
        return [path]
    if not path.is_dir():
        raise WorkloadError(f"checkpoint {str(path)!r} does not exist")
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
    raise WorkloadError(
        f"checkpoint folder {str(path)!r} holds no model.safetensors, sharded safetensors or "
        "pytorch_model.bin"
    )


def checkpoint_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's weight files (part of the cached baseline's key)."""
    digest = hashlib.sha256()
    for file in checkpoint_files(path):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, by name, on the CPU (no code is unpickled).

    Raises:
        WorkloadError: If a file cannot be read as weights (a pickle that would run code too).
    """
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            state.update(load_file(file))
            continue
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses anything but tensors and containers
            raise WorkloadError(
                f"checkpoint {str(file)!r} cannot be read as weights only "
                f"({type(err).__name__}: {str(err).splitlines()[0]}); save the model's "
                "state_dict(), or use safetensors"
            ) from err
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]  # a Lightning checkpoint
        if not isinstance(loaded, dict) or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()
        ):
            raise WorkloadError(
                f"checkpoint {str(file)!r} is not a state dict (names to tensors): it holds a "
                f"{type(loaded).__name__}"
            )
        state.update(loaded)
    return state


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the checkpoint at ``path`` into ``model`` (see the module's docstring).

    Raises:
        WorkloadError: If names or shapes do not fit the model (naming a few of each).
    """
    state = _match_prefix(read_checkpoint(path), model.state_dict())
    own = model.state_dict()
    shapes = [
        f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if shapes:
        raise WorkloadError(
            f"checkpoint {str(path)!r} does not fit the task's model: shapes differ for "
            f"{', '.join(shapes[:5])}{' ...' if len(shapes) > 5 else ''}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {own[k].data_ptr() for k in state if k in own and own[k].numel()}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise WorkloadError(
            f"checkpoint {str(path)!r} does not fit the task's model: missing "
            f"{untied[:5]}{' ...' if len(untied) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )


def _match_prefix(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` with one leading prefix stripped from every name, where that makes more of its
    names the model's (a Lightning module's ``model.``)."""
    if not state or set(state) & set(own):
        return state
    first = next(iter(state))
    for cut in range(len(first)):
        if first[cut] != ".":
            continue
        prefix = first[: cut + 1]
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            if set(stripped) & set(own):
                return stripped
    return state
