"""A model's own parametrizations (torch's ``weight_norm`` on a wav2vec 2.0's positional
convolution, ``spectral_norm``): compressors leave those tensors, the packed file keeps what the
parametrization keeps, structured pruning keeps such a layer whole; and a rerun draws what the
model draws from numpy's and Python's generators alike."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from compressors import (
    CompressionContext,
    apply_pipeline,
    get_compressor,
    load_packed,
    save_packed,
    targets,
)
from experiments import Split, Task, TrainConfig, load_or_train_baseline, seed_everything


class Normed(nn.Module):
    """A stem, a weight-normed convolution on the residual stream (as wav2vec 2.0's positional
    convolution), a spectral-normed Linear and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, 16, 3, padding=1)
        self.pos = weight_norm(nn.Conv1d(16, 16, 5, padding=2, groups=4), dim=2)
        self.mid = nn.Conv1d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 24)
        self.lin = spectral_norm(nn.Linear(24, 32))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(self.mid(h + self.pos(h)))
        return self.head(torch.relu(self.lin(torch.relu(self.fc(h.mean(-1))))))


def test_compressors_leave_a_models_own_parametrizations_and_the_file_keeps_them(tmp_path, caplog):
    torch.manual_seed(0)
    model = Normed().eval()
    x = torch.randn(6, 2, 12)
    with caplog.at_level("INFO", logger="compressors._targets"):
        found = targets(model)
    assert set(found) == {"stem.weight", "mid.weight", "fc.weight", "head.weight"}
    assert "pos.weight is left as it is: the model parametrizes it (_WeightNorm)" in caplog.text
    ctx = CompressionContext(example_inputs=x, seed=0)
    quantized = apply_pipeline([get_compressor("quant")(bits=4)], model, ctx).eval()
    save_packed(quantized, tmp_path / "m.sqz")
    torch.manual_seed(1)  # a fresh model with other weights, its own parametrizations
    reloaded = load_packed(tmp_path / "m.sqz", Normed()).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), quantized(x))
    assert torch.equal(reloaded.pos.weight, model.pos.weight)  # g and v as they were


def test_structured_pruning_keeps_a_weight_normed_layer_whole(caplog):
    torch.manual_seed(0)
    model = Normed().eval()
    x = torch.randn(6, 2, 12)
    ctx = CompressionContext(example_inputs=x, seed=0)
    with caplog.at_level("INFO", logger="compressors.structured"):
        pruned = get_compressor("structured")(amount=0.5).compress(model, ctx)
    assert pruned.mid.out_channels < 32  # the rest is pruned
    assert pruned.pos.weight.shape == model.pos.weight.shape  # the parametrized one is whole
    assert "the model parametrizes its weight (_WeightNorm)" in caplog.text
    with torch.no_grad():
        assert pruned(x).shape == (6, 3)


class NumpyNoise(nn.Module):
    """Adds noise from numpy's and Python's global generators in training (as wav2vec 2.0 masks
    time steps with ``np.random``, or an augmentation with `random`)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x):
        if self.training:
            scale = np.random.rand() + random.random()
            x = x + torch.from_numpy(np.random.randn(*x.shape).astype("float32")) * scale
        return self.net(x)


def test_training_draws_numpy_and_random_alike_for_a_seed(tmp_path):
    torch.manual_seed(0)
    split = Split(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    task = Task(
        name="noise",
        train=split,
        val=split,
        test=split,
        num_classes=3,
        build_model=NumpyNoise,
        train_config=TrainConfig(epochs=2, batch_size=16, lr=0.01),
    )
    weights = []
    for run in range(2):
        np.random.seed(run)  # whatever the process drew before
        random.seed(run)
        baseline = load_or_train_baseline(
            task, config={"run": run}, cache_dir=tmp_path / str(run), seed=0
        )
        weights.append(baseline.model.net.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    seed_everything(3)
    a = (np.random.rand(), random.random(), torch.rand(()))
    seed_everything(3)
    assert (np.random.rand(), random.random(), torch.rand(())) == a


@pytest.mark.slow  # (an ONNX export: ~4 s; the fast lane keeps the packing and pruning tests)
def test_w8a8_leaves_a_weight_normed_layer_float_and_exports(tmp_path):
    """W8A8 puts no activation grids on a layer whose weight the model computes (weight_norm:
    no initializer in the exported graph for a grid to read), so its graph exports."""
    from compressors import _act_quant as act

    torch.manual_seed(0)
    model = Normed().eval()
    x = torch.randn(16, 2, 12)
    assert "pos" not in act.quantizable(model, every=True) and "mid" in act.quantizable(model)
    ctx = CompressionContext(train=Split(x, torch.randint(0, 3, (16,))), example_inputs=x, seed=0)
    quant = get_compressor("quant")(bits=8, activations=8)
    quantized = apply_pipeline([quant], model, ctx).eval()
    assert "pos" not in act.ranges(quantized) and "mid" in act.ranges(quantized)
    save_packed(quantized, tmp_path / "m.sqz")
    pytest.importorskip("onnxscript")
    from compressors.onnx_export import check_onnx, export_onnx

    shipped = Normed()
    export_onnx(tmp_path / "m.sqz", shipped, x[:4], tmp_path / "m.onnx")
    check = check_onnx(tmp_path / "m.onnx", shipped, x)
    assert check.agree, check.message


@pytest.mark.parametrize("name", ["quant", "allocate", "prune", "structured", "cluster"])
def test_a_model_in_bfloat16_is_refused_before_training_naming_the_fix(name):
    """A model whose weights are bfloat16 (loaded with torch_dtype=bfloat16): every method
    that compresses weights refuses it before any training, naming the dtype and the fix (its
    grids would change the tensors' dtype: every trial failed in compress before)."""
    from compressors import UnsupportedModelError

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(torch.bfloat16)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedModelError, match=r"float32 weights, but this model's are "):
        get_compressor(name)().check_model(model, x)
    assert get_compressor(name)().check_model(model.float(), x.float())
