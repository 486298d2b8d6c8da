"""The arrays of a packed file: how one tensor is laid out as arrays.

A tensor becomes a layout record (a JSON-able dict, ``enc`` its layout) and a few arrays, each
named by a suffix (``values``, ``mask``, ``gaps``, ``codes``, ``ans``, ``freqs``, ``scale``,
``codebook``; ``""`` for an integer tensor stored as it is); see `compressors.packing` for the
layouts. Each array's bytes are then stored by `compressors._planes.store` (raw, or byte planes
zstd-compressed where that pays); `compressors._decoding` checks and decodes records. Both are
re-exported here, where readers and tests import them.

Everything here is a function of the tensor alone (no shared state), so tensors can be encoded in
parallel and the bytes are the same whatever the order they are encoded in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import constriction
import numpy as np
import torch

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
from compressors._decoding import (  # noqa: F401 (re-exported)
    DECODERS,
    MAX_CODEBOOK,
    Codes,
    _ans_model,
    check_layout,
    decode,
    decode_into,
    full_codes,
    stored_codes,
    stored_positions,
)
from compressors._planes import (  # noqa: F401 (re-exported)
    PAYS,
    SAMPLE_BYTES,
    ZSTD_LEVEL,
    CodecError,
    Stored,
    restore,
    store,
)

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


# ------------------------------------------------------------------------------ layouts


def encode(name: str, value: torch.Tensor, grid) -> tuple[dict, dict[str, np.ndarray | Stored]]:
    """``(layout record, arrays by suffix)`` of one tensor (``grid``: the parametrization whose
    ``packed`` gives its `Codes`, or None). Float values take the smallest of ``dense``,
    ``bitmask`` and ``gaps`` in raw bits, as in format SQZ2; codes the smallest as stored
    (`_encode_codes`)."""
    if isinstance(value, Codes):  # (a float32 tensor given by its codes, `_encoded_codes`)
        return _encoded_codes(name, value)
    if isinstance(value, Masked):  # (a float32 tensor given by a weight and a mask)
        return _encoded_masked(name, value)
    spec: dict = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    value = value.detach()
    if not value.is_floating_point():
        spec["enc"] = "raw"
        return spec, {"": value.contiguous().numpy()}
    flat = value.reshape(-1).to(torch.float32)
    n = flat.numel()
    # Which values are nonzero, by numpy (`np.count_nonzero` of the floats took 2.5 times as long
    # as this mask and its count, torch's `ne` 3 times numpy's; torch's count 20 times): kept
    # only where some are zero, for the sparse layouts.
    mask = _nonzero(flat)
    nnz = int(np.count_nonzero(mask))
    if nnz == n:
        mask = None
    arrays: dict[str, np.ndarray | Stored] = {}
    if grid is not None:
        packed: Codes = grid.packed(value)
        del value, flat  # (the codes are what is stored)
        _store_codes(name, packed, mask, nnz, spec, arrays)
        return spec, arrays
    half = _halves(flat)
    bits = 16 if half else 32
    costs = {"dense": bits * n, "bitmask": n + bits * nnz}
    positions = None
    if nnz < n:
        positions = _positions_if_cheaper(mask, nnz, bits * nnz, min(costs.values()))
    if positions is not None:
        costs["gaps"] = 8 * _gap_bytes(positions) + bits * nnz
    spec["enc"] = min(costs, key=costs.get)
    _store_positions(spec["enc"], mask, positions, arrays)
    del positions
    kept = flat if spec["enc"] == "dense" else _selected(flat, mask, nnz)
    del mask, value, flat  # (what is kept is what is stored)
    arrays["values"] = kept.to(torch.float16 if half else torch.float32).numpy()
    return spec, arrays


def _encoded_codes(name: str, packed: Codes) -> tuple[dict, dict[str, np.ndarray | Stored]]:
    """`encode` of a float32 tensor given by its codes on a grid whose zero values are exactly
    its codes of 0 (`compressors.quant.FakeQuant.packed_from`: positive, finite scales), so
    that its sparsity is read from the codes (a byte each) rather than from its values (the
    same record and arrays as `encode` of its value)."""
    if packed.decode != "scaled":
        raise ValueError(f"{name}: codes given without their values must be scaled codes")
    spec: dict = {"shape": list(packed.codes.shape), "dtype": "float32"}
    codes = packed.codes.detach().reshape(-1)
    mask = _nonzero(codes)
    nnz = int(np.count_nonzero(mask))
    if nnz == codes.numel():
        mask = None
    _store_codes(name, packed, mask, nnz, spec, arrays := {})
    return spec, arrays


@dataclass(frozen=True)
class Masked:
    """A float32 tensor given as ``weight * mask`` (`compressors.prune.Mask.packed_from`),
    without the product made: its nonzero values are ``weight``'s where ``mask`` keeps them
    and ``weight`` is nonzero. ``value`` makes the product, for the dense layout (which keeps
    each -0.0 the product leaves)."""

    weight: torch.Tensor  # float32, contiguous, on the CPU
    mask: torch.Tensor  # bool, ``weight``'s shape
    value: Callable[[], torch.Tensor]


def _encoded_masked(name: str, given: Masked) -> tuple[dict, dict[str, np.ndarray | Stored]]:
    """`encode` of ``given``'s product (the same record and arrays), its nonzero positions
    and values read from the weight through the mask (the product written and read back took
    a tenth of packing a pruned model); the product is made only where every value is kept or
    the dense layout is the smallest."""
    flat = given.weight.detach().reshape(-1)
    keep = np.not_equal(flat.numpy(), 0)
    np.logical_and(keep, given.mask.reshape(-1).numpy(), out=keep)
    n, nnz = len(keep), int(np.count_nonzero(keep))
    if nnz == n:
        return encode(name, given.value(), None)
    mask = torch.from_numpy(keep)
    kept = _selected(flat, mask, nnz)
    half = _halves(kept)  # (the zeros are float16 values: the nonzero ones decide)
    bits = 16 if half else 32
    costs = {"dense": bits * n, "bitmask": n + bits * nnz}
    positions = _positions_if_cheaper(mask, nnz, bits * nnz, min(costs.values()))
    if positions is not None:
        costs["gaps"] = 8 * _gap_bytes(positions) + bits * nnz
    enc = min(costs, key=costs.get)
    if enc == "dense":
        return encode(name, given.value(), None)
    spec: dict = {"shape": list(given.weight.shape), "dtype": "float32", "enc": enc}
    arrays: dict[str, np.ndarray | Stored] = {}
    _store_positions(enc, mask, positions, arrays)
    del positions, mask, keep
    arrays["values"] = kept.to(torch.float16 if half else torch.float32).numpy()
    return spec, arrays


def _store_codes(
    name: str, packed: Codes, mask: torch.Tensor | None, nnz: int, spec: dict, arrays: dict
) -> None:
    """A grid's codes and their scales or codebook into ``spec`` and ``arrays``."""
    if packed.decode not in DECODERS:
        raise ValueError(f"{name}: unknown decode {packed.decode!r}; known: {DECODERS}")
    for key, tensor in packed.tensors.items():
        tensor = tensor.detach().to(torch.float32).contiguous()
        arrays[key] = (tensor.to(torch.float16) if _halves(tensor) else tensor).numpy()
    spec["decode"] = packed.decode
    codes = _narrowed(packed.codes.reshape(-1))
    del packed
    _encode_codes(codes, mask, nnz, spec, arrays)


def _selected(values: torch.Tensor, mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """``values[mask]`` (both flat; ``count``: how many ``mask`` sets, if known), by numpy's
    branch-free selection (torch's boolean index took 10 times as long on a pruned weight: a
    mispredicted branch at every other value): a chunk's positions listed (`np.flatnonzero`)
    and its values taken straight into the result (``mode="wrap"``: the default mode takes
    into a temporary first). Chunks of `_SELECT_CHUNK` values, whose 8-byte positions stay in
    the core's cache: with chunks of 2^20 (`np.extract`, and a copy of each chunk's values)
    it took 2.8 ns a position of a pruned 4 M-value weight, against 0.8 (AVX-512 EPYC)."""
    flat, keep = values.numpy(), mask.numpy()
    if count is None:
        count = int(np.count_nonzero(keep))
    out = np.empty(count, dtype=flat.dtype)
    done = 0
    for start in range(0, len(flat), _SELECT_CHUNK):
        where = np.flatnonzero(keep[start : start + _SELECT_CHUNK])
        if done + len(where) > count:
            raise ValueError(f"the mask sets more than {count} values")
        chunk = flat[start : start + _SELECT_CHUNK]
        np.take(chunk, where, out=out[done : done + len(where)], mode="wrap")
        done += len(where)
    if done != count:
        raise ValueError(f"the mask sets {done} values, not {count}")
    return torch.from_numpy(out)


#: Values `_selected` lists the positions of at a time (int64 positions: 1 MB at half density).
_SELECT_CHUNK = 1 << 18


def _nonzero(flat: torch.Tensor) -> torch.Tensor:
    """``flat != 0`` (a bool tensor), by numpy."""
    return torch.from_numpy(np.not_equal(flat.numpy(), 0))


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
    return np.flatnonzero(nonzero.numpy())


def _encode_codes(
    codes: torch.Tensor,
    mask: torch.Tensor | None,
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
        sparse = _Symbols(_selected(codes, mask, nnz))
        costs["bitmask"] = n + sparse.bits * nnz
        positions = _positions_if_cheaper(mask, nnz, sparse.bits * nnz, min(costs.values()))
        if positions is not None:
            costs["gaps"] = 8 * _gap_bytes(positions) + sparse.bits * nnz
    spec["enc"] = min(costs, key=costs.get)
    _store_positions(spec["enc"], mask, positions, arrays)
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
            if index is not None:  # (offsets to positions by a table: a search took 5x as long)
                index = _lookup(index, alphabet - lo, _index_dtype(self.size))
            else:
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


def _lookup(offsets: np.ndarray, present: np.ndarray, dtype: type) -> np.ndarray:
    """Each of ``offsets`` (code less the lowest) as its position among ``present`` (the
    sorted offsets that occur), in ``dtype``; in chunks (numpy widens the indices of a take)."""
    table = np.zeros(int(present[-1]) + 1, dtype=dtype)
    table[present] = np.arange(len(present))
    out = np.empty(len(offsets), dtype=dtype)
    for start in range(0, len(offsets), _CHUNK):
        np.take(table, offsets[start : start + _CHUNK], out=out[start : start + _CHUNK])
    return out


def _bincount(index: np.ndarray, size: int) -> np.ndarray:
    """Occurrences of each of ``size`` index values (uint8 or int32, at least 0), counted by
    `torch.bincount`, which reads them as they are (`np.bincount` widens each to 8 bytes first:
    10 times as long on a 4-bit grid's codes); in chunks, for a tensor of int32 indices."""
    counts = np.zeros(size, dtype=np.int64)
    for start in range(0, len(index), _CHUNK):
        part = torch.from_numpy(np.ascontiguousarray(index[start : start + _CHUNK]))
        counts += torch.bincount(part, minlength=size).numpy()[:size]
    return counts


def _store_positions(
    enc: str, mask: torch.Tensor | None, positions: np.ndarray | None, arrays: dict
) -> None:
    if enc == "bitmask":
        arrays["mask"] = np.packbits(mask.numpy(), bitorder="little")
    elif enc == "gaps":
        arrays["gaps"] = encode_gaps(positions)


def _halves(tensor: torch.Tensor) -> bool:
    """Whether float16 holds every value of ``tensor`` exactly (its first `_PROBE` values
    tried first: a float weight's first values already tell, without converting a chunk)."""
    flat = tensor.reshape(-1)
    bounds = [0, min(_PROBE, len(flat)), *range(_PROBE, len(flat), _CHUNK)[1:], len(flat)]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        part = flat[start:stop]
        if not torch.equal(part.to(torch.float16).to(torch.float32), part):
            return False
    return True


_PROBE = 1 << 12


def _bits_for(symbols: int) -> int:
    return max(1, math.ceil(math.log2(symbols))) if symbols > 1 else 1
