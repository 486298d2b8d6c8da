"""`squeeze explain` (issue #16): where the bytes went, which predictions flipped, and whether the
compressed model still looks at the same evidence — on digits, on every family of the zoo, and
from the command line, the report and the trial's MLflow run."""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from compressors import (
    CompressionContext,
    apply_pipeline,
    finalize_pipeline,
    get_compressor,
    load_packed,
    save_packed,
    targets,
)
from compressors._container import open_packed
from compressors.packing import FRAMING_BYTES, HEADER_BYTES, read_payload, read_tensors
from experiments import load_or_train_baseline, predict_outputs
from experiments.digits import digits_mlp
from experiments.metrics import agreement
from search import compose_config
from search.cli import main
from search.config.constraints import LOWER_BOUNDS, constraint_values
from search.config.metrics import METRICS
from search.config.storage import open_storage
from search.results.explain import (
    CONTAINER,
    FILE_HEADER,
    FRAMING,
    INDEX,
    RECORD,
    attribution_fidelity,
    byte_breakdown,
    explain_model,
    write_explanation,
)
from search.results.reuse import export_trial, load_study
from tests.conftest import structured_quant_overrides
from tests.zoo import tasks

pytestmark = pytest.mark.usefixtures("one_thread")

#: Every model family of tests/zoo/models.py, the MLP and the 1-D CNN of the project's tasks.
FAMILIES = ["mlp", "cnn1d", "resnet", "mobilenet", "transformer", "lstm", "gru", "tied", "minilm"]


def _families():
    return [pytest.param(f, marks=pytest.mark.slow) if f == "minilm" else f for f in FAMILIES]


@functools.cache
def _task(family: str, data_dir: str):
    """The family's task, its baseline trained 1 epoch (2 for the MLP): enough for real,
    distinct predictions; what is checked is the accounting, not accuracy."""
    torch.manual_seed(0)
    if family == "mlp":
        return digits_mlp(seed=0, hidden=[64, 32], train={"epochs": 2})
    if family == "cnn1d":
        from experiments.mnist1d import mnist1d_cnn

        return mnist1d_cnn(seed=0, data_dir=data_dir, train={"epochs": 1})
    if family == "minilm":
        return tasks.zoo_minilm(seed=0)
    return getattr(tasks, f"zoo_{family}")(seed=0, train={"epochs": 1})


@pytest.fixture
def family_baseline(cache_dir):
    def get(family: str):
        task = _task(family, str(cache_dir / "mnist1d"))
        config = {"explain_test": family}
        return task, load_or_train_baseline(task, config=config, cache_dir=cache_dir, seed=0)

    return get


def _compress(model, task, pipeline):
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(), seed=0)
    compressors = [get_compressor(name)(**kwargs) for name, kwargs in pipeline]
    model = apply_pipeline(compressors, copy.deepcopy(model), ctx)
    return finalize_pipeline(compressors, model, ctx).eval()


def _check_accounting(path, model):
    """The breakdown's lines sum to the file's size, and each part is what it says it is."""
    breakdown = byte_breakdown(path, model)
    size = path.stat().st_size
    lines = breakdown.lines()
    assert int(lines.bytes.sum()) == size == breakdown.file_bytes
    if path.read_bytes()[:4] == b"SQZ2":
        meta = _check_sqz2_lines(path, breakdown)
    else:
        meta = _check_stored_lines(path, breakdown)
    # Every stored tensor is in exactly one row; every compressible tensor has its row.
    stored = [n for names in breakdown.rows.stored_tensors for n in names.split()]
    assert sorted(stored) == sorted(meta["t"])
    tied = set(meta.get("tied", {}))
    assert set(read_tensors(path)) - tied == set(stored)
    replaced = set(meta["modules"])
    expected = {n for n, t in targets(model).items() if t.module_name not in replaced}
    assert expected <= set(breakdown.rows.tensor)
    return breakdown


def _check_stored_lines(path, breakdown) -> dict:
    """An SQZ5 (SQZ4, SQZ3) file: each row's bytes are its arrays' stored sizes as the index
    lists them; then the index (its length in the trailer) and the framing. Returns the index."""
    data = path.read_bytes()
    meta = open_packed(path).meta
    trailer = 12 if data[:4] == b"SQZ3" else 16
    assert list(breakdown.lines().tensor[-2:]) == [INDEX, FRAMING]
    assert breakdown.format == data[:4].decode()
    assert breakdown.line(FRAMING) == 4 + trailer == (FRAMING_BYTES if trailer == 16 else 16)
    assert breakdown.line(INDEX) == int.from_bytes(data[-trailer : -trailer + 8], "little")
    for row in breakdown.rows.itertuples():
        entries = [e for n in row.stored_tensors.split() for e in meta["t"][n]["a"]]
        assert row.bytes == sum(sum(sizes) for *_, sizes in entries)
        raw = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for _, dtype, shape, *_ in entries)
        assert row.raw_bytes == raw
    return meta


def _check_sqz2_lines(path, breakdown) -> dict:
    """An SQZ2 file: accounted on its uncompressed payload. Returns its model record."""
    size = path.stat().st_size
    assert breakdown.format == "SQZ2"
    assert list(breakdown.lines().tensor[-3:]) == [RECORD, CONTAINER, FILE_HEADER]
    payload, compressed = read_payload(path)
    assert breakdown.line(FILE_HEADER) == HEADER_BYTES
    assert breakdown.line(CONTAINER) == size - HEADER_BYTES - len(payload)
    assert (breakdown.line(CONTAINER) < 0) == compressed
    # The record line, computed independently: the payload with every tensor's entries and
    # layout records removed (length prefix, JSON framing, padding, the model record).
    length = int.from_bytes(payload[:8], "little")
    header_text = payload[8 : 8 + length]
    header = json.loads(header_text)
    meta = json.loads(header["__metadata__"]["squeeze"])
    bare = {"__metadata__": {"squeeze": json.dumps({**meta, "t": {}}, separators=(",", ":"))}}
    padding = length - len(header_text.rstrip(b" "))
    assert breakdown.line(RECORD) == 8 + len(json.dumps(bare, separators=(",", ":"))) + padding
    assert int(breakdown.rows.data_bytes.sum()) == len(payload) - 8 - length  # the arrays
    assert (breakdown.rows.raw_bytes == breakdown.rows.data_bytes).all()
    return meta


def test_a_bias_costs_the_bytes_the_file_stores_for_it(tmp_path):
    """Today's files: a row's bytes are its arrays as stored (codecs applied), not as they would
    be uncompressed; a 4-bit layer's codes take a quarter of a float32 weight or less."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    quant = apply_pipeline(
        [get_compressor("quant")(bits=4)], copy.deepcopy(base), CompressionContext(seed=0)
    )
    for name, model in (("base", base), ("quant", quant)):
        path = tmp_path / f"{name}.sqz"
        save_packed(model, path, like=base)
        rows = _check_accounting(path, base).rows.set_index("tensor")
        (suffix, dtype, shape, _codec, sizes) = open_packed(path).meta["t"]["0.bias"]["a"][0]
        assert rows.loc["0 (bias)", "bytes"] == sum(sizes) < 4 * 64  # smaller than float32
        assert rows.loc["0 (bias)", "raw_bytes"] == np.dtype(dtype).itemsize * 64
    assert rows.loc["0.weight", "bytes"] <= 32 * 64 // 2 + 4 * 64  # 4-bit codes and scales


@pytest.mark.parametrize(
    ("fixture", "model"),
    [
        ("sqz2_small.sqz", "sqz2"),
        ("sqz3_v4_small.sqz", "sqz3"),
        ("sqz4_v4_small.sqz", "sqz3"),
    ],
)
def test_old_formats_are_accounted_to_their_size(fixture, model):
    from tests.test_packing import DATA, _fixture_model
    from tests.test_reload import _sqz3_fixture_model

    build = {"sqz2": _fixture_model, "sqz3": _sqz3_fixture_model}[model]
    breakdown = _check_accounting(DATA / fixture, build())
    assert breakdown.format == fixture[:4].upper()


@pytest.mark.parametrize("family", _families())
def test_bytes_per_tensor_sum_to_the_file_size_on_every_family(family, family_baseline, tmp_path):
    task, baseline = family_baseline(family)
    base_path = tmp_path / "base.sqz"
    save_packed(baseline.model, base_path)
    _check_accounting(base_path, task.build_model())
    model = _compress(
        baseline.model, task, [("structured", {"amount": 0.4}), ("quant", {"bits": 4})]
    )
    path = tmp_path / "small.sqz"
    save_packed(model, path, like=baseline.model)
    breakdown = _check_accounting(path, task.build_model())
    assert (breakdown.rows.kept != "").any()  # structured pruning's kept channels are shown
    assert breakdown.rows.stored.str.contains("15-level grid").any()  # quant's 4 bits


PIPELINES = {
    "lowrank": [("lowrank", {"keep": 0.3})],
    "cluster": [("cluster", {})],
    "int8": [("quant", {"bits": 8, "runtime": "int8"})],
    "prune+2bit": [("prune", {"amount": 0.98}), ("quant", {"bits": 2})],
}


@pytest.mark.parametrize("recipe", PIPELINES)
def test_replaced_layers_codebooks_int8_and_sparse_layouts_are_accounted(
    recipe, digits_task, digits_baseline, tmp_path
):
    model = _compress(digits_baseline.model, digits_task, PIPELINES[recipe])
    path = tmp_path / "m.sqz"
    save_packed(model, path, like=digits_baseline.model)
    rows = _check_accounting(path, digits_task.build_model()).rows.set_index("tensor")
    first = rows.loc["net.1.weight"]
    if recipe == "lowrank":  # the pair's two weights count as the layer they replace
        assert first.kind == "linear, LowRank" and first.kept.startswith("rank ")
        assert " + " in first.shape_after
    elif recipe == "cluster":
        assert first.stored.startswith("codebook of ")
    elif recipe == "int8":
        assert set(rows.runtime) == {"int8"}
    else:
        assert first.sparsity > 0.9 and first.layout != "dense"  # (sparse, or entropy-coded)


def test_the_baseline_against_itself_agrees_everywhere_and_attributes_alike(
    digits_task, digits_baseline, tmp_path
):
    """The baseline's packed fp32 file reloads to exactly the baseline: agreement 1, no flip,
    fidelity 1."""
    from search.run.workload import baseline_file_size

    baseline_file_size(digits_baseline)
    path = digits_baseline.folder / "model.sqz"
    explanation = explain_model(path, digits_task, digits_baseline, name="baseline", samples=32)
    for split in ("val", "test"):
        a = explanation.agreement[split]
        assert a.agreement == 1.0 and a.flipped.empty and a.samples == 360
        assert np.count_nonzero(a.flips.to_numpy() - np.diag(np.diag(a.flips.to_numpy()))) == 0
    assert explanation.fidelity.mean == pytest.approx(1.0, abs=1e-9)
    assert explanation.fidelity.per_class.mean_spearman.to_numpy() == pytest.approx(1.0)
    assert explanation.breakdown.file_bytes == explanation.baseline_breakdown.file_bytes
    files = {p.name for p in write_explanation(explanation, tmp_path / "out")}
    assert {"bytes_per_layer.csv", "bytes_per_layer.png", "agreement.csv", "flipped.csv"} <= files


def test_a_destructive_recipe_flips_predictions_and_the_flip_matrix_adds_up(
    digits_task, digits_baseline, tmp_path
):
    model = _compress(
        digits_baseline.model, digits_task, [("prune", {"amount": 0.98}), ("quant", {"bits": 2})]
    )
    path = tmp_path / "m.sqz"
    save_packed(model, path, like=digits_baseline.model)
    explanation = explain_model(path, digits_task, digits_baseline, name="trial x", samples=32)
    val = explanation.agreement["val"]
    assert val.agreement < 1.0
    reference = predict_outputs(digits_baseline.model, digits_task.val.x)
    counts = np.bincount(reference.argmax(1).numpy(), minlength=10)
    assert (val.flips.sum(axis=1).to_numpy() == counts).all()  # rows: the baseline's classes
    off_diagonal = val.flips.to_numpy().sum() - np.trace(val.flips.to_numpy())
    assert off_diagonal == len(val.flipped) == round((1 - val.agreement) * 360)
    assert (val.flipped.baseline != val.flipped.compressed).all()
    labels = digits_task.val.y[torch.tensor(val.flipped["index"].to_numpy())].numpy()
    assert (val.flipped.label.to_numpy() == labels).all()
    assert val.flipped.baseline_conf.between(0, 1).all()
    # experiments.metrics.agreement (what trials log as val_agreement) says the same
    shipped = load_packed(path, digits_task.build_model())
    assert agreement(shipped, reference, digits_task.val) == val.agreement
    assert explanation.fidelity.mean < 0.99


@pytest.mark.parametrize("family", _families())
def test_every_family_is_explained_and_attributes_like_itself(family, family_baseline, tmp_path):
    """Bytes, agreement and attributions on each family; int8 layers are attributed on the float
    reload; a model's attributions against its own have fidelity 1."""
    task, baseline = family_baseline(family)
    self_fidelity = attribution_fidelity(
        baseline.model, baseline.model, task.val, outputs=task.outputs, samples=8, steps=8
    )
    assert self_fidelity.mean == pytest.approx(1.0, abs=1e-9)
    model = _compress(baseline.model, task, [("quant", {"bits": 8, "runtime": "int8"})])
    path = tmp_path / "m.sqz"
    save_packed(model, path, like=baseline.model)
    explanation = explain_model(path, task, baseline, name="int8", samples=8, steps=8)
    assert int(explanation.breakdown.lines().bytes.sum()) == path.stat().st_size
    assert explanation.int8_layers and any("float reload" in n for n in explanation.notes)
    for a in explanation.agreement.values():
        assert 0.0 <= a.agreement <= 1.0
        if task.outputs == "logits":
            assert int(a.flips.to_numpy().sum()) == a.samples
    assert -1.0 <= explanation.fidelity.mean <= 1.0
    files = {p.name for p in write_explanation(explanation, tmp_path / "out")}
    assert {"attribution_fidelity.csv", "attributions.png"} <= files


def test_val_agreement_is_a_metric_an_objective_and_a_lower_bound():
    assert "val_agreement" in METRICS and "val_agreement" in LOWER_BOUNDS
    assert constraint_values({"val_agreement": 0.97}, {"val_agreement": 0.95}) == {
        "val_agreement": pytest.approx(-0.02)
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """Two trials of structured 0.5 + 4-bit quantization on digits."""
    tmp_path = tmp_path_factory.mktemp("explain")
    overrides = structured_quant_overrides(tmp_path, cache_dir, "space.finetune.lr=0.003")
    assert main(["sweep", "--quiet", *overrides]) == 0
    return tmp_path, overrides


def test_squeeze_explain_prints_the_breakdown_and_logs_it_to_the_trial_run(sweep, capsys):
    tmp_path, overrides = sweep
    study = optuna.load_study(
        study_name="digits_mlp", storage=open_storage(f"{tmp_path}/optuna.journal")
    )
    trial = study.trials[1]
    metrics = trial.user_attrs["metrics"]
    assert 0.9 < metrics["val_agreement"] <= 1.0
    assert study.user_attrs["baseline"]["val_agreement"] == 1.0

    assert main(["explain", "--study", "digits_mlp", "--trial", "1", *overrides]) == 0
    out = capsys.readouterr().out
    for text in ("net.1.weight", "out 150/300", "15-level grid (4-bit)", INDEX, "zstd JSON"):
        assert text in out
    assert f"{int(metrics['size_bytes']):,}" in out
    assert "Agreement with the baseline" in out and "Attribution fidelity" in out
    folder = tmp_path / "trials" / "digits_mlp" / "explain" / "trial-0001"
    table = pd.read_csv(folder / "bytes_per_layer.csv")
    assert table[table.model == "trial 1"].bytes.sum() == metrics["size_bytes"]
    assert (
        table[table.model == "baseline"].bytes.sum() == study.user_attrs["baseline"]["size_bytes"]
    )
    logged = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").list_artifacts(
        trial.user_attrs["mlflow_run_id"], "explain"
    )
    assert {"explain/bytes_per_layer.csv", "explain/bytes_per_layer.png"} <= {
        f.path for f in logged
    }

    assert main(["explain", "--study", "digits_mlp", "--trial", "baseline", *overrides]) == 0
    assert "1.0000" in capsys.readouterr().out


def test_squeeze_explain_of_an_unknown_trial_names_it_and_the_trials_there(sweep, capsys):
    _, overrides = sweep
    code = main(
        ["explain", "--study", "digits_mlp", "--trial", "7", "--no-attributions", *overrides]
    )
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has no complete trial 7" in err and "Complete trials: 0, 1." in err
    code = main(["explain", "--study", "digits_mlp", "--trial", "last", *overrides])
    assert code == 2
    assert "expected a trial number or 'baseline'" in capsys.readouterr().err


def test_squeeze_explain_without_trial_explains_the_recommended_point(sweep, capsys):
    """As `squeeze export`: no --trial means the point the sweep recommended; --pick chooses
    another front point; --trial and --pick together are refused."""
    from search.results.reuse import pick_trial

    tmp_path, overrides = sweep
    study = optuna.load_study(
        study_name="digits_mlp", storage=open_storage(f"{tmp_path}/optuna.journal")
    )
    recommended = pick_trial(study, "recommended").number
    args = ["explain", "--study", "digits_mlp", "--no-attributions", *overrides]
    assert main(args) == 0
    assert f"trial-{recommended:04d}" in capsys.readouterr().out
    smallest = pick_trial(study, "min-size").number
    assert main([*args, "--pick", "min-size"]) == 0
    assert f"trial-{smallest:04d}" in capsys.readouterr().out
    assert main([*args, "--pick", "min-size", "--trial", "1"]) == 2
    assert "give one of them" in capsys.readouterr().err


@pytest.mark.slow  # (over 4.5 s on 2 cores: the slow lane runs it)
def test_the_report_explains_the_front(sweep):
    tmp_path, overrides = sweep
    assert main(["report", "--study", "digits_mlp", *overrides]) == 0
    folder = tmp_path / "trials" / "digits_mlp" / "report"
    table = pd.read_csv(folder / "bytes_per_layer.csv")
    assert "baseline" in set(table.model)
    agreement_csv = pd.read_csv(folder / "agreement.csv")
    assert agreement_csv.agreement.between(0, 1).all()
    page = (folder / "report.html").read_text()
    assert "What compression changed" in page and "bytes_per_layer.html" in page
    names = [p.name for p in folder.iterdir()]
    assert page.count("Plotly.newPlot") == len([n for n in names if n.endswith(".html")]) - 1


@pytest.mark.slow  # (a `squeeze run`, 3.7 s CPU: test_reuse.py's export-then-run checks the same)
def test_squeeze_run_logs_the_agreement_and_the_explanation(sweep, tmp_path):
    workdir, overrides = sweep
    conf = tmp_path / "conf"
    cfg = compose_config(overrides)
    export_trial(cfg, "digits_mlp", pick="trial=1", name="exp1", conf_dir=conf)
    assert main(["run", "--config-dir", str(conf), "experiment=exp1", *overrides]) == 0
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    run_id = client.get_model_version_by_alias("exp1", "champion").run_id
    expected = load_study(cfg, "digits_mlp").trials[1].user_attrs["metrics"]
    assert client.get_run(run_id).data.metrics["val_agreement"] == expected["val_agreement"]
    logged = {f.path for f in client.list_artifacts(run_id, "explain")}
    assert {"explain/bytes_per_layer.csv", "explain/agreement.csv"} <= logged


def test_the_python_api_explains_a_trial(sweep):
    import search

    _, overrides = sweep
    explanation = search.explain_trial(
        compose_config(overrides), "digits_mlp", 0, attributions=False, log=False
    )
    assert explanation.name == "trial 0" and explanation.fidelity is None
    assert explanation.run_id is None and explanation.files
    assert int(explanation.breakdown.lines().bytes.sum()) == explanation.breakdown.file_bytes


def test_agreement_of_a_language_model_counts_labelled_positions_and_its_most_frequent_flips():
    """A language model's 50,257 classes: the flips are the most frequent pairs (a whole matrix
    would take 2.5 billion cells, 20 GB: `squeeze report` was killed for it), and padding
    positions (labels -100) are no decisions: agreement counts labelled positions as the
    trial's val_agreement does, and a flipped position's index is its place in the split."""
    from experiments.analysis import MOST_CONFUSED
    from search.results.explain._agreement import agreement_report

    classes, generator = 50257, torch.Generator().manual_seed(0)
    reference = torch.randn(6, 5, classes, generator=generator)
    outputs = reference.clone()
    targets = torch.randint(0, classes, (6, 5), generator=generator)
    targets[:, 3:] = -100  # padding: the last two positions of every sequence
    outputs[0, 0, 7] = 1e3  # position 0 flips to class 7, and so do three padding positions
    outputs[1, 1, 7] = 1e3
    outputs[1, 4, 7] = outputs[2, 3, 7] = outputs[5, 4, 7] = 1e3
    report = agreement_report(reference, outputs, targets, split_name="val", num_classes=classes)
    assert report.samples == 18  # 6 sequences x 3 labelled positions
    assert report.agreement == pytest.approx(16 / 18)
    assert sorted(report.flipped["index"]) == [0, 6]  # (row 1, position 1 -> 1 * 5 + 1)
    assert list(report.flips.columns) == ["baseline class", "compressed class", "count"]
    assert (report.flips["compressed class"] == 7).all() and report.flips["count"].sum() == 2
    assert len(report.flips) <= MOST_CONFUSED


@pytest.mark.parametrize("shape", [(10, 5), (6, 4, 5)])
def test_agreement_decided_batch_by_batch_equals_the_whole_splits(shape):
    """`squeeze explain` decides a classifier's agreement batch by batch (a language model's
    whole logits are never held): the same score, flips and flipped rows as of the whole."""
    from search.results.explain._agreement import agreement_report, decide, top1_agreement

    generator = torch.Generator().manual_seed(1)
    reference = torch.randn(*shape, generator=generator)
    outputs = reference + 0.8 * torch.randn(*shape, generator=generator)
    targets = torch.randint(0, 5, shape[:-1], generator=generator)
    if len(shape) == 3:
        targets[:, -1] = -100  # (a language model's last position: no label)
    whole = agreement_report(reference, outputs, targets, split_name="val")
    parts = [
        decide(reference[i : i + 4], outputs[i : i + 4], targets[i : i + 4])
        for i in range(0, shape[0], 4)
    ]
    batched = top1_agreement(parts, "val", 5)
    assert 0 < len(whole.flipped) < whole.samples
    assert batched.agreement == pytest.approx(whole.agreement)
    assert batched.samples == whole.samples
    pd.testing.assert_frame_equal(batched.flips, whole.flips)
    pd.testing.assert_frame_equal(batched.flipped, whole.flipped)
