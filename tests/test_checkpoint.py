"""Pretrained baselines: a user's checkpoint is loaded (safetensors, a weights-only state dict, a
Hugging Face folder), evaluated, cached by its hash and never trained; nothing unpickles code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from experiments import (
    WorkloadError,
    checkpoint_digest,
    evaluate,
    load_checkpoint,
    load_or_train_baseline,
)
from experiments.digits import digits_mlp
from search.cli import main
from tests.conftest import sweep_overrides
from tests.zoo.workloads import tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def test_each_kind_of_checkpoint_loads_the_same_weights(digits_baseline, tmp_path):
    state = _state(digits_baseline.model)
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3},
        tmp_path / "lightning.ckpt",
    )  # a Lightning checkpoint: prefixed names
    for name in ("w.safetensors", "w.pt", "lightning.ckpt"):
        model = digits_mlp(seed=0, hidden=[300, 100]).build_model()
        load_checkpoint(model, tmp_path / name)
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), (name, key)


def test_a_hugging_face_folder_loads_with_its_tied_weights(tmp_path):
    torch.manual_seed(0)
    saved = tiny_bert()
    saved.save_pretrained(tmp_path / "bert")
    torch.manual_seed(1)
    model = tiny_bert()
    load_checkpoint(model, tmp_path / "bert")
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved.state_dict()[key]), key


def test_a_checkpoint_that_would_run_code_or_does_not_fit_is_refused(tmp_path):
    model = nn.Linear(4, 2)
    torch.save(nn.Linear(4, 2), tmp_path / "module.pt")  # a pickled module: code, not weights
    with pytest.raises(WorkloadError, match="cannot be read as weights only"):
        load_checkpoint(model, tmp_path / "module.pt")
    save_file({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, tmp_path / "w.safetensors")
    with pytest.raises(
        WorkloadError, match=r"shapes differ for .*weight \(3, 4\) \(model: \(2, 4\)\)"
    ):
        load_checkpoint(model, tmp_path / "w.safetensors")
    save_file({"weight": torch.zeros(2, 4)}, tmp_path / "half.safetensors")
    with pytest.raises(WorkloadError, match=r"missing \['bias'\]"):
        load_checkpoint(model, tmp_path / "half.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WorkloadError, match="a checkpoint is a .safetensors file"):
        load_checkpoint(model, tmp_path / "notes.txt")


def test_the_baseline_is_the_checkpoint_evaluated_not_trained_and_keyed_by_its_hash(
    digits_baseline, tmp_path
):
    task = digits_mlp(seed=0, hidden=[300, 100], train={"epochs": 40})
    path = tmp_path / "pretrained.safetensors"
    save_file(_state(digits_baseline.model), path)
    config = {"name": "digits_mlp", "hidden": [300, 100]}
    baseline = load_or_train_baseline(
        task, config=config, cache_dir=tmp_path / "cache", seed=0, checkpoint=path
    )
    for key, value in baseline.model.state_dict().items():
        assert torch.equal(value, digits_baseline.model.state_dict()[key])
    assert baseline.metrics["val_acc"] == evaluate(digits_baseline.model, task.val)
    assert json.loads((baseline.folder / "metrics.json").read_text())["val_acc"] > 0.9
    # another checkpoint (one weight changed) is another baseline
    state = _state(digits_baseline.model)
    state["net.1.weight"][0, 0] += 1.0
    other = tmp_path / "other.safetensors"
    save_file(state, other)
    assert checkpoint_digest(other) != checkpoint_digest(path)
    again = load_or_train_baseline(
        task, config=config, cache_dir=tmp_path / "cache", seed=0, checkpoint=other
    )
    assert again.folder != baseline.folder and not again.from_cache


def test_a_sweep_from_a_checkpoint_and_bad_checkpoints_exit_2(
    digits_baseline, tmp_path, cache_dir, capsys
):
    path = tmp_path / "pretrained.safetensors"
    save_file(_state(digits_baseline.model), path)
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=1", f"checkpoint={path}")
    assert main(["sweep", "task=digits_mlp", *overrides]) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint={path}" in printed.split("squeeze run", 1)[1]  # run uses it too
    for bad, message in (
        (tmp_path / "nowhere.safetensors", "does not exist"),
        (tmp_path / "wrong.safetensors", "does not fit the task's model"),
    ):
        if bad.name == "wrong.safetensors":
            save_file({"net.1.weight": torch.zeros(3, 3)}, bad)
        run = tmp_path / bad.stem
        run.mkdir()
        overrides = sweep_overrides(run, cache_dir, "search.n_trials=1", f"checkpoint={bad}")
        assert main(["sweep", "--quiet", "task=digits_mlp", *overrides]) == 2
        assert message in capsys.readouterr().err
        assert not Path(run / "optuna.journal").exists()
