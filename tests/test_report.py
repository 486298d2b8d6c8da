"""`squeeze report`: the front table first, plotly.js once, no empty chart, every axis labelled."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import pandas as pd
import plotly.offline
import pytest
from mlflow.tracking import MlflowClient

from search import compose_config, run_sweep
from search.cli import main
from search.results.report import FIGURES, PLOTLY_JS, _figures
from search.results.reuse import load_study
from search.run.pareto import front_numbers, trials_frame
from search.run.progress import short_value
from search.run.recommend import recommend
from tests.conftest import sweep_overrides

PIPELINES = "space.pipeline=choice(structured+quant, prune+quant+kd, lowrank+quant)"


@pytest.fixture(scope="module")
def study(tmp_path_factory, cache_dir):
    """A 4-trial study (one fine-tuning epoch each) and its report."""
    tmp_path = tmp_path_factory.mktemp("report")
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=4", "space.finetune.epochs=1")
    result = run_sweep(compose_config([*overrides, PIPELINES]))
    assert main(["report", "--study", "digits_mlp", *overrides]) == 0
    return tmp_path / "trials" / "digits_mlp" / "report", overrides, result


def test_report_has_every_file_a_row_per_trial_and_logs_to_the_parent(study):
    folder, overrides, result = study
    names = {p.name for p in folder.iterdir()}
    for figure in ("pareto_front", "hypervolume", "params_vs_accuracy", "finetune_curves"):
        assert {f"{figure}.png", f"{figure}.html"} <= names, figure
    assert {"trials.csv", "trials.parquet", "metrics.csv", "confusion.json"} <= names
    assert {"class_balance.csv", "report.html", PLOTLY_JS} <= names
    trials = pd.read_csv(folder / "trials.csv")
    assert list(trials.trial) == [0, 1, 2, 3]
    assert {"state", "val_acc", "size_bytes", "latency_ms", "param.pipeline"} <= set(trials)
    metrics = pd.read_csv(folder / "metrics.csv")
    assert set(metrics.model) == {"baseline", *(f"trial {n}" for n in result.front.trial)}
    baseline_val = metrics[(metrics.model == "baseline") & (metrics.split == "val")].iloc[0]
    assert baseline_val.top1 == pytest.approx(result.baseline["val_acc"])
    assert baseline_val.top5 >= baseline_val.top1
    page = (folder / "report.html").read_text()
    assert f"<script src='{PLOTLY_JS}'></script>" in page  # the folder's copy: works offline
    assert not re.search(r"src=[\"']http", page)
    assert page.count("Plotly.newPlot") == len([n for n in names if n.endswith(".html")]) - 1
    client = MlflowClient(compose_config(overrides).tracking.uri)
    logged = {f.path for f in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/report.html", "report/trials.csv", "report/pareto_front.png"} <= logged
    assert f"report/{PLOTLY_JS}" in logged  # the report downloaded from MLflow works offline too


def test_report_leads_with_the_front_by_size_baseline_first(study):
    folder, overrides, result = study
    page = (folder / "report.html").read_text()
    assert page.index("<table") < page.index("<h2>Figures")  # the table comes before anything
    header, *rows = _first_table(page)
    assert header == [
        "model",
        "size (KB)",
        "ratio (× smaller)",
        "val score",
        "val change",
        "test score",
        "test change",
        "recipe",
    ]
    base = result.baseline
    assert rows[0][0] == "baseline (fp32)"
    size, val = f"{base['size_bytes'] / 1000:.2f}", f"{base['val_acc']:.4f}"
    assert rows[0][1:5] == [size, "1.0×", val, "reference"]
    front = result.front.sort_values("size_bytes")  # the sweep's own front, with test scores
    assert [r[0].removesuffix(" (recommended)") for r in rows[1:]] == [
        f"trial {n}" for n in front.trial
    ]
    # the point the sweep recommended (and `export` exports by default) is marked, once
    pick = recommend(result.front, score=result.score).trial
    assert [r[0] for r in rows if r[0].endswith(" (recommended)")] == [
        f"trial {pick} (recommended)"
    ]
    assert "<tr class='recommended'>" in page
    assert f"recommended: trial {pick}" in (folder / "pareto_front.html").read_text()
    sizes = [float(r[1]) for r in rows[1:]]
    assert sizes == sorted(sizes)
    trials = load_study(compose_config(overrides), "digits_mlp").trials
    for cells, point in zip(rows[1:], front.itertuples(), strict=True):
        assert cells[3] == f"{point.val_acc:.4f}" and cells[5] == f"{point.test_acc:.4f}"
        for cell, drop in ((cells[4], point.val_drop), (cells[6], point.test_drop)):
            change = float(cell.removesuffix(" pt").replace("−", "-"))
            assert change == pytest.approx(-drop, abs=0.051)  # negative change = a loss
            if abs(drop) >= 0.05:
                assert cell.startswith("−" if drop > 0 else "+"), cell
        recipe = cells[7]
        for name, value in trials[point.trial].params.items():  # every value, never cut
            assert f"{name}={short_value(value)}" in recipe.split(" ")  # 3 significant digits
        assert "finetune.epochs=1" in recipe  # fixed values too: the whole recipe
    assert any(c.startswith("−") for r in rows[1:] for c in (r[4], r[6]))  # this tiny run loses


def test_the_folder_carries_plotly_js_once(study):
    folder, _, _ = study
    scripts = list(folder.glob("*.js"))
    assert [p.name for p in scripts] == [PLOTLY_JS]
    assert scripts[0].read_text() == plotly.offline.get_plotlyjs()
    pages = list(folder.glob("*.html"))
    figures = [*FIGURES, "bytes_per_layer"]  # (the last: what compression changed, per layer)
    assert len(pages) == 1 + len([n for n in figures if (folder / f"{n}.html").exists()])
    for page in pages:  # each 4.8 MB before, plotly.js inlined in every one
        text = page.read_text()
        assert page.stat().st_size < 200_000, page.name
        assert re.search(rf"""<script[^>]* src=["']{PLOTLY_JS}["']""", text), page.name
    total = sum(p.stat().st_size for p in [*pages, *scripts])
    assert total < 1.1 * scripts[0].stat().st_size + 500_000


def test_every_axis_says_what_it_shows_and_its_unit(study):
    folder, overrides, _ = study
    titles = {}
    for name in FIGURES:
        page = folder / f"{name}.html"
        if page.exists():
            layout = _plotly_layout(page.read_text())
            axes = {k: v for k, v in layout.items() if re.fullmatch(r"[xy]axis\d*", k)}
            assert {"xaxis", "yaxis"} <= set(axes), name
            for key, axis in axes.items():
                assert axis.get("title", {}).get("text"), f"{name}: {key} has no title"
            titles[name] = (axes["xaxis"]["title"]["text"], axes["yaxis"]["title"]["text"])
    assert titles["pareto_front"] == (
        "packed model file size (KB, log scale)",
        "validation score (val_acc: top-1 accuracy, 0–1)",
    )
    assert titles["hypervolume"][1] == "hypervolume of val_acc × size_bytes (score × bytes)"
    assert titles["finetune_curves"] == (
        "fine-tuning epoch (from 0)",
        "training loss (mean per sample)",
    )
    # The PNGs: the same figures drawn by matplotlib, every axis labelled.
    figures = _study_figures(overrides, "top-1 accuracy, 0–1")
    for name, (png, _) in figures.items():
        for ax in png.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), name
        plt.close(png)
    assert "KB" in figures["pareto_front"][0].axes[0].get_xlabel()


def _study_figures(overrides: list[str], score: str) -> dict:
    """The report's figures of the module's study, its score described as ``score``."""
    cfg = compose_config(overrides)
    optuna_study = load_study(cfg, "digits_mlp")
    figures, _ = _figures(
        optuna_study,
        ["val_acc", "size_bytes"],
        trials_frame(optuna_study),
        front_numbers(optuna_study),
        optuna_study.user_attrs["baseline"],
        MlflowClient(cfg.tracking.uri),
        recipes=defaultdict(str),
        score=score,
    )
    return figures


def test_a_long_metric_name_stays_inside_each_figure(study):
    """A torchmetrics metric's name and direction make a long y-axis label: every PNG's axis
    labels are drawn inside the figure (the front's ran past its top and bottom)."""
    _, overrides, _ = study
    figures = _study_figures(overrides, "MulticlassJaccardIndex, higher is better")
    for name, (png, _) in figures.items():
        png.canvas.draw()
        renderer = png.canvas.get_renderer()
        for ax in png.axes:
            for label in (ax.xaxis.label, ax.yaxis.label):
                box = label.get_window_extent(renderer)
                inside = png.bbox
                assert box.y0 >= inside.y0 - 1 and box.y1 <= inside.y1 + 1, (name, box, inside)
                assert box.x0 >= inside.x0 - 1 and box.x1 <= inside.x1 + 1, (name, box, inside)
        plt.close(png)


def test_a_figure_without_data_is_left_out_with_a_note(study, cache_dir):
    folder, overrides, _ = study
    bare = [
        *overrides,
        "search.study_name=bare",
        "search.n_trials=1",
        "space.finetune.epochs=0",
        "space.pipeline=[prune,quant]",
    ]
    run_sweep(compose_config(bare))
    report = folder.parents[1] / "bare" / "report"
    report.mkdir(parents=True)
    (report / "hypervolume.html").write_text("a previous report's figure")
    assert main(["report", "--study", "bare", *overrides]) == 0
    names = {p.name for p in report.iterdir()}
    assert {"pareto_front.png", "pareto_front.html", PLOTLY_JS} <= names
    for name in ("hypervolume", "param_importance", "params_vs_accuracy", "finetune_curves"):
        assert f"{name}.png" not in names and f"{name}.html" not in names, name
    page = (report / "report.html").read_text()
    assert page.count("Plotly.newPlot") == 2  # the front, and the front point's bytes per layer
    notes = re.findall(r"<p class='note'><b>([a-z ]+)</b>: left out, ([^<]+)\.</p>", page)
    two = "it needs at least 2 complete trials and the study has 1"
    assert dict(notes) == {
        "hypervolume": two,
        "param importance": two,
        "params vs accuracy": two,
        "finetune curves": (
            "no trial of the front logged a fine-tuning loss (no fine-tuning epochs)"
        ),
    }
    _, baseline, trial = _first_table(page)
    assert baseline[0] == "baseline (fp32)" and trial[0] == "trial 0 (recommended)"
    assert "finetune.epochs=0" in trial[7].split(" ")


class _Table(HTMLParser):
    """The cells of the first ``<table>`` of a page, row by row (caption left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._where: str | None = None  # None before the table, "done" after it
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and self._where is None:
            self._where = "table"
        elif self._where == "table" and tag == "tr":
            self.rows.append([])
        elif self._where == "table" and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if self._where == "table" and tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif self._where == "table" and tag == "table":
            self._where = "done"

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _first_table(page: str) -> list[list[str]]:
    parser = _Table()
    parser.feed(page)
    return parser.rows


def _plotly_layout(page: str) -> dict:
    """The layout of the figure a plotly HTML file draws: ``Plotly.newPlot(id, data, layout``."""
    decoder = json.JSONDecoder()
    start = page.index("Plotly.newPlot(") + len("Plotly.newPlot(")
    values = []
    for _ in range(3):  # the div id, the traces, the layout
        start = re.compile(r"[\s,]*").match(page, start).end()
        value, start = decoder.raw_decode(page, start)
        values.append(value)
    return values[2]
