"""Bring your own model: README's example task, written to a config folder of its own, sweeps."""

from __future__ import annotations

import re
from pathlib import Path

import optuna

from search.cli import main
from tests.conftest import sweep_overrides

README = Path(__file__).resolve().parent.parent / "README.md"


def _example_files() -> dict[str, str]:
    """README's ``<!-- byo: path -->`` blocks, by path."""
    blocks = re.findall(r"<!-- byo: (\S+) -->\n```\w*\n(.*?)```", README.read_text(), re.DOTALL)
    return dict(blocks)


def test_readme_example_task_in_its_own_config_dir_runs_a_three_trial_sweep(
    tmp_path, cache_dir, monkeypatch
):
    files = _example_files()
    assert set(files) == {"my_task.py", "my_conf/task/blobs.yaml"}
    user = tmp_path / "user"
    for name, text in files.items():
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(text)
    monkeypatch.syspath_prepend(str(user))
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=3")
    code = main(
        ["sweep", "--quiet", "--config-dir", str(user / "my_conf"), "task=blobs", *overrides]
    )
    assert code == 0
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


def test_an_own_task_whose_target_cannot_be_imported_is_reported(tmp_path, capsys):
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "mine.yaml").write_text("_target_: nowhere.build\nname: mine\n")
    assert main(["sweep", "--config-dir", str(tmp_path), "task=mine"]) == 2
    assert "task._target_ 'nowhere.build' cannot be imported" in capsys.readouterr().err
