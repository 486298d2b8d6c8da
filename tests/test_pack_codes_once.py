"""A quantized tensor is packed from its codes, computed once (`FakeQuant.packed_from`): the
same record and arrays as packing its float value, whose codes `FakeQuant.packed` recomputes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compressors import CompressionContext, get_compressor, load_packed, save_packed
from compressors._codecs import encode
from compressors._model_state import _coded_sources, _sources
from compressors._planes import store
from compressors.prune import Mask
from compressors.quant import FakeQuant, make_grid


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 40))
    with torch.no_grad():
        model[0].weight[3] = 0  # a row of zeros: its scale is 1, its codes 0
        model[2].weight[:, ::3] = 0  # zeros inside rows
    return model


def _stored(spec_arrays):
    spec, arrays = spec_arrays
    return spec, {
        k: (store(a)[0], b"".join(bytes(c) for c in store(a)[2])) for k, a in arrays.items()
    }


@pytest.mark.parametrize("bits", [4, 2, 8, 1, "ternary"])
def test_codes_from_the_input_are_the_codes_of_the_value(bits):
    model = get_compressor("quant")(bits=bits).compress(_model(), CompressionContext())
    sources, coded = _sources(model), _coded_sources(model)
    assert set(coded) == {"0.weight", "2.weight"}
    for name, make in coded.items():
        value_fn, grid, _ = sources[name]
        given = make()
        assert not isinstance(given, torch.Tensor)  # (its codes, not its value)
        value = value_fn()
        expected = grid.packed(value)
        assert torch.equal(given.codes.to(torch.int64), expected.codes.to(torch.int64))
        assert _stored(encode(name, given, None)) == _stored(encode(name, value, grid))


def test_codes_after_a_pruning_mask_are_those_of_the_masked_weight():
    model = _model()
    for layer in (model[0], model[2]):
        mask = torch.rand_like(layer.weight) > 0.6
        parametrize.register_parametrization(layer, "weight", Mask(mask))
        with torch.no_grad():
            grid = make_grid(layer.weight, 4)
        parametrize.register_parametrization(layer, "weight", grid)
    sources, coded = _sources(model), _coded_sources(model)
    for name, make in coded.items():
        value_fn, grid, _ = sources[name]
        given, value = make(), value_fn()
        assert (value == 0).float().mean() > 0.5  # (sparse: the bitmask or gaps layouts)
        assert _stored(encode(name, given, None)) == _stored(encode(name, value, grid))


def test_a_file_of_codes_computed_once_is_the_file_of_its_values(tmp_path):
    """The same bytes whichever way the codes come (the coded path turned off by a grid that
    declines, as it does for scales that are not positive), and the file reloads exactly."""
    model = get_compressor("quant")(bits=4).compress(_model(), CompressionContext())
    x = torch.randn(5, 48)
    with torch.no_grad():
        expected = model(x)
    save_packed(model, tmp_path / "once.sqz")
    for layer in (model[0], model[2]):
        grid = layer.parametrizations.weight[-1]
        assert isinstance(grid, FakeQuant)
        grid.packed_from = lambda weight: None  # (an instance attribute: this model only)
    assert all(isinstance(make(), torch.Tensor) for make in _coded_sources(model).values())
    save_packed(model, tmp_path / "twice.sqz")
    once, twice = ((tmp_path / f"{n}.sqz").read_bytes() for n in ("once", "twice"))
    assert hashlib.sha256(once).digest() == hashlib.sha256(twice).digest()
    reloaded = load_packed(tmp_path / "once.sqz", _model(1))
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)


def test_a_grid_declines_where_a_zero_value_could_have_a_nonzero_code():
    weight = torch.randn(6, 8)
    grid = make_grid(weight, 4)
    assert grid.packed_from(weight) is not None
    assert grid.packed_from(weight.double()) is None
    grid.scale[2] = 0.0
    assert grid.packed_from(weight) is None
    grid.scale[2] = float("inf")
    assert grid.packed_from(weight) is None
    assert np.isinf(grid.scale[2].item())
