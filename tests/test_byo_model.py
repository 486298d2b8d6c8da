"""Bring your own model: README's example task, written to a folder of its own beside its config
folder, sweeps without ``PYTHONPATH``; the commands the sweep prints work when pasted; a
convolutional task of one's own reruns exactly; its registered model loads where its module is
importable."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from search import ConfigError, load_registered
from search.cli import main
from search.config import modules
from tests.conftest import sweep_overrides

README = Path(__file__).resolve().parent.parent / "README.md"


def _example_files() -> dict[str, str]:
    """README's ``<!-- byo: path -->`` blocks, by path."""
    blocks = re.findall(r"<!-- byo: (\S+) -->\n```\w*\n(.*?)```", README.read_text(), re.DOTALL)
    return dict(blocks)


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _forget(folder: Path) -> None:
    """Leave this process as a new one finds it: the modules imported from ``folder`` and the
    folder's place on sys.path (which squeeze appended) forgotten, no config folder composed."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != folder.resolve()]
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(folder)):
            del sys.modules[name]
    modules.use_config_dirs(())


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user's folder (the current directory), not on sys.path; forgotten afterwards."""
    folder = tmp_path / "user"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert all(Path(p or ".").resolve() != folder for p in sys.path)
    yield folder
    _forget(folder)


def _without(overrides: list[str], *dropped: str) -> list[str]:
    return [o for o in overrides if o not in dropped]


def _pasted(out: str) -> list[list[str]]:
    """The ``squeeze ...`` command lines a command printed, as argv after ``squeeze``."""
    lines = [line.strip() for line in out.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("squeeze ")]


@pytest.mark.slow  # (over 6 s on 2 cores: the slow lane runs it)
def test_readme_example_sweeps_without_pythonpath_and_its_printed_commands_work_pasted(
    user, tmp_path, cache_dir, capsys
):
    files = _example_files()
    assert set(files) == {"my_task.py", "my_conf/task/blobs.yaml"}
    _write(user, files)
    readme = README.read_text()
    assert "squeeze sweep --config-dir my_conf task=blobs" in readme
    assert "PYTHONPATH=. squeeze" not in readme
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=3")
    code = main(["sweep", "--config-dir", "my_conf", "task=blobs", *overrides])  # as README
    assert code == 0
    out = capsys.readouterr().out
    study = optuna.load_study(
        study_name="blobs",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(f"{tmp_path}/optuna.journal")
        ),
    )
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(t.user_attrs["metrics"]["val_acc"] > 0.5 for t in trials)
    assert (tmp_path / "trials" / "blobs" / "pareto.csv").exists()

    # The recommended trial's commands, pasted in the same folder by a new process.
    export, run = _pasted(out)
    assert export[:2] == ["export", "--study"] and run[:2] == ["run", run[1]]
    assert export[export.index("--config-dir") + 1] == "my_conf"  # relative, as it was given
    _forget(user)
    assert main(export) == 0
    written = Path(re.search(r"wrote (\S+);", capsys.readouterr().out).group(1))
    assert written.resolve().parent == user / "my_conf" / "experiment"
    header = written.read_text().splitlines()[3]
    assert header == "# Rerun it: " + shlex.join(["squeeze", *run])  # the file's own command
    _forget(user)
    assert main(run) == 0
    assert capsys.readouterr().out.count("(= the trial's)") == 2  # size_bytes and val_acc


def test_an_own_task_whose_module_cannot_be_found_names_it_and_the_folders_searched(user, capsys):
    (user / "conf" / "task").mkdir(parents=True)
    (user / "conf" / "task" / "mine.yaml").write_text("_target_: nowhere.build\nname: mine\n")
    assert main(["sweep", "--config-dir", "conf", "task=mine"]) == 2
    err = capsys.readouterr().err
    assert "task._target_ 'nowhere.build' cannot be imported: no module named 'nowhere'" in err
    assert str(user) in err and "PYTHONPATH" in err and "nowhere.py" in err


def test_an_own_module_that_fails_to_import_or_lacks_the_function_says_so(user, capsys):
    (user / "conf" / "task").mkdir(parents=True)
    (user / "conf" / "task" / "mine.yaml").write_text("_target_: broken.build\nname: mine\n")
    (user / "broken.py").write_text("import not_installed_anywhere\n")
    assert main(["inspect", "--config-dir", "conf", "task=mine"]) == 2
    err = capsys.readouterr().err
    assert "importing module 'broken' raised ModuleNotFoundError" in err
    assert "not_installed_anywhere" in err
    _forget(user)
    (user / "broken.py").write_text("def other(): ...\n")
    assert main(["inspect", "--config-dir", "conf", "task=mine"]) == 2
    assert "has no attribute 'build'" in capsys.readouterr().err


def test_an_own_task_function_that_raises_names_where_before_anything_is_created(user, capsys):
    """A task function of one's own that fails (a Task missing an argument) is a config error
    naming the function, the error, its file and line and the yaml's keys: exit 2, no study."""
    (user / "conf" / "task").mkdir(parents=True)
    (user / "conf" / "task" / "mine.yaml").write_text("_target_: faulty.build\nname: mine\n")
    (user / "faulty.py").write_text(
        "from experiments import Task\n\n\n"
        "def build(*, name, seed=0):\n"
        "    return Task(name=name)\n"
    )
    assert main(["sweep", "--config-dir", "conf", "task=mine"]) == 2
    err = capsys.readouterr().err
    assert "task._target_ faulty.build raised TypeError" in err and "num_classes" in err
    assert f"{user / 'faulty.py'}:5, in build" in err and "yaml's keys (name, seed)" in err
    assert "Traceback" not in err
    assert not (user / "optuna.journal").exists() and not (user / "mlflow.db").exists()


NAN_TASK = """
import torch
from torch import nn
from experiments import Split, Task, TrainConfig


def build(*, name, seed=0, lr=0.01):
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    x[37, 1] = float("nan")  # one missing value in the training data
    return Task(name=name, train=Split(x, y), val=Split(x[:8], y[:8]), test=Split(x[:8], y[:8]),
                num_classes=2,
                build_model=lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                train_config=TrainConfig(epochs=1, batch_size=16, lr=lr))
"""


def test_a_baseline_whose_loss_turns_nan_stops_saying_where_and_why(
    user, tmp_path, cache_dir, capsys
):
    """Data with a NaN: the baseline's training stops with exit 1, naming the epoch, the batch
    and the NaN in its data (no traceback)."""
    (user / "conf" / "task").mkdir(parents=True)
    (user / "conf" / "task" / "holes.yaml").write_text("_target_: holes.build\nname: holes\n")
    (user / "holes.py").write_text(NAN_TASK)
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=1", space=None)
    assert main(["sweep", "--config-dir", "conf", "task=holes", *overrides]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "the baseline of task 'holes' (seed 0) cannot be trained: training loss became nan" in err
    )
    assert "in epoch 0, batch" in err and "hold 1 NaN or infinite values; clean the data" in err
    assert "Traceback" not in err


#: A convolutional task of one's own: its training's float sums depend on torch's thread count.
CONV_TASK = '''
"""my_convnet.py: a small Conv2d model on generated 8x8 images."""

from functools import partial

import numpy as np
import torch
from torch import nn

from experiments import Split, Task, TrainConfig


class ConvNet(nn.Module):
    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels * 16, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x.view(-1, 1, 8, 8)))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def shapes(*, name="shapes", seed=0, samples=600, channels=8, train=None) -> Task:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=samples)
    x = (rng.normal(size=(4, 64))[labels] + 1.5 * rng.normal(size=(samples, 64))).astype("float32")
    cut = [0, int(0.6 * samples), int(0.8 * samples), samples]
    splits = [
        Split(torch.from_numpy(x[a:b]), torch.from_numpy(labels[a:b])) for a, b in zip(cut, cut[1:])
    ]
    return Task(
        name=name, train=splits[0], val=splits[1], test=splits[2], num_classes=4,
        build_model=partial(ConvNet, channels, 4),
        train_config=TrainConfig(**(train or {"epochs": 3})),
    )
'''


@pytest.mark.slow  # (over 6 s on 2 cores: the slow lane runs it)
def test_a_conv_task_swept_with_auto_threads_reruns_exactly_and_loads_where_importable(
    user, tmp_path, cache_dir, capsys, monkeypatch
):
    _write(
        user,
        {
            "my_convnet.py": CONV_TASK,
            "conf/task/shapes.yaml": "_target_: my_convnet.shapes\nname: shapes\nchannels: 8\n",
        },
    )
    where = _without(sweep_overrides(tmp_path, cache_dir), "threads=1")
    overrides = [
        *where,
        "threads=auto",  # one thread for this small model
        "task=shapes",
        "search.n_trials=2",
        "search.sampler=random",
        "space.pipeline=[prune]",  # fp32 weights: a different float sum changes the file
    ]
    assert main(["sweep", "--quiet", "--config-dir", "conf", *overrides]) == 0
    capsys.readouterr()
    study = optuna.load_study(
        study_name="shapes",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(f"{tmp_path}/optuna.journal")
        ),
    )
    trial = study.trials[1]
    assert trial.user_attrs["threads"] == 1 and study.user_attrs["threads"] == 1
    where = [o for o in where if not o.startswith(("space", "measure"))]
    assert (
        main(["export", "--study", "shapes", "--pick", "trial=1", "--config-dir", "conf", *where])
        == 0
    )
    exported = yaml.safe_load((user / "conf" / "experiment" / "shapes-t1.yaml").read_text())
    assert exported["threads"] == 1 and exported["run"]["seed_trial"] == 1
    capsys.readouterr()

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's default on a machine of two cores or more
    try:
        assert main(["run", "experiment=shapes-t1", "--config-dir", "conf", *where]) == 0
    finally:
        torch.set_num_threads(threads)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version_by_alias("shapes-t1", "champion")
    metrics = client.get_run(version.run_id).data.metrics
    expected = trial.user_attrs["metrics"]
    assert metrics["size_bytes"] == expected["size_bytes"]
    assert metrics["val_acc"] == expected["val_acc"]
    shipped = tmp_path / "trials" / "runs" / "shapes-t1" / "model.sqz"
    assert shipped.read_bytes() == (tmp_path / "trials" / "shapes" / "trial-0001.sqz").read_bytes()

    # The registered model: from a folder where my_convnet cannot be imported, a message that
    # names it; from the user's folder, the model.
    _forget(user)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError) as err:
        load_registered("shapes-t1", tracking_uri=uri)
    message = str(err.value)
    assert "no module named 'my_convnet'" in message and str(elsewhere) in message
    assert "PYTHONPATH" in message and "my_convnet.py" in message
    monkeypatch.chdir(user)
    model = load_registered("shapes-t1", tracking_uri=uri)
    assert type(model).__name__ == "ConvNet"
    with torch.no_grad():
        assert model(torch.zeros(3, 64)).shape == (3, 4)


def test_readme_data_example_sweeps_with_its_dataset_metric_and_training_step(
    tmp_path, cache_dir, monkeypatch
):
    """README's second example (a Dataset with augmentation, dict batches and outputs,
    torchmetrics macro-F1, AdamW, a clipping training step), written as a user would."""
    blocks = re.findall(
        r"<!-- byo-data: (\S+) -->\n```\w*\n(.*?)```", README.read_text(), re.DOTALL
    )
    files = dict(blocks)
    assert set(files) == {"my_digits.py", "my_conf/task/digits_aug.yaml"}
    user = tmp_path / "user"
    for name, text in files.items():
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(text)
    monkeypatch.chdir(user)
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=2", "task.train.epochs=8")
    code = main(["sweep", "--quiet", "--config-dir", "my_conf", "task=digits_aug", *overrides])
    assert code == 0
    study = optuna.load_study(
        study_name="digits_aug",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(f"{tmp_path}/optuna.journal")
        ),
    )
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    assert all(t.user_attrs["metrics"]["val_acc"] > 0.5 for t in trials)  # macro-F1
