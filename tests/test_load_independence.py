"""Results do not depend on the machine's load: ``threads: auto`` decides without reading a clock,
so one config and seed give the same baseline and the same trials on a quiet machine and on one
whose cores are all busy."""

from __future__ import annotations

import multiprocessing
import os
import time

import optuna
import pytest
import torch

from search import compose_config, run_sweep
from search.config.storage import open_storage
from tests.conftest import sweep_overrides

pytestmark = pytest.mark.slow


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds  # bounded: it stops by itself
    while time.monotonic() < end:
        pass


def _sweep(folder, cache) -> optuna.Study:
    folder.mkdir(parents=True)
    overrides = [o for o in sweep_overrides(folder, cache) if not o.startswith("threads")]
    threads = torch.get_num_threads()
    try:
        run_sweep(compose_config([*overrides, "search.n_trials=2", "threads=auto"]))
    finally:
        torch.set_num_threads(threads)
    return optuna.load_study(
        study_name="digits_mlp", storage=open_storage(f"{folder}/optuna.journal")
    )


def test_the_same_seed_gives_the_same_numbers_on_a_quiet_and_a_busy_machine(tmp_path):
    quiet = _sweep(tmp_path / "quiet", tmp_path / "quiet-cache")  # each trains its own baseline
    busy_loops = [
        multiprocessing.get_context("spawn").Process(target=_spin, args=(600.0,), daemon=True)
        for _ in range(2 * (os.cpu_count() or 1))  # every core busy twice over
    ]
    for loop in busy_loops:
        loop.start()
    try:
        busy = _sweep(tmp_path / "busy", tmp_path / "busy-cache")
    finally:
        for loop in busy_loops:
            loop.terminate()
            loop.join()
    assert quiet.user_attrs["threads"] == busy.user_attrs["threads"]
    assert quiet.user_attrs["baseline"]["val_acc"] == busy.user_attrs["baseline"]["val_acc"]
    measured = ("val_acc", "size_bytes", "test_acc", "flops")
    for a, b in zip(quiet.trials, busy.trials, strict=True):
        assert a.params == b.params
        assert a.values == b.values
        assert {k: a.user_attrs["metrics"].get(k) for k in measured} == {
            k: b.user_attrs["metrics"].get(k) for k in measured
        }
