"""Every phase on the trial's device: compressors keep a model's tensors where they are.

This CPU build has no second device with real kernels, so two checks stand in for one:

- the model on the CPU while torch's default device is ``meta``: a tensor a compressor makes
  without naming a device (``torch.zeros(n)``, ``torch.tensor(x)``, a new ``nn.Linear``) lands
  on ``meta``, and then either mixing it with the model's tensors fails or it ends in the model,
  which the test sees;
- the model itself on ``meta`` (shapes only, no data), for the compressors whose ops need no
  values: a ``.cpu()`` round trip fails there ("cannot copy out of meta tensor"). Not on meta:
  k-means (``cluster``: it sorts and reads the values), low-rank by ``energy`` (the rank is read
  from the singular values), ``structured`` (the channels to remove are read from the scores)
  and the Taylor criterion (it reads the training batches' loss); those are checked the first
  way only. ``structured`` with ``importance=random`` is left out of the first check:
  torch-pruning's ``RandomImportance`` draws ``torch.rand(n)`` on the default device (its
  scores are brought to the CPU to choose channels anyway).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

from compressors import (
    CompressionContext,
    apply_pipeline,
    finalize_pipeline,
    get_compressor,
)
from compressors._device import model_device


class _Calib(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor
    rows: int


class _Train:
    """Training data as a compressor sees it: a few fixed batches, moved where asked."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def calibration(self, *, samples: int, batch_size: int, device=None) -> list[_Calib]:
        x, y = self.inputs[:samples], self.targets[:samples]
        return [_Calib(x.to(device), y.to(device), len(x))]

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs.to(model_device(model)))


def _fit(model: nn.Module, *, epochs: int, batch_size: int, lr: float, loss_fn, data) -> None:
    """One SGD step where the model is (what `CompressionContext.fit` does on the trial's
    device)."""
    (batch,) = data.calibration(samples=8, batch_size=8, device=model_device(model))
    loss = loss_fn(data.forward(model, batch.inputs), batch.targets, None)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    model.zero_grad(set_to_none=True)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 3),
    )


#: Model builders and the shape of one input sample.
MODELS = {"mlp": (_mlp, (12,)), "cnn": (_cnn, (1, 8, 8))}


def _context(sample: tuple[int, ...], seed: int = 0) -> CompressionContext:
    generator = torch.Generator().manual_seed(seed)
    data = _Train(torch.randn(16, *sample, generator=generator), torch.arange(16) % 3)
    return CompressionContext(
        train=data,
        example_inputs=data.inputs[:4],
        teacher=nn.Identity(),  # (kd needs one; it acts only on the fine-tuning's loss)
        seed=seed,
        fit=lambda model, **kw: _fit(model, data=data, **kw),
    )


#: (compressor, params): every compressor, and the options that take other code paths.
CASES = [
    ("prune", {"amount": 0.5}),
    ("prune", {"amount": 0.5, "importance": "random"}),
    ("prune", {"amount": 0.5, "importance": "taylor", "scope": "layer"}),
    ("gradual", {"amount": 0.5}),
    ("quant", {"bits": 4}),
    ("quant", {"bits": "ternary"}),
    ("quant", {"bits": 1, "mode": "ptq"}),
    ("cluster", {"bits": 3}),
    ("cluster", {"bits": 3, "init": "density"}),
    ("cluster", {"bits": 3, "init": "random"}),
    ("lowrank", {"keep": 0.5}),
    ("lowrank", {"keep": 0.9, "rank_by": "energy"}),
    ("structured", {"amount": 0.5}),
    ("structured", {"amount": 0.5, "importance": "taylor"}),
    ("structured", {"amount": 0.5, "scope": "global"}),
    ("sparse", {"epochs": 1}),
    ("kd", {}),
]

#: Cases whose ops all run on tensors without data (``meta``); see the module's docstring.
ON_META = [
    ("prune", {"amount": 0.5}),
    ("prune", {"amount": 0.5, "importance": "random"}),
    ("gradual", {"amount": 0.5}),
    ("quant", {"bits": 4}),
    ("quant", {"bits": "ternary"}),
    ("quant", {"bits": 1, "mode": "ptq"}),
    ("lowrank", {"keep": 0.5}),
    ("kd", {}),
]


def _devices(model: nn.Module) -> set[torch.device]:
    """Devices of every parameter and buffer (parametrizations' originals and state too)."""
    return {t.device for t in [*model.parameters(), *model.buffers()]}


def _compress(name: str, params: dict, model: nn.Module, ctx: CompressionContext) -> nn.Module:
    compressors = [get_compressor(name)(**params)]
    model = apply_pipeline(compressors, model, ctx)
    for compressor in compressors:  # one fine-tuning epoch's schedule step
        compressor.on_epoch(model, 0, 2)
    return finalize_pipeline(compressors, model, ctx)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(("name", "params"), CASES, ids=lambda v: str(v))
def test_compressors_make_no_tensor_off_the_models_device(name, params, kind):
    """With the default device ``meta``, every tensor a compressor makes without naming a
    device would be on ``meta``: the CPU model's tensors all stay on the CPU, and it runs."""
    build, sample = MODELS[kind]
    ctx = _context(sample)
    model = build()
    with torch.device("meta"):
        compressed = _compress(name, params, model, ctx)
    assert _devices(compressed) == {torch.device("cpu")}
    with torch.no_grad():
        assert compressed(ctx.example_inputs).shape == (4, 3)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(("name", "params"), ON_META, ids=lambda v: str(v))
def test_compressors_keep_a_meta_model_on_meta(name, params, kind):
    """A model on ``meta`` stays there through compress and finalize (no ``.cpu()`` round trip,
    nothing made on the CPU)."""
    build, sample = MODELS[kind]
    ctx = _context(sample)
    model = build().to("meta")
    compressed = _compress(name, params, model, ctx)
    assert _devices(compressed) == {torch.device("meta")}
