"""Bad input: a clear message naming the key, exit code 2, and nothing created or trained."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from compressors import available, get_compressor
from search.cli import main

BAD_INPUT = [
    (
        ["space.prune.amount=1.5"],
        "'prune.amount' parameter of space 'digits_mlp' must be a float in [0.0, 1.0)",
    ),
    (
        ["space.quant.bits=0"],
        "'quant.bits' parameter of space 'digits_mlp' must be an int in [1, 8] or 'ternary'. Got 0",
    ),
    (["space.quant.bits=33"], "Got 33 instead"),
    (
        ["task=imagenet"],
        "Unknown task 'imagenet' (no conf/task/imagenet.yaml). Available: digits_images, "
        "digits_mlp, minilm, minilm_topics, mnist1d_cnn",
    ),
    (  # (a yaml file named nan.yaml: Hydra's grammar reads the option as a float)
        ["task=nan"],
        "Hydra reads an option (task=nan) as a number, a bool or null, not as the name of a yaml "
        "file; quote it (\"task='nan'\") or rename the file",
    ),
    (
        ["space.pipeline=[prune,quantize]"],
        "Unknown compressor 'quantize' in space.pipeline of space 'digits_mlp'. "
        f"Available: {', '.join(available())}, or a kind standing for each compressor of it: "
        f"{', '.join(sorted({get_compressor(n).kind for n in available()} - {''}))}",
    ),
    (
        ["space.prune.amount=interval("],
        "Malformed search expression for 'space.prune.amount': 'interval('",
    ),
    (
        ["space.kd.temperature=-1"],
        "'kd.temperature' parameter of space 'digits_mlp' must be a float in (0.0, inf)",
    ),
    (["space.kd.alpha=interval(0, 2)"], "'kd.alpha' parameter of space 'digits_mlp'"),
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
    (
        ["search.n_trails=3"],
        "Unknown config key 'search.n_trails'. Did you mean 'search.n_trials'? Allowed under "
        "'search': study_name, n_trials,",
    ),
    (
        ["serch.n_trials=3"],
        "Unknown config key 'serch.n_trials'. Did you mean 'search.n_trials'? Allowed at the "
        "top level:",
    ),
    (
        ["+serch.n_trials=3"],
        "Unknown config key 'serch.n_trials'. Did you mean 'search.n_trials'?",
    ),
    (["tsk=minilm"], "Unknown config key 'tsk'. Did you mean 'task'?"),
    (["task.hiden=[10]"], "Unknown config key 'task.hiden'. Did you mean 'task.hidden'?"),
    (["search.storage=redis://localhost/0"], "Unsupported search.storage URL scheme 'redis'"),
    (["space=nope"], "Unknown space 'nope'"),
    (["+task.hiden=[10]"], "Invalid key in task 'digits_mlp'"),
    (["+task.train.epoch=3"], "Unknown key(s) ['epoch'] in task.train. Allowed: epochs"),
    (
        ["space.prune.amount=-0.1"],
        "'prune.amount' parameter of space 'digits_mlp' must be a float in [0.0, 1.0)",
    ),
    (["space.structured.amount=1.0"], "'structured.amount' parameter of space 'digits_mlp'"),
    (
        ["space.kd.temperature=0"],
        "'kd.temperature' parameter of space 'digits_mlp' must be a float",
    ),
    (
        ["space.kd.alpha=1.5"],
        "'kd.alpha' parameter of space 'digits_mlp' must be a float in [0.0, 1.0]",
    ),
    (
        ["space.finetune.lr=tag(log, interval(0, 0.1))"],
        "Invalid search expression for 'space.finetune.lr'",
    ),
    (["space.quant.bits=choice(4, 33)"], "Got 33 (in choice(4, 33)) instead"),
    (["space.pipeline=[quant,structured]"], "applies 'structured' after 'quant'"),
    (
        ["+search.n_trails=3"],
        "Unknown config key 'search.n_trails'. Did you mean 'search.n_trials'?",
    ),
    (["+sead=3"], "Unknown config key 'sead'. Did you mean 'seed'?"),
    (["search.n_jobs=0"], "The 'search.n_jobs' config value must be an int in [1, 1024]. Got 0"),
    (["search.retries=-1"], "The 'search.retries' config value must be an int in [0, 100]"),
    (["search.retry_on=[timeout]"], "The 'search.retry_on' config value must be a non-empty list"),
    (["search.timeout=0"], "The 'search.timeout' config value must be null or a float in (0.0"),
    (["device=tpu"], "The 'device' config value must be one of 'cpu', 'cuda', 'auto'. Got 'tpu'"),
    (["search.trials_per_gpu=0"], "The 'search.trials_per_gpu' config value must be an int"),
    (["search.early_stop.margin=2"], "The 'search.early_stop.margin' config value must be a float"),
    (
        ["search.pruner=median"],
        "search.pruner='median' prunes on the validation score and needs the single objective",
    ),
    (
        ["search.pruner=asha", "search.objectives=[val_acc]", "search.directions=[maximize]"],
        "Unknown pruner 'asha' in search.pruner. Available: none, median, hyperband",
    ),
    (
        [
            "search.early_stop.enabled=true",
            "search.objectives=[val_acc,latency_ms]",
            "search.directions=[maximize,minimize]",
        ],
        "search.early_stop needs val_acc among search.objectives",
    ),
    (["search.constraints.size_kb=small"], "'search.constraints.size_kb' config value must be a"),
    (["+search.constraints.sise_kb=3"], "Unknown constraint 'sise_kb' in search.constraints"),
    (
        ["search.storage=postgresql+psycopg2://nobody:hunter2@127.0.0.1:1/none"],
        "Cannot reach search.storage 'postgresql+psycopg2://nobody:***@127.0.0.1:1/none'",
    ),
    (["search.storage=postgresql+psycopg2://"], "Malformed search.storage URL"),
    (["search.storage=sqlite:///no/such/folder/optuna.db"], "does not exist"),
    (["search.storage=sqlite:///optuna.db", "search.n_jobs=2"], "takes one writer at a time"),
    (["tracking.uri=ftp://example.org/mlflow"], "Unsupported tracking.uri 'ftp://example.org"),
    (
        ["tracking.uri=http://127.0.0.1:1"],
        "Cannot reach the MLflow tracking server tracking.uri 'http://127.0.0.1:1'",
    ),
    # Names that become file names: nothing is written outside output_dir.
    *(
        (
            [f"search.study_name={name}"],
            "The 'search.study_name' config value must be a file name of letters, digits, '.', "
            f"'_' and '-', starting with a letter or a digit (at most 128 characters). Got "
            f"{name!r} instead.",
        )
        for name in ("a/b", "../../escaped", "/tmp/absolute", ".", "..", "a b")
    ),
    (["task.name=../up", "search.study_name=ok"], "The 'task.name' config value must be a"),
    # The baseline's training and the tasks' settings, checked before any data is read.
    (["task.train.epochs=-1"], "'epochs' parameter of TrainConfig (task.train) must be an int"),
    (["task.train.epochs=1.5"], "'epochs' parameter of TrainConfig (task.train) must be an int"),
    (["task.train.batch_size=0"], "'batch_size' parameter of TrainConfig (task.train) must be"),
    (["task.train.lr=0"], "'lr' parameter of TrainConfig (task.train) must be a finite float in"),
    (["task.train.lr=nan"], "(0.0, inf). Got nan instead."),
    (["task.train.lr=inf"], "(0.0, inf). Got inf instead."),
    (["+task.train.weight_decay=-0.1"], "'weight_decay' parameter of TrainConfig (task.train)"),
    (["~task.train.epochs"], "task.train {'batch_size': 64, 'lr': 0.001} has no 'epochs'"),
    (["task.val_fraction=0"], "'val_fraction' parameter of task 'digits_mlp' must be a finite"),
    (["task.test_fraction=1.5"], "'test_fraction' parameter of task 'digits_mlp' must be a"),
    (
        ["task.val_fraction=0.5", "task.test_fraction=0.5"],
        "'val_fraction' and 'test_fraction' parameters of task 'digits_mlp' must sum to less "
        "than 1",
    ),
    (["task.hidden=[0,10]"], "'hidden' parameter of task 'digits_mlp' must be a list of ints"),
    (
        ["task=mnist1d_cnn", "task.channels=0"],
        "'channels' parameter of task 'mnist1d_cnn' must be an int in [1, inf). Got 0",
    ),
    (["task=mnist1d_cnn", "task.val_fraction=1"], "'val_fraction' parameter of task 'mnist1d_cnn'"),
    # Heartbeats and constraints that cannot work.
    (
        ["search.heartbeat_interval=60", "search.grace_period=30"],
        "The 'search.heartbeat_interval' config value must be less than search.grace_period",
    ),
    (["search.constraints.size_kb=-1"], "'search.constraints.size_kb' config value cannot be met"),
    (["+search.constraints.latency_ms=0"], "'search.constraints.latency_ms' config value cannot"),
    (["+search.constraints.flops=-5"], "'search.constraints.flops' config value cannot be met"),
    (
        ["+search.constraints.val_agreement=1.5"],
        "'search.constraints.val_agreement' config value cannot be met: it must be a number in "
        "[0, 1]",
    ),
    (
        ["+search.constraints.compressed_fraction=-0.1"],
        "'search.constraints.compressed_fraction' config value cannot be met",
    ),
    (
        ["+search.constraints.val_acc=1.5"],
        "task 'digits_mlp' scores val_acc with accuracy, which is at most 1",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUT)
def test_bad_input_exits_2_with_a_message_before_any_work(
    tmp_path, monkeypatch, capsys, overrides, message
):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--quiet", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
    assert "hunter2" not in err  # passwords are masked
    assert os.listdir(tmp_path) == []  # no study, MLflow database, cache or trial files


def test_at_least_twenty_kinds_of_bad_input_are_covered():
    assert len(BAD_INPUT) >= 70


@pytest.mark.parametrize("key", ["output_dir", "cache_dir"])
def test_a_folder_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys, key):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file")
    for value in ("taken", "taken/below"):
        assert main(["sweep", "--quiet", f"{key}={value}"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"The '{key}' config value '{value}'" in err and "a file, not a folder" in err
        assert os.listdir(tmp_path) == ["taken"]


def test_a_mistyped_key_is_named_without_advice_to_add_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--quiet", "serch.n_trials=3"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Did you mean 'search.n_trials'?" in err
    assert "+" not in err  # Hydra's own message advises `+serch.n_trials=3`
    assert os.listdir(tmp_path) == []


_IMPORTS = """
import sys
from search.cli import main
codes = []
for args in (["--help"], ["sweep", "--help"]):
    try:
        main(args)
    except SystemExit as done:
        codes.append(done.code)
codes += [main(["sweep", "serch.n_trials=3"]), main(["sweep", "search.n_jobs=0"])]
print(codes, "torch" in sys.modules, file=sys.stderr)
"""


def test_help_and_config_errors_answer_without_importing_torch(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    last = done.stderr.strip().splitlines()[-1]
    assert last == "[0, 0, 2, 2] False", done.stderr
    assert os.listdir(tmp_path) == []


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
