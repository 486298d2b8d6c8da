"""After a sweep: the table says what to do next, the commands it prints work, and the UIs people
open (MLflow, optuna-dashboard) show the study by name. One tiny sweep through the command line,
its output captured as a pipe would (not a terminal)."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import subprocess
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.cli import main
from search.config.compose import CONF_DIR
from search.config.storage import open_storage
from search.results.reuse import RECOMMEND_MAX_DROP, pick_trial
from tests.conftest import sweep_overrides


@contextlib.contextmanager
def _in(folder):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _squeeze(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """A 4-trial sweep run by `squeeze sweep` in a fresh working folder."""
    work = tmp_path_factory.mktemp("next")
    overrides = sweep_overrides(work, cache_dir, "search.n_trials=4")
    with _in(work):
        code, out, _ = _squeeze(["sweep", "--quiet", *overrides])
    assert code == 0, out
    study = optuna.load_study(
        study_name="digits_mlp", storage=open_storage(f"{work}/optuna.journal")
    )
    return work, overrides, out, study


def _recommended(out: str) -> tuple[int, list[str]]:
    """The recommended trial and the command lines printed under it."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("* recommended: trial "))
    trial = int(lines[start].removeprefix("* recommended: trial ").split()[0])
    return trial, [line.strip() for line in lines[start + 1 : start + 3]]


def test_the_table_keeps_every_recipe_whole_and_marks_the_recommended_point(sweep):
    _, overrides, out, study = sweep
    trial, commands = _recommended(out)
    assert trial == pick_trial(study, "knee", max_drop=RECOMMEND_MAX_DROP).number
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 8 and cells[1].removeprefix("* ").isdigit():
            rows[int(cells[1].removeprefix("* "))] = cells
    assert set(rows) == {t.number for t in study.best_trials}
    for number, cells in rows.items():
        recipe = cells[8].split(" ")  # on its line: never folded when stdout is not a terminal
        for key, value in study.trials[number].params.items():
            shown = f"{value:.3g}" if isinstance(value, float) else str(value)
            assert f"{key}={shown}" in recipe
        assert "finetune.epochs=2" in recipe  # fixed values too: the whole recipe
        assert cells[1].startswith("* ") == (number == trial)
        change = cells[6]  # "val change": negative is a loss
        metrics = study.trials[number].user_attrs["metrics"]
        loss = 100 * (study.user_attrs["baseline"]["val_acc"] - metrics["val_acc"])
        assert change == ("0.0 pt" if abs(loss) < 0.05 else f"{-loss:+.1f} pt")
    assert "val change" in out and "negative: a loss" in out and "val drop" not in out
    where = ("search.storage", "tracking.", "cache_dir", "output_dir")  # not space.*, threads
    where = [o for o in overrides if o.startswith(where)]
    assert len(where) == 4
    assert commands == [
        shlex.join(
            ["squeeze", "export", "--study", "digits_mlp", "--pick", f"trial={trial}", *where]
        ),
        shlex.join(["squeeze", "run", f"experiment=digits_mlp-t{trial}", *where]),
    ]


def test_mlflow_and_optuna_dashboard_show_the_study_by_name(sweep):
    work, _, _, study = sweep
    assert study.metric_names == ["val_acc", "size_bytes"]  # not "Objective 0/1"
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("squeeze")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`squeeze.trial` != ''"
    )
    assert sorted(r.info.run_name for r in runs) == [f"digits_mlp-t{n:04d}" for n in range(4)]
    front = {t.number for t in study.best_trials}
    for run in runs:
        on_front = int(run.data.tags["squeeze.trial"]) in front
        assert (run.data.tags.get("pareto") == "true") == on_front
        note = run.data.tags.get("mlflow.note.content", "")
        assert note.startswith("On the Pareto front of study `digits_mlp`") == on_front


@pytest.mark.slow  # (over 6 s on 2 cores: the slow lane runs it)
def test_the_printed_commands_export_into_this_folder_and_run_it(sweep):
    work, _, out, study = sweep
    trial, (export, run) = _recommended(out)
    source = CONF_DIR.parent
    status = ["git", "-C", str(source), "status", "--porcelain", "--", "conf"]
    git = subprocess.run(status, capture_output=True, text=True, check=False)
    before = set(CONF_DIR.glob("experiment/*"))
    with _in(work):
        code, said, _ = _squeeze(shlex.split(export)[1:])
        assert code == 0
        path = Path.cwd() / "conf" / "experiment" / f"digits_mlp-t{trial}.yaml"
        assert path.exists() and f"wrote {path}" in said
        assert "squeeze run experiment=digits_mlp-t" in said
        path.write_text(path.read_text() + "# a note of mine\n")
        code, _, err = _squeeze(shlex.split(export)[1:])  # never over an existing file
        assert code == 2 and f"{path} already exists" in err and "with --force" in err
        assert path.read_text().endswith("# a note of mine\n")
        code, _, _ = _squeeze([*shlex.split(export)[1:], "--force"])
        assert code == 0 and "# a note of mine" not in path.read_text()
        code, said, _ = _squeeze(shlex.split(run)[1:])  # finds ./conf/experiment
    assert code == 0
    metrics = study.trials[trial].user_attrs["metrics"]
    assert f"val_acc            {metrics['val_acc']:g}  (= the trial's)" in said
    assert set(CONF_DIR.glob("experiment/*")) == before  # nothing written into the project
    if git.returncode == 0:  # a checkout: its conf/ is as it was
        after = subprocess.run(status, capture_output=True, text=True, check=False)
        assert after.stdout == git.stdout
