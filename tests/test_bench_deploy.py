"""`bench/deploy.py`: every task's latency sweep, the zoo's families among them, composes and
passes the checks a sweep runs before any work (its space on the task's own model)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from search import plan_sweep
from search.config.blocks import cpu_block

_PATH = Path(__file__).resolve().parents[1] / "bench" / "deploy.py"
_SPEC = importlib.util.spec_from_file_location("bench_deploy", _PATH)
deploy = sys.modules.setdefault("bench_deploy", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(deploy)


def test_the_zoo_has_every_family():
    assert set(deploy.ZOO) == {
        "zoo_resnet",
        "zoo_mobilenet",
        "zoo_transformer",
        "zoo_lstm",
        "zoo_gru",
    }
    assert set(deploy.SPACES) == set(deploy.LARGE) == set(deploy.TRIALS)


@pytest.mark.parametrize("name", sorted(deploy.ZOO))
def test_a_zoo_familys_latency_sweep_plans_on_its_model(name, tmp_path):
    (tmp_path / name).mkdir()
    cfg = deploy.sweep_config(name, root=tmp_path, trials=2)
    plan = plan_sweep(cfg, connect=False)
    assert plan.objectives == ("val_acc", "speedup_b32")
    assert list(cfg.measure.latency_batch_sizes) == [1, 32]
    assert cfg.measure.runtime == "onnxruntime"
    task = plan.task_builder(**plan.task_kwargs)
    assert task.name == name
    plan.space.check_model(task.build_model(), task=name, example_inputs=task.example_inputs())
    quant = plan.space.values("quant")
    assert quant["quant.bits"] == 8


def test_overrides_come_after_the_tasks_space(tmp_path):
    (tmp_path / "zoo_mobilenet").mkdir()
    extra = ("space.structured.amount=interval(0.1, 0.5)",)
    cfg = deploy.sweep_config("zoo_mobilenet", root=tmp_path, trials=2, extra=extra)
    structured = plan_sweep(cfg, connect=False).space.values("structured")
    amount = structured["structured.amount"]
    assert (amount.low, amount.high) == (0.1, 0.5)
    # (the product's auto: the CPU's NCHWc block, 8 channels with AVX2, 16 with AVX-512)
    assert structured["structured.round_to"] == cpu_block().value


@pytest.mark.parametrize("name", ["zoo_resnet", "zoo_mobilenet", "digits_mlp", "mnist1d_cnn"])
def test_the_latency_sweeps_keep_the_cpus_channel_block(name, tmp_path):
    # (8 channels with AVX2, 16 with AVX-512: on a Zen 1 EPYC the ResNet's best point at
    # round_to=16 ran 1.22-1.25x at batch 32, at round_to=8 2.17x)
    (tmp_path / name).mkdir()
    cfg = deploy.sweep_config(name, root=tmp_path, trials=2)
    structured = plan_sweep(cfg, connect=False).space.values("structured")
    assert structured["structured.round_to"] == cpu_block().value
    if name.startswith("zoo_"):
        assert structured["structured.amount"].high == 0.8


class _Waits(torch.nn.Module):
    """A forward that waits 20 ms for something other than a core (as one waits for a core on a
    loaded machine): 20 ms of wall time, next to none of the thread's CPU time."""

    def forward(self, x):
        time.sleep(0.02)
        return x


def test_the_re_timing_leaves_out_waits_on_one_thread():
    # (the sweep times its trials in the thread's CPU time on one thread; the bench's re-timing
    # of the front on the wall clock counted a loaded machine's waits for a core)
    sys.path.insert(0, str(_PATH.parent))
    from _common import side_by_side

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, base_ms, ms = side_by_side(
            torch.nn.Identity(), _Waits(), torch.zeros(1), rounds=1, repeats=3
        )
    finally:
        torch.set_num_threads(threads)
    assert ms < 10.0  # (wall time: 20 ms or more)
