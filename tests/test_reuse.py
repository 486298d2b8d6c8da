"""Export a study's trial, rerun it with `squeeze run`, load the registered model back."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from search import ConfigError, compose_config, run_sweep
from search.cli import main
from search.config.space import SearchSpace
from search.results.reuse import (
    export_trial,
    load_registered,
    load_study,
    pick_trial,
    recommend,
)
from tests.conftest import sweep_overrides


@pytest.fixture(scope="module")
def study(tmp_path_factory, cache_dir):
    tmp_path = tmp_path_factory.mktemp("reuse")
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=5")
    pipelines = "space.pipeline=choice(structured+quant, prune+quant+kd, lowrank+quant)"
    result = run_sweep(compose_config([*overrides, pipelines]))
    return tmp_path, overrides, result  # overrides that name the storage, tracking and cache


def test_picks_come_from_the_front(study):
    _, overrides, result = study
    optuna_study = load_study(compose_config(overrides), "digits_mlp")
    front = {t.number for t in optuna_study.best_trials}
    acc = {t.number: t.user_attrs["metrics"]["val_acc"] for t in optuna_study.best_trials}
    size = {t.number: t.user_attrs["metrics"]["size_bytes"] for t in optuna_study.best_trials}
    assert pick_trial(optuna_study, "knee").number in front
    assert pick_trial(optuna_study, "max-acc").number == max(acc, key=lambda n: (acc[n], -size[n]))
    assert pick_trial(optuna_study, "min-size").number == min(
        size, key=lambda n: (size[n], -acc[n])
    )
    assert pick_trial(optuna_study, "trial=2").number == 2
    with pytest.raises(ConfigError, match="Unknown --pick 'best'"):
        pick_trial(optuna_study, "best")
    with pytest.raises(ConfigError, match="No study 'nope'.*Studies there: digits_mlp"):
        load_study(compose_config(overrides), "nope")


def test_export_then_run_reproduces_the_trial_and_registers_the_model(study, tmp_path, capsys):
    workdir, overrides, _ = study
    conf = tmp_path / "conf"
    path = export_trial(
        compose_config(overrides), "digits_mlp", pick="trial=3", name="exp3", conf_dir=conf
    )
    text = path.read_text()
    assert text.startswith("# @package _global_\n# Exported by `squeeze export`")
    assert "study 'digits_mlp', trial 3" in text
    exported = yaml.safe_load(text)
    trial = load_study(compose_config(overrides), "digits_mlp").trials[3]
    assert exported["space"]["pipeline"] == trial.params["pipeline"].split("+")
    for name, value in trial.params.items():  # every value fixed to the trial's, no ranges
        if name != "pipeline":
            section, key = name.split(".", 1)
            assert exported["space"][section][key] == value
    assert "(" not in yaml.safe_dump(exported["space"])

    code = main(["run", "--config-dir", str(conf), "experiment=exp3", *overrides])
    assert code == 0
    out = capsys.readouterr().out
    expected = trial.user_attrs["metrics"]
    run = compose_config(["experiment=exp3", *overrides], config_dirs=[conf])
    client = MlflowClient(str(run.tracking.uri))
    version = client.get_model_version_by_alias("exp3", "champion")
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["val_acc"] == expected["val_acc"]  # the same seed reproduces it exactly
    assert metrics["size_bytes"] == expected["size_bytes"]
    assert metrics["val_agreement"] == expected["val_agreement"]
    explained = {f.path for f in client.list_artifacts(version.run_id, "explain")}
    assert {"explain/bytes_per_layer.csv", "explain/agreement.csv"} <= explained
    assert 0.5 < metrics["test_acc"] <= 1.0
    assert "(= the trial's)" in out
    # the registered model ships an ONNX graph beside the packed file, checked in ONNX Runtime
    files = {Path(f.path).name for f in client.list_artifacts(version.run_id, "model")}
    assert {"model.sqz", "model.onnx", "config.yaml"} <= files
    assert metrics["onnx_max_abs_diff"] < 1e-4 and metrics["onnx_bytes"] > 0
    assert metrics["val_acc_onnx"] == pytest.approx(metrics["val_acc"])

    from search import load_registered as public_loader

    assert public_loader is load_registered
    model = load_registered("exp3", tracking_uri=str(run.tracking.uri))
    from experiments.digits import digits_mlp

    task = digits_mlp(seed=0, hidden=[300, 100], train={"epochs": 40})
    with torch.no_grad():
        accuracy = (model(task.val.x).argmax(1) == task.val.y).float().mean().item()
    assert accuracy == pytest.approx(expected["val_acc"])


def test_export_as_onnx_writes_a_checked_graph_of_the_picked_trial(study, tmp_path, capsys):
    workdir, overrides, result = study
    out = tmp_path / "knee.onnx"
    args = ["export", "--study", "digits_mlp", "--format", "onnx", "--output", str(out)]
    assert main([*args, *overrides]) == 0
    printed = capsys.readouterr().out
    # no --pick: the point the sweep recommended (its table's *), not the whole front's knee
    knee = pick_trial(load_study(compose_config(overrides), "digits_mlp"), "recommended")
    assert knee.number == recommend(result.front, score=result.score).trial
    packed = workdir / "trials" / "digits_mlp" / f"trial-{knee.number:04d}.sqz"
    assert f"wrote {out} (trial {knee.number}): {out.stat().st_size:,} bytes" in printed
    assert f"its packed .sqz file: {packed.stat().st_size:,} bytes" in printed
    assert "ONNX Runtime agrees with the torch model" in printed
    # the session settings a latency in ONNX Runtime depends on, and the saved optimisation
    assert "intra_op_threads 1, inter_op_threads 1, execution_mode sequential, " in printed
    assert "optimization basic offline, all at load" in printed
    assert main([*args, *overrides]) == 2  # never over an existing file
    assert "already exists" in capsys.readouterr().err


def test_run_without_an_experiment_is_a_config_error(study, capsys):
    _, overrides, _ = study
    assert main(["run", *overrides]) == 2
    assert "squeeze run needs an exported experiment" in capsys.readouterr().err


def test_per_class_accuracy_averages_to_the_accuracy_on_a_balanced_split(digits_baseline):
    import numpy as np

    from experiments import Split
    from experiments.analysis import classification_report
    from experiments.digits import digits_mlp

    task = digits_mlp(seed=0, hidden=[300, 100], train={"epochs": 40})
    by_class = [torch.nonzero(task.test.y == c).flatten()[:30] for c in range(10)]
    index = torch.cat(by_class)  # 30 of each class: balanced
    balanced = Split(task.test.x[index], task.test.y[index])
    report = classification_report(digits_baseline.model, balanced, 10)
    assert np.mean(report["per_class_acc"]) == pytest.approx(report["top1"])
    assert report["macro_recall"] == pytest.approx(report["top1"])
    assert np.array(report["confusion"]).sum() == 300
    assert 0.8 < report["macro_f1"] <= 1.0


def test_a_report_of_many_classes_keeps_the_most_frequent_confusions_not_whole_matrices():
    """Found as a user: a 2,000-token language model's report wrote a 144 MB confusion.json
    (GPT-2's 50,257 classes would need 2.5 billion cells a matrix) and 2,000 columns of
    accuracy per class. Above `WHOLE_CLASSES` classes the report keeps the most frequent
    confusions, and the accuracy per class as rows of its own; scores are read batch by batch."""
    import numpy as np

    from experiments import Split, Task, TrainConfig
    from experiments.analysis import MOST_CONFUSED, WHOLE_CLASSES, classification_report
    from search.results.report import _metrics

    classes = WHOLE_CLASSES + 50
    torch.manual_seed(0)
    x, y = torch.randn(3000, 8), torch.randint(0, classes, (3000,))
    model = torch.nn.Linear(8, classes)
    report = classification_report(model, Split(x, y), classes)
    predicted = model(x).argmax(1)
    wrong = predicted != y
    assert report["top1"] == pytest.approx(1 - wrong.double().mean().item())
    top5 = (model(x).topk(5, 1).indices == y[:, None]).any(1).double().mean().item()
    assert report["top5"] == pytest.approx(top5)
    confusions = report["confusion"]
    assert len(confusions) == MOST_CONFUSED
    counts = [c["count"] for c in confusions]
    assert counts == sorted(counts, reverse=True) and counts[-1] >= 1
    first = confusions[0]
    pairs = (y[wrong] == first["true"]) & (predicted[wrong] == first["predicted"])
    assert int(pairs.sum()) == first["count"] and first["true"] != first["predicted"]
    assert len(report["per_class_acc"]) == classes

    split = Split(x[:600], y[:600])
    task = Task(
        name="many",
        train=split,
        val=split,
        test=Split(x[600:900], y[600:900]),
        num_classes=classes,
        build_model=lambda: torch.nn.Linear(8, classes),
        train_config=TrainConfig(epochs=1),
    )
    metrics, confusion, by_class = _metrics({"baseline": model}, task)
    assert not any(c.startswith("acc_class_") for c in metrics.columns)
    assert list(by_class.columns) == ["baseline / val", "baseline / test"]
    assert by_class.index.name == "class" and len(by_class) == len(np.unique(y[:900]))
    assert set(confusion) == {"baseline / val", "baseline / test"}


def test_sensitivity_writes_a_per_layer_space_that_composes_and_samples(tmp_path, cache_dir):
    conf = tmp_path / "conf"
    overrides = [f"cache_dir={cache_dir}", f"output_dir={tmp_path}/out"]
    assert main(["sensitivity", "--config-dir", str(conf), *overrides]) == 0
    path = conf / "space" / "digits_mlp_sensitivity.yaml"
    table = pd.read_csv(tmp_path / "out" / "sensitivity-digits_mlp" / "sensitivity.csv")
    assert set(table.layer) == {"net.1", "net.3", "net.5"}
    drops = table[(table.method == "prune") & (table.layer == "net.1")].val_drop.tolist()
    assert drops[-1] > drops[0]  # pruning more of a layer costs more
    cfg = compose_config(["space=digits_mlp_sensitivity", *overrides], config_dirs=[conf])
    space = SearchSpace.from_config(cfg.space)
    trial = optuna.create_study().ask()
    recipe = space.sample(trial)
    assert recipe.pipeline == ("prune", "quant", "kd")
    assert {"prune.amount.net.1", "prune.amount.net.3", "prune.amount.net.5"} <= set(trial.params)
    ranges = yaml.safe_load(path.read_text())["prune"]["amount"]
    tolerated = table[(table.method == "prune") & (table.val_drop <= 1.0)]
    for layer, text in ranges.items():
        upper = float(text.removeprefix("interval(0.0, ").removesuffix(")"))
        best = tolerated[tolerated.layer == layer].setting.max()
        assert upper == pytest.approx(min(0.99, max(0.3, (0 if best != best else best) + 0.1)))
