"""Binary, ternary and k-bit grids, post-training vs quantization-aware, and int8 execution."""

from __future__ import annotations

import copy

import pytest
import torch

from compressors import (
    CompressionContext,
    UnsupportedModelError,
    apply_pipeline,
    finalize_pipeline,
    get_compressor,
    load_packed,
    read_packed,
    save_packed,
)
from compressors._targets import weight_layers
from compressors.packing import plain_state
from compressors.quant import FakeQuant
from compressors.runtime import Int8Linear
from experiments import evaluate, fit
from experiments.metrics import count_flops, nonzero_params, peak_memory_bytes


def _quantize(model, *steps):
    compressors = [get_compressor(name)(**params) for name, params in steps]
    return apply_pipeline(compressors, copy.deepcopy(model), CompressionContext()), compressors


def _weights(model):
    state, _ = plain_state(model)
    return {name: state[f"{name}.weight"] for name in weight_layers(model)}


def test_ternary_weights_take_at_most_three_values_per_channel(digits_task, digits_baseline):
    model, _ = _quantize(digits_baseline.model, ("quant", {"bits": "ternary"}))
    for stage in ("after quantization", "after fine-tuning"):
        for name, w in _weights(model).items():
            for row in w:
                values = torch.unique(row)
                assert len(values) <= 3, f"{name} {stage}: {values}"
                assert set(values.abs().tolist()) - {0.0} == {row.abs().max().item()}
            assert (w == 0).float().mean() > 0.2  # ternary really zeroes the small weights
        fit(model, digits_task.train, epochs=2, batch_size=64, lr=1e-2)


def test_binary_weights_are_sign_times_channel_scale_and_take_one_bit(digits_baseline, tmp_path):
    model, _ = _quantize(digits_baseline.model, ("quant", {"bits": 1, "bias": "fp16"}))
    weights = _weights(model)
    for w in weights.values():
        scale = w.abs().amax(dim=1, keepdim=True)
        assert torch.equal(w.abs(), scale.expand_as(w))  # every weight is +-scale of its row
    size = save_packed(model, tmp_path / "binary.sqz")
    n_weights = sum(w.numel() for w in weights.values())
    assert size < n_weights / 8 * 1.10 + 2_000  # ~1 bit a weight, plus scales, biases, header
    assert torch.equal(read_packed(tmp_path / "binary.sqz")["net.1.weight"], weights["net.1"])


def test_binary_keeps_pruned_weights_at_zero(digits_baseline, tmp_path):
    model, _ = _quantize(digits_baseline.model, ("prune", {"amount": 0.7}), ("quant", {"bits": 1}))
    for w in _weights(model).values():
        assert max(len(torch.unique(row.abs())) for row in w) <= 2  # 0 and the row's scale
    assert (torch.cat([w.flatten() for w in _weights(model).values()]) == 0).float().mean() >= 0.69
    save_packed(model, tmp_path / "m.sqz")
    reloaded = read_packed(tmp_path / "m.sqz")
    for name, w in _weights(model).items():
        assert torch.equal(reloaded[f"{name}.weight"], w)


def test_sparse_ternary_is_smaller_than_dense_two_bit(digits_baseline, tmp_path):
    ternary, _ = _quantize(
        digits_baseline.model, ("prune", {"amount": 0.8}), ("quant", {"bits": "ternary"})
    )
    two_bit, _ = _quantize(digits_baseline.model, ("quant", {"bits": 2}))
    assert save_packed(ternary, tmp_path / "t.sqz") < save_packed(two_bit, tmp_path / "2.sqz")


def test_k_bit_grids_clip_to_reduce_the_error(digits_baseline):
    model, _ = _quantize(digits_baseline.model, ("quant", {"bits": 3}))
    original = _weights(digits_baseline.model)
    state, grids = plain_state(model)
    clipped = 0
    for name, w in original.items():
        grid = grids[f"{name}.weight"]
        no_clip = w.abs().amax(dim=1, keepdim=True) / grid.qmax
        clipped += int((grid.scale < no_clip * 0.999).sum())
        err = (state[f"{name}.weight"] - w).pow(2).sum(dim=1)
        naive = (torch.clamp(torch.round(w / no_clip), -3, 3) * no_clip - w).pow(2).sum(dim=1)
        assert torch.all(err <= naive * 1.01 + 1e-6)  # never worse than max-scaling (fp16 round)
    assert clipped > 0


def test_a_k_bit_grid_takes_each_rows_clipping_ratio_of_least_error():
    """Each row's scale is the clipping ratio's (of `CLIP_RATIOS`, the first of equal errors)
    whose codes reconstruct the row with the least squared error, computed out of place here."""
    from compressors.quant import CLIP_RATIOS, _fp16, make_grid

    torch.manual_seed(0)
    w = torch.randn(64, 40) * torch.linspace(0.1, 2.0, 64)[:, None]
    w[3] = 0.0  # (a row of zeros: scale 1)
    w[5, :3] = 25.0  # (outliers)
    clipped = 0
    for bits in (2, 4, 8):
        qmax = 2 ** (bits - 1) - 1
        amax = w.abs().amax(dim=1)
        best_err, best = torch.full_like(amax, float("inf")), torch.ones_like(amax)
        for ratio in CLIP_RATIOS:
            scale = _fp16(amax * ratio / qmax)
            q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax) * scale[:, None]
            err = (q - w).pow(2).sum(dim=1)
            better = err < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
        assert torch.equal(make_grid(w, bits).scale.flatten(), best)
        clipped += int((best < _fp16(amax / qmax)).sum())
    assert clipped > 0  # (the search is exercised: some rows are best clipped)


def test_ptq_quantizes_only_after_fine_tuning(digits_task, digits_baseline):
    model, compressors = _quantize(digits_baseline.model, ("quant", {"bits": 4, "mode": "ptq"}))
    assert not any(isinstance(m, FakeQuant) for m in model.modules())  # float while fine-tuning
    fit(model, digits_task.train, epochs=1, batch_size=64, lr=1e-3)
    model = finalize_pipeline(compressors, model, CompressionContext())
    for w in _weights(model).values():
        assert max(len(torch.unique(row)) for row in w) <= 15
    assert evaluate(model, digits_task.val) > 0.9


def test_qat_fine_tunes_on_the_grid_and_beats_ptq_at_two_bits(digits_task, digits_baseline):
    accuracy = {}
    for mode in ("qat", "ptq"):
        model, compressors = _quantize(digits_baseline.model, ("quant", {"bits": 2, "mode": mode}))
        fit(model, digits_task.train, epochs=5, batch_size=64, lr=3e-3, seed=0)
        model = finalize_pipeline(compressors, model, CompressionContext())
        accuracy[mode] = evaluate(model, digits_task.val)
    assert accuracy["qat"] > accuracy["ptq"], accuracy


@pytest.mark.parametrize("bits", [8, 4, "ternary", 1])
def test_int8_runtime_runs_int8_kernels_close_to_float(
    digits_task, digits_baseline, tmp_path, bits
):
    model, _ = _quantize(digits_baseline.model, ("quant", {"bits": bits, "runtime": "int8"}))
    save_packed(model, tmp_path / "int8.sqz")
    shipped = load_packed(tmp_path / "int8.sqz", digits_task.build_model())
    layers = [m for m in shipped.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 3
    float_weights = _weights(model)
    for name, w in float_weights.items():
        qweight, _ = shipped.get_submodule(name)._weight_bias()
        assert qweight.dtype == torch.qint8
        assert torch.equal(qweight.dequantize(), w)  # the int8 codes are exactly the grid's
    x = digits_task.val.x
    with torch.no_grad():
        expected, got = model(x), shipped(x)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(1) == expected.argmax(1)).float().mean() > 0.98
    one = digits_task.example_inputs(1)
    assert count_flops(shipped, one) == count_flops(model, one)
    state, _ = plain_state(model)
    assert nonzero_params(shipped) == sum(int(torch.count_nonzero(t)) for t in state.values())
    batch = digits_task.example_inputs(256)
    assert peak_memory_bytes(shipped, batch) < peak_memory_bytes(model, batch)


def test_int8_runtime_leaves_convolutions_in_float(tmp_path):
    from experiments.models import ConvNet1d

    torch.manual_seed(0)
    model, _ = _quantize(ConvNet1d(40, 10), ("quant", {"bits": 8, "runtime": "int8"}))
    save_packed(model, tmp_path / "cnn.sqz")
    shipped = load_packed(tmp_path / "cnn.sqz", ConvNet1d(40, 10))
    assert isinstance(shipped.head, Int8Linear)
    assert isinstance(shipped.features[0], torch.nn.Conv1d)
    x = torch.randn(16, 40)
    with torch.no_grad():
        assert torch.allclose(shipped(x), model(x), atol=0.05 * model(x).abs().max().item())


class _AllConv(torch.nn.Module):
    """Convolutions to the classes and global pooling: no Linear, LSTM or GRU."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv1d(1, 8, 3, padding=1), torch.nn.BatchNorm1d(8), torch.nn.ReLU()
        )
        self.classes = torch.nn.Conv1d(8, 10, 1)

    def forward(self, x):
        return self.classes(self.features(x.unsqueeze(1))).mean(-1)


def test_int8_runtime_is_refused_where_no_layer_runs_on_int8_kernels():
    from experiments.models import ConvNet1d
    from search import ConfigError, SearchSpace, compose_config

    model = _AllConv()
    with pytest.raises(UnsupportedModelError) as refused:
        get_compressor("quant")(runtime="int8").check_model(model)
    message = str(refused.value)
    assert "'quant.runtime' parameter of compressor 'quant' is 'int8'" in message
    assert "they run Linear, LSTM, GRU layers" in message
    assert "the model's layers are BatchNorm1d, Conv1d" in message
    assert "Use quant.runtime=float" in message
    assert get_compressor("quant")().check_model(model) == [
        "features.0.weight",
        "classes.weight",
    ]
    assert "head.weight" in get_compressor("quant")(runtime="int8").check_model(ConvNet1d(40, 10))

    cfg = compose_config(["space.pipeline=[quant]", "space.quant.runtime=int8"])
    with pytest.raises(ConfigError, match="'quant.runtime' .* 'int8'"):  # squeeze sweep exits 2
        SearchSpace.from_config(cfg.space).check_model(model, task="all_conv")
