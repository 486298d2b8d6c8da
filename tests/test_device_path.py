"""Every phase on the trial's device: compressors keep a model's tensors where they are; and
fewer copies: a trial copies the baseline once, a sweep builds its model once before training
and refuses one that its trials' copies would not fit in memory.

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

import copy
import dataclasses
from typing import NamedTuple

import pytest
import torch
from torch import nn

import experiments._baseline
import search.run.study
from compressors import (
    CompressionContext,
    apply_pipeline,
    finalize_pipeline,
    get_compressor,
)
from compressors._device import model_device
from experiments import build_fresh, check_workload, load_or_train_baseline
from search import compose_config
from search._errors import ConfigError
from search.cli import main
from search.config.plan import plan_sweep
from search.config.space import Recipe
from search.run.study import checked_task
from search.run.trial import compress_recipe
from search.run.workload import available_memory_bytes, check_memory, load_workload


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


# --- Fewer copies: the baseline is deep-copied once per trial, the model built once ---------


class _Space:
    """The part of a search space `compress_recipe` uses: building the recipe's compressors."""

    def build(self, recipe: Recipe) -> list:
        return [get_compressor(n)(**recipe.compressors[n]) for n in recipe.pipeline]


def _recipe(**compressors: dict) -> Recipe:
    finetune = {"epochs": 1, "batch_size": 64, "lr": 1e-3, "schedule": "constant"}
    return Recipe(tuple(compressors), dict(compressors), finetune, {})


class _CopyCounter:
    """Counts top-level deep copies of modules (not the copies of their parts)."""

    def __init__(self, monkeypatch) -> None:
        self.modules: list[nn.Module] = []
        self._inside = False
        original = copy.deepcopy

        def counting(x, memo=None, _nil=None):
            if self._inside or not isinstance(x, nn.Module):
                return original(x, memo) if _nil is None else original(x, memo, _nil)
            self._inside = True
            try:
                self.modules.append(x)
                return original(x, memo)
            finally:
                self._inside = False

        monkeypatch.setattr(copy, "deepcopy", counting)


@pytest.mark.parametrize(
    ("compressors", "copies"),
    [
        ({"prune": {"amount": 0.5}}, 1),  # nothing changes at finalize: the model itself
        ({"quant": {"bits": 4, "mode": "ptq"}}, 2),  # post-training quantization: on a copy
    ],
)
def test_a_trial_copies_the_baseline_once_and_the_estimate_only_when_it_must(
    digits_task, digits_baseline, monkeypatch, compressors, copies
):
    seen = []

    def on_compressed(model: nn.Module) -> None:  # what the early-stop estimate gets
        seen.append((_devices(model), len(counter.modules)))

    counter = _CopyCounter(monkeypatch)
    model, _ = compress_recipe(
        _recipe(**compressors),
        _Space(),
        digits_task,
        digits_baseline,
        seed=0,
        on_compressed=on_compressed,
    )
    assert counter.modules[0] is digits_baseline.model
    assert len(counter.modules) == copies
    assert seen == [({torch.device("cpu")}, copies)]  # on the CPU, for the packer
    assert _devices(model) == {torch.device("cpu")}


def test_the_estimate_leaves_the_model_it_reads_as_it_was(digits_task, digits_baseline):
    """Without a copy, the estimate reads the trial's own model: fine-tuning then starts from
    the same weights as with a copy."""
    with_copy, plain = [], []
    for out, flag in ((with_copy, True), (plain, False)):
        model, _ = compress_recipe(
            _recipe(prune={"amount": 0.5}),
            _Space(),
            digits_task,
            digits_baseline,
            seed=0,
            on_compressed=(lambda m: None) if flag else None,
        )
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    assert with_copy[0].keys() == plain[0].keys()
    assert all(torch.equal(with_copy[0][k], plain[0][k]) for k in plain[0])


def test_a_model_larger_than_the_memory_left_is_refused_with_its_size():
    model = nn.Linear(1000, 1000)  # 1,001,000 parameters, 3.8 MiB
    with pytest.raises(ConfigError) as err:
        check_memory("big", model, available=(10 * 2**20, "MemAvailable in /proc/meminfo"))
    message = str(err.value)
    assert "1,001,000 parameters (3.8 MiB" in message
    assert "22.9 MiB" in message  # 6 copies
    assert "10.0 MiB of memory available (MemAvailable in /proc/meminfo)" in message
    check_memory("big", model, available=(2**30, "test"))  # fits
    with pytest.raises(ConfigError, match="x 4 workers"):
        check_memory("big", model, workers=4, available=(50 * 2**20, "test"))


def test_available_memory_is_read_from_the_machine():
    found = available_memory_bytes()
    assert found is None or (found[0] > 0 and found[1])


def test_a_sweep_refuses_a_model_too_large_before_anything_is_made(
    tmp_path, cache_dir, monkeypatch, capsys
):
    monkeypatch.setattr(
        "search.run.workload.available_memory_bytes", lambda: (2**20, "MemAvailable (test)")
    )
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    assert main(["sweep", "--quiet", f"cache_dir={cache}", f"output_dir={tmp_path}/out"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "1.0 MiB of memory available (MemAvailable (test))" in err
    assert not cache.exists()  # no baseline trained


def _builds(monkeypatch) -> list[str]:
    """Records each model the task of `checked_task` builds, and when training starts."""
    events: list[str] = []
    build_task = search.run.study.build_task

    def counted_task(plan):
        task = build_task(plan)

        def build():
            events.append("build")
            return task.build_model()

        return dataclasses.replace(task, build_model=build)

    monkeypatch.setattr(search.run.study, "build_task", counted_task)
    fit = experiments._baseline.fit

    def training(*args, **kwargs):
        events.append("fit")
        return fit(*args, **kwargs)

    monkeypatch.setattr(experiments._baseline, "fit", training)
    return events


def test_the_checked_model_is_the_one_trained_and_the_one_loaded(tmp_path, monkeypatch):
    cfg = compose_config([f"cache_dir={tmp_path}/cache", "task.train.epochs=1", "threads=auto"])
    plan = plan_sweep(cfg, connect=False)
    events = _builds(monkeypatch)
    task, fresh = checked_task(plan)
    load_workload(cfg, plan=plan, task=task, fresh=fresh)
    assert events[: events.index("fit")] == ["build"]  # one model before training
    events.clear()
    task, fresh = checked_task(plan)
    again = load_workload(cfg, plan=plan, task=task, fresh=fresh)
    assert events == ["build"]  # the cached baseline is loaded into the checked model
    assert again.baseline.model is fresh.model


def test_training_the_checked_model_gives_the_baseline_a_model_built_for_it_gives(
    digits_task, tmp_path
):
    config = {"name": "digits_mlp", "hidden": [300, 100], "train": {"epochs": 2}}
    fresh = build_fresh(digits_task, 0)
    check_workload(digits_task, fresh.model)  # what checked_task runs on it
    torch.manual_seed(123)  # whatever happened to the random state in between
    checked = load_or_train_baseline(
        digits_task, config=config, cache_dir=tmp_path / "a", seed=0, fresh=fresh
    )
    built = load_or_train_baseline(digits_task, config=config, cache_dir=tmp_path / "b", seed=0)
    mine, theirs = checked.model.state_dict(), built.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
