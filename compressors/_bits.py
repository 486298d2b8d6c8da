"""Bit-packed integers and byte-spelled gaps, the two integer streams of a packed file's arrays
(see `compressors._codecs`)."""

from __future__ import annotations

import numpy as np

#: Bit widths whose codes fill whole bytes (packed and unpacked by byte shifts).
BYTE_ALIGNED = (1, 2, 4, 8)
#: Values processed at a time where a whole-array temporary would be large (a multiple of 8).
_CHUNK = 1 << 20


class BitsError(ValueError):
    """A bit stream too short for the integers it should hold."""


def gap_bytes(positions: np.ndarray) -> int:
    """Bytes `encode_gaps` spells ``positions`` in, without spelling them."""
    if not len(positions):
        return 0
    gaps = np.diff(positions, prepend=-1) - 1
    return int((gaps // 255).sum()) + len(positions)


def encode_gaps(positions: np.ndarray) -> np.ndarray:
    """Bytes spelling the gaps before each position; each 255 adds 255 and carries no value."""
    gaps = np.diff(positions, prepend=-1) - 1
    counts = gaps // 255 + 1
    out = np.full(int(counts.sum()), 255, dtype=np.uint8)
    out[np.cumsum(counts) - 1] = gaps % 255
    return out


def decode_gaps(data: np.ndarray) -> np.ndarray:
    """Positions of `encode_gaps`'s bytes."""
    ends = np.flatnonzero(data < 255)
    return np.cumsum(data.astype(np.int64))[ends] + np.arange(len(ends))


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers below ``2**bits`` into a dense little-endian bit stream (in
    chunks: a whole-tensor bit plane would take ``bits`` bytes per value; widths that fill
    whole bytes by shifts of bytes)."""
    if bits in BYTE_ALIGNED:
        return _pack_aligned(values, bits)
    if bits < 8:
        return _pack_groups(values, bits)
    shifts = np.arange(bits, dtype=values.dtype)
    parts = [
        np.packbits(
            ((values[start : start + _CHUNK, None] >> shifts) & 1)
            .astype(np.uint8, copy=False)
            .reshape(-1),
            bitorder="little",
        )
        for start in range(0, len(values), _CHUNK)  # _CHUNK * bits is a whole number of bytes
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def _pack_groups(values: np.ndarray, bits: int) -> np.ndarray:
    """`pack_bits` for widths below 8: each 8 values make one 64-bit word of ``8 * bits`` bits
    (little-endian), whose low ``bits`` bytes are the stream's next bytes (the same stream as
    a bit plane per width, a third of a 10 M MLP's allocation table, at an eighth of the
    operations)."""
    n = len(values)
    out = np.empty(-(-n * bits // 8), dtype=np.uint8)
    for start in range(0, n, _CHUNK):  # (_CHUNK is a multiple of 8)
        part = values[start : start + _CHUNK].astype(np.uint64)
        if len(part) % 8:
            part = np.concatenate([part, np.zeros(8 - len(part) % 8, dtype=np.uint64)])
        groups = part.reshape(-1, 8)
        word = groups[:, 0].copy()
        for i in range(1, 8):
            word |= groups[:, i] << np.uint64(i * bits)
        stream = word.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8)[:, :bits]
        first = start * bits // 8
        take = min(stream.size, len(out) - first)
        out[first : first + take] = stream.reshape(-1)[:take]
    return out


def _pack_aligned(values: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    if bits == 8:
        return values.astype(np.uint8)
    n = len(values)
    out = np.empty(-(-n // per), dtype=np.uint8)
    for start in range(0, n, _CHUNK):  # (_CHUNK is a multiple of 8)
        part = values[start : start + _CHUNK].astype(np.uint8, copy=False)
        if len(part) % per:
            part = np.concatenate([part, np.zeros(per - len(part) % per, dtype=np.uint8)])
        groups = part.reshape(-1, per)
        byte = groups[:, 0].copy()
        for i in range(1, per):
            byte |= groups[:, i] << np.uint8(i * bits)
        out[start // per : start // per + len(byte)] = byte
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` integers `pack_bits` packed (int64)."""
    return unpacked_index(packed, bits, count).astype(np.int64, copy=False)


def unpacked_index(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` integers `pack_bits` packed, uint8 for widths up to 8 bits, else int64."""
    if len(packed) * 8 < count * bits:
        raise BitsError(f"{len(packed)} bytes cannot hold {count} codes of {bits} bits")
    if bits in BYTE_ALIGNED:
        per = 8 // bits
        packed = packed[: -(-count // per)]
        if bits == 8:
            return packed.copy()
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        mask = np.uint8((1 << bits) - 1)
        return ((packed[:, None] >> shifts) & mask).reshape(-1)[:count]
    out = np.empty(count, dtype=np.int64 if bits > 8 else np.uint8)
    weights = np.left_shift(1, np.arange(bits, dtype=np.int64))
    step = _CHUNK * bits // 8
    for i, start in enumerate(range(0, count, _CHUNK)):
        m = min(_CHUNK, count - start)
        planes = np.unpackbits(
            packed[i * step : i * step + step], count=m * bits, bitorder="little"
        )
        out[start : start + m] = planes.reshape(m, bits) @ weights
    return out
