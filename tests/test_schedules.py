"""Gradual pruning during fine-tuning, and L1 sparse training before pruning."""

from __future__ import annotations

import copy

import pytest
import torch

from compressors import CompressionContext, apply_pipeline, finalize_pipeline, get_compressor
from compressors._targets import weight_layers
from compressors.gradual import cubic_schedule
from compressors.packing import plain_state
from experiments import evaluate, fit
from search.run.trial import compression_context


def _sparsity(model):
    state, _ = plain_state(model)
    weights = torch.cat([state[f"{n}.weight"].flatten() for n in weight_layers(model)])
    return (weights == 0).float().mean().item()


def test_cubic_schedule_rises_fast_then_slow_to_the_target():
    values = [cubic_schedule(0.8, t / 10) for t in range(11)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.8)
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert all(s > 0 for s in steps) and steps == sorted(steps, reverse=True)
    assert cubic_schedule(0.8, 2.0) == pytest.approx(0.8)


def test_gradual_pruning_raises_sparsity_each_epoch_and_keeps_pruned_weights(
    digits_task, digits_baseline
):
    gradual = get_compressor("gradual")(amount=0.9, end=0.5)
    ctx = CompressionContext(train=digits_task.train, seed=0)
    model = apply_pipeline([gradual], copy.deepcopy(digits_baseline.model), ctx)
    assert _sparsity(model) == 0.0
    seen, pruned = [], None

    def after(_stats):
        nonlocal pruned
        seen.append(_sparsity(model))
        state, _ = plain_state(model)
        now = {n: state[f"{n}.weight"] == 0 for n in weight_layers(model)}
        if pruned is not None:
            assert all(torch.all(now[n][pruned[n]]) for n in now)  # pruned weights stay zero
        pruned = now

    fit(
        model,
        digits_task.train,
        epochs=8,
        batch_size=64,
        lr=1e-3,
        before_epoch=lambda e, n: gradual.on_epoch(model, e, n),
        after_epoch=after,
    )
    assert seen[0] == pytest.approx(cubic_schedule(0.9, 0.25), abs=1e-4)
    assert seen[:4] == sorted(seen[:4]) and len(set(seen[:4])) == 4
    assert seen[3:] == pytest.approx([0.9] * 5, abs=1e-4)  # final amount from epoch end*8 - 1
    model = finalize_pipeline([gradual], model, ctx)
    assert _sparsity(model) == pytest.approx(0.9, abs=1e-4)
    assert evaluate(model, digits_task.val) > 0.9


def test_gradual_pruning_without_fine_tuning_prunes_at_once(digits_baseline):
    gradual = get_compressor("gradual")(amount=0.6)
    ctx = CompressionContext(seed=0)
    model = apply_pipeline([gradual], copy.deepcopy(digits_baseline.model), ctx)
    model = finalize_pipeline([gradual], model, ctx)
    assert _sparsity(model) == pytest.approx(0.6, abs=1e-4)


def test_l1_sparse_training_makes_weights_small_before_pruning(digits_task, digits_baseline):
    ctx = compression_context(digits_task, digits_baseline, seed=0)
    l1 = get_compressor("sparse")(strength=3e-4, epochs=5)
    plain = get_compressor("sparse")(strength=1e-12, epochs=5)  # the same training, no penalty
    tiny = {}
    for name, compressor in (("l1", l1), ("plain", plain)):
        model = compressor.compress(copy.deepcopy(digits_baseline.model), ctx)
        weights = torch.cat(
            [
                layer.weight.detach().flatten()
                for layer in model.modules()
                if isinstance(layer, torch.nn.Linear)
            ]
        )
        tiny[name] = (weights.abs() < 1e-3).float().mean().item()
        if name == "l1":
            assert evaluate(model, digits_task.val) > 0.9
    assert tiny["l1"] > 2 * tiny["plain"], tiny
