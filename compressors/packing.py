"""The packed model file: what makes a compressed model's size real.

A file is ``b"SQZ2"``, one codec byte, the CRC-32 of the rest (4 bytes, little-endian; a
truncated or corrupted file is refused with `PackedFileError`), then a safetensors payload
(compressed with LZMA when that is smaller: at preset 9, or at preset 0 for payloads over
`FAST_LZMA_BYTES`, where a high preset
costs a minute for well under 1%: a 69 MB MiniLM payload took 62 s at preset 6 and 15 s at preset
0 on a 2-core CPU, for 9.8% and 9.4% fewer bytes). For every tensor of the model's state the
writer picks the smallest of three layouts:

- ``dense``: every value;
- ``bitmask``: one bit per position saying whether it is nonzero, plus the nonzero values;
- ``gaps``: the gaps between successive nonzero positions as bytes (a gap of 255 or more is
  spelled with 255s that carry no value, as in Deep Compression), plus the nonzero values.

Values of a tensor that a parametrization keeps on a discrete set of values (a quantization grid,
a codebook of shared weights) are stored as integer codes through one value protocol (`Codes`:
the parametrization's method ``packed(value)`` gives the codes and how values are rebuilt from
them, ``value = code * scale`` or ``value = codebook[code]``; the file knows nothing else of the
method), each code the index of its value in the tensor's code alphabet (a range such as -7..7,
or a list such as -1, +1 for binary weights), packed into ``ceil(log2(alphabet size))`` bits,
with float16 per-channel scales. Other values are stored as float32, or as float16 when that holds
them exactly (the scales, which are rounded to float16 when a grid is made, and biases kept on
float16 values).

The header also records how the model's structure differs from a freshly built one: layers
replaced by other modules (a low-rank pair, see `register_replacement`), layers that run on int8
kernels (`compressors.runtime`), module attributes that compression changed (a pruned layer's
``out_features``, a depthwise conv's ``groups``, an attention's ``embed_dim`` and ``num_heads``,
an LSTM's ``hidden_size``: given the uncompressed model as ``like``, every public attribute of
plain value that differs from it), and tensors shared by several modules (a tied embedding and
output layer), which are stored once and tied again on load. Loading rebuilds all of it; it
reads tensors and JSON only and never unpickles code.
"""

from __future__ import annotations

import json
import lzma
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import constriction
import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from compressors._targets import targets
from compressors.runtime import to_int8

MAGIC = b"SQZ2"
FORMAT_VERSION = 3
#: Bytes before the payload: magic, codec, CRC-32.
HEADER_BYTES = 9
_RAW, _LZMA = 0, 1
#: Payloads larger than this are compressed with LZMA's fastest preset.
FAST_LZMA_BYTES = 4 * 2**20
_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original$")


@dataclass(frozen=True)
class Codes:
    """A tensor on a discrete set of values, as a parametrization hands it to the packed file.

    A parametrization that keeps its tensor on such a set offers ``packed(value) -> Codes`` (and
    may set ``runtime = "int8"`` when its values are int8 codes times per-row scales that torch's
    int8 kernels can run); the file stores the codes bit-packed or entropy-coded, sparse where
    that is smaller, and ``tensors`` beside them.

    Attributes:
        codes: One integer per value, the tensor's shape.
        decode: How values are rebuilt: ``scaled`` (``code * tensors["scale"]``, the scale
            broadcast over the tensor: one per row) or ``codebook``
            (``tensors["codebook"][code]``).
        tensors: What ``decode`` reads. A tensor that float16 holds exactly is stored in 2 bytes.
    """

    codes: torch.Tensor
    decode: str
    tensors: dict[str, torch.Tensor]


#: The ways `Codes` rebuild values (see `Codes.decode`).
DECODERS = ("scaled", "codebook")


class PackedFileError(ValueError):
    """The file is not a squeeze packed model, or does not fit the model it is loaded into."""


class Replacement(nn.Module):
    """A module that replaces a layer of the original architecture (e.g. a low-rank pair).

    Subclasses registered with `register_replacement` are recorded in the packed file by
    `spec`, and `like` rebuilds an empty one from the original layer when the file is loaded.
    """

    def spec(self) -> dict:
        """JSON-able arguments that, with the original layer, fix this module's structure."""
        raise NotImplementedError

    @classmethod
    def like(cls, original: nn.Module, spec: dict) -> nn.Module:
        """An (untrained) module of the structure ``spec`` describes, replacing ``original``."""
        raise NotImplementedError


_REPLACEMENTS: dict[str, type[Replacement]] = {}


def register_replacement(cls: type[Replacement]) -> type[Replacement]:
    """Class decorator: let packed files record and rebuild modules of ``cls``."""
    _REPLACEMENTS[cls.__name__] = cls
    return cls


def plain_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """The model's state with parametrizations evaluated, and the parametrization that gives
    the codes (`Codes`) of each tensor kept on a discrete set of values.

    The model is left untouched (removing parametrizations from a deep copy would also strip them
    from the original, which shares the copy's parametrized class).

    Returns:
        ``(state, grids)``: ``state`` has the keys of the uncompressed model's ``state_dict``;
        ``grids`` maps the keys of such tensors to the parametrization with ``packed``.
    """
    state: dict[str, torch.Tensor] = {}
    grids: dict[str, nn.Module] = {}
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
                if callable(getattr(p, "packed", None)):
                    grids[full] = p
    return state, grids


def save_packed(model: nn.Module, path: str | os.PathLike, *, like: nn.Module | None = None) -> int:
    """Write ``model`` as a packed file and return the file's size in bytes.

    Args:
        model: The (compressed) model.
        path: Where to write.
        like: The uncompressed model it was made from (or a fresh one of its architecture):
            module attributes of ``model`` that differ from it are recorded, so that loading
            restores them. Needed whenever compression changed layer shapes.
    """
    path = Path(path)
    path.write_bytes(_file(model, like=like))
    return path.stat().st_size


def packed_size(
    model: nn.Module,
    *,
    replace: dict[str, tuple[torch.Tensor, nn.Module | None]] | None = None,
    like: nn.Module | None = None,
    lzma_pass: bool = True,
) -> int:
    """Bytes of the file `save_packed` would write for ``model``, with the values (and the
    parametrizations giving their codes, or None) of the tensors named in ``replace`` swapped
    in: the size of a variant of the model, without copying it (a deep copy of a parametrized
    model shares its class, and changing the copy's parametrizations would change the
    original's). ``lzma_pass=False``: the size before the payload's optional LZMA pass (the
    sum of `tensor_bytes` and the record of the model)."""
    return len(_file(model, like=like, replace=replace, lzma_pass=lzma_pass))


def _file(
    model: nn.Module,
    *,
    like: nn.Module | None = None,
    replace: dict[str, tuple[torch.Tensor, nn.Module | None]] | None = None,
    lzma_pass: bool = True,
) -> bytes:
    state, grids = plain_state(model)
    for name, (value, grid) in (replace or {}).items():
        state[name] = value.detach().contiguous()
        grids.pop(name, None)
        if grid is not None:
            grids[name] = grid
    tied = _tied_keys(model)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, value in state.items():
        if name not in tied:
            layout[name] = _encode(name, value, grids.get(name), tensors)
    meta: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "t": layout,
        "modules": {
            name: {"type": type(module).__name__, **module.spec()}
            for name, module in model.named_modules()
            if isinstance(module, Replacement)
        },
        "int8": _int8_layers(model, grids),
    }
    if tied:
        meta["tied"] = tied
    attrs = _changed_attributes(model, like) if like is not None else {}
    if attrs:
        meta["attrs"] = attrs
    payload = st_save(tensors, metadata={"squeeze": json.dumps(meta, separators=(",", ":"))})
    packed = (
        lzma.compress(payload, preset=0 if len(payload) > FAST_LZMA_BYTES else 9)
        if lzma_pass
        else payload
    )
    codec, body = (_LZMA, packed) if len(packed) < len(payload) else (_RAW, payload)
    return MAGIC + bytes([codec]) + struct.pack("<I", zlib.crc32(body)) + body


def tensor_bytes(value: torch.Tensor, grid: nn.Module | None = None) -> int:
    """Bytes the payload of a packed file spends on one tensor: its arrays in the layout the
    writer picks (codes of ``grid``'s `Codes` when given), their safetensors entries and the
    tensor's layout record. A file's payload is the sum over its tensors plus the record of the
    model (replaced modules, ties, changed attributes) and a few bytes of framing."""
    out: dict[str, torch.Tensor] = {}
    spec = _encode("t", value.detach(), grid, out)
    return len(st_save(out)) - 8 + len(json.dumps(spec, separators=(",", ":")))


def read_packed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Decode a packed file into a plain state dict (float32 weights, exact values)."""
    return _read(path)[0]


def int8_layers(path: str | os.PathLike) -> list[str]:
    """Names of the layers a packed file runs on int8 kernels."""
    return list(_read(path)[1]["int8"])


@dataclass(frozen=True)
class PackedTensor:
    """One tensor of a packed file as the file holds it (see `read_tensors`).

    Attributes:
        value: Its values (float32 for floating tensors), exactly as `read_packed` gives them.
        layout: How the file lays it out: ``dense``, ``bitmask`` or ``gaps`` (the last two keep
            only nonzero values), ``ans`` (entropy-coded codes), or ``raw`` (integer tensors).
        codes: Its integer codes at every position and their scales or codebook, for a tensor
            kept on a discrete set of values (``codes * scale`` or ``codebook[codes]`` is
            ``value``, exactly); None for other tensors.
    """

    value: torch.Tensor
    layout: str
    codes: Codes | None = None


def read_tensors(path: str | os.PathLike) -> dict[str, PackedTensor]:
    """Every tensor of a packed file as the file stores it: values, layout and integer codes
    (what an exporter needs to store codes rather than floats). A tied tensor's keys map to one
    `PackedTensor` object."""
    state, meta, tensors = _read(path)
    records = {
        name: PackedTensor(
            state[name],
            spec["enc"],
            _full_codes(name, spec, tensors) if "count" in spec else None,
        )
        for name, spec in meta["t"].items()
    }
    for alias, canonical in meta.get("tied", {}).items():
        records[alias] = records[canonical]
    return records


def read_payload(path: str | os.PathLike) -> tuple[bytes, bool]:
    """``(payload, lzma)``: a packed file's safetensors payload (decompressed) and whether the
    file holds it LZMA-compressed, after the checks every reader makes (magic, format,
    checksum). The file's size is `HEADER_BYTES` plus the payload's, or its LZMA stream's."""
    data = Path(path).read_bytes()
    if data[:3] == MAGIC[:3] and data[:4] != MAGIC:
        raise PackedFileError(
            f"{path} was written by another version of squeeze (format {data[3:4].decode()!r}); "
            f"this squeeze reads format {MAGIC[3:].decode()!r}. Rerun the trial to rewrite it."
        )
    if data[:4] != MAGIC or len(data) < HEADER_BYTES or data[4] not in (_RAW, _LZMA):
        raise PackedFileError(f"{path} is not a squeeze packed model file")
    body = data[HEADER_BYTES:]
    if zlib.crc32(body) != struct.unpack("<I", data[5:HEADER_BYTES])[0]:
        raise PackedFileError(
            f"{path} is truncated or corrupted: its checksum does not match ({len(data)} bytes)"
        )
    try:
        return (lzma.decompress(body) if data[4] == _LZMA else body), data[4] == _LZMA
    except lzma.LZMAError as err:  # checksum passed
        raise PackedFileError(f"{path} cannot be decoded: {err}") from None


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(state, header, raw tensors)`` of a packed file."""
    payload, _ = read_payload(path)
    try:
        (header_len,) = struct.unpack("<Q", payload[:8])
        header = json.loads(payload[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["squeeze"])
        tensors = st_load(payload)
    except (lzma.LZMAError, struct.error, ValueError, KeyError) as err:  # checksum passed
        raise PackedFileError(f"{path} cannot be decoded: {err}") from None
    if meta["v"] != FORMAT_VERSION:
        raise PackedFileError(f"{path} has format {meta['v']}; this squeeze reads {FORMAT_VERSION}")
    state = {name: _decode(name, spec, tensors) for name, spec in meta["t"].items()}
    for alias, canonical in meta.get("tied", {}).items():
        state[alias] = state[canonical]
    return state, meta, tensors


def load_packed(path: str | os.PathLike, model: nn.Module, *, int8: bool = True) -> nn.Module:
    """Load a packed file into ``model``, a freshly built model of the same architecture.

    Layers the file records as replaced (a low-rank pair, say) are rebuilt first; module
    attributes that compression changed are restored; tensors whose shape changed (layers made
    smaller) replace the model's tensors; tied tensors are tied again; layers the file records
    as int8 are converted to int8 kernels last, unless ``int8=False``, which keeps every layer
    float (with the same weight values), e.g. for export (`compressors.onnx_export`).
    """
    state, meta, tensors = _read(path)
    for name, spec in meta["modules"].items():
        spec = dict(spec)
        cls = _REPLACEMENTS.get(spec.pop("type"))
        if cls is None:
            raise PackedFileError(f"{path} has a module {name!r} of unknown type")
        model.set_submodule(name, cls.like(model.get_submodule(name), spec))
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise PackedFileError(
            f"{path} does not fit the model: missing {missing}, unexpected {extra}"
        )
    for name, values in meta.get("attrs", {}).items():
        module = model.get_submodule(name)
        for attr, value in values.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    tied = meta.get("tied", {})
    with torch.no_grad():
        for name, value in state.items():
            if name in tied:
                continue
            module, attr = _owner(model, name)
            current = getattr(module, attr)
            if current.shape == value.shape:
                current.copy_(value)
            elif isinstance(current, nn.Parameter):
                setattr(module, attr, nn.Parameter(value, requires_grad=current.requires_grad))
            else:
                setattr(module, attr, value)
        for alias, canonical in tied.items():
            module, attr = _owner(model, alias)
            source, source_attr = _owner(model, canonical)
            setattr(module, attr, getattr(source, source_attr))
    scales: dict[str, dict[str, torch.Tensor]] = {}
    for layer in meta["int8"] if int8 else ():
        prefix = f"{layer}." if layer else ""
        scales[layer] = {
            key[len(prefix) :].removesuffix(":scale"): value
            for key, value in tensors.items()
            if key.startswith(prefix) and key.endswith(":scale") and "." not in key[len(prefix) :]
        }
    to_int8(model, scales)
    return model.eval()


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, attr = key.rpartition(".")
    return model.get_submodule(module_name), attr


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """``{key: first key}`` for state keys whose tensor is the one of an earlier key."""
    first: dict[tuple, str] = {}
    tied = {}
    for key, value in _state_identities(model):
        if value in first:
            tied[key] = first[value]
        else:
            first[value] = key
    return tied


def _state_identities(model: nn.Module):
    """``(key, identity)`` of each entry of the plain state: the same identity for tensors
    shared by several modules (the original under a parametrization, else the storage)."""
    for key, value in model.state_dict(keep_vars=True).items():
        match = _PARAMETRIZED.match(key)
        if match is not None:
            full = f"{match.group(1) or ''}.{match.group(2)}".lstrip(".")
            yield full, ("p", id(value))
        elif ".parametrizations." not in f".{key}":
            storage = value.untyped_storage().data_ptr() if value.numel() else id(value)
            yield key, ("s", storage, value.storage_offset(), tuple(value.shape), value.stride())


def _int8_layers(model: nn.Module, grids: dict[str, nn.Module]) -> list[str]:
    """Layers all of whose weights are on grids that asked for int8 kernels."""
    layers: dict[str, list[bool]] = {}
    for target in targets(model).values():
        grid = grids.get(target.name)
        layers.setdefault(target.module_name, []).append(
            grid is not None and getattr(grid, "runtime", "float") == "int8"
        )
    return sorted(name for name, flags in layers.items() if all(flags))


#: Attribute values recorded when they differ from the uncompressed model's.
_PLAIN = (int, float, bool, str, type(None))


def _changed_attributes(model: nn.Module, like: nn.Module) -> dict[str, dict[str, Any]]:
    """Public attributes of plain value (numbers, strings, tuples of them) of each module that
    differ from the same module of ``like``."""
    reference = dict(like.named_modules())
    changed: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        other = reference.get(name)
        if other is None or isinstance(module, Replacement):
            continue
        if type_before_parametrizations(module) is not type_before_parametrizations(other):
            continue
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr == "training" or not _is_plain(value):
                continue
            if getattr(other, attr, None) != value:
                plain = list(value) if isinstance(value, tuple) else value
                changed.setdefault(name, {})[attr] = plain
    return changed


def _is_plain(value: Any) -> bool:
    if isinstance(value, tuple | list):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


def _encode(
    name: str, value: torch.Tensor, grid: nn.Module | None, out: dict[str, torch.Tensor]
) -> dict:
    spec: dict = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if not value.is_floating_point():
        out[name] = value
        spec["enc"] = "raw"
        return spec
    flat = value.flatten().to(torch.float32)
    nonzero = flat != 0
    nnz, n = int(nonzero.sum()), flat.numel()
    gaps = _encode_gaps(torch.nonzero(nonzero).flatten().numpy())
    if grid is not None:
        packed: Codes = grid.packed(value.detach())
        if packed.decode not in DECODERS:
            raise PackedFileError(f"{name}: unknown decode {packed.decode!r}; known: {DECODERS}")
        for key, tensor in packed.tensors.items():
            tensor = tensor.detach().to(torch.float32).contiguous()
            out[f"{name}:{key}"] = tensor.to(torch.float16) if _halves(tensor) else tensor
        spec["decode"] = packed.decode
        return _encode_codes(name, packed.codes.flatten().to(torch.int64), nonzero, gaps, spec, out)
    half = _halves(flat)
    bits = 16 if half else 32
    costs = {"dense": bits * n, "bitmask": n + bits * nnz, "gaps": 8 * len(gaps) + bits * nnz}
    spec["enc"] = min(costs, key=costs.get)
    _store_positions(name, spec["enc"], nonzero, gaps, out)
    kept = flat if spec["enc"] == "dense" else flat[nonzero]
    out[f"{name}:values"] = kept.to(torch.float16 if half else torch.float32)
    return spec


def _encode_codes(
    name: str,
    codes: torch.Tensor,
    nonzero: torch.Tensor,
    gaps: np.ndarray,
    spec: dict,
    out: dict[str, torch.Tensor],
) -> dict:
    """Store integer codes in the cheapest of: bit-packed dense / bitmask / gaps layouts, or the
    dense stream entropy-coded (rANS with the tensor's own code frequencies)."""
    n, nnz = codes.numel(), int(nonzero.sum())
    streams = {"dense": _Symbols(codes), "sparse": _Symbols(codes[nonzero])}
    costs = {
        "dense": streams["dense"].bits * n,
        "bitmask": n + streams["sparse"].bits * nnz,
        "gaps": 8 * len(gaps) + streams["sparse"].bits * nnz,
    }
    if streams["dense"].size > 1:
        ans = streams["dense"].ans()
        costs["ans"] = 8 * ans[0].nbytes + 8 * len(ans[1])
    spec["enc"] = min(costs, key=costs.get)
    _store_positions(name, spec["enc"], nonzero, gaps, out)
    stream = streams["dense" if spec["enc"] in ("dense", "ans") else "sparse"]
    spec.update(stream.spec, count=len(stream.index))
    if spec["enc"] == "ans":
        out[f"{name}:ans"] = torch.from_numpy(ans[0].view(np.int32))
        out[f"{name}:freqs"] = torch.from_numpy(ans[1])
    else:
        out[f"{name}:codes"] = torch.from_numpy(_pack_bits(stream.index.numpy(), stream.bits))
        spec["bits"] = stream.bits
    return spec


class _Symbols:
    """Integer codes as indices into their alphabet (a range lo..hi, or an explicit list)."""

    def __init__(self, codes: torch.Tensor) -> None:
        alphabet = torch.unique(codes) if len(codes) else torch.zeros(1, dtype=torch.int64)
        self.size = len(alphabet)
        self.bits = _bits_for(self.size)
        lo, hi = int(alphabet[0]), int(alphabet[-1])
        if hi - lo + 1 <= 2**self.bits:  # a range codes as compactly as the list
            self.spec = {"range": [lo, hi]}
            self.index = codes - lo
            self.size = hi - lo + 1
        else:
            self.spec = {"alphabet": alphabet.tolist()}
            self.index = torch.searchsorted(alphabet, codes)

    def ans(self) -> tuple[np.ndarray, np.ndarray]:
        """``(compressed words, frequencies)``: the index stream entropy-coded under its own
        symbol frequencies, which are stored as bytes (1..255 for a symbol that occurs)."""
        index = self.index.numpy().astype(np.int32)
        counts = np.bincount(index, minlength=self.size).astype(np.float64)
        freqs = np.where(counts > 0, np.maximum(1, np.round(255 * counts / counts.max())), 0)
        freqs = freqs.astype(np.uint8)
        coder = constriction.stream.stack.AnsCoder()
        if len(index):
            coder.encode_reverse(index, _ans_model(freqs))
        return coder.get_compressed(), freqs


def _ans_model(freqs: np.ndarray) -> constriction.stream.model.Categorical:
    weights = freqs.astype(np.float64)
    return constriction.stream.model.Categorical(weights / weights.sum(), perfect=False)


def _store_positions(
    name: str, enc: str, nonzero: torch.Tensor, gaps: np.ndarray, out: dict[str, torch.Tensor]
) -> None:
    if enc == "bitmask":
        out[f"{name}:mask"] = torch.from_numpy(np.packbits(nonzero.numpy(), bitorder="little"))
    elif enc == "gaps":
        out[f"{name}:gaps"] = torch.from_numpy(gaps)


def _halves(tensor: torch.Tensor) -> bool:
    """Whether float16 holds every value of ``tensor`` exactly."""
    return torch.equal(tensor.to(torch.float16).to(torch.float32), tensor)


def _bits_for(symbols: int) -> int:
    return max(1, math.ceil(math.log2(symbols))) if symbols > 1 else 1


def _decode(name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = spec["shape"]
    if spec["enc"] == "raw":
        return tensors[name]
    n = int(np.prod(shape)) if shape else 1
    if "count" in spec:  # integer codes on a grid
        codes = _stored_codes(name, spec, tensors)
        if spec["decode"] == "codebook":
            codes, scale = tensors[f"{name}:codebook"].to(torch.float32)[codes], None
        else:
            codes = codes.to(torch.float32)
            scale = tensors[f"{name}:scale"].to(torch.float32)
            if spec["enc"] in ("dense", "ans"):
                return codes.view(shape) * scale
            scale = scale.expand(shape).flatten()
    else:
        codes, scale = tensors[f"{name}:values"].to(torch.float32), None
    if spec["enc"] in ("dense", "ans"):
        return codes.view(shape)
    index = _stored_positions(name, spec, tensors, n)
    flat = torch.zeros(n, dtype=torch.float32)
    flat[index] = codes * scale[index] if scale is not None else codes
    return flat.view(shape)


def _stored_codes(name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The integer codes a tensor's record holds (int64): every position's for the ``dense``
    and ``ans`` layouts, the nonzero positions' for ``bitmask`` and ``gaps``."""
    if spec["enc"] == "ans":
        freqs = tensors[f"{name}:freqs"].numpy()
        coder = constriction.stream.stack.AnsCoder(tensors[f"{name}:ans"].numpy().view(np.uint32))
        index = coder.decode(_ans_model(freqs), spec["count"]).astype(np.int64)
    else:
        index = _unpack_bits(tensors[f"{name}:codes"].numpy(), spec["bits"], spec["count"])
    if "range" in spec:
        return torch.from_numpy(index + spec["range"][0])
    return torch.from_numpy(np.asarray(spec["alphabet"], dtype=np.int64)[index])


def _stored_positions(
    name: str, spec: dict, tensors: dict[str, torch.Tensor], n: int
) -> torch.Tensor:
    """Flat positions of the values a sparse layout (``bitmask`` or ``gaps``) stores."""
    if spec["enc"] == "bitmask":
        packed = tensors[f"{name}:mask"].numpy()
        positions = np.flatnonzero(np.unpackbits(packed, count=n, bitorder="little"))
    else:
        positions = _decode_gaps(tensors[f"{name}:gaps"].numpy())
    return torch.from_numpy(positions.astype(np.int64))


def _full_codes(name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> Codes:
    """A record's codes at every position, with its scales or codebook as float32. Positions
    a sparse layout leaves out (zeros) get the code of 0: 0 on a scaled grid, the codebook's
    index of 0 (appended to the codebook where it is missing)."""
    shape, decode = spec["shape"], spec["decode"]
    key = "codebook" if decode == "codebook" else "scale"
    table = tensors[f"{name}:{key}"].to(torch.float32)
    stored = _stored_codes(name, spec, tensors)
    if spec["enc"] in ("dense", "ans"):
        return Codes(stored.view(shape), decode, {key: table})
    zero = 0
    if decode == "codebook":
        zeros = torch.nonzero(table == 0).flatten()
        if len(zeros):
            zero = int(zeros[0])
        else:
            zero, table = len(table), torch.cat([table, table.new_zeros(1)])
    n = int(np.prod(shape)) if shape else 1
    full = torch.full((n,), zero, dtype=torch.int64)
    full[_stored_positions(name, spec, tensors, n)] = stored
    return Codes(full.view(shape), decode, {key: table})


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
