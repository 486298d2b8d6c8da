"""An explanation's figures: bytes per layer (matplotlib and plotly) and attributions."""

from __future__ import annotations

import math
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from search.results.explain._attributions import Attributions
from search.results.explain._bytes import Breakdown

#: Segments a bytes-per-layer bar shows on their own; smaller ones are pooled.
_SEGMENTS = 12


def _segments(models: Mapping[str, Breakdown]) -> tuple[list[str], pd.DataFrame]:
    """``(labels, bytes)``: a frame of bytes per segment (rows) and model (columns); the
    largest `_SEGMENTS` tensors each, the others pooled, then the lines beyond the tensors
    (index and framing; an SQZ2 file's model record and header) pooled as the file's overhead
    (an SQZ2 file's LZMA container is apart: it is negative when LZMA shrank the payload)."""
    table = pd.DataFrame(
        {name: b.rows.set_index("tensor").bytes for name, b in models.items()}
    ).fillna(0)
    order = table.max(axis=1).sort_values(ascending=False).index
    top, rest = list(order[:_SEGMENTS]), list(order[_SEGMENTS:])
    segments = table.loc[[t for t in table.index if t in top]]
    if rest:
        segments.loc[f"{len(rest)} other rows"] = table.loc[rest].sum()
    segments.loc[_OVERHEAD] = [
        sum(x.bytes for x in b.extra if x.bytes > 0) for b in models.values()
    ]
    return list(segments.index), segments


#: The segment of the lines beyond the tensors, and the hatched bar of LZMA's saving (SQZ2).
_OVERHEAD = "index, framing (SQZ2: record, header)"
_SAVING = "LZMA saving (SQZ2 files, below 0)"


def _saving(models: Mapping[str, Breakdown]) -> np.ndarray:
    """KB by which an SQZ2 file's LZMA container shrank its payload (negative; 0 for others)."""
    return (
        np.array(
            [sum(x.bytes for x in b.extra if x.bytes < 0) for b in models.values()], dtype=float
        )
        / 1000
    )


def bytes_figure(models: Mapping[str, Breakdown]) -> plt.Figure:
    """Bytes per layer as stacked bars, one bar per model (the baseline first): each segment a
    tensor's bytes in the file (an SQZ2 file's: in its uncompressed payload, LZMA's saving hanging
    below zero), and a black tick marks each file's size (what the segments add up to)."""
    labels, segments = _segments(models)
    names = list(models)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names) + 3.5), 4.8), dpi=110)
    colors = plt.get_cmap("tab20").colors
    bottom = np.zeros(len(names))
    for i, label in enumerate(labels):
        values = segments.loc[label].to_numpy(dtype=float) / 1000
        ax.bar(names, values, bottom=bottom, color=colors[i % len(colors)], label=label, width=0.6)
        bottom += values
    saving = _saving(models)
    if saving.any():
        ax.bar(names, saving, color="0.85", hatch="//", edgecolor="0.5", width=0.6, label=_SAVING)
    sizes = np.array([b.file_bytes for b in models.values()], dtype=float) / 1000
    for x, size in enumerate(sizes):
        ax.plot(
            [x - 0.38, x + 0.38], [size, size], c="k", lw=2, label="file size" if not x else None
        )
        ax.annotate(
            f"{size:,.1f} KB",
            (x, size),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=8,
        )
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("bytes in the packed file (KB)")
    ax.set_title("Where the bytes went, per layer")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def bytes_plotly(models: Mapping[str, Breakdown]):
    """`bytes_figure` as an interactive plotly figure (relative bars: any saving below 0)."""
    import plotly.graph_objects as go

    labels, segments = _segments(models)
    names = list(models)
    fig = go.Figure()
    for label in labels:
        fig.add_bar(x=names, y=segments.loc[label].to_numpy() / 1000, name=label)
    saving = _saving(models)
    if saving.any():
        fig.add_bar(x=names, y=saving, name=_SAVING, marker_pattern_shape="/")
    fig.add_scatter(
        x=names,
        y=[b.file_bytes / 1000 for b in models.values()],
        mode="markers",
        marker={"symbol": "line-ew-open", "size": 30, "color": "black"},
        name="file size",
    )
    fig.update_layout(
        barmode="relative",
        title="Where the bytes went, per layer",
        xaxis_title="model",
        yaxis_title="bytes in the packed file (KB)",
    )
    return fig


def attribution_figure(shown: Attributions, *, title: str) -> plt.Figure:
    """Per example (a row): the input, the baseline's attributions and the compressed model's,
    flipped examples first; red: evidence for the baseline's decision, blue: against."""
    rows = len(shown.indices)
    rho = shown.spearman()
    fig, axes = plt.subplots(rows, 3, figsize=(8.4, 2.0 * rows + 0.6), dpi=100, squeeze=False)
    for i in range(rows):
        status = "flipped" if shown.flipped[i] else "kept"
        if shown.baseline_pred[i] >= 0:
            status += f": {shown.baseline_pred[i]} -> {shown.model_pred[i]}"
        a, b = shown.reference[i], shown.model[i]
        panels = (
            (shown.inputs[i], f"input #{shown.indices[i]} ({status})", False),
            (a, "baseline attribution", True),
            (b, f"{title} attribution (Spearman ρ {rho[i]:.2f})", True),
        )
        for ax, (values, label, signed) in zip(axes[i], panels, strict=True):
            _panel(ax, values, signed=signed, tokens=not shown.inputs.is_floating_point())
            ax.set_title(label, fontsize=8)
    fig.suptitle(
        f"Attributions, baseline vs {title} (flipped examples first)\nred: for the baseline's "
        "decision, blue: against; each panel on its own scale",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _panel(ax, values: torch.Tensor, *, signed: bool, tokens: bool) -> None:
    """One input or attribution: an image for 2-D and square 1-D data, else bars."""
    values = values.detach().float()
    if values.dim() == 3:  # channels first: summed over channels
        values = values.sum(0)
    side = math.isqrt(values.numel()) if values.dim() == 1 else 0
    if values.dim() == 1 and side * side == values.numel() and side >= 4 and not tokens:
        values = values.view(side, side)
    ax.tick_params(labelsize=6)
    if values.dim() == 2:
        limit = float(values.abs().max()) or 1.0
        cmap, low = ("RdBu_r", -limit) if signed else ("gray_r", None)
        ax.imshow(values.numpy(), cmap=cmap, vmin=low, vmax=limit if signed else None)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    colors = ["tab:red" if v >= 0 else "tab:blue" for v in values] if signed else "0.4"
    ax.bar(range(values.numel()), values.numpy(), color=colors, width=0.9)
    ax.set_xlabel("token position" if tokens else "input feature", fontsize=6)
