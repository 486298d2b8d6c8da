"""Bad input: a clear message naming the key, exit code 2, and nothing created or trained."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from search.cli import main

BAD_INPUT = [
    (
        ["space.prune.amount=1.5"],
        "'prune.amount' parameter of space 'default' must be a float in [0.0, 1.0)",
    ),
    (
        ["space.quant.bits=0"],
        "'quant.bits' parameter of space 'default' must be an int in [2, 8]. Got 0",
    ),
    (["space.quant.bits=33"], "Got 33 instead"),
    (
        ["task=imagenet"],
        "Unknown task 'imagenet' (no conf/task/imagenet.yaml). Available: digits_mlp, mnist1d_cnn",
    ),
    (
        ["space.pipeline=[prune,quantize]"],
        "Unknown compressor 'quantize' in space.pipeline of space 'default'. "
        "Available: kd, prune, quant",
    ),
    (
        ["space.prune.amount=interval("],
        "Malformed search expression for 'space.prune.amount': 'interval('",
    ),
    (
        ["space.kd.temperature=-1"],
        "'kd.temperature' parameter of space 'default' must be a float in (0.0, inf)",
    ),
    (["space.kd.alpha=interval(0, 2)"], "'kd.alpha' parameter of space 'default'"),
    (
        ["search.sampler=cmaes"],
        "Unknown sampler 'cmaes' in search.sampler. Available: tpe, nsga2, random",
    ),
    (
        ["search.objectives=[val_acc,bytes]", "search.directions=[maximize,minimize]"],
        "Unknown objective 'bytes'",
    ),
    (["search.directions=[maximize]"], "must be non-empty lists of the same length"),
    (["search.directions=[maximize,smaller]"], "Unknown direction 'smaller'"),
    (["search.n_trials=0"], "The 'search.n_trials' config value must be an int in [1, "),
    (["search.n_trails=3"], "Could not override 'search.n_trails'"),
    (["search.storage=redis://localhost/0"], "Unsupported search.storage URL scheme 'redis'"),
    (["space=nope"], "Unknown space 'nope'"),
    (["+task.hiden=[10]"], "Invalid key in task 'digits_mlp'"),
    (["+task.train.epoch=3"], "Unknown key(s) ['epoch'] in task.train. Allowed: epochs"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUT)
def test_bad_input_exits_2_with_a_message_before_any_work(
    tmp_path, monkeypatch, capsys, overrides, message
):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--quiet", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
    assert os.listdir(tmp_path) == []  # no study, MLflow database, cache or trial files


def test_console_script_exit_code(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", "sweep", "space.quant.bits=0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "quant.bits" in done.stderr
    assert os.listdir(tmp_path) == []


def test_options_and_overrides_mix_in_any_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "space.quant.bits=0", "--quiet", "task=digits_mlp"]) == 2
    assert "quant.bits" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--loud"])
    assert exit_info.value.code == 2
