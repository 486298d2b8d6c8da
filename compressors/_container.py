"""Opening a packed file of either format: the checks every reader makes (magic, checksum,
format version) and each tensor's arrays, decoded on demand (see `compressors.packing` for the
formats: ``SQZ3``, written today, and ``SQZ2``, still read)."""

from __future__ import annotations

import json
import lzma
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import load as st_load

from compressors._codecs import CodecError, decode, restore

MAGIC = b"SQZ3"
FORMAT_VERSION = 4
#: The previous format, still read: its magic and the version in its model record.
MAGIC_SQZ2, FORMAT_VERSION_SQZ2 = b"SQZ2", 3
#: Bytes before an SQZ2 file's payload: magic, codec, CRC-32.
HEADER_BYTES = 9
#: Bytes of an SQZ3 file that are neither arrays nor index: the magic and the trailer.
FRAMING_BYTES = 4 + 12
#: An SQZ3 file's last bytes: its index's length and the CRC-32 of all before them.
TRAILER = struct.Struct("<QI")
_RAW, _LZMA = 0, 1
#: An index larger than this (decompressed) is refused (a model of 100,000 tensors needs ~20 MB).
MAX_INDEX_BYTES = 1 << 28
#: The dtypes an array of a file may have (numpy's names; no objects).
_DTYPES = frozenset(
    ["|b1", "|u1", "|i1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"]
)


class PackedFileError(ValueError):
    """The file is not a squeeze packed model, or does not fit the model it is loaded into."""


class Packed:
    """An opened packed file of either format: its model record (``meta``, with each tensor's
    layout record under ``t``) and each tensor's arrays (`arrays`), decoded on demand."""

    def __init__(self, path, meta: dict, arrays: Callable[[str], dict[str, torch.Tensor]]):
        self.path, self.meta, self._arrays = path, meta, arrays

    def arrays(self, name: str, only: str | None = None) -> dict[str, torch.Tensor]:
        """The arrays of tensor ``name`` by suffix (``only``: just that one, if it has it)."""
        return self.guarded(self._arrays, name, only)

    def decoded(self, name: str, arrays: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Tensor ``name``'s values."""
        arrays = self.arrays(name) if arrays is None else arrays
        return self.guarded(decode, self.meta["t"][name], arrays)

    def guarded(self, fn, *args):
        """``fn(*args)``, a damaged or foreign record's error raised as `PackedFileError`."""
        try:
            return fn(*args)
        except (CodecError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            if isinstance(err, PackedFileError):
                raise
            raise PackedFileError(f"{self.path} cannot be decoded: {err!r}") from None


def checked(path: str | os.PathLike) -> bytes:
    """The bytes of a packed file of a format this squeeze reads (the checksum not checked)."""
    data = Path(path).read_bytes()
    if data[:3] == MAGIC[:3] and data[:4] not in (MAGIC, MAGIC_SQZ2):
        raise PackedFileError(
            f"{path} was written by another version of squeeze (format {data[3:4].decode()!r}); "
            f"this squeeze reads formats '2' and {MAGIC[3:].decode()!r}. Rerun the trial to "
            "rewrite it."
        )
    if data[:4] not in (MAGIC, MAGIC_SQZ2):
        raise PackedFileError(f"{path} is not a squeeze packed model file")
    return data


def _corrupted(path, data: bytes) -> PackedFileError:
    return PackedFileError(
        f"{path} is truncated or corrupted: its checksum does not match ({len(data)} bytes)"
    )


def open_packed(path: str | os.PathLike, data: bytes | None = None) -> Packed:
    """Open a packed file (SQZ3 or SQZ2) after checking its magic and checksum."""
    data = checked(path) if data is None else data
    if data[:4] == MAGIC_SQZ2:
        return _open_sqz2(path, data)
    if len(data) < FRAMING_BYTES:
        raise _corrupted(path, data)
    index_len, crc = TRAILER.unpack(data[-TRAILER.size :])
    index_start = len(data) - TRAILER.size - index_len
    view = memoryview(data)
    if index_start < len(MAGIC) or zlib.crc32(view[: -TRAILER.size]) != crc:
        raise _corrupted(path, data)
    try:
        index = zstandard.ZstdDecompressor().decompress(
            view[index_start : -TRAILER.size], max_output_size=MAX_INDEX_BYTES
        )
        meta = json.loads(index)
        if meta["v"] != FORMAT_VERSION:
            raise PackedFileError(
                f"{path} has format {meta['v']}; this squeeze reads {FORMAT_VERSION}"
            )
        places: dict[str, list[tuple[str, np.dtype, list[int], str, list[int], int]]] = {}
        offset = len(MAGIC)
        for name, spec in meta["t"].items():
            places[name] = []
            for suffix, dtype, shape, codec, sizes in spec["a"]:
                if dtype not in _DTYPES:
                    raise PackedFileError(f"{path}: array {name}:{suffix} has dtype {dtype!r}")
                places[name].append((suffix, np.dtype(dtype), shape, codec, sizes, offset))
                offset += sum(int(s) for s in sizes)
    except (ValueError, KeyError, TypeError, zstandard.ZstdError) as err:  # checksum passed
        if isinstance(err, PackedFileError):
            raise
        raise PackedFileError(f"{path} cannot be decoded: {err!r}") from None
    if offset != index_start:
        raise PackedFileError(f"{path}: its arrays do not fill the space before its index")

    def arrays(name: str, only: str | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for suffix, dtype, shape, codec, sizes, start in places[name]:
            if only is not None and suffix != only:
                continue
            count = int(np.prod(shape)) if shape else 1
            end = start + sum(sizes)
            array = restore(dtype, count, codec, sizes, view[start:end])
            out[suffix] = torch.from_numpy(array).reshape(shape)
        return out

    return Packed(path, meta, arrays)


def sqz2_payload(path, data: bytes) -> tuple[bytes, bool]:
    if len(data) < HEADER_BYTES or data[4] not in (_RAW, _LZMA):
        raise PackedFileError(f"{path} is not a squeeze packed model file")
    body = memoryview(data)[HEADER_BYTES:]
    if zlib.crc32(body) != struct.unpack("<I", data[5:HEADER_BYTES])[0]:
        raise _corrupted(path, data)
    try:
        return (lzma.decompress(body) if data[4] == _LZMA else bytes(body)), data[4] == _LZMA
    except lzma.LZMAError as err:  # checksum passed
        raise PackedFileError(f"{path} cannot be decoded: {err}") from None


def _open_sqz2(path, data: bytes) -> Packed:
    payload, _ = sqz2_payload(path, data)
    try:
        (header_len,) = struct.unpack("<Q", payload[:8])
        header = json.loads(payload[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["squeeze"])
        tensors = st_load(payload)
    except (struct.error, ValueError, KeyError) as err:  # checksum passed
        raise PackedFileError(f"{path} cannot be decoded: {err}") from None
    del payload
    if meta["v"] != FORMAT_VERSION_SQZ2:
        raise PackedFileError(
            f"{path} has format {meta['v']}; this squeeze reads {FORMAT_VERSION_SQZ2} in SQZ2 files"
        )
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.rpartition(":")
        grouped.setdefault(name or suffix, {})[suffix if name else ""] = tensor

    def arrays(name: str, only: str | None = None) -> dict[str, torch.Tensor]:
        found = grouped.get(name, {})
        return found if only is None else {k: v for k, v in found.items() if k == only}

    return Packed(path, meta, arrays)
