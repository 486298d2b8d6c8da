"""The packed model file: what makes a compressed model's size real.

A file is ``b"SQZ1"``, one codec byte, then a safetensors payload (compressed with LZMA when that
is smaller). For every tensor of the model's state the writer picks the smaller of two layouts:

- ``dense``: every value;
- ``bitmask``: one bit per position saying whether it is nonzero, plus the nonzero values;
- ``gaps``: the gaps between successive nonzero positions as bytes (a gap of 255 or more is
  spelled with 255s that carry no value, as in Deep Compression), plus the nonzero values.

Values of a tensor that lies on a quantization grid (a `FakeQuant` parametrization) are stored as
k-bit integer codes packed tightly into bytes, with their fp32 per-channel scales; other values
are stored as float32, or as float16 when that holds them exactly (the scales, which are rounded
to float16 when a grid is made, and biases kept on float16 values). Loading reads
tensors and JSON only: it never unpickles code.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from compressors.quant import FakeQuant

MAGIC = b"SQZ1"
FORMAT_VERSION = 1
_RAW, _LZMA = 0, 1
_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original$")


class PackedFileError(ValueError):
    """The file is not a squeeze packed model, or does not fit the model it is loaded into."""


def plain_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, FakeQuant]]:
    """The model's state with parametrizations evaluated, and the grid of each quantized tensor.

    The model is left untouched (removing parametrizations from a deep copy would also strip them
    from the original, which shares the copy's parametrized class).

    Returns:
        ``(state, grids)``: ``state`` has the keys of the uncompressed model's ``state_dict``;
        ``grids`` maps the keys of quantized tensors to their `FakeQuant`.
    """
    state: dict[str, torch.Tensor] = {}
    grids: dict[str, FakeQuant] = {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            match = _PARAMETRIZED.match(key)
            if match is None:
                if ".parametrizations." not in f".{key}":
                    state[key] = value.detach().contiguous()
                continue
            module_name, tensor_name = match.group(1) or "", match.group(2)
            module = model.get_submodule(module_name)
            full = f"{module_name}.{tensor_name}".lstrip(".")
            state[full] = getattr(module, tensor_name).detach().contiguous()
            for p in module.parametrizations[tensor_name]:
                if isinstance(p, FakeQuant):
                    grids[full] = p
    return state, grids


def save_packed(model: nn.Module, path: str | os.PathLike) -> int:
    """Write ``model`` as a packed file and return the file's size in bytes."""
    state, grids = plain_state(model)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, value in state.items():
        layout[name] = _encode(name, value, grids.get(name), tensors)
    payload = st_save(tensors, metadata={"squeeze": json.dumps({"v": FORMAT_VERSION, "t": layout})})
    packed = lzma.compress(payload, preset=9)
    codec, body = (_LZMA, packed) if len(packed) < len(payload) else (_RAW, payload)
    path = Path(path)
    path.write_bytes(MAGIC + bytes([codec]) + body)
    return path.stat().st_size


def read_packed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Decode a packed file into a plain state dict (float32 weights, exact values)."""
    data = Path(path).read_bytes()
    if data[:4] != MAGIC or len(data) < 5 or data[4] not in (_RAW, _LZMA):
        raise PackedFileError(f"{path} is not a squeeze packed model file")
    payload = lzma.decompress(data[5:]) if data[4] == _LZMA else data[5:]
    (header_len,) = struct.unpack("<Q", payload[:8])
    meta = json.loads(json.loads(payload[8 : 8 + header_len])["__metadata__"]["squeeze"])
    if meta["v"] != FORMAT_VERSION:
        raise PackedFileError(f"{path} has format {meta['v']}; this squeeze reads {FORMAT_VERSION}")
    tensors = st_load(payload)
    return {name: _decode(name, spec, tensors) for name, spec in meta["t"].items()}


def load_packed(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a packed file into ``model``, a freshly built model of the same architecture.

    Tensors whose shape changed (layers made smaller) replace the model's tensors.
    """
    state = read_packed(path)
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise PackedFileError(
            f"{path} does not fit the model: missing {missing}, unexpected {extra}"
        )
    with torch.no_grad():
        for name, value in state.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            current = getattr(module, attr)
            if current.shape == value.shape:
                current.copy_(value)
            elif isinstance(current, nn.Parameter):
                setattr(module, attr, nn.Parameter(value, requires_grad=current.requires_grad))
            else:
                setattr(module, attr, value)
    return model.eval()


def _encode(
    name: str, value: torch.Tensor, grid: FakeQuant | None, out: dict[str, torch.Tensor]
) -> dict:
    spec: dict = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if not value.is_floating_point():
        out[name] = value
        spec["enc"] = "raw"
        return spec
    flat = value.flatten().to(torch.float32)
    nonzero = flat != 0
    nnz, n = int(nonzero.sum()), flat.numel()
    half = torch.equal(flat.to(torch.float16).to(torch.float32), flat)  # float16 holds it exactly
    bits = grid.bits if grid is not None else (16 if half else 32)
    gaps = _encode_gaps(torch.nonzero(nonzero).flatten().numpy())
    costs = {"dense": bits * n, "bitmask": n + bits * nnz, "gaps": 8 * len(gaps) + bits * nnz}
    spec["enc"] = min(costs, key=costs.get)
    sparse = spec["enc"] != "dense"
    kept = flat[nonzero] if sparse else flat
    if spec["enc"] == "bitmask":
        out[f"{name}:mask"] = torch.from_numpy(np.packbits(nonzero.numpy(), bitorder="little"))
    elif spec["enc"] == "gaps":
        out[f"{name}:gaps"] = torch.from_numpy(gaps)
    if grid is None:
        out[f"{name}:values"] = kept.to(torch.float16 if half else torch.float32)
        return spec
    scale = grid.scale.expand_as(value).flatten()
    scale = scale[nonzero] if sparse else scale
    codes = torch.round(kept / scale).to(torch.int64) + grid.qmax
    out[f"{name}:codes"] = torch.from_numpy(_pack_bits(codes.numpy(), bits))
    out[f"{name}:scale"] = grid.scale.to(torch.float16).contiguous()  # exact: see channel_scale
    spec.update(bits=bits, qmax=grid.qmax, count=len(kept))
    return spec


def _decode(name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = spec["shape"]
    if spec["enc"] == "raw":
        return tensors[name]
    n = int(np.prod(shape)) if shape else 1
    if "bits" in spec:
        codes = _unpack_bits(tensors[f"{name}:codes"].numpy(), spec["bits"], spec["count"])
        codes = torch.from_numpy(codes.astype(np.int64) - spec["qmax"]).to(torch.float32)
        scale = tensors[f"{name}:scale"].to(torch.float32)
        if spec["enc"] == "dense":
            return codes.view(shape) * scale
        scale = scale.expand(shape).flatten()
    else:
        codes, scale = tensors[f"{name}:values"].to(torch.float32), None
    if spec["enc"] == "dense":
        return codes.view(shape)
    if spec["enc"] == "bitmask":
        packed = tensors[f"{name}:mask"].numpy()
        positions = np.flatnonzero(np.unpackbits(packed, count=n, bitorder="little"))
    else:
        positions = _decode_gaps(tensors[f"{name}:gaps"].numpy())
    index = torch.from_numpy(positions.astype(np.int64))
    flat = torch.zeros(n, dtype=torch.float32)
    flat[index] = codes * scale[index] if scale is not None else codes
    return flat.view(shape)


def _encode_gaps(positions: np.ndarray) -> np.ndarray:
    """Bytes spelling the gaps before each position; each 255 adds 255 and carries no value."""
    gaps = np.diff(positions, prepend=-1) - 1
    counts = gaps // 255 + 1
    out = np.full(int(counts.sum()), 255, dtype=np.uint8)
    out[np.cumsum(counts) - 1] = gaps % 255
    return out


def _decode_gaps(data: np.ndarray) -> np.ndarray:
    ends = np.flatnonzero(data < 255)
    return np.cumsum(data.astype(np.int64))[ends] + np.arange(len(ends))


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers below ``2**bits`` into a dense little-endian bit stream."""
    planes = (values[:, None] >> np.arange(bits)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits)).sum(axis=1)
