"""Where a packed file's bytes went, tensor by tensor (`byte_breakdown`; the accounting is
described in `search.results.explain`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from compressors import targets
from compressors._container import TRAILER, TRAILER_SQZ3, checked
from compressors._opening import opened
from compressors.packing import (
    HEADER_BYTES,
    MAGIC_SQZ2,
    MAGIC_SQZ3,
    PackedFileError,
    int8_layers,
    read_payload,
    read_tensors,
)

#: The lines that complete the per-tensor rows to the file's size: an SQZ5, SQZ4 or SQZ3 file's
#: index and framing; an SQZ2 file's model record, LZMA container and header.
INDEX, FRAMING = "index", "framing"
RECORD, CONTAINER, FILE_HEADER = "model record", "LZMA container", "file header"
#: Names of a target's dimensions, by kind (after these, a conv's kernel).
_DIMS = {
    "linear": ("out", "in"),
    "conv": ("out", "in/groups"),
    "attention": ("3×embed", "embed"),
    "recurrent": ("gates×hidden", "in"),
    "embedding": ("rows", "dim"),
}
#: Module attributes that count channels or heads, shown when compression changed them.
_COUNTS = ("num_heads", "num_attention_heads", "hidden_size", "groups")


@dataclass(frozen=True)
class Line:
    """A line of a breakdown beside its tensors' rows: ``label`` (`INDEX`, `FRAMING`, ...),
    ``kind``, ``what`` it holds, in words, and its ``bytes``."""

    label: str
    kind: str
    what: str
    bytes: int


@dataclass(frozen=True)
class Breakdown:
    """A packed file's bytes, tensor by tensor (see `search.results.explain` for the accounting).

    Attributes:
        path: The packed file.
        format: Its format (``SQZ5``, ``SQZ4``, ``SQZ3`` or ``SQZ2``).
        rows: One row per compressible tensor (``tensor`` its name), then one per module's other
            tensors (``tensor`` the module and their names): ``kind``, ``shape_before``,
            ``shape_after``, ``kept``, ``sparsity``, ``stored`` (bit width, codebook, float
            width), ``layout``, ``runtime``, ``params``, ``stored_tensors`` (the names the
            file stores them under, space-separated), ``arrays`` (each array's suffix, codec and
            bytes in the file), ``raw_bytes`` (the arrays' bytes uncompressed) and ``bytes``:
            what the file stores for them. In an SQZ5, SQZ4 or SQZ3 file, their arrays as
            stored (compressed by their codecs); in an SQZ2 file, their bytes in its uncompressed
            payload, ``data_bytes`` (arrays) + ``index_bytes`` (their safetensors header entries)
            + ``record_bytes`` (layout records), as LZMA compresses the payload as a whole.
        extra: The lines that complete ``rows`` to the file's size (`Line`).
        file_bytes: The file's size: ``rows.bytes.sum()`` plus ``extra``'s bytes, exactly.
    """

    path: Path
    format: str
    rows: pd.DataFrame
    extra: tuple[Line, ...]
    file_bytes: int

    def line(self, label: str) -> int:
        """Bytes of the extra line ``label`` (0 if the file's format has none)."""
        return sum(line.bytes for line in self.extra if line.label == label)

    def lines(self) -> pd.DataFrame:
        """``rows`` then the ``extra`` lines (``bytes`` sums to the file's size), each with its
        ``share`` of the file."""
        extra = pd.DataFrame(
            [{"tensor": x.label, "kind": x.kind, "bytes": x.bytes} for x in self.extra]
        )
        lines = pd.concat([self.rows, extra], ignore_index=True)
        counts = [c for c in _COUNT_COLUMNS if c in lines]
        lines[counts] = lines[counts].astype("Int64")  # (empty on the extra lines)
        lines["share"] = lines.bytes.astype(float) / self.file_bytes
        return lines


#: Integer columns of `Breakdown.lines`.
_COUNT_COLUMNS = ("params", "raw_bytes", "data_bytes", "index_bytes", "record_bytes", "bytes")


def byte_breakdown(path: str | Path, model: nn.Module) -> Breakdown:
    """Take a packed file apart byte by byte (see `search.results.explain`).

    Args:
        path: A packed model file (`compressors.save_packed`).
        model: A freshly built model of the file's uncompressed architecture (the task's
            ``build_model()``): what shapes were before and which tensors are compressible.

    Raises:
        compressors.PackedFileError: If the file is not a packed model, or is not laid out as
            squeeze writes it (the accounting would not be exact).
    """
    path = Path(path)
    if checked(path)[:4] == MAGIC_SQZ2:
        return _sqz2_breakdown(path, model)
    stored = stored_arrays(path, model)
    costs = {
        name: {
            "raw_bytes": sum(a.raw_bytes for a in arrays),
            "bytes": sum(a.bytes for a in arrays),
        }
        for name, arrays in stored.arrays.items()
    }
    described = {
        name: [
            f"{name.rpartition('.')[2]}{':' + a.suffix if a.suffix else ''} {a.bytes:,} B "
            f"({a.codec})"
            for a in arrays
        ]
        for name, arrays in stored.arrays.items()
    }
    values = read_tensors(path, model=model)
    rows = _rows(model, stored.meta, values, costs, described, int8_layers(path))
    return Breakdown(
        path=path,
        format=stored.format,
        rows=rows,
        extra=stored.extra,
        file_bytes=stored.file_bytes,
    )


@dataclass(frozen=True)
class StoredArray:
    """One array of a tensor as an SQZ5, SQZ4 or SQZ3 file stores it: its ``suffix`` (``codes``,
    ``scale``, ``codebook``, ``freqs``, ``mask``, ``values``...; empty for an integer tensor
    stored raw), its ``codec`` (``raw``, ``planes``, ``top``), its ``bytes`` in the file and its
    ``raw_bytes`` before its codec."""

    suffix: str
    codec: str
    bytes: int
    raw_bytes: int


@dataclass(frozen=True)
class StoredFile:
    """What an SQZ5, SQZ4 or SQZ3 file stores (`stored_arrays`): its ``format``, its index
    (``meta``), each tensor's arrays in the file's order (``arrays``), the index and framing
    lines (``extra``) and its size (``file_bytes``: the arrays' bytes plus ``extra``'s)."""

    format: str
    meta: dict
    arrays: dict[str, list[StoredArray]]
    extra: tuple[Line, Line]
    file_bytes: int


def stored_arrays(path: str | Path, model: nn.Module | None = None) -> StoredFile:
    """The stored bytes of an SQZ5, SQZ4 or SQZ3 file, array by array, as its index lists them
    (``model``: the fresh model that bounds its shapes; None: bounded by size).

    Raises:
        compressors.PackedFileError: If the file is not one of those formats (an SQZ2 file holds
            one LZMA-compressed payload, not arrays one by one), or is damaged.
    """
    data = checked(path)
    if data[:4] == MAGIC_SQZ2:
        raise PackedFileError(
            f"{path} is an SQZ2 file (one LZMA-compressed payload), not an SQZ5, SQZ4 or SQZ3 "
            "file (arrays stored one by one)"
        )
    meta = opened(path, model, data)[0].meta
    arrays = {
        name: [
            StoredArray(suffix, codec, sum(sizes), math.prod(shape) * np.dtype(dtype).itemsize)
            for suffix, dtype, shape, codec, sizes in spec["a"]
        ]
        for name, spec in meta["t"].items()
    }
    trailer = TRAILER_SQZ3 if data[:4] == MAGIC_SQZ3 else TRAILER
    index = trailer.unpack(data[-trailer.size :])[0]
    framing = 4 + trailer.size
    if sum(a.bytes for found in arrays.values() for a in found) + index + framing != len(data):
        raise PackedFileError(f"{path}: its arrays, index and framing do not fill the file")
    version = data[:4].decode()
    check = "CRC-32" if data[:4] == MAGIC_SQZ3 else "XXH3-64"
    extra = (
        Line(INDEX, "zstd JSON", "names, shapes, layouts, array sizes; modules, ties", index),
        Line(FRAMING, "framing", f"magic {version!r}, index length and {check}", framing),
    )
    return StoredFile(version, meta, arrays, extra, len(data))


def _sqz2_breakdown(path: Path, model: nn.Module) -> Breakdown:
    """An SQZ2 file accounted on its uncompressed safetensors payload, LZMA's saving on its own
    line (LZMA compresses the payload as a whole)."""
    file_bytes = path.stat().st_size
    payload, compressed = read_payload(path, model=model)  # (bounded by its shapes)
    stored = read_tensors(path, model=model)
    header, meta = _parse_header(path, payload)
    data_bytes, index_bytes, record_bytes = _tensor_bytes(path, header, meta)
    accounted = sum(data_bytes.values()) + sum(index_bytes.values()) + sum(record_bytes.values())
    data_section = len(payload) - 8 - int.from_bytes(payload[:8], "little")
    if (
        sum(data_bytes.values()) != data_section
        or not compressed
        and len(payload) != (file_bytes - HEADER_BYTES)
    ):
        raise PackedFileError(
            f"{path}: its arrays ({sum(data_bytes.values()):,} bytes) do not fill its data "
            f"section ({data_section:,} bytes); the file is not laid out as squeeze writes it."
        )
    costs = {
        name: {
            "raw_bytes": data_bytes[name],
            "data_bytes": data_bytes[name],
            "index_bytes": index_bytes[name],
            "record_bytes": record_bytes[name],
            "bytes": data_bytes[name] + index_bytes[name] + record_bytes[name],
        }
        for name in meta["t"]
    }
    arrays = {name: [f"{data_bytes[name]:,} B in the payload"] for name in meta["t"]}
    rows = _rows(model, meta, stored, costs, arrays, int8_layers(path))
    container = file_bytes - HEADER_BYTES - len(payload)  # 0 for a raw payload
    lzma = (
        f"payload {len(payload):,} B → LZMA {len(payload) + container:,} B"
        if compressed
        else "payload stored raw (LZMA would not shrink it)"
    )
    return Breakdown(
        path=path,
        format="SQZ2",
        rows=rows,
        extra=(
            Line(
                RECORD,
                "framing",
                "length prefix, JSON framing, padding; modules, ties",
                len(payload) - accounted,
            ),
            Line(CONTAINER, "lzma", lzma, container),
            Line(FILE_HEADER, "header", "magic, codec, CRC-32", HEADER_BYTES),
        ),
        file_bytes=file_bytes,
    )


def _parse_header(path: Path, payload: bytes) -> tuple[dict, dict]:
    """``(safetensors header, squeeze model record)``, checked to be laid out as squeeze writes
    them (compact JSON, padded with spaces), so that each part's bytes can be counted exactly."""
    raw = payload[8 : 8 + int.from_bytes(payload[:8], "little")]
    text = raw.rstrip(b" ")
    header = json.loads(text)
    meta_text = header["__metadata__"]["squeeze"]
    meta = json.loads(meta_text)
    if _compact(header).encode() != text or _compact(meta, ascii=True) != meta_text:
        raise PackedFileError(
            f"{path}: its header is not laid out as this squeeze writes it, so its bytes cannot "
            "be accounted tensor by tensor. Rewrite it with this version (rerun the trial)."
        )
    return header, meta


def _compact(value, *, ascii: bool = False) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=ascii)


def _tensor_bytes(
    path: Path, header: dict, meta: dict
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Per stored tensor: bytes of its arrays' data, of their header entries (each with the
    comma before it), and of its layout record inside the escaped model record (with the comma
    before it, the first record having none)."""
    names = list(meta["t"])
    data = dict.fromkeys(names, 0)
    index = dict.fromkeys(names, 0)
    for position, (key, entry) in enumerate(header.items()):
        if key == "__metadata__":
            continue
        owner = key if key in data else key.rpartition(":")[0]
        if owner not in data:
            raise PackedFileError(f"{path}: array {key!r} belongs to no tensor of the file")
        start, end = entry["data_offsets"]
        data[owner] += end - start
        index[owner] += len(_compact({key: entry})[1:-1].encode()) + (1 if position else 0)
    record = {
        name: _escaped(_compact({name: spec}, ascii=True)[1:-1]) + (1 if i else 0)
        for i, (name, spec) in enumerate(meta["t"].items())
    }
    return data, index, record


def _escaped(text: str) -> int:
    """Bytes of ``text`` inside a JSON string (the model record is a string of the header)."""
    return len(json.dumps(text, ensure_ascii=False).encode()) - 2


def _rows(
    model: nn.Module,
    meta: dict,
    stored: Mapping,
    costs: Mapping[str, Mapping[str, int]],
    arrays: Mapping[str, Sequence[str]],
    int8: Sequence[str],
) -> pd.DataFrame:
    """The breakdown's rows: tensors grouped (see `_group`), in the file's order, each with the
    sums of its tensors' ``costs`` (bytes by column) and their ``arrays``, described."""
    found = targets(model)
    by_module = {t.module_name: t for t in found.values()}
    sites = {f"{s.module_name}.{s.attr}".lstrip("."): t for t in found.values() for s in t.sites}
    before = model.state_dict()
    tied = {}
    for alias, canonical in meta.get("tied", {}).items():
        tied.setdefault(canonical, []).append(alias)
    groups: dict[str, list[str]] = {}
    for name in meta["t"]:
        groups.setdefault(_group(name, sites, by_module, meta["modules"]), []).append(name)
    rows = []
    for label, names in groups.items():
        target = found.get(label)
        row = {
            "tensor": label,
            **_shapes(label, names, target, before, meta, stored, model),
            "sparsity": _sparsity([stored[n].value for n in names]),
            "stored": ", ".join(dict.fromkeys(_stored(meta["t"][n], stored[n]) for n in names)),
            "layout": ", ".join(dict.fromkeys(meta["t"][n]["enc"] for n in names)),
            "runtime": "int8" if _module_of(label, target) in int8 else "float",
            "params": sum(stored[n].value.numel() for n in names),
            "stored_tensors": " ".join(names),
            "arrays": ", ".join(a for n in names for a in arrays[n]),
            **{c: sum(costs[n][c] for n in names) for c in costs[names[0]]},
        }
        aliases = [a for n in names for a in tied.get(n, [])]
        if aliases:
            row["kind"] += f", tied: {', '.join(aliases)}"
        rows.append(row)
    return pd.DataFrame(rows)


def _group(name: str, sites: Mapping, by_module: Mapping, replaced: Mapping) -> str:
    """The row a stored tensor belongs to: its compressible tensor's name (the tensors of a
    module that replaced a layer, a low-rank pair say, count as that layer's weight; its bias
    stays with the layer's other tensors), else ``"<module> (<attributes>)"``, filled in later."""
    if name in sites:
        return sites[name].name
    for module in replaced:
        if name.startswith(f"{module}.") and module in by_module and not name.endswith(".bias"):
            return by_module[module].name
        if name.startswith(f"{module}."):
            return f"{module} (other)"
    module = name.rpartition(".")[0]
    return f"{module or '(model)'} (other)"


def _module_of(label: str, target) -> str:
    return target.module_name if target is not None else label.removesuffix(" (other)")


def _shapes(label, names, target, before, meta, stored, model) -> dict:
    """``kind``, ``shape_before``, ``shape_after`` and ``kept`` of one row."""
    after = [tuple(stored[n].value.shape) for n in names]
    if target is None:  # a module's other tensors
        module = label.removesuffix(" (other)")
        prefix = f"{module}." if module != "(model)" else ""
        attrs = [n.rpartition(".")[2] for n in names]
        old = [before[f"{prefix}{a}"] for a in attrs if f"{prefix}{a}" in before]
        kind = _module_type(model, module)
        shown = (
            ", ".join(attrs) if len(attrs) <= 3 else f"{', '.join(attrs[:2])}, +{len(attrs) - 2}"
        )
        return {
            "tensor": f"{module} ({shown})" if prefix else f"{shown} (top level)",
            "kind": kind,
            "shape_before": _shape_list([tuple(v.shape) for v in old]),
            "shape_after": _shape_list(after),
            "kept": "",
        }
    original = tuple(before[target.name].shape)
    kept = []
    replaced = meta["modules"].get(target.module_name)
    if replaced is not None:
        kept += [f"{k} {v}" for k, v in replaced.items() if k != "type"]
    elif after[0] != original:
        dims = _DIMS[target.kind] + ("kernel",) * max(0, len(original) - 2)
        kept += [
            f"{dims[i]} {a}/{b}"
            for i, (a, b) in enumerate(zip(after[0], original, strict=False))
            if a != b
        ]
    kept += _changed_counts(target.module_name, meta.get("attrs", {}), model)
    kind = target.kind if replaced is None else f"{target.kind}, {replaced['type']}"
    return {
        "kind": kind,
        "shape_before": _shape(original),
        "shape_after": _shape_list(after),
        "kept": ", ".join(dict.fromkeys(kept)),
    }


def _changed_counts(module: str, attrs: Mapping, model: nn.Module) -> list[str]:
    """``"num_heads 2/4"`` for counts of the module or its parent that compression changed."""
    out = []
    for name in (module, module.rpartition(".")[0]):
        for attr, value in attrs.get(name, {}).items():
            if attr in _COUNTS:
                original = getattr(model.get_submodule(name), attr, None)
                out.append(f"{attr} {value}/{original}")
    return out


def _module_type(model: nn.Module, module: str) -> str:
    try:
        return type(model.get_submodule("" if module == "(model)" else module)).__name__
    except AttributeError:
        return "module"


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def _shape_list(shapes: Sequence[tuple[int, ...]]) -> str:
    if len(shapes) > 2:
        return f"{len(shapes)} tensors, {sum(math.prod(s) for s in shapes):,} values"
    return " + ".join(_shape(s) for s in shapes)


def _sparsity(values: Sequence[torch.Tensor]) -> float:
    total = sum(v.numel() for v in values)
    zeros = sum(int((v == 0).sum()) for v in values if v.is_floating_point())
    return zeros / total if total else 0.0


def _stored(spec: dict, record) -> str:
    """How the file stores one tensor's values: ``15-level grid (4-bit)``, ``codebook of 16
    (4-bit)``, ``fp16``; for codes, how their stream is stored when it is not plain bits."""
    if record.codes is not None:
        if record.codes.decode == "codebook":
            size = len(record.codes.tensors["codebook"])
            what = f"codebook of {size} ({_bits(size)}-bit)"
        else:
            levels = int(torch.unique(record.codes.codes).numel())
            what = f"{levels}-level grid ({_bits(levels)}-bit)"
        if spec["enc"] == "ans":
            return f"{what}, entropy-coded"
        if spec["enc"] in ("bitmask", "gaps"):
            return f"{what}, nonzeros in {spec['bits']} bit{'s' if spec['bits'] > 1 else ''}"
        return what
    if spec["enc"] == "raw":
        return spec["dtype"]
    return "fp16" if _is_half(record.value) else "fp32"


def _bits(levels: int) -> int:
    return max(1, math.ceil(math.log2(levels))) if levels > 1 else 1


def _is_half(value: torch.Tensor) -> bool:
    return torch.equal(value.to(torch.float16).to(torch.float32), value.to(torch.float32))
