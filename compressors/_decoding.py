"""Reading a tensor's layout record back: the checks a record must pass before any of its arrays
is decoded (`check_layout`), and its values (`decode`) or integer codes (`stored_codes`,
`full_codes`) rebuilt from its arrays (see `compressors._codecs` for the layouts, and `Codes`, the
value protocol both sides share)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import constriction
import numpy as np
import torch

from compressors._bits import BYTE_ALIGNED, decode_gaps, unpacked_index
from compressors._planes import CodecError

#: Bit widths whose codes are looked up straight from their bytes.
_BYTE_ALIGNED = BYTE_ALIGNED


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


def _ans_model(freqs: np.ndarray) -> constriction.stream.model.Categorical:
    weights = freqs.astype(np.float64)
    return constriction.stream.model.Categorical(weights / weights.sum(), perfect=False)


def decode(spec: dict, arrays: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensor a layout record and its arrays hold (float32 for floating tensors)."""
    shape = spec["shape"]
    if spec["enc"] == "raw":
        return arrays[""]
    out = torch.empty(shape, dtype=torch.float32)
    if decode_into(spec, arrays, out):
        return out
    del out
    n = math.prod(shape)
    if "count" in spec:  # integer codes on a grid: each index's value looked up in one pass
        symbols = _alphabet(spec)
        if spec["decode"] == "codebook":
            table, scale = arrays["codebook"].to(torch.float32).numpy()[symbols], None
        else:
            table, scale = symbols.astype(np.float32), arrays["scale"].to(torch.float32)
        codes = torch.from_numpy(_looked_up(spec, arrays, table))
        if scale is not None:
            if spec["enc"] in ("dense", "ans"):
                return codes.view(shape).mul_(scale)
            scale = scale.expand(shape).reshape(-1)
    else:
        codes, scale = arrays["values"].to(torch.float32), None
    if spec["enc"] in ("dense", "ans"):
        return codes.view(shape)
    flat = torch.zeros(n, dtype=torch.float32)
    if spec["enc"] == "bitmask":  # a boolean mask scatters faster than positions
        mask = _unpacked_mask(arrays["mask"].numpy(), n)
        flat.masked_scatter_(mask, codes * scale[mask] if scale is not None else codes)
        return flat.view(shape)
    index = stored_positions(spec, arrays, n)
    flat[index] = codes * scale[index] if scale is not None else codes
    return flat.view(shape)


#: Values a record is decoded in at a time (a multiple of 8): a block's codes, positions and
#: values stay in the cache while it is written into the tensor (the whole-tensor passes before
#: took 4 to 10 times as long: a table lookup whose indices numpy widened to 8 bytes each, a
#: boolean scatter that mispredicts a branch at every other position of a pruned weight).
BLOCK = 1 << 16


def decode_into(spec: dict, arrays: Mapping[str, torch.Tensor], out: torch.Tensor) -> bool:
    """Decode a floating tensor's record straight into ``out`` (float32, contiguous, on the
    CPU, of the record's shape), `BLOCK` values at a time: each block's codes looked up (or
    its stored values taken), scattered to the block's nonzero positions for a sparse layout,
    with no whole-tensor temporary. False, and nothing written, for a record it does not take
    (``raw``; scales that do not broadcast one per row; on a sparse layout, a scale below 0 or
    not finite, which would turn the zeros' 0 into -0 or NaN): then `decode`'s general path.
    The values are the same, bit for bit, as that path's.

    Raises:
        CodecError: If the arrays do not hold the record's values (``out`` may then hold part).
    """
    shape, enc = spec["shape"], spec["enc"]
    if (
        enc == "raw"
        or not shape
        or out.dtype != torch.float32
        or list(out.shape) != shape
        or not out.is_contiguous()
        or out.device.type != "cpu"
    ):
        return False
    scale = None
    if "count" in spec:
        if spec["decode"] == "scaled":
            scale = _row_scales(arrays["scale"], shape, sparse=enc not in ("dense", "ans"))
            if scale is None:
                return False
        take, count = _code_blocks(spec, arrays), spec["count"]
    else:
        values = arrays["values"].numpy()
        take, count = _Taker(_slices(values)), len(values)
    flat = out.detach().view(-1).numpy()
    n = len(flat)
    if enc in ("dense", "ans") and scale is not None and n:
        _scaled_rows(flat.reshape(shape[0], -1), scale.numpy(), take)
        take.end()
        return True
    if enc in ("dense", "ans"):
        for start in range(0, n, BLOCK):
            take.into(flat[start : start + BLOCK])
    elif enc == "bitmask":
        _scatter_mask(flat, arrays["mask"].numpy(), take, count)
    else:
        positions = decode_gaps(arrays["gaps"].numpy())
        if len(positions) != count or len(positions) and positions[-1] >= n:
            raise CodecError(f"{len(positions)} gaps for {count} values of {n} positions")
        flat.fill(0)
        for start in range(0, count, BLOCK):
            part = positions[start : start + BLOCK]
            flat[part] = take(len(part))
    take.end()
    if scale is not None and n:
        rows = out.detach().view(shape[0], -1)
        rows.mul_(scale if len(scale) == 1 else scale.view(-1, 1))
    return True


def _scaled_rows(rows: np.ndarray, scale: np.ndarray, take) -> None:
    """Write ``take``'s code values into ``rows`` (a dense record's), each times its row's
    scale (``scale``: one per row, or one in all), a block of whole rows (or of one row) at a
    time, multiplied while the block is in the cache (the whole tensor multiplied after it was
    written read and wrote it all again: a fifth of reloading a 4-bit model). The same float32
    products as that multiplication's."""
    count, cols = rows.shape
    every = scale[0] if len(scale) == 1 else None
    if cols <= BLOCK:
        step = BLOCK // cols
        for start in range(0, count, step):
            block = rows[start : start + step]
            take.into(block.reshape(-1))
            np.multiply(
                block,
                every if every is not None else scale[start : start + len(block), None],
                out=block,
            )
        return
    for r in range(count):
        row = rows[r]
        for start in range(0, cols, BLOCK):
            part = row[start : start + BLOCK]
            take.into(part)
            np.multiply(part, every if every is not None else scale[r], out=part)


def _scatter_mask(flat: np.ndarray, mask: np.ndarray, take, count: int) -> None:
    """Write ``take``'s values at the positions ``mask`` (bits, little-endian) sets, 0 at the
    others, a block at a time: the block's positions listed (`np.flatnonzero`, branch-free)
    and its values put there."""
    n = len(flat)
    if len(mask) * 8 < n:
        raise CodecError(f"a mask of {len(mask)} bytes cannot cover {n} positions")
    done = 0
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        part = mask[start // 8 : -(-stop // 8)]
        bits = np.unpackbits(part, count=stop - start, bitorder="little")
        where = np.flatnonzero(bits.view(np.bool_))  # (as booleans: 20 times as fast)
        if done + len(where) > count:
            raise CodecError(f"a mask sets more positions than its {count} values")
        part = flat[start:stop]
        part.fill(0)
        part[where] = take(len(where))
        done += len(where)
    if done != count:
        raise CodecError(f"a mask sets {done} positions for {count} values")


def _row_scales(scale: torch.Tensor, shape: list[int], *, sparse: bool) -> torch.Tensor | None:
    """A scaled record's scales as one per row of ``shape`` (its first dimension) or one in
    all, float32; None where they broadcast otherwise, or (``sparse``) where one is below 0 or
    not finite (``0 * scale`` would not be the 0 a sparse layout leaves)."""
    if scale.dim() > len(shape):
        return None
    full = scale.reshape((1,) * (len(shape) - scale.dim()) + tuple(scale.shape))
    if any(d != 1 for d in full.shape[1:]) or full.shape[0] not in (1, shape[0]):
        return None
    rows = full.reshape(-1).to(torch.float32)
    if sparse and not bool(((rows >= 0) & torch.isfinite(rows)).all()):
        return None
    return rows


class _Taker:
    """The values of a stream of blocks (``blocks``: an iterator of arrays), taken ``k`` at a
    time in order, whatever the blocks' bounds."""

    def __init__(self, blocks) -> None:
        self._blocks, self._block, self._at = blocks, np.zeros(0, np.float32), 0

    def __call__(self, k: int) -> np.ndarray:
        parts = []
        while k:
            if self._at == len(self._block):
                self._block, self._at = next(self._blocks, None), 0
                if self._block is None or not len(self._block):
                    raise CodecError("a record holds fewer values than its positions")
            part = self._block[self._at : self._at + k]
            self._at += len(part)
            k -= len(part)
            parts.append(part)
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else self._block[:0]

    def into(self, out: np.ndarray) -> None:
        """Write the next ``len(out)`` values into ``out``."""
        out[:] = self(len(out))

    def end(self) -> None:
        """Check no value was left over."""
        if self._at != len(self._block) or next(self._blocks, None) is not None:
            raise CodecError("a record holds more values than its positions")


def _slices(values: np.ndarray):
    for start in range(0, len(values), BLOCK):
        yield values[start : start + BLOCK]


def _code_blocks(spec: dict, arrays: Mapping[str, torch.Tensor]) -> _Taker:
    """A `_Taker` of a record's code values (float32: its scaled grid's codes, or its codebook's
    values), decoded `BLOCK` codes at a time."""
    symbols = _alphabet(spec)
    if spec["decode"] == "codebook":
        table = arrays["codebook"].to(torch.float32).numpy()[symbols]
    else:
        table = symbols.astype(np.float32)
    count = spec["count"]
    if spec["enc"] == "ans":
        coder = constriction.stream.stack.AnsCoder(arrays["ans"].numpy().view(np.uint32))
        model = _ans_model(arrays["freqs"].numpy())

        def ans_blocks():
            for start in range(0, count, BLOCK):
                yield np.take(table, coder.decode(model, min(BLOCK, count - start)))

        return _Taker(ans_blocks())
    bits, packed = spec["bits"], arrays["codes"].numpy()
    if len(packed) * 8 < count * bits:
        raise CodecError(f"{len(packed)} bytes cannot hold {count} codes of {bits} bits")
    step = BLOCK * bits // 8  # (bytes of a block's codes)
    if bits not in _BYTE_ALIGNED:

        def unpacked_blocks():
            for i, start in enumerate(range(0, count, BLOCK)):
                m = min(BLOCK, count - start)
                yield np.take(table, unpacked_index(packed[i * step : i * step + step], bits, m))

        return _Taker(unpacked_blocks())
    return _ByteCodes(packed, bits, count, table)


class _ByteCodes:
    """A `_Taker` of codes whose width fills whole bytes (`_BYTE_ALIGNED`), each byte's code
    values looked up at once (a table of 256 rows, one per byte value), straight into the
    tensor where the caller gives it (`into`): a 4-bit grid's two values of a byte as one
    8-byte word, looked up by `np.take` with ``mode="wrap"`` into the tensor's own block (its
    default mode, ``raise``, takes into a temporary array first, and the block was then copied:
    together 0.72 ns a value against 0.40, on an AVX-512 EPYC)."""

    def __init__(self, packed: np.ndarray, bits: int, count: int, table: np.ndarray) -> None:
        indices = _BYTE_CODES[bits]  # (256, codes per byte)
        self._checked = not (indices < len(table)).all()
        per_byte = np.ascontiguousarray(table[np.minimum(indices, len(table) - 1)], np.float32)
        self._rows = per_byte
        # (a byte's values as one word: a take of whole items)
        self._words = (
            per_byte.view(_WORDS[per_byte.shape[1]]).reshape(-1)
            if (per_byte.shape[1] in _WORDS)
            else None
        )
        self._packed, self._per, self._count, self._done = packed, 8 // bits, count, 0
        self._table_size = len(table)
        # The bytes as indices in a buffer reused block after block (a take of uint8 indices
        # made a new array of 8-byte indices for every block and its check: 3 times as long).
        self._index, self._scratch = np.empty(0, np.intp), np.empty(0, np.uint8)

    def _indices(self, first: int, stop: int) -> np.ndarray:
        """Bytes ``first:stop`` of the codes as indices (checked against the alphabet)."""
        if len(self._index) < stop - first:
            self._index = np.empty(max(stop - first, BLOCK // self._per), np.intp)
            self._scratch = np.empty(len(self._index), np.uint8)
        part, at = self._packed[first:stop], self._index[: stop - first]
        if self._checked:
            self._check(part)
        np.copyto(at, part, casting="unsafe")
        return at

    def _check(self, part: np.ndarray) -> None:
        """Refuse bytes holding a code index beyond the alphabet: each field's largest index
        (a mask of the bytes, shifted first for a middle field, and their maximum: 0.07 ns a
        byte a field, against 0.55 for each byte's validity looked up in a table of 256; the
        top field's largest is the largest byte's, shifted: no pass of its own, a third less
        time for a 4-bit grid's codes than a shift and a mask per field, on a Zen 1 EPYC)."""
        bits = 8 // self._per
        top = 8 - bits
        largest = int(part.max()) >> top if len(part) else 0
        field = self._scratch[: len(part)]
        for shift in range(0, top, bits):
            if shift:
                np.right_shift(part, shift, out=field)
                np.bitwise_and(field, (1 << bits) - 1, out=field)
            else:
                np.bitwise_and(part, (1 << bits) - 1, out=field)
            if len(field):
                largest = max(largest, int(field.max()))
        if largest >= self._table_size:
            raise CodecError(f"a code index is beyond its alphabet of {self._table_size}")

    def _advance(self, k: int) -> int:
        start = self._done
        if start + k > self._count:
            raise CodecError("a record holds fewer values than its positions")
        self._done = start + k
        return start

    def __call__(self, k: int) -> np.ndarray:
        per = self._per
        start = self._advance(k)
        first = start // per
        at = self._indices(first, -(-(start + k) // per))
        skip = start - first * per
        return np.take(self._rows, at, axis=0).reshape(-1)[skip : skip + k]

    def into(self, out: np.ndarray) -> None:
        """Write the next ``len(out)`` values into ``out`` (float32, contiguous)."""
        k, per = len(out), self._per
        if self._words is None or self._done % per or k % per:
            out[:] = self(k)
            return
        start = self._advance(k)
        at = self._indices(start // per, (start + k) // per)
        # (every index is below 256, the table's rows: "wrap" never wraps)
        np.take(self._words, at, out=out.view(self._words.dtype), mode="wrap")

    def end(self) -> None:
        """Check no value was left over."""
        if self._done != self._count:
            raise CodecError("a record holds more values than its positions")


#: Unsigned words of a byte's code values (float32 each), by codes per byte.
_WORDS = {1: np.dtype(np.uint32), 2: np.dtype(np.uint64)}


#: The layouts of a record (``enc``) and the arrays each may hold, with their dtypes (numpy's
#: names): what a file's records are checked against before anything is decoded.
_FLOATS = ("<f2", "<f4")
_LAYOUT_ARRAYS = {
    "dense": {"values": _FLOATS},
    "bitmask": {"mask": ("|u1",), "values": _FLOATS},
    "gaps": {"gaps": ("|u1",), "values": _FLOATS},
}
_CODE_ARRAYS = {
    "dense": {"codes": ("|u1",)},
    "ans": {"ans": ("<i4",), "freqs": ("|u1",)},
    "bitmask": {"mask": ("|u1",), "codes": ("|u1",)},
    "gaps": {"gaps": ("|u1",), "codes": ("|u1",)},
}
_TABLES = {"scaled": "scale", "codebook": "codebook"}
#: Most entries of a codebook, whatever the tensor (k-means with 2**16 clusters is far beyond use).
MAX_CODEBOOK = 1 << 16
#: Most words an entropy-coded stream takes beyond one per code (a code costs < 32 bits).
_ANS_SLACK = 64


def _is_int(value) -> bool:
    return type(value) is int


def check_layout(spec, arrays: Mapping[str, tuple[str, int]]) -> int:
    """Check a tensor's layout record against the arrays the file holds for it, before any is
    decoded: each array is one the layout has, of its dtype, with no more elements than the
    tensor's shape lets it hold (``arrays``: ``{suffix: (numpy dtype name, element count)}``).
    Returns the tensor's number of values.

    Raises:
        CodecError: Naming what does not fit.
    """
    if not isinstance(spec, dict):
        raise CodecError(f"its record is a {type(spec).__name__}, not an object")
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise CodecError(f"its shape {shape!r} is not a list of at most 8 sizes")
    n = math.prod(shape)
    enc = spec.get("enc")
    if enc == "raw":
        allowed = {"": None}
    elif "count" in spec:
        allowed = _code_arrays(spec, enc, n)
    elif enc in _LAYOUT_ARRAYS:
        allowed = _LAYOUT_ARRAYS[enc]
    else:
        raise CodecError(f"its layout {enc!r} is not one of raw, {', '.join(_LAYOUT_ARRAYS)}, ans")
    count = spec.get("count", n)
    bits = spec.get("bits", 32)
    table = max(n, max(shape, default=1))
    limits = {
        "": n,
        "values": n,
        "mask": -(-n // 8),
        "gaps": n + n // 255 + 1,
        "codes": -(-count * bits // 8),
        "ans": count + _ANS_SLACK,
        "freqs": _alphabet_size(spec, count),
        "scale": table,
        "codebook": MAX_CODEBOOK,
    }
    for suffix, (dtype, elements) in arrays.items():
        if suffix not in allowed:
            raise CodecError(
                f"a {enc} record holds no array {suffix!r} (it holds {sorted(allowed)})"
            )
        if allowed[suffix] is not None and dtype not in allowed[suffix]:
            raise CodecError(f"its array {suffix!r} has dtype {dtype!r}, not {allowed[suffix]}")
        exact = suffix in ("", "mask") or suffix == "values" and enc == "dense"
        if elements > limits[suffix] or exact and elements != limits[suffix]:
            raise CodecError(
                f"its array {suffix!r} has {elements:,} elements; shape {shape} allows "
                f"{'exactly' if exact else 'at most'} {limits[suffix]:,}"
            )
    return n


def _code_arrays(spec: dict, enc, n: int) -> dict:
    """The arrays of a record of integer codes, after checking its code fields."""
    if enc not in _CODE_ARRAYS:
        raise CodecError(f"its layout {enc!r} is not one of {', '.join(_CODE_ARRAYS)}")
    count = spec["count"]
    if not _is_int(count) or not 0 <= count <= n or enc in ("dense", "ans") and count != n:
        raise CodecError(f"its code count {count!r} does not fit its {n:,} values ({enc})")
    if spec.get("decode") not in _TABLES:
        raise CodecError(f"its decode {spec.get('decode')!r} is not one of {DECODERS}")
    if enc != "ans" and not (_is_int(spec.get("bits")) and 1 <= spec["bits"] <= 63):
        raise CodecError(f"its code width {spec.get('bits')!r} is not 1..63 bits")
    if "range" in spec:
        lo_hi = spec["range"]
        if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(map(_is_int, lo_hi))):
            raise CodecError(f"its code range {lo_hi!r} is not two integers")
        if not -(2**62) <= lo_hi[0] <= lo_hi[1] <= 2**62:
            raise CodecError(f"its code range {lo_hi!r} is empty or out of bounds")
    elif isinstance(spec.get("alphabet"), list):
        if not all(_is_int(a) and abs(a) <= 2**62 for a in spec["alphabet"]):
            raise CodecError("its code alphabet is not a list of integers")
    else:
        raise CodecError("its codes have neither a range nor an alphabet")
    if _alphabet_size(spec, count) > 2 * max(count, 1):
        raise CodecError(f"its code alphabet is larger than twice its {count:,} codes")
    return {**_CODE_ARRAYS[enc], _TABLES[spec["decode"]]: _FLOATS}


def _alphabet_size(spec: dict, count: int) -> int:
    if "range" in spec:
        lo, hi = spec["range"]
        return hi - lo + 1
    return len(spec.get("alphabet", ()))


def _unpacked_mask(packed: np.ndarray, n: int) -> torch.Tensor:
    if len(packed) * 8 < n:
        raise CodecError(f"a mask of {len(packed)} bytes cannot cover {n} positions")
    return torch.from_numpy(np.unpackbits(packed, count=n, bitorder="little").view(np.bool_))


def stored_codes(spec: dict, arrays: Mapping[str, torch.Tensor], *, holds: int = 0) -> torch.Tensor:
    """The integer codes a tensor's record holds, in the narrowest integer type that holds them
    and ``holds`` (an exporter reads a 4-bit grid's codes from int8, not int64; a codebook's
    indices are int32 at least, so that they index a tensor): every position's for the
    ``dense`` and ``ans`` layouts, the nonzero positions' for ``bitmask`` and ``gaps``."""
    alphabet = _alphabet(spec)
    lo, hi = min(int(alphabet.min()), holds), max(int(alphabet.max()), holds)
    types = (np.int32, np.int64) if spec.get("decode") == "codebook" else _SIGNED
    dtype = next(t for t in types if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max)
    return torch.from_numpy(_looked_up(spec, arrays, alphabet.astype(dtype)))


_SIGNED = (np.int8, np.int16, np.int32, np.int64)


def _looked_up(spec: dict, arrays: Mapping[str, torch.Tensor], table: np.ndarray) -> np.ndarray:
    """``table[index]`` for each code index a record stores: where bit-packed codes fill whole
    bytes, straight from the bytes (each byte's codes looked up at once, one pass)."""
    if spec["enc"] == "ans" or spec["bits"] not in _BYTE_ALIGNED:
        return np.take(table, _stored_index(spec, arrays))
    bits, count = spec["bits"], spec["count"]
    packed = arrays["codes"].numpy()
    if len(packed) * 8 < count * bits:
        raise CodecError(f"{len(packed)} bytes cannot hold {count} codes of {bits} bits")
    packed = packed[: -(-count // (8 // bits))]
    indices = _BYTE_CODES[bits]  # (256, codes per byte)
    valid = (indices < len(table)).all(axis=1)
    if not valid.all() and not np.take(valid, packed).all():
        raise CodecError(f"a code index is beyond its alphabet of {len(table)}")
    per_byte = table[np.minimum(indices, len(table) - 1)]
    return np.take(per_byte, packed, axis=0).reshape(-1)[:count]


#: The codes each byte value holds, for each width of `_BYTE_ALIGNED` (least significant first).
_BYTE_CODES = {
    bits: (np.arange(256)[:, None] >> np.arange(0, 8, bits)) & ((1 << bits) - 1)
    for bits in _BYTE_ALIGNED
}


def _alphabet(spec: dict) -> np.ndarray:
    """The codes a record's indices stand for (int64)."""
    if "range" in spec:
        lo, hi = spec["range"]
        return np.arange(lo, hi + 1, dtype=np.int64)
    return np.asarray(spec["alphabet"], dtype=np.int64)


def _stored_index(spec: dict, arrays: Mapping[str, torch.Tensor]) -> np.ndarray:
    """A record's code indices (into `_alphabet`), uint8 where they fit."""
    if spec["enc"] == "ans":
        freqs = arrays["freqs"].numpy()
        coder = constriction.stream.stack.AnsCoder(arrays["ans"].numpy().view(np.uint32))
        return coder.decode(_ans_model(freqs), spec["count"])
    return unpacked_index(arrays["codes"].numpy(), spec["bits"], spec["count"])


def stored_positions(spec: dict, arrays: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
    """Flat positions of the values a sparse layout (``bitmask`` or ``gaps``) stores."""
    if spec["enc"] == "bitmask":
        packed = arrays["mask"].numpy()
        positions = np.flatnonzero(np.unpackbits(packed, count=n, bitorder="little"))
    else:
        positions = decode_gaps(arrays["gaps"].numpy())
    return torch.from_numpy(positions.astype(np.int64))


def full_codes(spec: dict, arrays: Mapping[str, torch.Tensor]) -> Codes:
    """A record's codes at every position, with its scales or codebook as float32. Positions
    a sparse layout leaves out (zeros) get the code of 0: 0 on a scaled grid, the codebook's
    index of 0 (appended to the codebook where it is missing)."""
    shape, decode_as = spec["shape"], spec["decode"]
    key = "codebook" if decode_as == "codebook" else "scale"
    table = arrays[key].to(torch.float32)
    zero = 0
    if decode_as == "codebook" and spec["enc"] not in ("dense", "ans"):
        zeros = torch.nonzero(table == 0).flatten()
        if len(zeros):
            zero = int(zeros[0])
        else:
            zero, table = len(table), torch.cat([table, table.new_zeros(1)])
    stored = stored_codes(spec, arrays, holds=zero)
    if spec["enc"] in ("dense", "ans"):
        return Codes(stored.view(shape), decode_as, {key: table})
    n = math.prod(shape)
    full = torch.full((n,), zero, dtype=stored.dtype)
    full[stored_positions(spec, arrays, n)] = stored
    return Codes(full.view(shape), decode_as, {key: table})
