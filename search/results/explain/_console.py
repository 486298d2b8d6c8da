"""What ``squeeze explain`` prints: rich tables of bytes, agreement, flips and attributions."""

from __future__ import annotations

from search.results.explain._agreement import Agreement
from search.results.explain._model import Explanation


def console_tables(explanation: Explanation, *, flipped_rows: int = 10) -> list:
    """What ``squeeze explain`` prints: rich tables of bytes, agreement, flips, attributions."""
    from rich.table import Table

    out: list = []
    breakdown, base = explanation.breakdown, explanation.baseline_breakdown
    ratio = base.file_bytes / breakdown.file_bytes
    table = Table(
        title=f"{explanation.name}: {breakdown.path.name}, {breakdown.file_bytes:,} bytes "
        f"({ratio:.1f}x smaller than the baseline's {base.file_bytes:,})",
        caption=_CAPTIONS["SQZ2" if breakdown.format == "SQZ2" else "stored"],
        caption_justify="left",
    )
    for column in ("tensor", "kind", "shape", "kept", "sparsity", "stored", "layout", "runtime"):
        table.add_column(column, overflow="fold")
    table.add_column("uncompressed", justify="right", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    for row in breakdown.rows.itertuples():
        shape = (
            row.shape_before
            if row.shape_before == row.shape_after
            else f"{row.shape_before} → {row.shape_after}"
        )
        table.add_row(
            row.tensor,
            row.kind,
            shape,
            row.kept,
            f"{row.sparsity:.1%}",
            row.stored,
            row.layout,
            row.runtime,
            f"{row.raw_bytes:,}",
            f"{row.bytes:,}",
            f"{row.bytes / breakdown.file_bytes:.1%}",
        )
    for line in breakdown.extra:
        share = f"{line.bytes / breakdown.file_bytes:.1%}"
        cells = (line.label, line.kind, "", "", "", line.what, "", "", "")
        table.add_row(*cells, f"{line.bytes:,}", share, style="dim")
    total = f"{breakdown.file_bytes:,}"
    table.add_row("total = file size", *[""] * 8, total, "100.0%", style="bold")
    out.append(table)

    summary = Table(title="Agreement with the baseline", caption_justify="left")
    for column in ("split", "decided alike", "agreement", "flipped", "decisions"):
        summary.add_column(column, justify="left" if column == "decided alike" else "right")
    for a in explanation.agreement.values():
        summary.add_row(a.split, a.kind, f"{a.agreement:.4f}", str(len(a.flipped)), str(a.samples))
    if explanation.agreement:  # (none for a regression: its note says why)
        out.append(summary)
    for a in explanation.agreement.values():
        if a.flips is not None and len(a.flipped):
            out.append(_flips_table(a, flipped_rows))
        if len(a.flipped):
            out.append(_flipped_table(a, flipped_rows))
    if explanation.fidelity is not None:
        fidelity = explanation.fidelity
        table = Table(title="Attribution fidelity")
        table.add_column("class", justify="right")
        table.add_column("samples", justify="right")
        table.add_column("mean Spearman ρ", justify="right")
        for label, row in fidelity.per_class.iterrows():
            table.add_row(
                str(label),
                str(int(row.samples)),
                f"{row.mean_spearman:.3f}",
                style="bold" if label == "all" else None,
            )
        out.append(table)
        out.append(
            "attribution fidelity: the mean Spearman rank correlation of the baseline's and the "
            f"compressed model's input attributions (1: the same evidence, ranked alike); "
            f"{fidelity.method}"
        )
    out += [f"note: {note}" for note in explanation.notes]
    return out


#: What the bytes table's columns count, by format.
_CAPTIONS = {
    "stored": "bytes: what the file stores for each tensor (its arrays — codes, codebook, scales, "
    "frequency tables, masks, values — each compressed by its codec); uncompressed: the same "
    "arrays before their codecs. The index and framing lines complete the sum to the file's size "
    "exactly. kept: sizes after/before structured pruning.",
    "SQZ2": "bytes: what each tensor costs in the file's uncompressed payload (its arrays, their "
    "safetensors entries and its layout record; this old format LZMA-compresses the payload as a "
    "whole); the last three lines complete the sum to the file's size exactly. kept: sizes "
    "after/before structured pruning.",
}


def _flips_table(a: Agreement, rows: int):
    from rich.table import Table

    if "count" in a.flips.columns:  # (above WHOLE_CLASSES classes: the most frequent flips)
        table = Table(title=f"Most frequent flips on {a.split}", caption_justify="left")
        for column in a.flips.columns:
            table.add_column(column, justify="right")
        for row in a.flips.head(rows).itertuples(index=False):
            table.add_row(*(str(v) for v in row))
        if len(a.flips) > rows:
            table.caption = f"... {len(a.flips) - rows} more pairs in flips_{a.split}.csv"
        return table
    classes = [c for c in a.flips.index if a.flips.loc[c].sum() or a.flips[c].sum()]
    table = Table(
        title=f"Flips on {a.split}: rows the baseline's class, columns the compressed model's "
        "(off the diagonal: flipped; row sums: the baseline's class counts)",
        caption_justify="left",
    )
    table.add_column("baseline \\ compressed", justify="right")
    for c in classes:
        table.add_column(str(c), justify="right")
    for r in classes:
        cells = [
            (f"[bold red]{v}[/]" if v and r != c else str(v) if v else "·")
            for c, v in ((c, int(a.flips.loc[r, c])) for c in classes)
        ]
        table.add_row(str(r), *cells)
    return table


def _flipped_table(a: Agreement, rows: int):
    from rich.table import Table

    more = len(a.flipped) - rows
    neighbours = a.kind == "nearest neighbour"
    per_label = a.kind == "yes/no per label"
    table = Table(
        title=f"Flipped on {a.split}"
        + (f" (first {rows}; all {len(a.flipped)} in flipped.csv)" if more > 0 else ""),
        caption="conf: cosine similarity to the nearest neighbour"
        if neighbours
        else "label: whose decision flipped, 1 yes / 0 no; conf: sigmoid probability of the "
        "model's own decision"
        if per_label
        else "conf: softmax probability of the model's own class",
        caption_justify="left",
    )
    head = (
        ("index", "baseline's neighbour", "compressed's neighbour")
        if neighbours
        else ("index", "label", "baseline (conf)", "compressed (conf)")
    )
    for column in head:
        table.add_column(column, justify="right")
    for row in a.flipped.head(rows).itertuples():
        base = f"{row.baseline} ({row.baseline_conf:.2f})"
        comp = f"{row.compressed} ({row.compressed_conf:.2f})"
        cells = (
            (str(row.index), base, comp)
            if neighbours
            else (str(row.index), str(row.label) if row.label != -1 else "·", base, comp)
        )
        table.add_row(*cells)
    return table
