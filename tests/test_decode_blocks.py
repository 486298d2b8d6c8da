"""Decoding a record a block at a time straight into a float32 tensor
(`compressors._decoding.decode_into`): the same values, bit for bit, as the general path
(`decode` with no block decoder), for every layout, code width, scale and table; records it does
not take are left to the general path; damaged records are refused."""

from __future__ import annotations

import pytest
import torch

from compressors import _codecs, _decoding
from compressors._codecs import CodecError, Codes, decode, decode_into, encode

#: Values per block in these tests: small tensors then span many blocks, and a block's bounds
#: fall inside rows, bytes of codes and runs of zeros.
_BLOCK = 64


class _Grid:
    """A parametrization's value protocol (`Codes`), for a tensor given as its codes."""

    def __init__(self, codes: torch.Tensor, decode_as: str, tensors: dict) -> None:
        self.codes, self.decode_as, self.tensors = codes, decode_as, tensors

    def packed(self, value: torch.Tensor) -> Codes:
        return Codes(self.codes, self.decode_as, self.tensors)

    def value(self) -> torch.Tensor:
        if self.decode_as == "codebook":
            return self.tensors["codebook"][self.codes.long()]
        return self.codes.to(torch.float32) * self.tensors["scale"]


def _arrays(value: torch.Tensor, grid: _Grid | None = None) -> tuple[dict, dict]:
    spec, arrays = encode("t", value, grid)
    return spec, {k: torch.from_numpy(getattr(a, "array", a).copy()) for k, a in arrays.items()}


def _general(spec: dict, arrays: dict, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(_decoding, "decode_into", lambda *args: False)
        return decode(spec, arrays)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def _sparse(shape, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(shape, generator=g)
    return value * (torch.rand(shape, generator=g) < density)


def _codes(shape, lo: int, hi: int, density: float, seed: int, *, peaked=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if peaked:  # (mostly one code: entropy-coded)
        codes = torch.where(torch.rand(shape, generator=g) < 0.9, 1, hi)
    else:
        codes = torch.randint(lo, hi + 1, shape, generator=g)
    codes = torch.where(codes == 0, 1, codes)  # (zeros only where the mask puts them)
    return (codes * (torch.rand(shape, generator=g) < density)).to(torch.int8)


def _row_scales(rows: int, *trailing: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(rows, generator=g) + 0.1).to(torch.float16).to(torch.float32)
    return scale.view(rows, *([1] * len(trailing)))


FLOATS = {
    "dense": (_sparse((37, 53), 1.0, 0), "dense"),
    "bitmask": (_sparse((37, 53), 0.5, 1), "bitmask"),
    "gaps": (_sparse((41, 67), 0.03, 2), "gaps"),
    "bitmask float16": (_sparse((29, 31), 0.6, 3).to(torch.float16).float(), "bitmask"),
    "one dimension": (_sparse((1001,), 0.4, 4), "bitmask"),
    "no nonzero": (torch.zeros(5, 7), "gaps"),
}


@pytest.mark.parametrize("case", list(FLOATS))
def test_float_records_decode_in_blocks_as_the_general_path(monkeypatch, case):
    monkeypatch.setattr(_decoding, "BLOCK", _BLOCK)
    value, layout = FLOATS[case]
    spec, arrays = _arrays(value)
    assert spec["enc"] == layout
    out = torch.full(value.shape, float("nan"))
    assert decode_into(spec, arrays, out)
    assert torch.equal(_bits(out), _bits(_general(spec, arrays, monkeypatch)))
    assert torch.equal(_bits(out), _bits(value + 0.0))  # (-0.0 of a product is stored as 0)


def _code_case(name: str) -> tuple[_Grid, str, bool]:
    """``(grid, layout, whether the block decoder takes it)``."""
    if name == "4-bit dense, scale per row":
        return (
            _Grid(_codes((37, 53), -7, 7, 1.0, 0), "scaled", {"scale": _row_scales(37, 53)}),
            ("dense"),
            True,
        )
    if name in ("1-bit dense", "2-bit dense", "8-bit dense"):  # (a byte's codes at once)
        hi = {"1-bit dense": 1, "2-bit dense": 2, "8-bit dense": 100}[name]
        codes = _codes((37, 54), -hi, hi, 1.0, 14)
        return _Grid(codes, "scaled", {"scale": _row_scales(37, 54)}), "dense", True
    if name == "3-bit dense":
        return (
            _Grid(_codes((37, 53), -3, 3, 1.0, 1), "scaled", {"scale": _row_scales(37, 53)}),
            ("dense"),
            True,
        )
    if name == "5-bit bitmask":
        codes = _codes((37, 53), -15, 15, 0.5, 2)
        return _Grid(codes, "scaled", {"scale": _row_scales(37, 53)}), "bitmask", True
    if name == "4-bit gaps":
        codes = _codes((41, 67), -7, 7, 0.03, 3)
        return _Grid(codes, "scaled", {"scale": _row_scales(41, 67)}), "gaps", True
    if name == "entropy-coded":
        codes = _codes((37, 53), -7, 7, 1.0, 4, peaked=True)
        return _Grid(codes, "scaled", {"scale": _row_scales(37, 53)}), "ans", True
    if name == "one scale":
        scale = torch.tensor([0.125])
        return _Grid(_codes((37, 53), -7, 7, 0.5, 5), "scaled", {"scale": scale}), "bitmask", True
    if name == "conv scale per channel":
        codes = _codes((8, 3, 3, 3), -7, 7, 0.5, 6)
        return _Grid(codes, "scaled", {"scale": _row_scales(8, 3, 3, 3)}), "bitmask", True
    if name == "rows longer than a block, dense":  # (each row written in several blocks)
        codes = _codes((5, 3 * _BLOCK + 11), -7, 7, 1.0, 11)
        scale = _row_scales(5, 3 * _BLOCK + 11, seed=2)
        return _Grid(codes, "scaled", {"scale": scale}), "dense", True
    if name == "one scale, dense":
        scale = torch.tensor([0.375])
        return _Grid(_codes((37, 53), -7, 7, 1.0, 12), "scaled", {"scale": scale}), "dense", True
    if name == "conv scale per channel, dense":
        codes = _codes((8, 3, 3, 3), -7, 7, 1.0, 13)
        return _Grid(codes, "scaled", {"scale": _row_scales(8, 3, 3, 3)}), "dense", True
    if name == "scale per column":  # (not one per row: the general path)
        scale = _row_scales(53, seed=1).view(1, 53)
        return _Grid(_codes((37, 53), -7, 7, 1.0, 7), "scaled", {"scale": scale}), "dense", False
    if name == "negative scale, sparse":  # (0 * -s is -0: the general path keeps 0)
        scale = -_row_scales(37, 53)
        codes = _codes((37, 53), -7, 7, 0.5, 8)
        return _Grid(codes, "scaled", {"scale": scale}), "bitmask", False
    if name == "negative scale, dense":
        scale = -_row_scales(37, 53)
        return _Grid(_codes((37, 53), -7, 7, 1.0, 9), "scaled", {"scale": scale}), "dense", True
    codebook = torch.tensor([0.0, -0.5, 0.25, 1.5, -2.0, 3.0, 0.75, -0.125])
    codes = _codes((37, 53), 0, 7, 0.5 if name == "codebook, sparse" else 1.0, 10).abs()
    layout = "bitmask" if name == "codebook, sparse" else "dense"
    return _Grid(codes.to(torch.int64), "codebook", {"codebook": codebook}), layout, True


CODES = [
    "4-bit dense, scale per row",
    "3-bit dense",
    "1-bit dense",
    "2-bit dense",
    "8-bit dense",
    "5-bit bitmask",
    "4-bit gaps",
    "entropy-coded",
    "one scale",
    "conv scale per channel",
    "rows longer than a block, dense",
    "one scale, dense",
    "conv scale per channel, dense",
    "scale per column",
    "negative scale, sparse",
    "negative scale, dense",
    "codebook, sparse",
    "codebook, dense",
]


#: Code widths some cases must have: bytes of whole codes, and widths that split codes over bytes.
_WIDTHS = {
    "4-bit dense, scale per row": 4,
    "2-bit dense": 2,
    "8-bit dense": 8,
    "5-bit bitmask": 5,
    "codebook, sparse": 3,
}


@pytest.mark.parametrize("case", CODES)
def test_code_records_decode_in_blocks_as_the_general_path(monkeypatch, case):
    monkeypatch.setattr(_decoding, "BLOCK", _BLOCK)
    grid, layout, taken = _code_case(case)
    if layout != "ans":  # (small tensors of uniform codes: entropy-coded where not told apart)
        monkeypatch.setattr(_codecs, "ANS_ALWAYS", 0)
        monkeypatch.setattr(_codecs, "ANS_PAYS", 0.0)
    value = grid.value()
    spec, arrays = _arrays(value, grid)
    assert spec["enc"] == layout
    assert spec.get("bits") == _WIDTHS.get(case, spec.get("bits"))
    out = torch.full(value.shape, float("nan"))
    assert decode_into(spec, arrays, out) == taken
    expected = _general(spec, arrays, monkeypatch)
    assert torch.equal(value, expected)
    if taken:
        assert torch.equal(_bits(out), _bits(expected))
    else:
        assert torch.isnan(out).all()  # (nothing written)
    assert torch.equal(_bits(decode(spec, arrays)), _bits(expected))


def test_a_target_it_does_not_take_is_left_alone():
    spec, arrays = _arrays(_sparse((37, 53), 0.5, 1))
    for out in (
        torch.zeros(37, 53, dtype=torch.float64),
        torch.zeros(53, 37).t(),
        torch.zeros(37, 54),
    ):
        assert not decode_into(spec, arrays, out)
        assert not out.any()


def test_a_mask_and_values_that_disagree_are_refused(monkeypatch):
    monkeypatch.setattr(_decoding, "BLOCK", _BLOCK)
    monkeypatch.setattr(_codecs, "ANS_ALWAYS", 0)
    monkeypatch.setattr(_codecs, "ANS_PAYS", 0.0)
    spec, arrays = _arrays(_sparse((37, 53), 0.5, 1))
    assert spec["enc"] == "bitmask"
    values = arrays["values"]
    out = torch.zeros(37, 53)
    with pytest.raises(CodecError, match="more positions"):
        decode_into(spec, {**arrays, "values": values[:-1]}, out)
    with pytest.raises(CodecError, match="positions for"):
        decode_into(spec, {**arrays, "values": torch.cat([values, values[:1]])}, out)
    grid, _, _ = _code_case("4-bit gaps")
    spec, arrays = _arrays(grid.value(), grid)
    spec = {**spec, "count": spec["count"] - 1}
    with pytest.raises(CodecError, match="gaps for"):
        decode_into(spec, arrays, torch.zeros(41, 67))


def test_codes_beyond_the_alphabet_are_refused(monkeypatch):
    monkeypatch.setattr(_decoding, "BLOCK", _BLOCK)
    monkeypatch.setattr(_codecs, "ANS_ALWAYS", 0)
    monkeypatch.setattr(_codecs, "ANS_PAYS", 0.0)
    grid, _, _ = _code_case("4-bit dense, scale per row")
    spec, arrays = _arrays(grid.value(), grid)
    codes = arrays["codes"].clone()
    codes[-1] = 0xFF  # (index 15 of an alphabet of 15)
    with pytest.raises(CodecError, match="beyond its alphabet"):
        decode_into(spec, {**arrays, "codes": codes}, torch.zeros(37, 53))
    for byte in (0xF0, 0x0F):  # (either code of a byte, in a block of the middle)
        codes = arrays["codes"].clone()
        codes[len(codes) // 2] = byte
        with pytest.raises(CodecError, match="beyond its alphabet"):
            decode_into(spec, {**arrays, "codes": codes}, torch.zeros(37, 53))


@pytest.mark.parametrize("field", range(4))
def test_a_2_bit_code_beyond_the_alphabet_is_refused_in_any_field(monkeypatch, field):
    """Codes of 2 bits on an alphabet of 3 (1, 2, 3: indices 0 to 2): index 3 in any of a
    byte's four fields (the top one, checked from the largest byte, and the others) is
    refused."""
    monkeypatch.setattr(_decoding, "BLOCK", _BLOCK)
    monkeypatch.setattr(_codecs, "ANS_ALWAYS", 0)
    monkeypatch.setattr(_codecs, "ANS_PAYS", 0.0)
    grid = _Grid(_codes((37, 54), 1, 3, 1.0, 15), "scaled", {"scale": _row_scales(37, 54)})
    spec, arrays = _arrays(grid.value(), grid)
    assert spec["enc"] == "dense" and spec["bits"] == 2 and spec["range"] == [1, 3]
    decode_into(spec, arrays, torch.zeros(37, 54))  # (the codes as stored are taken)
    codes = arrays["codes"].clone()
    at = len(codes) // 2
    codes[at] = (int(codes[at]) & ~(3 << 2 * field)) | (3 << 2 * field)
    with pytest.raises(CodecError, match="beyond its alphabet"):
        decode_into(spec, {**arrays, "codes": codes}, torch.zeros(37, 54))
