"""An explanation's files: its tables as CSV and its figures as PNG (`write_explanation`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from search.results.explain._bytes import Breakdown
from search.results.explain._figures import attribution_figure, bytes_figure
from search.results.explain._model import Explanation


def write_explanation(explanation: Explanation, folder: str | Path) -> list[Path]:
    """Write an explanation's tables (CSV) and figures (PNG) into ``folder``; return the paths.

    ``bytes_per_layer.csv`` (the model's lines, then the baseline's; each model's ``bytes`` sum
    to its file's size) and ``bytes_per_layer.png``; for a model that makes decisions
    ``agreement.csv``, ``flips_<split>.csv`` and ``flipped.csv``; with attributions
    ``attribution_fidelity.csv`` and ``attributions.png``. A table with nothing to hold (a
    regression's agreement) is not written, and a previous explanation's is removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    models = {explanation.name: explanation.breakdown}
    if explanation.name != "baseline":
        models = {"baseline": explanation.baseline_breakdown, **models}
    files.append(save_csv(bytes_table(models), folder / "bytes_per_layer.csv", index=False))
    files.append(save_png(bytes_figure(models), folder / "bytes_per_layer.png"))
    for stale in ONLY_WITH_ROWS:  # (a previous explanation's, in this folder)
        (folder / stale).unlink(missing_ok=True)
    if explanation.agreement:
        agreement = agreement_table(explanation)
        files.append(save_csv(agreement, folder / "agreement.csv", index=False))
    for split_name, agreement in explanation.agreement.items():
        if agreement.flips is not None:
            whole = "count" not in agreement.flips.columns  # (else the most frequent flips)
            path = folder / f"flips_{split_name}.csv"
            files.append(save_csv(agreement.flips, path, index=whole))
    if explanation.agreement:
        flipped = pd.concat(
            [a.flipped.assign(split=s) for s, a in explanation.agreement.items()],
            ignore_index=True,
        )
        files.append(save_csv(flipped, folder / "flipped.csv", index=False))
    if explanation.fidelity is not None:
        table = explanation.fidelity.per_class.assign(method=explanation.fidelity.method)
        files.append(save_csv(table, folder / "attribution_fidelity.csv"))
    if explanation.shown is not None and len(explanation.shown.indices):
        figure = attribution_figure(explanation.shown, title=explanation.name)
        files.append(save_png(figure, folder / "attributions.png"))
    return files


#: The tables an explanation writes only where they have rows: agreement and flips for a model
#: that makes decisions, attribution fidelity where attributions were computed.
ONLY_WITH_ROWS = ("agreement.csv", "flipped.csv", "attribution_fidelity.csv")


def save_csv(frame: pd.DataFrame, path: Path, **kwargs) -> Path:
    frame.to_csv(path, **kwargs)
    return path


def save_png(figure: plt.Figure, path: Path) -> Path:
    figure.savefig(path)
    plt.close(figure)
    return path


def bytes_table(models: Mapping[str, Breakdown]) -> pd.DataFrame:
    """Every model's breakdown lines (`Breakdown.lines`), one after the other, with a ``model``
    column; each model's ``bytes`` sum to its file's size."""
    frame = pd.concat(
        [b.lines().assign(model=name) for name, b in models.items()], ignore_index=True
    )
    return frame.reindex(columns=["model", *_LINE_COLUMNS])


#: Columns of `bytes_table` after ``model``.
_LINE_COLUMNS = [
    "tensor",
    "kind",
    "shape_before",
    "shape_after",
    "kept",
    "sparsity",
    "stored",
    "layout",
    "runtime",
    "params",
    "stored_tensors",
    "arrays",
    "raw_bytes",
    "data_bytes",
    "index_bytes",
    "record_bytes",
    "bytes",
    "share",
]


def agreement_table(explanation: Explanation) -> pd.DataFrame:
    """One row per split: what agreement measures, the share kept, flipped inputs, inputs."""
    return pd.DataFrame(
        [
            {
                "model": explanation.name,
                "split": a.split,
                "kind": a.kind,
                "agreement": a.agreement,
                "flipped": len(a.flipped),
                "samples": a.samples,
            }
            for a in explanation.agreement.values()
        ]
    )
