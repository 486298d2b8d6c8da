"""Opening a packed file of any format: the checks every reader makes (magic, checksum,
format version) and each tensor's arrays, decoded on demand (see `compressors.packing` for the
formats: ``SQZ5``, written today, and ``SQZ4``, ``SQZ3`` and ``SQZ2``, still read)."""

from __future__ import annotations

import json
import lzma
import math
import mmap
import os
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import xxhash
import zstandard
from safetensors.torch import load as st_load

from compressors._codecs import CodecError, check_layout, decode, decode_into, restore
from compressors._planes import restore_into

MAGIC = b"SQZ5"
#: The previous container, still read: the same but for the codec ``top`` (`compressors._planes`),
#: which its readers do not know.
MAGIC_SQZ4 = b"SQZ4"
#: The previous container, still read: the same bytes but for its trailer's checksum (CRC-32).
MAGIC_SQZ3 = b"SQZ3"
FORMAT_VERSION = 4
#: The version of SQZ3 files that record activation grids (``act``: W8A8 models). Files without
#: them keep `FORMAT_VERSION`, so that a squeeze which cannot restore the grids refuses only the
#: files that have them, rather than loading a model that computes differently.
FORMAT_VERSION_ACT = 5
#: The previous format, still read: its magic and the version in its model record.
MAGIC_SQZ2, FORMAT_VERSION_SQZ2 = b"SQZ2", 3
#: Bytes before an SQZ2 file's payload: magic, codec, CRC-32.
HEADER_BYTES = 9
#: Bytes of an SQZ5 (or SQZ4) file that are neither arrays nor index: the magic and the trailer.
FRAMING_BYTES = 4 + 16
#: An SQZ5 (or SQZ4) file's last bytes: its index's length and the XXH3-64 of all before them
#: (`checksum`: about 6 times as fast as zlib's CRC-32, which took a quarter of a 110 M model's
#: reload).
TRAILER = struct.Struct("<QQ")
#: An SQZ3 file's last bytes: its index's length and the CRC-32 of all before them.
TRAILER_SQZ3 = struct.Struct("<QI")
_RAW, _LZMA = 0, 1
#: An index larger than this (decompressed) is refused (a model of 100,000 tensors needs ~20 MB).
MAX_INDEX_BYTES = 1 << 28
#: ... and, whatever the model, one that decompresses to more than this many times its stored
#: bytes (and more than `_SMALL_INDEX`): squeeze's indexes shrink about 5 to 10 times.
INDEX_RATIO = 32
_SMALL_INDEX = 1 << 20
#: Bytes a file's tensors may decode to when it is read without the model it was made from (whose
#: shapes bound them otherwise), and an SQZ2 file's payload at most, decompressed.
MAX_UNBOUNDED_BYTES = 1 << 30
#: The dtypes an array of a file may have (numpy's names; no objects).
_DTYPES = frozenset(
    ["|b1", "|u1", "|i1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"]
)


class PackedFileError(ValueError):
    """The file is not a squeeze packed model, or does not fit the model it is loaded into."""


class Packed:
    """An opened packed file of either format: its model record (``meta``, with each tensor's
    layout record under ``t``) and each tensor's arrays (`arrays`), decoded on demand.

    Every layout record has been checked against the arrays the file holds for it
    (`compressors._codecs.check_layout`); before any array is decoded, the records' shapes are
    bounded (`bound`): by the shapes of the model the file is loaded into, or by
    `MAX_UNBOUNDED_BYTES` in all.
    """

    def __init__(
        self,
        path,
        meta: dict,
        arrays: Callable[[str], dict[str, torch.Tensor]],
        into: Callable[[str, str, np.ndarray], None] | None = None,
    ):
        self.path, self.meta, self._arrays, self._into = path, meta, arrays, into
        self._bounded = False

    def bound(self, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        """Refuse the file unless each tensor's shape has the dimensions of ``shapes``' (the
        model's own shapes, by state key), each no larger; with no ``shapes``, unless its
        tensors decode to `MAX_UNBOUNDED_BYTES` at most.

        Raises:
            PackedFileError: Naming the first tensor that does not fit.
        """
        total = 0
        for name, spec in self.meta["t"].items():
            shape = spec["shape"]
            if shapes is None:
                total += 4 * math.prod(shape)
                if total > MAX_UNBOUNDED_BYTES:
                    raise PackedFileError(
                        f"{self.path}: its tensors decode to more than {MAX_UNBOUNDED_BYTES:,} "
                        f"bytes (at {name!r}, shape {shape}); load it into its model instead"
                    )
                continue
            limit = shapes.get(name)
            if limit is None:
                raise PackedFileError(f"{self.path}: tensor {name!r} is not one of the model's")
            if len(shape) != len(limit) or any(a > b for a, b in zip(shape, limit, strict=True)):
                raise PackedFileError(
                    f"{self.path}: tensor {name!r} has shape {shape}; the model's is "
                    f"{list(limit)} (a compressed tensor is never larger)"
                )
        self._bounded = True

    def arrays(self, name: str, only: str | None = None) -> dict[str, torch.Tensor]:
        """The arrays of tensor ``name`` by suffix (``only``: just that one, if it has it)."""
        if not self._bounded:
            self.bound()
        return self.guarded(self._arrays, name, only)

    def decoded(self, name: str, arrays: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Tensor ``name``'s values."""
        arrays = self.arrays(name) if arrays is None else arrays
        return self.guarded(decode, self.meta["t"][name], arrays)

    def decode_into(self, name: str, target: torch.Tensor) -> bool:
        """Decode tensor ``name`` straight into ``target``'s storage. Where the file holds it
        as ``target`` holds it (one array of ``target``'s dtype and shape: a ``dense`` record
        of float values, or an integer tensor stored ``raw``; ``target`` contiguous on the
        CPU), its bytes are written in place, byte plane by byte plane, with no copy of the
        whole tensor on the way. Where ``target`` is float32 and the record a sparse layout or
        codes (`compressors._decoding.decode_into`), its arrays are decoded and its values
        written in place a block at a time. False, and nothing written, where neither holds
        (SQZ2 files' dense records, values stored as float16 for a float32 dense tensor, a
        float16 model's tensors): then `decoded` and a copy.
        """
        if not self.fits(name, target):
            return self._blocks_fit(name, target) and self.guarded(
                decode_into, self.meta["t"][name], self.arrays(name), target.detach()
            )
        if not self._bounded:
            self.bound()
        suffix = {"dense": "values", "raw": ""}[self.meta["t"][name]["enc"]]
        out = target.detach().reshape(-1).view(torch.uint8).numpy()
        self.guarded(self._into, name, suffix, out)
        return True

    def _blocks_fit(self, name: str, target: torch.Tensor) -> bool:
        spec = self.meta["t"][name]
        return (
            spec["enc"] != "raw"
            and ("count" in spec or spec["enc"] != "dense")
            and target.dtype == torch.float32
            and list(target.shape) == spec["shape"]
            and target.is_contiguous()
            and target.device.type == "cpu"
        )

    def held(self, name: str, target: torch.Tensor) -> int:
        """Values (of 4 bytes) that decoding tensor ``name`` into ``target`` holds besides
        ``target``: none where `fits` (its bytes written in place), its arrays' where it is
        decoded in place a block at a time, else the whole tensor's."""
        spec = self.meta["t"][name]
        if self.fits(name, target):
            return 0
        if self._blocks_fit(name, target) and "a" in spec:  # (SQZ2: its arrays are held)
            return sum(math.prod(a[2]) * np.dtype(a[1]).itemsize for a in spec["a"]) // 4
        return math.prod(spec["shape"])

    def fits(self, name: str, target: torch.Tensor) -> bool:
        """Whether `decode_into` writes tensor ``name`` straight into ``target``."""
        if self._into is None:
            return False
        spec = self.meta["t"][name]
        entries = spec["a"]
        suffix = {"dense": "values", "raw": ""}.get(spec["enc"])
        return not (
            suffix is None
            or "count" in spec
            or len(entries) != 1
            or entries[0][0] != suffix
            or entries[0][1] != _NUMPY.get(target.dtype)
            or list(target.shape) != spec["shape"]
            or not target.is_contiguous()
            or target.device.type != "cpu"
        )

    def guarded(self, fn, *args):
        """``fn(*args)``, a damaged or foreign record's error raised as `PackedFileError`."""
        try:
            return fn(*args)
        except (CodecError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            if isinstance(err, PackedFileError):
                raise
            raise PackedFileError(f"{self.path} cannot be decoded: {err!r}") from None


def checked(path: str | os.PathLike) -> bytes | mmap.mmap:
    """The bytes of a packed file of a format this squeeze reads (the checksum not checked):
    the file mapped read-only (a tensor's arrays are then decoded from the page cache, with no
    copy of the whole file), or read where it cannot be mapped (an empty file)."""
    try:
        with Path(path).open("rb") as f:
            try:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (ValueError, OSError):
                data = f.read()
    except OSError as err:
        raise PackedFileError(f"{path} cannot be read: {err.strerror or err}") from None
    if data[:3] == MAGIC[:3] and data[:4] not in _MAGICS:
        raise PackedFileError(
            f"{path} was written by another version of squeeze (format {data[3:4].decode()!r}); "
            f"this squeeze reads formats '2', '3', '4' and {MAGIC[3:].decode()!r}. Rerun the trial "
            "to rewrite it."
        )
    if data[:4] not in _MAGICS:
        raise PackedFileError(f"{path} is not a squeeze packed model file")
    return data


_MAGICS = (MAGIC, MAGIC_SQZ4, MAGIC_SQZ3, MAGIC_SQZ2)


def checksum(data) -> int:
    """The checksum an SQZ5 (or SQZ4) file's trailer holds for ``data`` (all bytes before the
    trailer): XXH3-64, as an unsigned integer."""
    return xxhash.xxh3_64_intdigest(data)


def _corrupted(path, data: bytes) -> PackedFileError:
    return PackedFileError(
        f"{path} is truncated or corrupted: its checksum does not match ({len(data)} bytes)"
    )


def open_packed(
    path: str | os.PathLike,
    data: bytes | None = None,
    *,
    max_bytes: int = MAX_UNBOUNDED_BYTES,
    max_index: int = MAX_INDEX_BYTES,
) -> Packed:
    """Open a packed file (SQZ5, SQZ4, SQZ3 or SQZ2) after checking its magic, its checksum and
    every record's fields against the bytes the file holds for it: nothing is allocated from a
    size the file states before that size is checked.

    Args:
        path: The file.
        data: Its bytes, if read already.
        max_bytes: Most bytes an SQZ2 file's payload may decompress to (the model's tensors'
            bytes bound it).
        max_index: Most bytes an SQZ3 file's index may decompress to (besides `INDEX_RATIO`).

    Raises:
        PackedFileError: If the file is not one squeeze wrote, or is damaged, naming what.
    """
    data = checked(path) if data is None else data
    if data[:4] == MAGIC_SQZ2:
        return _open_sqz2(path, data, max_bytes=max_bytes)
    trailer, check = (TRAILER_SQZ3, crc32) if data[:4] == MAGIC_SQZ3 else (TRAILER, checksum)
    if len(data) < len(MAGIC) + trailer.size:
        raise _corrupted(path, data)
    index_len, stated = trailer.unpack(data[-trailer.size :])
    index_start = len(data) - trailer.size - index_len
    view = memoryview(data)
    if index_start < len(MAGIC) or check(view[: -trailer.size]) != stated:
        raise _corrupted(path, data)
    limit = min(MAX_INDEX_BYTES, max_index, max(_SMALL_INDEX, INDEX_RATIO * index_len))
    index = _unzstd(path, view[index_start : -trailer.size], limit, "its index")
    try:
        meta = json.loads(index)
    except (ValueError, RecursionError) as err:  # (checksum passed: a crafted file)
        raise PackedFileError(f"{path}: its index is not JSON ({err})") from None
    del index
    _check_model_record(path, meta, (FORMAT_VERSION, FORMAT_VERSION_ACT))
    places: dict[str, list[tuple[str, np.dtype, list[int], str, list[int], int]]] = {}
    known = ("raw", "planes", "top") if data[:4] == MAGIC else ("raw", "planes")
    offset = len(MAGIC)
    for name, spec in meta["t"].items():
        entries = spec.get("a") if isinstance(spec, dict) else None
        if not isinstance(entries, list) or not all(_is_entry(e) for e in entries):
            raise PackedFileError(
                f"{path}: tensor {name!r} does not list its arrays as "
                "[suffix, dtype, shape, codec, sizes]"
            )
        places[name] = []
        counts = {}
        for suffix, dtype, shape, codec, sizes in entries:
            where = f"{path}: array {name}:{suffix}"
            if dtype not in _DTYPES:
                raise PackedFileError(f"{where} has dtype {dtype!r}; allowed: {sorted(_DTYPES)}")
            dtype = np.dtype(dtype)
            count = math.prod(shape)
            stored = sum(sizes)
            if codec == "raw" and sizes != [count * dtype.itemsize]:
                raise PackedFileError(
                    f"{where}: {count:,} elements of {dtype.itemsize} bytes are stored raw in "
                    f"{stored:,} bytes"
                )
            if codec == "planes" and (
                len(sizes) != dtype.itemsize or any(size > count for size in sizes)
            ):
                raise PackedFileError(
                    f"{where}: byte planes {sizes} do not fit {count:,} elements of "
                    f"{dtype.itemsize} bytes"
                )
            if codec == "top" and (
                dtype.itemsize < 2
                or len(sizes) != 2
                or sizes[0] != (dtype.itemsize - 1) * count
                or not 0 < sizes[1] <= count
            ):
                raise PackedFileError(
                    f"{where}: low bytes and top plane {sizes} do not fit {count:,} elements of "
                    f"{dtype.itemsize} bytes"
                )
            if codec not in known:
                raise PackedFileError(f"{where} has codec {codec!r}; known: {', '.join(known)}")
            if suffix in counts or offset + stored > index_start:
                raise PackedFileError(f"{where} is listed twice or runs past the arrays")
            counts[suffix] = (dtype.str, count)
            places[name].append((suffix, dtype, shape, codec, sizes, offset))
            offset += stored
        _check_record(path, name, spec, counts)
    if offset != index_start:
        raise PackedFileError(f"{path}: its arrays do not fill the space before its index")

    def arrays(name: str, only: str | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for suffix, dtype, shape, codec, sizes, start in places[name]:
            if only is not None and suffix != only:
                continue
            count = math.prod(shape)
            end = start + sum(sizes)
            array = restore(dtype, count, codec, sizes, view[start:end])
            out[suffix] = torch.from_numpy(array).reshape(shape)
        return out

    def into(name: str, suffix: str, out: np.ndarray) -> None:
        for found, dtype, shape, codec, sizes, start in places[name]:
            if found == suffix:
                end = start + sum(sizes)
                restore_into(out, dtype, math.prod(shape), codec, sizes, view[start:end])

    return Packed(path, meta, arrays, into)


#: Threads checking a large SQZ3 file's CRC-32, a part each (zlib lets go of the GIL meanwhile).
CRC_WORKERS = max(1, min(4, os.cpu_count() or 1))
#: Bytes below which a file's CRC-32 is computed in one part.
_CRC_PART = 1 << 22
_CRC_POLY = 0xEDB88320


def crc32(data) -> int:
    """``zlib.crc32(data)``, computed in `CRC_WORKERS` parts at once on a large buffer and the
    parts' checksums combined (zlib's ``crc32_combine``, which Python does not expose)."""
    view = memoryview(data).cast("B")
    parts = min(CRC_WORKERS, len(view) // _CRC_PART)
    if parts <= 1:
        return zlib.crc32(view)
    bounds = [len(view) * i // parts for i in range(parts + 1)]
    chunks = [view[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    with ThreadPoolExecutor(parts, thread_name_prefix="squeeze-crc") as pool:
        crcs = list(pool.map(zlib.crc32, chunks))
    crc = crcs[0]
    for part, chunk in zip(crcs[1:], chunks[1:], strict=True):
        crc = crc32_combine(crc, part, len(chunk))
    return crc


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc1`` of ``a``, ``crc2`` of ``b`` and ``len(b)``: zlib's
    ``crc32_combine`` (``crc1`` times x^(8 len2) modulo the polynomial, plus ``crc2``)."""
    return _multmodp(_x2nmodp(len2, 3), crc1) ^ crc2


def _multmodp(a: int, b: int) -> int:
    """``a * b`` modulo the CRC polynomial (bit-reflected, as zlib has it)."""
    m, p = 1 << 31, 0
    while m:
        if a & m:
            p ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


def _x2nmodp(n: int, k: int) -> int:
    """x^(n * 2^k) modulo the CRC polynomial."""
    p = 1 << 31  # x^0
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def _is_entry(entry) -> bool:
    """Whether an index entry is ``[suffix, dtype, shape, codec, sizes]`` of plain values."""
    if not (isinstance(entry, list) and len(entry) == 5):
        return False
    suffix, dtype, shape, codec, sizes = entry
    return (
        isinstance(suffix, str)
        and isinstance(dtype, str)
        and isinstance(codec, str)
        and _sizes(shape, most=8)
        and _sizes(sizes, most=8)
    )


def _sizes(values, *, most: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) <= most
        and all(type(v) is int and 0 <= v < 2**48 for v in values)
    )


def _check_model_record(path, meta, version: int | tuple[int, ...]) -> None:
    """Check the model record's fields are of the types the loader reads."""
    if not isinstance(meta, dict):
        raise PackedFileError(f"{path}: its model record is not a JSON object")
    versions = version if isinstance(version, tuple) else (version,)
    if meta.get("v") not in versions:
        read = " or ".join(map(str, versions))
        raise PackedFileError(f"{path} has format {meta.get('v')!r}; this squeeze reads {read}")
    if "act" in meta and meta.get("v") != FORMAT_VERSION_ACT:
        raise PackedFileError(f"{path} records activation grids in format {meta.get('v')!r}")
    kinds = {"t": dict, "modules": dict, "int8": list, "tied": dict, "attrs": dict, "act": dict}
    for key, kind in kinds.items():
        if key in ("t", "modules", "int8") and key not in meta:
            raise PackedFileError(f"{path}: its model record has no {key!r}")
        if key in meta and not isinstance(meta[key], kind):
            raise PackedFileError(
                f"{path}: its model record's {key!r} is a {type(meta[key]).__name__}, not a "
                f"{kind.__name__}"
            )
    names = [
        *meta["modules"],
        *meta["int8"],
        *meta.get("tied", {}).items(),
        *meta.get("attrs", {}),
        *meta.get("act", {}),
    ]
    if not all(isinstance(n, str) or isinstance(n, tuple) and all(map(_str, n)) for n in names):
        raise PackedFileError(f"{path}: its model record names a module or tensor by a non-string")


def _str(value) -> bool:
    return isinstance(value, str)


def _check_record(path, name: str, spec, counts: dict[str, tuple[str, int]]) -> None:
    try:
        check_layout(spec, counts)
    except CodecError as err:
        raise PackedFileError(f"{path}: tensor {name!r}: {err}") from None


def _unzstd(path, frame, limit: int, what: str) -> bytes:
    """A zstd frame decompressed, refused if it holds more than ``limit`` bytes (streamed: a
    frame that does not state its size is not trusted to be small)."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(bytes(frame))
        out = reader.read(limit + 1)
        while len(out) <= limit:
            more = reader.read(limit + 1 - len(out))
            if not more:
                break
            out += more
    except zstandard.ZstdError as err:
        raise PackedFileError(f"{path}: {what} does not decompress ({err})") from None
    if len(out) > limit:
        raise PackedFileError(f"{path}: {what} decompresses to more than {limit:,} bytes")
    return out


def sqz2_payload(path, data: bytes, *, max_bytes: int = MAX_UNBOUNDED_BYTES) -> tuple[bytes, bool]:
    """``(payload, compressed)`` of an SQZ2 file, refused if it decompresses to more than
    ``max_bytes``."""
    if len(data) < HEADER_BYTES or data[4] not in (_RAW, _LZMA):
        raise PackedFileError(f"{path} is not a squeeze packed model file")
    body = memoryview(data)[HEADER_BYTES:]
    if zlib.crc32(body) != struct.unpack("<I", data[5:HEADER_BYTES])[0]:
        raise _corrupted(path, data)
    if data[4] == _RAW:
        return bytes(body), False
    decompressor = lzma.LZMADecompressor()
    try:
        payload = decompressor.decompress(body, max_length=max_bytes)
    except lzma.LZMAError as err:  # checksum passed
        raise PackedFileError(f"{path} cannot be decoded: {err}") from None
    if decompressor.eof and decompressor.unused_data:
        raise PackedFileError(f"{path}: bytes follow its LZMA stream (more streams are refused)")
    if not decompressor.eof:
        what = (
            "is cut short" if decompressor.needs_input else f"holds more than {max_bytes:,} bytes"
        )
        raise PackedFileError(f"{path}: its LZMA stream {what}")
    return payload, True


def _open_sqz2(path, data: bytes, *, max_bytes: int) -> Packed:
    payload, _ = sqz2_payload(path, data, max_bytes=max_bytes)
    try:
        (header_len,) = struct.unpack("<Q", payload[:8])
        if header_len > len(payload) - 8:
            raise ValueError(f"a header of {header_len:,} bytes in a {len(payload):,}-byte payload")
        header = json.loads(payload[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["squeeze"])
        tensors = st_load(payload)
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types; checksum passed)
        raise PackedFileError(f"{path} cannot be decoded: {err}") from None
    del payload
    if isinstance(meta, dict) and meta.get("v") != FORMAT_VERSION_SQZ2:
        raise PackedFileError(
            f"{path} has format {meta['v']}; this squeeze reads {FORMAT_VERSION_SQZ2} in SQZ2 files"
        )
    _check_model_record(path, meta, FORMAT_VERSION_SQZ2)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.rpartition(":")
        grouped.setdefault(name or suffix, {})[suffix if name else ""] = tensor
    if set(grouped) - set(meta["t"]):
        raise PackedFileError(
            f"{path} holds arrays of no tensor: {sorted(set(grouped) - set(meta['t']))}"
        )
    for name, spec in meta["t"].items():
        counts = {}
        for suffix, tensor in grouped.get(name, {}).items():
            dtype = _NUMPY.get(tensor.dtype)
            if dtype is None:
                raise PackedFileError(f"{path}: array {name}:{suffix} has dtype {tensor.dtype}")
            counts[suffix] = (dtype, tensor.numel())
        _check_record(path, name, spec, counts)

    def arrays(name: str, only: str | None = None) -> dict[str, torch.Tensor]:
        found = grouped.get(name, {})
        return found if only is None else {k: v for k, v in found.items() if k == only}

    return Packed(path, meta, arrays)


#: numpy's names of the dtypes an SQZ2 file's arrays may have.
_NUMPY = {
    getattr(torch, name): np.dtype(name).str
    for name in (
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "float32",
        "float64",
    )
}
