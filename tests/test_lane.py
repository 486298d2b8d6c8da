"""The fast lane's scheduling under ``pytest -n``: whole modules per worker (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import DIGITS_CONFIG, SAME_WORKER, SLOW_CASES, xdist_scope

ROOT = Path(__file__).resolve().parent.parent


def test_a_module_is_one_unit_of_work_and_paired_modules_share_one():
    assert xdist_scope("tests/test_cli.py::test_help[a]") == "tests/test_cli.py"
    assert xdist_scope("tests/test_cli.py::test_x[a::b]") == "tests/test_cli.py"
    assert xdist_scope("tests/test_zoo_tasks.py::test_y") == "tests/test_any_model.py"
    for module, partner in SAME_WORKER.items():  # (a renamed file would silently unpair them)
        assert (ROOT / module).is_file() and (ROOT / partner).is_file()
        assert xdist_scope(f"{module}::t") == xdist_scope(f"{partner}::t") == partner


def test_every_slow_case_names_a_test_of_its_module():
    """A renamed test would leave its `SLOW_CASES` entry naming nothing and run in the lane."""
    for case in SLOW_CASES:
        module, test = case.split("::")
        assert f"def {test.split('[')[0]}(" in (ROOT / "tests" / module).read_text(), case


def test_the_digits_baseline_fixture_is_the_one_a_default_sweep_trains():
    """`digits_baseline` and the sweeps of conf/task/digits_mlp.yaml share one cached baseline
    only while its config is the one a sweep keys its baseline on."""
    from search import compose_config, plan_sweep

    assert plan_sweep(compose_config([]), connect=False).task_kwargs == DIGITS_CONFIG
