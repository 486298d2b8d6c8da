"""A pruned tensor is packed from its weight and mask (`Mask.packed_from`), without the product
made: the same record and arrays, and the same file, as packing the product."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compressors import CompressionContext, get_compressor, load_packed, save_packed
from compressors._codecs import Masked, encode
from compressors._model_state import _coded_sources
from compressors._planes import store
from compressors.prune import Mask


def _stored(spec_arrays):
    spec, arrays = spec_arrays
    out = {}
    for key, array in arrays.items():
        codec, _, chunks = store(array)
        out[key] = (codec, str(array.dtype), b"".join(bytes(c) for c in chunks))
    return spec, out


def _weight(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 50, generator=g)
    if kind == "float16 values":
        weight = weight.to(torch.float16).float()
    if kind == "a few -0.0 inside the mask":
        weight[1::20, ::25] = -0.0
    if kind == "zeros and -0.0 inside the mask":
        weight[::3, ::4] = 0.0
        weight[1::5, ::7] = -0.0
    return weight


@pytest.mark.parametrize(
    ("kind", "pruned", "layout"),
    [
        ("random", 0.5, "bitmask"),
        ("random", 0.98, "gaps"),
        ("random", 0.01, "dense"),  # (the product made: the dense layout keeps its -0.0)
        ("random", 0.0, "dense"),  # (every value kept)
        ("float16 values", 0.5, "bitmask"),
        ("zeros and -0.0 inside the mask", 0.5, "bitmask"),
        ("a few -0.0 inside the mask", 0.01, "dense"),
    ],
)
def test_the_record_is_the_products(kind, pruned, layout):
    weight = _weight(kind)
    g = torch.Generator().manual_seed(1)
    mask = Mask(torch.rand(weight.shape, generator=g) >= pruned)
    given = mask.packed_from(weight)
    assert isinstance(given, Masked)
    with torch.no_grad():
        product = mask(weight)
    spec, arrays = _stored(encode("w", given, None))
    assert spec["enc"] == layout
    if kind == "float16 values":
        assert arrays["values"][1] == "float16"
    assert (spec, arrays) == _stored(encode("w", product, None))


def test_a_mask_declines_what_it_cannot_give():
    mask = Mask(torch.ones(4, 5, dtype=torch.bool))
    assert mask.packed_from(torch.randn(4, 5)) is not None
    assert mask.packed_from(torch.randn(4, 5).double()) is None
    assert Mask(torch.tensor(True)).packed_from(torch.randn(4, 5)) is None


def _pruned(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 30))
    return get_compressor("prune")(amount=0.6).compress(model, CompressionContext())


def test_a_pruned_models_file_is_the_same_either_way(tmp_path):
    model = _pruned()
    assert {k: type(f()) for k, f in _coded_sources(model).items()} == {
        "0.weight": Masked,
        "2.weight": Masked,
    }
    x = torch.randn(3, 40)
    with torch.no_grad():
        expected = model(x)
    save_packed(model, tmp_path / "masked.sqz")
    for layer in (model[0], model[2]):
        layer.parametrizations.weight[-1].packed_from = lambda weight: None  # (this model's)
    assert all(isinstance(f(), torch.Tensor) for f in _coded_sources(model).values())
    save_packed(model, tmp_path / "product.sqz")
    masked, product = ((tmp_path / f"{n}.sqz").read_bytes() for n in ("masked", "product"))
    assert hashlib.sha256(masked).digest() == hashlib.sha256(product).digest()
    fresh = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 30))
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "masked.sqz", fresh)(x), expected)


def test_a_mask_under_a_grid_gives_way_to_the_grids_codes():
    model = _pruned()
    parametrize.register_parametrization(model[0], "weight", Mask(torch.ones(64, 40) > 0))
    model = get_compressor("quant")(bits=4).compress(model, CompressionContext())
    assert {type(f()).__name__ for f in _coded_sources(model).values()} == {"Codes"}
