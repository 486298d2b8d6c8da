"""Every yaml under conf/ composes, and every compressor yaml builds its registered class."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from compressors import Compressor, available
from search import compose_config, plan_sweep
from search.config import CONF_DIR, group_options


@pytest.mark.parametrize("task", group_options("task"))
@pytest.mark.parametrize("space", group_options("space"))
@pytest.mark.parametrize("search", group_options("search"))
@pytest.mark.parametrize("tracking", group_options("tracking"))
def test_every_combination_composes_and_validates(task, space, search, tracking):
    cfg = compose_config(
        [f"task={task}", f"space={space}", f"search={search}", f"tracking={tracking}"]
    )
    plan = plan_sweep(cfg)
    assert plan.study_name == task
    assert cfg.task.name == task


@pytest.mark.parametrize("name", group_options("compressor"))
def test_compressor_yaml_builds_its_class_with_its_defaults(name):
    entry = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "compressor" / f"{name}.yaml"))
    cls = get_class(entry.pop("_target_"))
    assert issubclass(cls, Compressor) and cls.name == name
    assert cls(**entry).get_params() == entry


def test_every_registered_compressor_has_a_yaml():
    assert sorted(group_options("compressor")) == available()


def test_every_yaml_file_is_in_a_group_that_composes():
    groups = {p.parent.name for p in Path(CONF_DIR).rglob("*.yaml") if p.parent != CONF_DIR}
    assert groups <= {"task", "space", "search", "tracking", "compressor", "experiment"}
    for path in Path(CONF_DIR).glob("experiment/*.yaml"):
        compose_config([f"experiment={path.stem}"])  # the defaults list has experiment: null
