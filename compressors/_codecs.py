"""The arrays of a packed file: how one tensor is laid out, and how each array's bytes are stored.

A tensor becomes a layout record (a JSON-able dict, ``enc`` its layout) and a few arrays, each
named by a suffix (``values``, ``mask``, ``gaps``, ``codes``, ``ans``, ``freqs``, ``scale``,
``codebook``; ``""`` for an integer tensor stored as it is); see `compressors.packing` for the
layouts. Each array's bytes are then stored (`store`) either as they are (``raw``) or as byte
planes (``planes``: the array's i-th bytes of every element, least significant first), each
plane zstd-compressed where that measurably pays: a float32 weight's exponent byte takes about
2.7 bits of its 8, its mantissa bytes are noise. Whether a plane pays is first tried on a sample
of it (`SAMPLE_BYTES`), so incompressible planes cost a copy and no compression.

Everything here is a function of the tensor alone (no shared state), so tensors can be encoded in
parallel and the bytes are the same whatever the order they are encoded in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import constriction
import numpy as np
import torch
import zstandard

from compressors._bits import (  # noqa: F401 (re-exported: readers and tests import them here)
    BYTE_ALIGNED,
    BitsError,
    decode_gaps,
    encode_gaps,
    pack_bits,
    unpack_bits,
    unpacked_index,
)
from compressors._bits import (
    gap_bytes as _gap_bytes,
)

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
#: Values processed at a time where a whole-tensor temporary would be large (a multiple of 8).
_CHUNK = 1 << 20
#: Code alphabets up to this range are counted with `bincount` rather than sorted.
_BINCOUNT_RANGE = 1 << 20
#: Codes are entropy-coded (rANS, a few nanoseconds per code each way, against zstd's fraction
#: of one) when the coder's estimate is below this fraction of the bit-packed codes as stored,
#: or when the tensor has at most `ANS_ALWAYS` values (then the coder's exact size decides).
ANS_PAYS = 0.97
ANS_ALWAYS = 1 << 16
#: Bit widths whose codes fill whole bytes, so that zstd's byte-wise entropy stage sees whole
#: codes (others are also tried one code per byte).
_BYTE_ALIGNED = BYTE_ALIGNED


class CodecError(BitsError):
    """An array's stored bytes cannot be decoded (the packed file is damaged or foreign)."""


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


# ------------------------------------------------------------------------------ layouts


def encode(name: str, value: torch.Tensor, grid) -> tuple[dict, dict[str, np.ndarray | Stored]]:
    """``(layout record, arrays by suffix)`` of one tensor (``grid``: the parametrization whose
    ``packed`` gives its `Codes`, or None). Float values take the smallest of ``dense``,
    ``bitmask`` and ``gaps`` in raw bits, as in format SQZ2; codes the smallest as stored
    (`_encode_codes`)."""
    spec: dict = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    value = value.detach()
    if not value.is_floating_point():
        spec["enc"] = "raw"
        return spec, {"": value.contiguous().numpy()}
    flat = value.reshape(-1).to(torch.float32)
    n = flat.numel()
    nnz = int(torch.count_nonzero(flat))
    arrays: dict[str, np.ndarray | Stored] = {}
    if grid is not None:
        packed: Codes = grid.packed(value)
        if packed.decode not in DECODERS:
            raise ValueError(f"{name}: unknown decode {packed.decode!r}; known: {DECODERS}")
        for key, tensor in packed.tensors.items():
            tensor = tensor.detach().to(torch.float32).contiguous()
            arrays[key] = (tensor.to(torch.float16) if _halves(tensor) else tensor).numpy()
        spec["decode"] = packed.decode
        codes = _narrowed(packed.codes.reshape(-1))
        nonzero = _Lazy(value=flat != 0 if nnz < n else None)
        del packed, value, flat  # (the codes are what is stored)
        _encode_codes(codes, nonzero, nnz, spec, arrays)
        return spec, arrays
    nonzero = _Lazy(partial(torch.ne, flat, 0))
    half = _halves(flat)
    bits = 16 if half else 32
    costs = {"dense": bits * n, "bitmask": n + bits * nnz}
    positions = None
    if nnz < n:
        positions = _positions_if_cheaper(nonzero.get(), nnz, bits * nnz, min(costs.values()))
    if positions is not None:
        costs["gaps"] = 8 * _gap_bytes(positions) + bits * nnz
    spec["enc"] = min(costs, key=costs.get)
    _store_positions(spec["enc"], nonzero, positions, arrays)
    del positions
    kept = flat if spec["enc"] == "dense" else flat[nonzero.get()]
    del nonzero, value, flat  # (what is kept is what is stored)
    arrays["values"] = kept.to(torch.float16 if half else torch.float32).numpy()
    return spec, arrays


class _Lazy:
    """A value computed when first asked for (a tensor's nonzero mask: dense tensors need none)."""

    def __init__(self, make=None, *, value=None) -> None:
        self._make, self._value = make, value

    def get(self):
        if self._value is None:
            self._value, self._make = self._make(), None
        return self._value


def _narrowed(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` as int32 where they fit (half the memory of int64 codes; narrower codes, such
    as a quantization grid's int8, are kept)."""
    codes = codes.to(torch.int64) if not codes.dtype.is_signed else codes
    if codes.numel() and codes.dtype == torch.int64:
        if -(2**31) <= int(codes.min()) and int(codes.max()) < 2**31:
            return codes.to(torch.int32)
    return codes


def _positions_if_cheaper(
    nonzero: torch.Tensor, nnz: int, value_bits: int, best: int
) -> np.ndarray | None:
    """Flat positions of the nonzeros, when the ``gaps`` layout (at least a byte per nonzero)
    could beat ``best`` bits; None when it cannot (so dense tensors cost no position scan)."""
    if 8 * nnz + value_bits >= best:
        return None
    return torch.nonzero(nonzero).reshape(-1).numpy()


def _encode_codes(
    codes: torch.Tensor,
    nonzero: _Lazy,
    nnz: int,
    spec: dict,
    arrays: dict[str, np.ndarray | Stored],
) -> None:
    """Store integer codes in the cheapest of: the dense stream bit-packed (and then stored by
    `store`, whose zstd entropy-codes whole codes where they fill bytes; for other widths also
    tried one code per byte), bitmask / gaps layouts of the nonzero codes (in raw bits), or the
    dense stream entropy-coded (rANS with the tensor's own code frequencies) where its estimate
    beats the stored stream by `ANS_PAYS` (always tried on tensors of up to `ANS_ALWAYS`)."""
    n = codes.numel()
    dense = _Symbols(codes)
    packed = _stored_codes(dense)
    costs = {"dense": 8 * packed.nbytes}
    ans = None
    if dense.size > 1 and (n <= ANS_ALWAYS or dense.ans_bits() < ANS_PAYS * costs["dense"]):
        ans = dense.ans()
        costs["ans"] = 8 * ans[0].nbytes + 8 * len(ans[1])
    sparse, positions = dense, None
    # A sparse stream's codes take at least 1 bit each; on a scaled grid (scales are nonzero,
    # so a value is 0 exactly where its code is) its alphabet is the dense one less code 0.
    floor = _bits_for(dense.distinct - 1) if spec["decode"] == "scaled" else 1
    if nnz < n and min(n, 8 * nnz) + floor * nnz < min(costs.values()):
        sparse = _Symbols(codes[nonzero.get()])
        costs["bitmask"] = n + sparse.bits * nnz
        positions = _positions_if_cheaper(
            nonzero.get(), nnz, sparse.bits * nnz, min(costs.values())
        )
        if positions is not None:
            costs["gaps"] = 8 * _gap_bytes(positions) + sparse.bits * nnz
    spec["enc"] = min(costs, key=costs.get)
    _store_positions(spec["enc"], nonzero, positions, arrays)
    stream = dense if spec["enc"] in ("dense", "ans") else sparse
    spec.update(stream.spec, count=stream.count)
    if spec["enc"] == "ans":
        arrays["ans"] = ans[0].view(np.int32)
        arrays["freqs"] = ans[1]
    elif spec["enc"] == "dense":
        arrays["codes"], spec["bits"] = packed, packed.bits
    else:
        arrays["codes"] = pack_bits(stream.index, stream.bits)
        spec["bits"] = stream.bits


@dataclass(frozen=True)
class _PackedCodes(Stored):
    bits: int = 8


def _stored_codes(stream: _Symbols) -> _PackedCodes:
    """The stream's codes bit-packed as `store` stores them; for widths that do not fill whole
    bytes, one code per byte instead where zstd then stores that in fewer bytes."""
    best = None
    widths = [stream.bits] if stream.bits in _BYTE_ALIGNED else [stream.bits, 8]
    for bits in widths:
        array = pack_bits(stream.index, bits)
        codec, sizes, chunks = store(array)
        if best is None or sum(sizes) < best.nbytes:
            best = _PackedCodes(array, codec, sizes, chunks, bits)
    return best


class _Symbols:
    """Integer codes as indices into their alphabet (a range lo..hi, or an explicit list):
    ``index`` (uint8 where the alphabet fits in a byte, else int32) and ``counts``, each
    index's number of occurrences."""

    def __init__(self, codes: torch.Tensor) -> None:
        self.count = codes.numel()
        if not self.count:
            codes = torch.zeros(1, dtype=torch.int8)
        lo, hi = (int(v) for v in torch.aminmax(codes))
        if codes.dtype == torch.int64 and -(2**31) <= lo and hi < 2**31:
            codes = codes.to(torch.int32)  # (half the memory of int64 codes)
        if hi - lo < _BINCOUNT_RANGE:
            index = _offset(codes, lo, hi - lo)
            counts = _bincount(index, hi - lo + 1)
            alphabet = np.flatnonzero(counts) + lo
        else:
            index, counts = None, None
            alphabet = torch.unique(codes).numpy()
        self.distinct = self.size = len(alphabet)
        self.bits = _bits_for(self.size)
        if hi - lo + 1 <= 2**self.bits:  # a range codes as compactly as the list
            self.spec = {"range": [lo, hi]}
            self.size = hi - lo + 1
        else:
            self.spec = {"alphabet": alphabet.tolist()}
            index = np.searchsorted(alphabet, codes.numpy()).astype(_index_dtype(self.size))
            counts = counts[counts > 0] if counts is not None else _bincount(index, self.size)
        del codes
        self.index = index[: self.count]
        self.counts = counts if self.count else np.zeros_like(counts)

    def ans_bits(self) -> float:
        """Bits the entropy-coded stream takes, estimated: the codes' cross-entropy under the
        frequencies `ans` stores (the coder's size is within a few words of it)."""
        freqs = _freqs(self.counts).astype(np.float64)
        used = self.counts > 0
        p = freqs[used] / freqs.sum()
        return float(-(self.counts[used] * np.log2(p)).sum()) + 8 * len(freqs)

    def ans(self) -> tuple[np.ndarray, np.ndarray]:
        """``(compressed words, frequencies)``: the index stream entropy-coded under its own
        symbol frequencies, which are stored as bytes (1..255 for a symbol that occurs)."""
        freqs = _freqs(self.counts)
        coder = constriction.stream.stack.AnsCoder()
        if len(self.index):
            coder.encode_reverse(self.index.astype(np.int32, copy=False), _ans_model(freqs))
        return coder.get_compressed(), freqs


def _freqs(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64)
    return np.where(counts > 0, np.maximum(1, np.round(255 * counts / counts.max())), 0).astype(
        np.uint8
    )


def _index_dtype(size: int) -> type:
    return np.uint8 if size <= 256 else np.int32


def _offset(codes: torch.Tensor, lo: int, span: int) -> np.ndarray:
    """``codes - lo`` as a numpy array of the narrowest index dtype (in chunks: no int64
    temporary of the whole tensor)."""
    dtype = _index_dtype(span + 1)
    flat = codes.reshape(-1)
    if dtype is np.uint8 and flat.dtype in (torch.int8, torch.uint8):
        # Wrapping byte arithmetic: (code - lo) mod 256 is the index, which is below 256.
        return flat.numpy().view(np.uint8) - np.uint8(lo % 256)
    out = np.empty(flat.numel(), dtype=dtype)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK].to(torch.int64) - lo
        out[start : start + _CHUNK] = part.numpy()
    return out


def _bincount(index: np.ndarray, size: int) -> np.ndarray:
    """Occurrences of each of ``size`` index values (in chunks: `np.bincount` widens its input
    to 8 bytes a value)."""
    counts = np.zeros(size, dtype=np.int64)
    for start in range(0, len(index), _CHUNK):
        counts += np.bincount(index[start : start + _CHUNK], minlength=size)[:size]
    return counts


def _ans_model(freqs: np.ndarray) -> constriction.stream.model.Categorical:
    weights = freqs.astype(np.float64)
    return constriction.stream.model.Categorical(weights / weights.sum(), perfect=False)


def _store_positions(enc: str, nonzero: _Lazy, positions: np.ndarray | None, arrays: dict) -> None:
    if enc == "bitmask":
        arrays["mask"] = np.packbits(nonzero.get().numpy(), bitorder="little")
    elif enc == "gaps":
        arrays["gaps"] = encode_gaps(positions)


def _halves(tensor: torch.Tensor) -> bool:
    """Whether float16 holds every value of ``tensor`` exactly."""
    for start in range(0, tensor.numel(), _CHUNK):
        part = tensor.reshape(-1)[start : start + _CHUNK]
        if not torch.equal(part.to(torch.float16).to(torch.float32), part):
            return False
    return True


def _bits_for(symbols: int) -> int:
    return max(1, math.ceil(math.log2(symbols))) if symbols > 1 else 1


def decode(spec: dict, arrays: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensor a layout record and its arrays hold (float32 for floating tensors)."""
    shape = spec["shape"]
    if spec["enc"] == "raw":
        return arrays[""]
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


# ------------------------------------------------------------------------------ stored bytes


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
