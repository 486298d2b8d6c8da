"""How each array of a packed file stores its bytes: as they are (``raw``) or as byte planes
(``planes``: the array's i-th bytes of every element, least significant first), each plane
zstd-compressed where that measurably pays: a float32 weight's exponent byte takes about 2.7 bits
of its 8, its mantissa bytes are noise. Whether a plane pays is first tried on a sample of it
(`SAMPLE_BYTES`), so incompressible planes cost a copy and no compression (see
`compressors._codecs` for the arrays a tensor becomes). Where only the top byte's plane pays (a
float weight's), the array is stored as ``top`` (format SQZ5): each element's other bytes
together, then that plane; the same bytes, but written back into elements twice as fast."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import zstandard

from compressors._bits import BitsError

#: zstd's level for byte planes: on float32 weights, level 1 stored the exponent plane as well as
#: levels 3 and 9 (shuffled, 0.843 of the raw bytes against 0.856 and 0.850) and fastest.
ZSTD_LEVEL = 1
#: ... with a hash table of 2^6 entries rather than the level's 2^14: a byte plane's matches are
#: mostly chance (its bytes nearly independent), each costing more than the literals it saves.
#: On a BERT-like 28 M model's embedding, the exponent plane took 0.340 of its bytes against 0.369
#: (its bytes' order-0 entropy: 0.335) and decompressed 40% faster (more literals, fewer
#: sequences), compressed 2.4 times as fast; files of 1 M to 28 M models, fp32, pruned or 4-bit:
#: 0.01% to 1.4% smaller.
ZSTD_HASH_LOG = 6
#: Bytes of a plane compressed first (evenly spaced blocks of it) to see whether zstd pays.
SAMPLE_BYTES = 1 << 16
_SAMPLE_BLOCKS = 16
#: A plane is compressed when its sample shrinks below this fraction of its bytes.
PAYS = 0.97
#: Bytes of elements a decoded array's byte planes are written into at a time (a block that
#: stays in the cache while each plane writes its bytes: about twice as fast as plane by plane
#: over the whole array, whose elements each plane would bring from memory again).
_INTERLEAVE_BYTES = 1 << 20
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
    zstd-compressed where that is smaller (its size is then below the element count); ``top``,
    where only the most significant byte's plane is compressed: two chunks, each element's
    other bytes (element after element), then that plane. The
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
    if k > 1 and tried == [k - 1]:  # (a float weight: only its top byte, no transposing copy)
        frame = _zstd().compress(strided[:, k - 1].copy().data)
        if len(frame) >= n:
            return "raw", [raw.nbytes], [raw.data]
        return "top", [(k - 1) * n, len(frame)], [_low_bytes(raw, k).data, frame]
    planes = strided.T.copy() if k > 1 else strided.reshape(1, n)  # (one transposing copy)
    chunks: list = [planes[j].data for j in range(k)]
    for j in tried:
        frame = _zstd().compress(planes[j].data)
        if len(frame) < n:
            chunks[j] = frame
    sizes = [len(c) if isinstance(c, bytes) else n for c in chunks]
    if all(size == n for size in sizes):
        return "raw", [raw.nbytes], [raw.data]
    if k > 1 and all(size == n for size in sizes[:-1]):
        return "top", [(k - 1) * n, sizes[-1]], [_low_bytes(raw, k).data, chunks[-1]]
    return "planes", sizes, chunks


def _low_bytes(raw: np.ndarray, k: int) -> np.ndarray:
    """Each element's ``k - 1`` low bytes, element after element (``raw``: elements of ``k``
    bytes, little-endian): by `_overlapped` where numpy writes it right (`_OVERLAPPING`; 5.6
    times as fast on a float32 weight, whose storing it took half of), else by a copy of
    ``k - 1``-byte items."""
    if _OVERLAPPING and k in _WORDS:
        return _overlapped(raw, k)
    return _items(raw, k)


_WORDS = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _overlapped(raw: np.ndarray, k: int) -> np.ndarray:
    """`_low_bytes` by writing each element whole at ``k - 1``-byte steps, in order, so that
    its top byte is overwritten by the next element's first (the reader's trick backwards)."""
    n = len(raw) // k
    out = np.empty((k - 1) * n + 1, dtype=np.uint8)
    np.ndarray((n,), _WORDS[k], out, strides=(k - 1,))[...] = raw.view(_WORDS[k])
    return out[: (k - 1) * n]


def _items(raw: np.ndarray, k: int) -> np.ndarray:
    """`_low_bytes` by one copy of ``k - 1``-byte items (as fast as the transposing copy of
    planes; an ``(n, k - 1)`` slice copied as bytes took three times as long)."""
    low = np.dtype({"names": ["low"], "formats": [f"V{k - 1}"], "offsets": [0], "itemsize": k})
    return np.ascontiguousarray(raw.view(low)["low"]).view(np.uint8)


def _overlapping_in_order() -> bool:
    """Whether `_overlapped` gives `_items`'s bytes: numpy writes a strided copy element after
    element, as it needs (which numpy does not promise), tried on every width, at an aligned
    and a misaligned start."""
    rng = np.random.default_rng(0)
    for k in _WORDS:
        for offset in (0, 1):
            raw = rng.integers(0, 256, 1003 * k + offset, dtype=np.uint8)[offset:]
            if not np.array_equal(_overlapped(raw, k), _items(raw, k)):
                return False
    return True


_OVERLAPPING = _overlapping_in_order()


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
    return zstandard.ZstdCompressor(compression_params=_PARAMS)


_PARAMS = zstandard.ZstdCompressionParameters.from_level(
    ZSTD_LEVEL, hash_log=ZSTD_HASH_LOG, write_checksum=False
)


def restore(
    dtype: np.dtype, count: int, codec: str, sizes: list[int], data: memoryview
) -> np.ndarray:
    """The array `store` stored as ``data`` (``count`` elements of ``dtype``), as a new,
    writable array.

    Raises:
        CodecError: If the bytes do not decode to such an array.
    """
    out = np.empty(count * dtype.itemsize, dtype=np.uint8)
    restore_into(out, dtype, count, codec, sizes, data)
    return out.view(dtype)


def restore_into(
    out: np.ndarray, dtype: np.dtype, count: int, codec: str, sizes: list[int], data: memoryview
) -> None:
    """Decode the array `store` stored as ``data`` (``count`` elements of ``dtype``) straight
    into ``out``, ``count`` times the element's bytes (a byte view of the tensor it is for):
    each byte plane is written into its place in the elements, with no copy of the whole
    array on the way (only a compressed plane is decompressed first, one at a time).

    Raises:
        CodecError: If the bytes do not decode to such an array (``out`` may then hold part).
    """
    k = dtype.itemsize
    if out.dtype != np.uint8 or out.shape != (count * k,):
        raise ValueError(f"out must be {count * k:,} bytes (uint8), not {out.dtype} {out.shape}")
    if codec == "raw":
        if sizes != [count * k] or len(data) != count * k:
            raise CodecError(f"a raw array of {count} x {k} bytes is stored in {len(data)}")
        out[:] = np.frombuffer(data, dtype=np.uint8)
        return
    if codec == "top":
        _restore_top(out, k, count, sizes, data)
        return
    if codec != "planes" or len(sizes) != k or sum(sizes) != len(data):
        raise CodecError(f"unknown codec {codec!r} or sizes {sizes} for {len(data)} bytes")
    if any(size > count for size in sizes):
        raise CodecError(f"a byte plane of {count} bytes is stored in more ({sizes})")
    planes, offset = [], 0
    for j, size in enumerate(sizes):
        chunk = data[offset : offset + size]
        offset += size
        planes.append(np.frombuffer(chunk, np.uint8) if size == count else _Plane(chunk, count, j))
    elements = out.reshape(count, k)
    step = _INTERLEAVE_BYTES // k
    for start in range(0, count, step):  # (a block's planes in its elements while cached)
        block = elements[start : start + step]
        for j, plane in enumerate(planes):
            block[:, j] = plane[start : start + len(block)]
    for plane in planes:
        if isinstance(plane, _Plane):
            plane.end()


def _restore_top(out: np.ndarray, k: int, count: int, sizes: list[int], data: memoryview):
    """`restore_into` for codec ``top``: each element's ``k - 1`` low bytes stored together
    (``sizes[0]`` bytes), then its top byte's plane, zstd-compressed where ``sizes[1]`` is less
    than ``count``. A block of elements is written whole from the low bytes, each element read as
    ``k`` bytes at ``k - 1``-byte steps (its last byte the next element's first, or for the last
    element the plane's), then its top bytes over them: twice as fast as four byte planes
    written into their places (a copy a byte at a time each)."""
    if k < 2 or len(sizes) != 2 or sizes[0] != (k - 1) * count or not 0 < sizes[1] <= count:
        raise CodecError(f"sizes {sizes} do not fit {count} elements of {k} bytes as codec 'top'")
    if sum(sizes) != len(data):
        raise CodecError(f"an array of sizes {sizes} is stored in {len(data)} bytes")
    chunk = data[sizes[0] :]
    top = np.frombuffer(chunk, np.uint8) if sizes[1] == count else _Plane(chunk, count)
    word = np.dtype(f"<u{k}")
    words, elements = out.view(word), out.reshape(count, k)
    step = _INTERLEAVE_BYTES // k
    for start in range(0, count, step):
        m = min(step, count - start)
        low = np.ndarray((m,), word, data, offset=(k - 1) * start, strides=(k - 1,))
        words[start : start + m] = low
        elements[start : start + m, k - 1] = top[start : start + m]
    if isinstance(top, _Plane):
        top.end()


_SCRATCH = threading.local()


def _scratch(index: int) -> bytearray:
    """This thread's ``index``-th block buffer (`_INTERLEAVE_BYTES`), made once and reused by
    every plane the thread decodes: a new buffer per plane cost its page faults again (0.4 ms a
    plane, 55 ms of a 110 M model's reload)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", [])
    while len(buffers) <= index:
        buffers.append(bytearray(_INTERLEAVE_BYTES))
    return buffers[index]


class _Plane:
    """A zstd-compressed byte plane of ``count`` bytes, decompressed a block at a time as it is
    sliced in order (``plane[start:stop]``, the blocks consecutive): into one small buffer (the
    thread's ``index``-th, `_scratch`), rather than the whole plane into new memory.

    Raises:
        CodecError: If the frame states another size, does not decompress, or holds fewer or
            more than ``count`` bytes (checked by `end`).
    """

    def __init__(self, chunk: memoryview, count: int, index: int = 0) -> None:
        self.count, self._done = count, 0
        try:
            # A frame that states its size is decompressed to that size whatever the limit:
            # the stated size is checked first (a frame that states none is read to `count`).
            stated = zstandard.frame_content_size(chunk)
            if stated not in (count, -1):
                raise CodecError(f"a byte plane states {stated} bytes, not {count}")
            self._reader = zstandard.ZstdDecompressor().stream_reader(chunk)
        except zstandard.ZstdError as err:
            raise CodecError(f"a byte plane does not decompress: {err}") from None
        self._buffer = memoryview(_scratch(index))[: min(count, _INTERLEAVE_BYTES)]

    def __getitem__(self, block: slice) -> np.ndarray:
        if block.start != self._done or block.stop - block.start > len(self._buffer):
            raise ValueError(f"blocks of a plane are read in order, not {block}")
        n = block.stop - block.start
        view, got = self._buffer[:n], 0
        try:
            while got < n:
                more = self._reader.readinto(view[got:])
                if not more:
                    raise CodecError(
                        f"a byte plane holds {self._done + got} bytes, not {self.count}"
                    )
                got += more
        except zstandard.ZstdError as err:
            raise CodecError(f"a byte plane does not decompress: {err}") from None
        self._done += n
        return np.frombuffer(self._buffer, np.uint8, n)

    def end(self) -> None:
        """Check the frame held no more than the plane's bytes."""
        try:
            more = self._reader.read(1)
        except zstandard.ZstdError as err:
            raise CodecError(f"a byte plane does not decompress: {err}") from None
        if self._done != self.count or more:
            raise CodecError(
                f"a byte plane does not decompress to {self.count} bytes (it holds more)"
            )
