"""The packed model file: what makes a compressed model's size real.

A file (format ``SQZ5``) is ``b"SQZ5"``, then each tensor's arrays, one tensor after another, then
an index (compact JSON, as a zstd frame: each tensor's layout record with its arrays' names,
dtypes, shapes and stored sizes, and the record of the model, below; compressed, because in a
file of a few KB the index is a third of it), then a 16-byte trailer: the index's length
(8 bytes) and the XXH3-64 of everything before the trailer (8 bytes, both little-endian; a
truncated or corrupted file is refused with `PackedFileError`). The writer streams: it encodes
tensors in parallel (`WORKERS` threads; each record depends on its tensor alone, so the bytes do
not depend on the threads) and writes each record as soon as it and those before it are done;
the reader maps the file, checks its checksum, and decodes tensors in parallel
(`WORKERS` threads), each where it can straight into the model's own tensor: a dense float32
weight's bytes are written into the tensor's storage block by block, its compressed exponent
plane decompressed a block at a time, with no copy of the whole tensor or file on the way; a
sparse layout's or integer codes' values are written into a float32 tensor a block at a time
(`compressors._decoding.decode_into`: each block's codes looked up, its nonzero positions listed
from the mask and its values put there).

For every tensor of the model's state the writer picks the smallest of three layouts:

- ``dense``: every value;
- ``bitmask``: one bit per position saying whether it is nonzero, plus the nonzero values;
- ``gaps``: the gaps between successive nonzero positions as bytes (a gap of 255 or more is
  spelled with 255s that carry no value, as in Deep Compression), plus the nonzero values.

Values of a tensor that a parametrization keeps on a discrete set of values (a quantization grid,
a codebook of shared weights) are stored as integer codes through one value protocol (`Codes`:
the parametrization's method ``packed(value)`` gives the codes and how values are rebuilt from
them, ``value = code * scale`` or ``value = codebook[code]``; the file knows nothing else of the
method), each code the index of its value in the tensor's code alphabet (a range such as -7..7,
or a list such as -1, +1 for binary weights), packed into ``ceil(log2(alphabet size))`` bits or
entropy-coded (``ans``: rANS under the tensor's own code frequencies) where that is smaller, with
float16 per-channel scales. Other values are stored as float32, or as float16 when that holds
them exactly (the scales, which are rounded to float16 when a grid is made, and biases kept on
float16 values). A tensor whose last parametrization gives its codes from its input
(``packed_from``, a quantization grid's) is encoded from those codes without its float value
being made (the same record: the codes are those the value is made of).

Each array's bytes are then stored as they are, or split into byte planes, each compressed with
zstd where that measurably pays (`compressors._codecs.store`): the exponent bytes of float
weights, sparse positions, integer buffers. The entropy-coded codes and the float mantissas are
left as they are (nothing to gain, so no time spent). Where only the top byte pays (a float
weight's sign and exponent), the array is stored as codec ``top``: each element's other bytes
together, element after element, then the top bytes' compressed plane (the same bytes as four
planes, in an order that is written back into float32 elements twice as fast). `packed_size`
gives the file's size exactly without writing it: each tensor is encoded as the writer encodes
it, only sizes kept.

The index also records how the model's structure differs from a freshly built one: layers
replaced by other modules (a low-rank pair, see `register_replacement`), layers that run on int8
kernels (`compressors.runtime`), module attributes that compression changed (a pruned layer's
``out_features``, a depthwise conv's ``groups``, an attention's ``embed_dim`` and ``num_heads``,
an LSTM's ``hidden_size``: given the uncompressed model as ``like``, every public attribute of
plain value that differs from it), activation grids (``act``: a file with them is format 5,
`compressors._act_quant`), and tensors shared by several modules (a tied embedding and output
layer), which are stored once and tied again on load. Loading rebuilds all of it; it reads
arrays of plain numbers and JSON only and never unpickles code.

Files of the previous formats still load: ``SQZ4``, the same but without codec ``top`` (a
float weight's four byte planes, one after another); ``SQZ3``, as SQZ4 but for its trailer (the
index's length, then a CRC-32 of 4 bytes: a quarter of a large model's reload went to checking
it), and ``SQZ2`` (magic, codec byte, CRC-32, then one safetensors payload holding the same
arrays, LZMA-compressed when that was smaller).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import xxhash
import zstandard
from safetensors.torch import save as st_save
from torch import nn

from compressors import _act_quant, _threads
from compressors._codecs import DECODERS, Codes, encode, full_codes
from compressors._codecs import store as store_array
from compressors._container import (
    FORMAT_VERSION,
    FORMAT_VERSION_ACT,
    FORMAT_VERSION_SQZ2,
    FRAMING_BYTES,
    HEADER_BYTES,
    MAGIC,
    MAGIC_SQZ2,
    MAGIC_SQZ3,
    MAGIC_SQZ4,
    TRAILER,
    PackedFileError,
    checked,
    sqz2_payload,
)
from compressors._model_state import (  # noqa: F401 (_changed_attributes: tests import it here)
    _changed_attributes,
    _coded_sources,
    _int8_layers,
    _plain,
    _sources,
    _tied_keys,
    plain_state,
)
from compressors._opening import (
    ARCHITECTURE_ATTRS,
    Replacement,
    limits,
    module_named,
    opened,
    register_replacement,
    restore_attributes,
)
from compressors.runtime import to_int8

#: Re-exported: parametrizations, exporters and readers of the bytes import them from here.
__all__ = [
    "DECODERS",
    "FORMAT_VERSION",
    "FORMAT_VERSION_SQZ2",
    "ARCHITECTURE_ATTRS",
    "FRAMING_BYTES",
    "HEADER_BYTES",
    "MAGIC",
    "MAGIC_SQZ2",
    "MAGIC_SQZ3",
    "MAGIC_SQZ4",
    "Codes",
    "PackedFileError",
    "PackedTensor",
    "Replacement",
    "load_packed",
    "packed_size",
    "plain_state",
    "read_packed",
    "read_payload",
    "read_tensors",
    "register_replacement",
    "save_packed",
    "tensor_bytes",
]
#: Threads encoding tensors at once (the file's bytes do not depend on it).
WORKERS = max(1, min(4, os.cpu_count() or 1))
#: zstd's level for the index (JSON of a few KB to a few hundred: quick at any level).
INDEX_LEVEL = 19
#: Values encoded at once at most, beyond a single tensor (each takes a few times its bytes).
IN_FLIGHT = 1 << 23
#: Values a file's tensors hold from which they are decoded by `WORKERS` threads (below, in the
#: calling thread: starting threads would cost more than they save).
THREADED_FROM = 1 << 16
#: Bytes of decoded copies a reload lets go of before it gives memory back to the system
#: (`_trim` walks the whole heap: after each of a 110 M BERT's 124 small tensors it cost 65 ms).
TRIM_BYTES = 1 << 24


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
    with path.open("wb") as f:
        size = _write(model, f, like=like)
    return size


def packed_size(
    model: nn.Module,
    *,
    replace: dict[str, tuple[torch.Tensor, nn.Module | None]] | None = None,
    like: nn.Module | None = None,
    lzma_pass: bool = True,
) -> int:
    """Bytes of the file `save_packed` would write for ``model`` (exactly), with the values
    (and the parametrizations giving their codes, or None) of the tensors named in ``replace``
    swapped in: the size of a variant of the model, without copying it (a deep copy of a
    parametrized model shares its class, and changing the copy's parametrizations would change
    the original's). Each tensor is encoded as the writer encodes it and only its size is kept;
    no file is written. The size is the sum of `tensor_bytes` over the stored tensors plus the
    record of the model and `FRAMING_BYTES`. ``lzma_pass`` is accepted for callers written for
    format SQZ2 (whose payload had an optional whole-file LZMA pass); SQZ5 has none, so it
    changes nothing."""
    del lzma_pass
    return _write(model, None, like=like, replace=replace)


def tensor_bytes(value: torch.Tensor, grid: nn.Module | None = None) -> int:
    """Bytes a packed file spends on one tensor: its arrays in the layout the writer picks
    (codes of ``grid``'s `Codes` when given) as stored (zstd'd byte planes where that pays),
    and its record in the index (before the index is compressed). A file's size is about the
    sum over its tensors plus the record of the model (replaced modules, ties, changed
    attributes), the index's framing (its braces, the
    tensors' names) and `FRAMING_BYTES`."""
    spec, chunks = _record("t", value.detach(), grid, trim=value.numel() > TRIM_ABOVE)
    return sum(len(memoryview(c)) for c in chunks) + len(_compact(spec))


#: `tensor_bytes` of a tensor of at most this many values does not give the memory its
#: encoding freed back to the system (the next one reuses it): trims were a tenth of
#: `compressors.allocate`'s table of a 10 M MLP, costed on samples of a million values.
TRIM_ABOVE = 1 << 21


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _record(
    name: str,
    value: torch.Tensor | Callable[[], torch.Tensor],
    grid: nn.Module | None,
    *,
    trim: bool = True,
) -> tuple[dict, list]:
    """``(layout record, chunks)`` of one tensor (``value``: the tensor, or a function that
    computes it, which lets the encoder drop it as soon as it has its arrays): the record lists
    its arrays as ``[suffix, dtype, shape, codec, sizes]``; the chunks are its bytes in the
    file. ``trim``: give the memory the encoding freed back to the system (`_trim`)."""
    try:
        spec, arrays = encode(name, value() if callable(value) else value, grid)
    except ValueError as err:
        raise PackedFileError(str(err)) from None
    del value
    spec["a"] = []
    chunks: list = []
    for suffix in list(arrays):
        array = arrays.pop(suffix)  # (each array let go once it is stored)
        codec, sizes, stored = store_array(array)
        spec["a"].append(
            [suffix, array.dtype.newbyteorder("<").str, list(array.shape), codec, sizes]
        )
        chunks += stored
    if trim:
        _trim()
    return spec, chunks


def _libc_trim() -> Callable[[], Any] | None:
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return lambda: trim(0)


_MALLOC_TRIM = _libc_trim()


def _trim() -> None:
    """Give the memory a tensor's work freed back to the system (glibc keeps freed blocks of
    each thread's arena otherwise: at 10 M parameters, packing with two threads held twice the
    model's bytes of freed memory). Nothing where the C library is not glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM()


def _write(
    model: nn.Module,
    sink,
    *,
    like: nn.Module | None = None,
    replace: dict[str, tuple[torch.Tensor, nn.Module | None]] | None = None,
) -> int:
    """Write the file to ``sink`` (a binary file; None: only count its bytes); its size."""
    sources = _sources(model)
    for name, value in _coded_sources(model).items():  # (their codes, computed once)
        if name in sources:
            sources[name] = (value, *sources[name][1:])
    for name, (value, grid) in (replace or {}).items():
        sources[name] = (partial(_plain, value), grid, value.numel())
    tied = _tied_keys(model)
    grids = {name: grid for name, (_, grid, _) in sources.items() if grid is not None}
    jobs = ((name, *source) for name, source in sources.items() if name not in tied)
    size, hasher = len(MAGIC), xxhash.xxh3_64(MAGIC)
    if sink is not None:
        sink.write(MAGIC)
    layout: dict[str, dict] = {}
    for name, spec, chunks in _encoded(jobs):
        layout[name] = spec
        for chunk in chunks:
            size += len(memoryview(chunk))
            if sink is not None:
                sink.write(chunk)
                hasher.update(chunk)
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
    if act := _act_quant.ranges(model):  # (W8A8: a format older readers refuse)
        meta["act"], meta["v"] = act, FORMAT_VERSION_ACT
    attrs = _changed_attributes(model, like) if like is not None else {}
    if attrs:
        meta["attrs"] = attrs
    index = zstandard.ZstdCompressor(level=INDEX_LEVEL).compress(_compact(meta))
    if sink is not None:
        sink.write(index)
        hasher.update(index)
        sink.write(TRAILER.pack(len(index), hasher.intdigest()))
    return size + len(index) + TRAILER.size


def _encoded(jobs) -> Iterator[tuple[str, dict, list]]:
    """``(name, record, chunks)`` of each job ``(name, value, grid, numel)``, in order, encoded
    by `WORKERS` threads. A value is computed by the thread that encodes it (its
    parametrizations evaluated there), and at most `IN_FLIGHT` values (or one larger tensor)
    are in work at once, so that memory holds a few tensors' work rather than the model's."""
    pool = _threads.pool(WORKERS) if WORKERS > 1 else None
    trim = _Trimmer()
    if pool is None:
        for name, value, grid, size in jobs:
            yield name, *_record(name, value, grid, trim=False)
            trim(size)
        return
    with _threads.settling(deque()) as pending:
        in_flight = 0
        for name, value, grid, size in jobs:
            while pending and (len(pending) >= WORKERS or in_flight + size > IN_FLIGHT):
                done, future, count = pending.popleft()
                in_flight -= count
                yield done, *future.result()
                trim(count)
            pending.append((name, pool.submit(_record, name, value, grid, trim=False), size))
            in_flight += size
        while pending:
            done, future, count = pending.popleft()
            yield done, *future.result()
            trim(count)


class _Trimmer:
    """`_trim` once the tensors encoded since the last trim held `IN_FLIGHT` values (the memory
    their work freed is reused by the next ones meanwhile): a trim after every tensor, each
    bias included, cost a tenth of packing a pruned 10 M MLP, in its own time and in the pages
    the next tensors faulted in again."""

    def __init__(self) -> None:
        self.since = 0

    def __call__(self, values: int) -> None:
        self.since += values
        if self.since >= IN_FLIGHT:
            _trim()
            self.since = 0


def read_packed(
    path: str | os.PathLike, *, model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Decode a packed file into a plain state dict (float32 weights, exact values).

    ``model``, a freshly built model of the file's architecture, bounds what the file may
    decode to by its own shapes (without it, by `MAX_UNBOUNDED_BYTES` in all); it is not
    changed. So do the other readers' (`read_tensors`, `read_payload`, `int8_layers`)."""
    return _read(path, model)[0]


def int8_layers(path: str | os.PathLike, *, model: nn.Module | None = None) -> list[str]:
    """Names of the layers a packed file runs on int8 kernels."""
    return list(opened(path, model)[0].meta["int8"])


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

    value: torch.Tensor | None
    layout: str
    codes: Codes | None = None


def read_tensors(
    path: str | os.PathLike, *, model: nn.Module | None = None, decode: bool = True
) -> dict[str, PackedTensor]:
    """Every tensor of a packed file as the file stores it: values, layout and integer codes
    (what an exporter needs to store codes rather than floats). A tied tensor's keys map to one
    `PackedTensor` object. ``decode=False``: values left out (None), for a caller that loads the
    file into ``model`` next and takes them from it (`with_values`) rather than decode a second
    copy of the model's bytes."""
    packed = opened(path, model)[0]
    records = {}
    for name, spec in packed.meta["t"].items():
        arrays = packed.arrays(name)
        records[name] = PackedTensor(
            packed.decoded(name, arrays) if decode else None,
            spec["enc"],
            packed.guarded(full_codes, spec, arrays) if "count" in spec else None,
        )
    for alias, canonical in packed.meta.get("tied", {}).items():
        records[alias] = records[canonical]
    return records


def with_values(
    records: dict[str, PackedTensor], state: Mapping[str, torch.Tensor]
) -> dict[str, PackedTensor]:
    """``records`` (`read_tensors` with ``decode=False``) with each value taken from ``state``,
    the state dict of the model the file was loaded into (its tensors themselves; float32, as
    `read_tensors` decodes them, where the model's are another floating type). Tied keys still
    share one record."""
    done: dict[int, PackedTensor] = {}
    out = {}
    for name, record in records.items():
        if id(record) not in done:
            value = state[name].detach()
            if value.is_floating_point() and value.dtype != torch.float32:
                value = value.float()
            done[id(record)] = dataclasses.replace(record, value=value)
        out[name] = done[id(record)]
    return out


def read_payload(path: str | os.PathLike, *, model: nn.Module | None = None) -> tuple[bytes, bool]:
    """``(payload, compressed)``: a packed file's arrays and records as one safetensors payload,
    after the checks every reader makes (magic, format, checksum). For an SQZ2 file, the payload
    it holds (decompressed) and whether the file holds it LZMA-compressed: the file's size is
    `HEADER_BYTES` plus the payload's, or its LZMA stream's. For an SQZ5, SQZ4 or SQZ3 file
    (which holds arrays one by one), the same payload built from its arrays as they are before
    their byte planes are compressed and its layout records without their storage lists, and
    whether the file is smaller than `HEADER_BYTES` plus that payload (what a byte count made
    for SQZ2 files, `search.results.explain`, needs)."""
    data = checked(path)
    if data[:4] == MAGIC_SQZ2:
        return sqz2_payload(path, data, max_bytes=limits(model)[0])
    packed = opened(path, model, data)[0]
    flat = {}
    layout = {}
    for name, spec in packed.meta["t"].items():
        for suffix, array in packed.arrays(name).items():
            flat[f"{name}:{suffix}" if suffix else name] = array
        layout[name] = {k: v for k, v in spec.items() if k != "a"}
    meta = {**packed.meta, "t": layout}
    payload = st_save(flat, metadata={"squeeze": json.dumps(meta, separators=(",", ":"))})
    return payload, len(data) < HEADER_BYTES + len(payload)


def _read(
    path: str | os.PathLike, model: nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(state, model record, arrays)`` of a packed file; the arrays keyed as SQZ2 files key
    them (``<tensor>:<suffix>``, an integer tensor by its own name)."""
    packed = opened(path, model)[0]
    state, flat = {}, {}
    for name in packed.meta["t"]:
        arrays = packed.arrays(name)
        state[name] = packed.decoded(name, arrays)
        for suffix, array in arrays.items():
            flat[f"{name}:{suffix}" if suffix else name] = array
    for alias, canonical in packed.meta.get("tied", {}).items():
        state[alias] = state[canonical]
    return state, packed.meta, flat


def load_packed(path: str | os.PathLike, model: nn.Module, *, int8: bool = True) -> nn.Module:
    """Load a packed file into ``model``, a freshly built model of the same architecture.

    Layers the file records as replaced (a low-rank pair, say) are rebuilt first; module
    attributes that compression changed are restored; tensors whose shape changed (layers made
    smaller) replace the model's tensors; tied tensors are tied again; layers the file records
    as int8 are converted to int8 kernels last, unless ``int8=False``, which keeps every layer
    float (with the same weight values), e.g. for export (`compressors.onnx_export`). Tensors
    are decoded by `WORKERS` threads, each straight into the model's own tensor where it can
    (`Packed.decode_into`: a dense float32 weight or an integer buffer, its bytes; a sparse or
    coded tensor into a float32 one, a block at a time), else decoded and copied in.
    """
    try:
        return _load(path, model, int8=int8)
    except PackedFileError:
        raise
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        # (every field was checked; this is the net under those checks)
        raise PackedFileError(f"{path} does not load into the model: {err!r}") from None


def _load(path: str | os.PathLike, model: nn.Module, *, int8: bool) -> nn.Module:
    packed, replaced = opened(path, model)
    meta = packed.meta
    for name, module in replaced.items():
        model.set_submodule(name, module)
    tied = meta.get("tied", {})
    restore_attributes(path, model, meta.get("attrs", {}))
    with torch.no_grad():
        owners = {name: _owner(model, name) for name in meta["t"] if name not in tied}
        freed = 0
        for name, value in _decoded(packed, owners):
            if value is None:
                continue  # (decoded straight into the model's tensor)
            module, attr = owners[name]
            current = getattr(module, attr)
            if current.shape == value.shape:
                current.copy_(value)
                freed += value.nbytes
            elif isinstance(current, nn.Parameter):
                setattr(module, attr, nn.Parameter(value, requires_grad=current.requires_grad))
            else:
                setattr(module, attr, value)
            del value
            if freed >= TRIM_BYTES:  # (not after each bias: a trim walks the whole heap)
                _trim()
                freed = 0
        for alias, canonical in tied.items():
            module, attr = _owner(model, alias)
            source, source_attr = _owner(model, canonical)
            setattr(module, attr, getattr(source, source_attr))
    _act_quant.restore(path, model, meta.get("act"))
    scales: dict[str, dict[str, torch.Tensor]] = {}
    for layer in meta["int8"] if int8 else ():
        prefix = f"{layer}." if layer else ""
        module_named(path, model, layer, what="runs on int8 kernels")
        scales[layer] = {
            name[len(prefix) :]: packed.arrays(name, "scale")["scale"]
            for name in meta["t"]
            if name.startswith(prefix)
            and "." not in name[len(prefix) :]
            and packed.arrays(name, "scale")
        }
    to_int8(model, scales)
    return model.eval()


def _decoded(
    packed, owners: dict[str, tuple[nn.Module, str]]
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(name, value)`` of each tensor of ``owners`` (``{name: (module, attribute)}``), in
    order, decoded by `WORKERS` threads: None where the tensor was decoded straight into the
    model's own (`Packed.decode_into`), else its values, for the caller to copy or set. Tensors
    whose bytes are written in place hold no memory of their own, so any number of them are
    queued at once (a large embedding first no longer leaves the other threads idle behind it);
    the others, `IN_FLIGHT` values of what they hold (`Packed.held`: their arrays, or their new
    values) at most (or one larger tensor)."""

    def one(name: str) -> torch.Tensor | None:
        module, attr = owners[name]
        if packed.decode_into(name, getattr(module, attr)):
            return None
        return packed.decoded(name)

    values = sum(math.prod(packed.meta["t"][name]["shape"]) for name in owners)
    pool = _threads.pool(WORKERS) if WORKERS > 1 and values >= THREADED_FROM else None
    if pool is None:
        yield from ((name, one(name)) for name in owners)
        return
    with _threads.settling(deque()) as pending:
        held = 0
        for name in owners:
            module, attr = owners[name]
            size = packed.held(name, getattr(module, attr))
            while size and held and held + size > IN_FLIGHT:
                done, future, count = pending.popleft()
                held -= count
                yield done, future.result()
            pending.append((name, pool.submit(one, name), size))
            held += size
        while pending:
            done, future, _ = pending.popleft()
            yield done, future.result()


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, attr = key.rpartition(".")
    return model.get_submodule(module_name), attr
