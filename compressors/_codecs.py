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

import constriction
import numpy as np
import torch
import zstandard

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


class CodecError(ValueError):
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


# ------------------------------------------------------------------------------ layouts


def encode(name: str, value: torch.Tensor, grid) -> tuple[dict, dict[str, np.ndarray]]:
    """``(layout record, arrays by suffix)`` of one tensor (``grid``: the parametrization whose
    ``packed`` gives its `Codes`, or None). The layout is the smallest of ``dense``,
    ``bitmask`` and ``gaps`` (and ``ans`` for codes) in raw bits, as in format SQZ2."""
    spec: dict = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    value = value.detach()
    if not value.is_floating_point():
        spec["enc"] = "raw"
        return spec, {"": value.contiguous().numpy()}
    flat = value.reshape(-1).to(torch.float32)
    n = flat.numel()
    nonzero = flat != 0
    nnz = int(nonzero.sum())
    arrays: dict[str, np.ndarray] = {}
    if grid is not None:
        packed: Codes = grid.packed(value)
        if packed.decode not in DECODERS:
            raise ValueError(f"{name}: unknown decode {packed.decode!r}; known: {DECODERS}")
        for key, tensor in packed.tensors.items():
            tensor = tensor.detach().to(torch.float32).contiguous()
            arrays[key] = (tensor.to(torch.float16) if _halves(tensor) else tensor).numpy()
        spec["decode"] = packed.decode
        codes = _narrowed(packed.codes.reshape(-1))
        del packed, flat
        _encode_codes(codes, nonzero, nnz, spec, arrays)
        return spec, arrays
    half = _halves(flat)
    bits = 16 if half else 32
    costs = {"dense": bits * n, "bitmask": n + bits * nnz}
    positions = _positions_if_cheaper(nonzero, nnz, bits * nnz, min(costs.values()))
    if positions is not None:
        costs["gaps"] = 8 * _gap_bytes(positions) + bits * nnz
    spec["enc"] = min(costs, key=costs.get)
    _store_positions(spec["enc"], nonzero, positions, arrays)
    kept = flat if spec["enc"] == "dense" else flat[nonzero]
    arrays["values"] = kept.to(torch.float16 if half else torch.float32).numpy()
    return spec, arrays


def _narrowed(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` as int32 where they fit (half the memory of the int64 codes grids give)."""
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
    nonzero: torch.Tensor,
    nnz: int,
    spec: dict,
    arrays: dict[str, np.ndarray],
) -> None:
    """Store integer codes in the cheapest of: bit-packed dense / bitmask / gaps layouts, or the
    dense stream entropy-coded (rANS with the tensor's own code frequencies)."""
    n = codes.numel()
    dense = _Symbols(codes)
    costs = {"dense": dense.bits * n}
    ans = None
    if dense.size > 1:
        ans = dense.ans()
        costs["ans"] = 8 * ans[0].nbytes + 8 * len(ans[1])
    sparse, positions = dense, None
    # A sparse stream's codes take at least 1 bit each; on a scaled grid (scales are nonzero,
    # so a value is 0 exactly where its code is) its alphabet is the dense one less code 0.
    floor = _bits_for(dense.distinct - 1) if spec["decode"] == "scaled" else 1
    if nnz < n and min(n, 8 * nnz) + floor * nnz < min(costs.values()):
        sparse = _Symbols(codes[nonzero])
        costs["bitmask"] = n + sparse.bits * nnz
        positions = _positions_if_cheaper(nonzero, nnz, sparse.bits * nnz, min(costs.values()))
        if positions is not None:
            costs["gaps"] = 8 * _gap_bytes(positions) + sparse.bits * nnz
    spec["enc"] = min(costs, key=costs.get)
    _store_positions(spec["enc"], nonzero, positions, arrays)
    stream = dense if spec["enc"] in ("dense", "ans") else sparse
    spec.update(stream.spec, count=stream.count)
    if spec["enc"] == "ans":
        arrays["ans"] = ans[0].view(np.int32)
        arrays["freqs"] = ans[1]
    else:
        arrays["codes"] = pack_bits(stream.index, stream.bits)
        spec["bits"] = stream.bits


class _Symbols:
    """Integer codes as indices into their alphabet (a range lo..hi, or an explicit list)."""

    def __init__(self, codes: torch.Tensor) -> None:
        self.count = codes.numel()
        if not self.count:
            codes = torch.zeros(1, dtype=torch.int64)
        lo, hi = int(codes.min()), int(codes.max())
        if -(2**31) <= lo and hi < 2**31:
            codes = codes.to(torch.int32)  # (half the memory of int64 codes)
        if hi - lo < _BINCOUNT_RANGE:
            present = torch.bincount((codes - lo).reshape(-1), minlength=hi - lo + 1) > 0
            alphabet = (torch.nonzero(present).reshape(-1) + lo).to(codes.dtype)
        else:
            alphabet = torch.unique(codes)
        self.distinct = self.size = len(alphabet)
        self.bits = _bits_for(self.size)
        if hi - lo + 1 <= 2**self.bits:  # a range codes as compactly as the list
            self.spec = {"range": [lo, hi]}
            index = codes - lo
            self.size = hi - lo + 1
        else:
            self.spec = {"alphabet": alphabet.tolist()}
            index = torch.searchsorted(alphabet, codes)
        del codes
        self.index = index.reshape(-1)[: self.count].to(torch.int32).numpy()

    def ans(self) -> tuple[np.ndarray, np.ndarray]:
        """``(compressed words, frequencies)``: the index stream entropy-coded under its own
        symbol frequencies, which are stored as bytes (1..255 for a symbol that occurs)."""
        counts = np.bincount(self.index, minlength=self.size).astype(np.float64)
        freqs = np.where(counts > 0, np.maximum(1, np.round(255 * counts / counts.max())), 0)
        freqs = freqs.astype(np.uint8)
        coder = constriction.stream.stack.AnsCoder()
        if len(self.index):
            coder.encode_reverse(self.index, _ans_model(freqs))
        return coder.get_compressed(), freqs


def _ans_model(freqs: np.ndarray) -> constriction.stream.model.Categorical:
    weights = freqs.astype(np.float64)
    return constriction.stream.model.Categorical(weights / weights.sum(), perfect=False)


def _store_positions(
    enc: str, nonzero: torch.Tensor, positions: np.ndarray | None, arrays: dict[str, np.ndarray]
) -> None:
    if enc == "bitmask":
        arrays["mask"] = np.packbits(nonzero.numpy(), bitorder="little")
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
    if "count" in spec:  # integer codes on a grid
        codes = stored_codes(spec, arrays)
        if spec["decode"] == "codebook":
            codes, scale = arrays["codebook"].to(torch.float32)[codes], None
        else:
            codes = codes.to(torch.float32)
            scale = arrays["scale"].to(torch.float32)
            if spec["enc"] in ("dense", "ans"):
                return codes.view(shape) * scale
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


def stored_codes(spec: dict, arrays: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The integer codes a tensor's record holds (int64): every position's for the ``dense``
    and ``ans`` layouts, the nonzero positions' for ``bitmask`` and ``gaps``."""
    if spec["enc"] == "ans":
        freqs = arrays["freqs"].numpy()
        coder = constriction.stream.stack.AnsCoder(arrays["ans"].numpy().view(np.uint32))
        index = coder.decode(_ans_model(freqs), spec["count"]).astype(np.int64)
    else:
        index = unpack_bits(arrays["codes"].numpy(), spec["bits"], spec["count"])
    if "range" in spec:
        return torch.from_numpy(index + spec["range"][0])
    return torch.from_numpy(np.asarray(spec["alphabet"], dtype=np.int64)[index])


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
    stored = stored_codes(spec, arrays)
    if spec["enc"] in ("dense", "ans"):
        return Codes(stored.view(shape), decode_as, {key: table})
    zero = 0
    if decode_as == "codebook":
        zeros = torch.nonzero(table == 0).flatten()
        if len(zeros):
            zero = int(zeros[0])
        else:
            zero, table = len(table), torch.cat([table, table.new_zeros(1)])
    n = math.prod(shape)
    full = torch.full((n,), zero, dtype=torch.int64)
    full[stored_positions(spec, arrays, n)] = stored
    return Codes(full.view(shape), decode_as, {key: table})


def _gap_bytes(positions: np.ndarray) -> int:
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
    chunks: a whole-tensor bit plane would take ``bits`` bytes per value)."""
    shifts = np.arange(bits, dtype=values.dtype)
    parts = [
        np.packbits(
            ((values[start : start + _CHUNK, None] >> shifts) & 1).astype(np.uint8).reshape(-1),
            bitorder="little",
        )
        for start in range(0, len(values), _CHUNK)  # _CHUNK * bits is a whole number of bytes
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` integers `pack_bits` packed (int64)."""
    if len(packed) * 8 < count * bits:
        raise CodecError(f"{len(packed)} bytes cannot hold {count} codes of {bits} bits")
    out = np.empty(count, dtype=np.int64)
    weights = np.left_shift(1, np.arange(bits, dtype=np.int64))
    step = _CHUNK * bits // 8
    for i, start in enumerate(range(0, count, _CHUNK)):
        m = min(_CHUNK, count - start)
        planes = np.unpackbits(
            packed[i * step : i * step + step], count=m * bits, bitorder="little"
        )
        out[start : start + m] = planes.reshape(m, bits) @ weights
    return out


# ------------------------------------------------------------------------------ stored bytes


def store(array: np.ndarray) -> tuple[str, list[int], list]:
    """``(codec, sizes, chunks)``: how ``array``'s little-endian bytes are stored. ``raw``: one
    chunk, the bytes; ``planes``: one chunk per byte of an element (least significant first),
    zstd-compressed where that is smaller (its size is then below the element count). The
    chunks are what the file holds, back to back; ``sizes`` their lengths."""
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1)
    n, k = array.size, array.dtype.itemsize
    raw = array.view(np.uint8)
    if not n:
        return "raw", [0], []
    planes = raw.reshape(n, k)
    chunks: list = []
    packed = False
    for j in range(k):
        plane = planes[:, j]
        compressed = _compressed_if_smaller(plane)
        packed = packed or compressed is not None
        chunks.append(compressed)
    if not packed:
        return "raw", [raw.nbytes], [raw.data]
    chunks = [
        c if c is not None else np.ascontiguousarray(planes[:, j]).data
        for j, c in enumerate(chunks)
    ]
    return "planes", [len(c) if isinstance(c, bytes) else n for c in chunks], chunks


def _compressed_if_smaller(plane: np.ndarray) -> bytes | None:
    """zstd's frame of ``plane`` (a byte array, maybe strided) if it is smaller, else None; a
    large plane is compressed only if a sample of it shrinks below `PAYS`."""
    n = len(plane)
    if n > _SMALL:
        block = SAMPLE_BYTES // _SAMPLE_BLOCKS
        starts = np.linspace(0, n - block, _SAMPLE_BLOCKS).astype(np.int64)
        sample = np.concatenate([plane[s : s + block] for s in starts])
        if len(_zstd().compress(sample.data)) >= PAYS * len(sample):
            return None
    frame = _zstd().compress(np.ascontiguousarray(plane).data)
    return frame if len(frame) < n else None


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
    out = np.empty((count, k), dtype=np.uint8)
    offset = 0
    for j, size in enumerate(sizes):
        chunk = data[offset : offset + size]
        offset += size
        if size == count:
            out[:, j] = np.frombuffer(chunk, dtype=np.uint8)
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
        out[:, j] = np.frombuffer(plane, dtype=np.uint8)
    return out.reshape(-1).view(dtype)
