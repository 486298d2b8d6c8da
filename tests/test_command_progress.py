"""`squeeze run`, `report` and `explain` show their progress: bounded lines per phase where the
rate allows (``SQUEEZE_PROGRESS_S=0``), none where every phase is shorter than the rate."""

from __future__ import annotations

import logging
import re
from collections import Counter

import pytest

from search import compose_config
from search.cli import main
from search.results.reuse import export_trial
from search.run.logs import Stages, Ticker
from tests.conftest import structured_quant_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

#: A progress line: ``<job> <done>/<total>[ detail] (<time>)``; the job is what comes before.
PROGRESS = re.compile(r"^(?P<job>(run|report|explain)\b.*?) (?P<done>\d+)/(?P<total>\d+)\b.*\(\d")
NEVER = "3600"  # seconds between lines: every phase of these small commands is shorter


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stages_bound_each_stage_and_time_it_from_the_end_of_the_one_before(caplog):
    logger, clock = logging.getLogger("tests.stages"), _Clock()
    caplog.set_level(logging.INFO, logger="tests.stages")
    stages = Stages(logger, "run:", every=10.0, clock=clock)
    for epoch in range(1, 101):  # 100 epochs of 1 s: at most 10 lines, the last one the end
        clock.now += 1.0
        stages("baseline epochs", epoch, 100)
    for k in range(1, 4):  # 3 batches of teacher outputs in 0.3 s: nothing
        clock.now += 0.1
        stages("teacher outputs", k, 3)
    lines = [r.getMessage() for r in caplog.records]
    assert 1 < len(lines) <= Ticker.max_lines
    assert all(line.startswith("run: baseline epochs ") for line in lines)
    assert lines[-1] == "run: baseline epochs 100/100 (1 min 40 s)"

    caplog.clear()
    stages = Stages(logger, "report:", every=10.0, clock=clock)
    clock.now += 6.0  # the stage's first step counts: 2 steps of 6 s make a 12 s stage
    stages("baseline epochs", 1, 2)
    clock.now += 6.0
    stages("baseline epochs", 2, 2)
    assert [r.getMessage() for r in caplog.records] == ["report: baseline epochs 2/2 (12 s)"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """Two trials of structured 0.5 + 4-bit quantization on digits, three epochs each."""
    tmp_path = tmp_path_factory.mktemp("progress")
    overrides = structured_quant_overrides(tmp_path, cache_dir, "space.finetune.epochs=3")
    assert main(["sweep", "--quiet", *overrides]) == 0
    return tmp_path, overrides


def _progress(caplog, monkeypatch, every: str, argv: list[str]) -> list[tuple[str, int, int]]:
    """``(job, done, total)`` of each progress line ``squeeze <argv>`` logged."""
    monkeypatch.setenv("SQUEEZE_PROGRESS_S", every)
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert main(argv) == 0
    found = [PROGRESS.match(r.getMessage()) for r in caplog.records]
    return [(m["job"], int(m["done"]), int(m["total"])) for m in found if m]


def _check_bounded(lines: list[tuple[str, int, int]]) -> dict[str, list[int]]:
    """Steps shown per job; each job shows at most `Ticker.max_lines`, ending on its last."""
    jobs: dict[str, list[int]] = {}
    for job, done, total in lines:
        jobs.setdefault(job, []).append(done)
        assert done <= total
    for job, steps in jobs.items():
        assert len(steps) <= Ticker.max_lines and steps == sorted(set(steps)), (job, steps)
    assert max(Counter(job for job, _, _ in lines).values()) <= Ticker.max_lines
    return jobs


@pytest.mark.slow
def test_squeeze_run_shows_its_steps_epochs_and_explanation(sweep, tmp_path, caplog, monkeypatch):
    _, overrides = sweep
    conf = tmp_path / "conf"
    export_trial(compose_config(overrides), "digits_mlp", pick="trial=1", name="p1", conf_dir=conf)
    argv = ["run", "--config-dir", str(conf), "experiment=p1", *overrides]
    lines = _progress(caplog, monkeypatch, "0", argv)
    jobs = _check_bounded(lines)
    total = next(t for job, _, t in lines if job == "run:")
    assert jobs["run:"] == list(range(1, total + 1))  # every step: 6, 7 with the ONNX extra
    assert jobs["run: fine-tune epoch"] == [1, 2, 3]
    assert jobs["explain p1:"] == [1, 2, 3, 4]
    assert _progress(caplog, monkeypatch, NEVER, argv) == []


@pytest.mark.slow
def test_squeeze_report_shows_points_models_and_figures(sweep, caplog, monkeypatch):
    _, overrides = sweep
    argv = ["report", "--study", "digits_mlp", *overrides]
    lines = _progress(caplog, monkeypatch, "0", argv)
    jobs = _check_bounded(lines)
    points = len(jobs["report: explaining point"])
    assert points >= 1 and jobs["report: loading point"] == list(range(1, points + 1))
    assert jobs["report: scoring model"] == list(range(1, points + 2))  # and the baseline
    assert jobs["report: figure"] == [1, 2, 3, 4, 5]
    assert _progress(caplog, monkeypatch, NEVER, argv) == []


@pytest.mark.slow
def test_squeeze_explain_shows_its_phases(sweep, caplog, monkeypatch):
    _, overrides = sweep
    argv = ["explain", "--study", "digits_mlp", "--trial", "1", *overrides]
    jobs = _check_bounded(_progress(caplog, monkeypatch, "0", argv))
    assert jobs == {"explain trial 1:": [1, 2, 3, 4]}
    quick = _check_bounded(_progress(caplog, monkeypatch, "0", [*argv, "--no-attributions"]))
    assert quick == {"explain trial 1:": [1, 2]}
    assert _progress(caplog, monkeypatch, NEVER, argv) == []
