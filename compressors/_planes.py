"""How each array of a packed file stores its bytes: as they are (``raw``) or as byte planes
(``planes``: the array's i-th bytes of every element, least significant first), each plane
zstd-compressed where that measurably pays: a float32 weight's exponent byte takes about 2.7 bits
of its 8, its mantissa bytes are noise. Whether a plane pays is first tried on a sample of it
(`SAMPLE_BYTES`), so incompressible planes cost a copy and no compression (see
`compressors._codecs` for the arrays a tensor becomes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zstandard

from compressors._bits import BitsError

#: zstd's level for byte planes: on float32 weights, level 1 stored the exponent plane as well as
#: levels 3 and 9 (shuffled, 0.843 of the raw bytes against 0.856 and 0.850) and fastest.
ZSTD_LEVEL = 1
#: Bytes of a plane compressed first (evenly spaced blocks of it) to see whether zstd pays.
SAMPLE_BYTES = 1 << 16
_SAMPLE_BLOCKS = 16
#: A plane is compressed when its sample shrinks below this fraction of its bytes.
PAYS = 0.97
#: Arrays smaller than this are compressed whole, without a sample.
_SMALL = 4 * SAMPLE_BYTES


class CodecError(BitsError):
    """An array's stored bytes cannot be decoded (the packed file is damaged or foreign)."""


@dataclass(frozen=True)
class Stored:
    """An array with its stored form (`store`'s result), when choosing a layout stored it
    already (so that it is not compressed twice)."""

    array: np.ndarray
    codec: str
    sizes: list[int]
    chunks: list

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


def store(array: np.ndarray | Stored) -> tuple[str, list[int], list]:
    """``(codec, sizes, chunks)``: how ``array``'s little-endian bytes are stored. ``raw``: one
    chunk, the bytes; ``planes``: one chunk per byte of an element (least significant first),
    zstd-compressed where that is smaller (its size is then below the element count). The
    chunks are what the file holds, back to back; ``sizes`` their lengths. (A `Stored` array
    was stored already: its result.)"""
    if isinstance(array, Stored):
        return array.codec, array.sizes, array.chunks
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1)
    n, k = array.size, array.dtype.itemsize
    raw = array.view(np.uint8)
    if not n:
        return "raw", [0], []
    strided = raw.reshape(n, k)
    tried = [j for j in range(k) if n <= _SMALL or _sample_pays(strided[:, j])]
    if not tried:
        return "raw", [raw.nbytes], [raw.data]
    planes = strided.T.copy() if k > 1 else strided.reshape(1, n)  # (one transposing copy)
    chunks: list = [planes[j].data for j in range(k)]
    for j in tried:
        frame = _zstd().compress(planes[j].data)
        if len(frame) < n:
            chunks[j] = frame
    sizes = [len(c) if isinstance(c, bytes) else n for c in chunks]
    if all(size == n for size in sizes):
        return "raw", [raw.nbytes], [raw.data]
    return "planes", sizes, chunks


def _sample_pays(plane: np.ndarray) -> bool:
    """Whether zstd shrinks evenly spaced blocks of ``plane`` (a large byte array, maybe
    strided) below `PAYS` of their bytes."""
    n = len(plane)
    block = SAMPLE_BYTES // _SAMPLE_BLOCKS
    starts = np.linspace(0, n - block, _SAMPLE_BLOCKS).astype(np.int64)
    sample = np.concatenate([plane[s : s + block] for s in starts])
    return len(_zstd().compress(sample.data)) < PAYS * len(sample)


def _zstd() -> zstandard.ZstdCompressor:
    # One compressor per call: a compressor must not be used by two threads at once.
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False)


def restore(
    dtype: np.dtype, count: int, codec: str, sizes: list[int], data: memoryview
) -> np.ndarray:
    """The array `store` stored as ``data`` (``count`` elements of ``dtype``), as a new,
    writable array.

    Raises:
        CodecError: If the bytes do not decode to such an array.
    """
    k = dtype.itemsize
    if codec == "raw":
        if sizes != [count * k] or len(data) != count * k:
            raise CodecError(f"a raw array of {count} x {k} bytes is stored in {len(data)}")
        return np.frombuffer(data, dtype=np.uint8).copy().view(dtype)
    if codec != "planes" or len(sizes) != k or sum(sizes) != len(data):
        raise CodecError(f"unknown codec {codec!r} or sizes {sizes} for {len(data)} bytes")
    if any(size > count for size in sizes):
        raise CodecError(f"a byte plane of {count} bytes is stored in more ({sizes})")
    out = np.empty((k, count), dtype=np.uint8)
    offset = 0
    for j, size in enumerate(sizes):
        chunk = data[offset : offset + size]
        offset += size
        if size == count:
            out[j] = np.frombuffer(chunk, dtype=np.uint8)
            continue
        try:
            # A frame that states its size is decompressed to that size whatever the limit:
            # the stated size is checked first (a frame that states none gets the limit).
            stated = zstandard.frame_content_size(chunk)
            if stated not in (count, -1):
                raise CodecError(f"a byte plane states {stated} bytes, not {count}")
            plane = zstandard.ZstdDecompressor().decompress(chunk, max_output_size=count)
        except zstandard.ZstdError as err:
            raise CodecError(f"a byte plane does not decompress: {err}") from None
        if len(plane) != count:
            raise CodecError(f"a byte plane holds {len(plane)} bytes, not {count}")
        out[j] = np.frombuffer(plane, dtype=np.uint8)
    return (out.T.copy() if k > 1 else out).reshape(-1).view(dtype)
