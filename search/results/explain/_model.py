"""One packed model explained against its task's baseline: bytes, agreement, attributions
(`explain_model`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compressors import load_packed
from compressors.packing import (
    int8_layers,
)
from experiments import (
    DECISIONS,
    Baseline,
    Task,
    predict_outputs,
)
from experiments._training import outputs_and_targets, paired_output_batches
from search.results.explain._agreement import (
    Agreement,
    agreement_report,
    decide,
    top1_agreement,
)
from search.results.explain._attributions import (
    STEPS,
    Attributions,
    Fidelity,
    attribute,
    attribution_fidelity,
)
from search.results.explain._bytes import Breakdown, byte_breakdown
from search.run.logs import Ticker

logger = logging.getLogger(__name__)

#: Flipped and kept examples the attribution figure shows (each at most).
SHOWN = 3


@dataclass(frozen=True)
class Explanation:
    """What compression changed in one packed model (`explain_model`).

    Attributes:
        name: ``trial <N>`` or ``baseline``.
        breakdown: Its file's bytes (`byte_breakdown`).
        baseline_breakdown: The baseline's file's bytes, beside it.
        agreement: ``{"val": Agreement, "test": Agreement}``.
        fidelity: Attribution fidelity on validation (None when not asked for).
        shown: Attributions of a few flipped and a few kept validation inputs, for the figure.
        int8_layers: Layers the file runs on int8 kernels.
        notes: What the reader should know.
        files: The files `write_explanation` wrote (set by `explain_trial`).
        run_id: The MLflow run they were logged to (set by `explain_trial`).
    """

    name: str
    breakdown: Breakdown
    baseline_breakdown: Breakdown
    agreement: dict[str, Agreement]
    fidelity: Fidelity | None
    shown: Attributions | None
    int8_layers: list[str]
    notes: tuple[str, ...] = ()
    files: list[Path] = field(default_factory=list)
    run_id: str | None = None


def explain_model(
    path: str | Path,
    task: Task,
    baseline: Baseline,
    *,
    name: str = "model",
    attributions: bool = True,
    samples: int | None = None,
    seed: int = 0,
    steps: int = STEPS,
) -> Explanation:
    """Explain one packed model against the task's baseline: bytes, agreement, attributions.

    Agreement is measured on the model as shipped (int8 layers where the file has them);
    attributions on its float reload (the same weights: int8 kernels have no gradients).

    Args:
        path: The model's packed file.
        task: Its task (splits, model builder).
        baseline: The task's cached baseline (its packed file is written if absent).
        name: What to call the model in tables (``trial 7``).
        attributions: Compute attribution fidelity (the slow part; off: bytes and agreement).
        samples: Validation samples attributed (default `SAMPLES`, `TOKEN_SAMPLES` for tokens).
        seed: Seeds that sample.
        steps: Integrated Gradients' steps.
    """
    from search.run.workload import baseline_file_size

    step = Ticker(logger, f"explain {name}:")  # a long explanation shows its phases
    phases = 4 if attributions and _attributable(task) else 2
    baseline_file_size(baseline)  # writes <baseline.folder>/model.sqz if absent
    path = Path(path)
    fresh = task.build_model()  # (only read: the architecture before compression)
    breakdown = byte_breakdown(path, fresh)
    base_breakdown = byte_breakdown(baseline.folder / "model.sqz", fresh)
    shipped = load_packed(path, task.build_model())
    step(1, phases, "bytes per tensor group")
    notes: list[str] = []
    agreement = {}
    if task.outputs == "logits":  # (decided batch by batch: never a split's whole logits)
        for split_name, split in (("val", task.val), ("test", task.test)):
            pairs = paired_output_batches(baseline.model, shipped, split)
            decided = [decide(ref, out, targets) for ref, out, targets in pairs]
            agreement[split_name] = top1_agreement(decided, split_name, task.num_classes)
    elif task.outputs in DECISIONS:
        for split_name, split in (("val", task.val), ("test", task.test)):
            outputs, targets = outputs_and_targets(shipped, split)
            agreement[split_name] = agreement_report(
                predict_outputs(baseline.model, split),
                outputs,
                targets,
                split_name=split_name,
                kind=task.outputs,
                num_classes=task.num_classes if task.outputs == "logits" else None,
            )
    else:  # (and none to attribute: the note below about held-in-memory data is not why)
        notes.append(
            f"a model that outputs {task.outputs} makes no decisions to agree on or to "
            "attribute: agreement, flipped inputs and attributions are left out"
        )
        attributions = False
    step(2, phases, "agreement")
    int8 = int8_layers(path)
    fidelity = shown = None
    if attributions and task.outputs == "multilabel":
        notes.append(
            "a multi-label classifier decides once per label: attributions explain one decision "
            "per sample and are left out; agreement and flipped decisions are counted per label"
        )
        attributions = False
    if attributions and task.outputs == "logits":
        with torch.no_grad():
            one = task.val.forward(shipped, task.example_inputs(1))
        if one.dim() > 2:
            notes.append(
                f"the model decides per position (logits {tuple(one.shape)}): attributions "
                "explain one decision per sample and are left out; agreement and flipped "
                "decisions are counted per position"
            )
            attributions = False
    if attributions and not _attributable(task):
        notes.append(
            "attributions need a classifier or encoder whose validation data is held in memory "
            "as one input tensor (a Split); left out for this task"
        )
        attributions = False
    if attributions:
        float_model = load_packed(path, task.build_model(), int8=False) if int8 else shipped
        if int8:
            notes.append(
                f"attributions of the compressed model are computed on its float reload "
                f"(the same weights): its int8 layers ({', '.join(int8)}) have no gradients"
            )
        fidelity = attribution_fidelity(
            baseline.model,
            float_model,
            task.val,
            outputs=task.outputs,
            samples=samples,
            seed=seed,
            steps=steps,
        )
        notes += fidelity.notes
        step(3, phases, "attribution fidelity")
        indices = _shown(agreement["val"], fidelity)
        shown = attribute(
            baseline.model,
            float_model,
            task.val.x,
            indices,
            outputs=task.outputs,
            steps=steps,
            flipped=np.isin(indices, agreement["val"].flipped["index"].to_numpy()),
        )
        step(4, phases, "attributions shown")
    return Explanation(
        name, breakdown, base_breakdown, agreement, fidelity, shown, int8, tuple(notes)
    )


def _attributable(task: Task) -> bool:
    """Whether Integrated Gradients can attribute the task's models (one input tensor, held in
    memory, and decisions to explain)."""
    return (
        task.outputs in DECISIONS
        and task.val.in_memory is not None
        and isinstance(task.example_inputs(1), torch.Tensor)
    )


def _shown(agreement: Agreement, fidelity: Fidelity) -> np.ndarray:
    """Up to `SHOWN` flipped validation inputs and `SHOWN` kept ones of the attributed sample."""
    flipped = agreement.flipped["index"].to_numpy()[:SHOWN]
    sample = fidelity.attributions.indices
    kept = [i for i in sample if i not in set(agreement.flipped["index"])][:SHOWN]
    return np.asarray([*flipped, *kept], dtype=np.int64)
