"""Where latency is measured: torch (the default) or ONNX Runtime (``measure.runtime``).

With ``measure.runtime=onnxruntime`` each trial's packed file (and the baseline's, once) is
exported to ONNX (`compressors.onnx_export`), checked in ONNX Runtime against the torch model on
the whole validation split, and its latency and speed-up are timed in ONNX Runtime's CPU
provider with the sweep's threads: the runtime users deploy to, where eager PyTorch's ~20 us of
dispatch per forward no longer hides what compression removes.

The graph takes the model's inputs as the task's batches hold them (one tensor, positional
tensors, or keyword tensors such as ``input_ids`` and ``attention_mask``) and computes the
output the task scores (``Task.output``); the check reads the validation split batch by batch,
as every evaluation does, and scores ONNX Runtime's outputs with the task's metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from experiments import Data, Task, class_last, is_streaming_metric, select_output
from experiments._data import cat_rows, join_rows

if TYPE_CHECKING:
    from compressors.onnx_export import OnnxCheck, OnnxExport


class OnnxMismatchError(RuntimeError):
    """ONNX Runtime's outputs differ from the torch model's beyond the check's tolerance."""


@dataclass(frozen=True)
class Deployed:
    """A packed model exported to ONNX and loaded in ONNX Runtime.

    Attributes:
        module: The ONNX Runtime session as a module (what latency is timed on).
        metrics: ``onnx_bytes`` (the ``.onnx`` file's size), ``onnx_max_abs_diff`` (largest
            difference from the torch model's outputs on validation) and ``val_acc_onnx`` (the
            validation score of ONNX Runtime's outputs: of the graph that is timed, so of the
            ``MatMulNBits`` graph where `kernels` is ``nbits``; ``onnx_max_abs_diff`` is the
            exact session's), and ``onnx_nbits`` (1: on ``MatMulNBits``) with ``nbits_tolerance``.
        path: The ``.onnx`` file.
        export: What the export made (ops, exporter, notes such as sparsity stored dense).
        check: How ONNX Runtime's outputs compared with the torch model's.
        threads: The session's settings that its latency depends on (intra- and inter-op
            threads, execution mode, graph optimisation: `ORT_THREAD_PARAMS`), logged as a
            trial's parameters beside ``torch.threads``.
        kernels: ``float`` (weights dequantized at load: the exact session) or ``nbits`` (ORT's
            4-bit ``MatMulNBits`` kernels, `compressors._onnx_nbits`), and why (``kernels_why``).
    """

    module: torch.nn.Module
    metrics: dict[str, float]
    path: Path
    export: OnnxExport
    check: OnnxCheck
    threads: dict[str, int | str] = field(default_factory=dict)
    kernels: str = "float"
    kernels_why: str = ""


#: The names of `Deployed.threads`, the ONNX Runtime session settings a trial logs.
ORT_THREAD_PARAMS = (
    "ort.intra_op_threads",
    "ort.inter_op_threads",
    "ort.execution_mode",
    "ort.optimization",
)


def deploy_onnx(
    packed: Path,
    task: Task,
    out: Path,
    *,
    threads: int | None = None,
    nbits_tolerance: float | None = None,
) -> Deployed:
    """Export the packed file ``packed`` of ``task``'s model to ``out`` and check it on the
    validation split, batch by batch.

    With ``nbits_tolerance`` (a difference of validation scores, e.g. 0.001 for 0.1 point of
    accuracy), a graph whose 4-bit layers ORT can run on its ``MatMulNBits`` kernels is also
    written that way (`compressors._onnx_nbits`, ``<out>.nbits.onnx``) and scored on the
    validation split in that session; it is what is timed and shipped (``kernels="nbits"``,
    metric ``onnx_nbits`` 1) only if its score is within ``nbits_tolerance`` of the torch
    model's, otherwise the exact session is (``kernels_why`` says why).

    Raises:
        OnnxMismatchError: If ONNX Runtime's outputs on the validation split are not within
            `compressors.onnx_export.check_onnx`'s tolerance of the torch model's.
        compressors.onnx_export.OnnxExportError: If the model cannot be exported.
    """
    from compressors.onnx_export import (
        OrtModule,
        check_onnx,
        export_onnx,
        ort_session,
        release_freed_memory,
        session_settings,
        torch_outputs,
    )

    model = task.build_model()
    output = scored(task)
    exported = export_onnx(  # (loads the file into ``model``)
        packed, model, task.example_inputs(8), out, output=output, more_inputs=other_inputs(task)
    )
    expected = torch_outputs(model, _inputs(task.val, []), output=output)
    del model  # (before ONNX Runtime's session holds the graph's float weights)
    release_freed_memory()  # (the exporter left the model in reference cycles)
    targets: list[Any] = []
    check = check_onnx(out, None, _inputs(task.val, targets), output=output, expected=expected)
    if not check.agree:  # (the export's notes say what it fixed, or which exporter it fell to)
        notes = "".join(f"; {note}" for note in exported.notes if "dense" not in note)
        raise OnnxMismatchError(f"{out.name}: {check.message}{notes}")
    threads = threads or torch.get_num_threads()
    module = OrtModule(ort_session(out, threads=threads))
    metrics = {
        "onnx_bytes": float(exported.size_bytes),
        "onnx_max_abs_diff": check.max_abs_diff,
        "val_acc_onnx": _score(task.val, join_rows(check.batches), targets),  # the check's own pass
    }
    settings = session_settings(threads, offline=exported.optimization)
    if nbits_tolerance is None:
        return Deployed(module, metrics, out, exported, check, settings)
    metrics["onnx_nbits"] = 0.0
    reference = _score(task.val, join_rows(expected), targets)
    nbits = _try_nbits(out, task, threads, reference, nbits_tolerance)
    if isinstance(nbits, str):
        return Deployed(module, metrics, out, exported, check, settings, kernels_why=nbits)
    module, path, score, why = nbits
    metrics |= {"val_acc_onnx": score, "onnx_nbits": 1.0}
    return Deployed(module, metrics, path, exported, check, settings, "nbits", why)


def _try_nbits(
    out: Path, task: Task, threads: int, reference: float, tolerance: float
) -> str | tuple[torch.nn.Module, Path, float, str]:
    """``out`` on ORT's ``MatMulNBits`` kernels: (module, graph, validation score, why) if its
    score is within ``tolerance`` of ``reference`` (the torch model's), else why not."""
    from compressors._onnx_io import call_model, input_batches
    from compressors._onnx_nbits import fused_ops, nbits_graph, nbits_session
    from compressors.onnx_export import CHECK_ROWS, OrtModule

    if not isinstance(tolerance, float | int) or tolerance < 0:
        raise ValueError(
            f"The 'nbits_tolerance' parameter must be a number >= 0. Got {tolerance!r} instead."
        )
    path = out.with_suffix(".nbits.onnx")
    if not nbits_graph(out, path):
        path.unlink(missing_ok=True)
        return "no 4-bit Gemm weight to run on MatMulNBits"
    fused = fused_ops(path, out.with_suffix(".nbits.optimized.onnx"), threads=threads)
    out.with_suffix(".nbits.optimized.onnx").unlink(missing_ok=True)
    if "MatMulNBits" not in fused:
        path.unlink(missing_ok=True)
        return "ONNX Runtime fused no MatMulNBits on this CPU"
    module = OrtModule(nbits_session(path, threads=threads))
    targets: list[Any] = []
    with torch.no_grad():
        got = [
            call_model(module, batch).float()
            for batch in input_batches(_inputs(task.val, targets), CHECK_ROWS)
        ]
    score = _score(task.val, join_rows(got), targets)
    if abs(score - reference) > tolerance:
        path.unlink(missing_ok=True)
        return (
            f"MatMulNBits scored {score:.6g} on validation, the torch model {reference:.6g}: "
            f"more than nbits_tolerance={tolerance:g} apart"
        )
    why = f"{fused.count('MatMulNBits')} MatMulNBits, validation {score:.6g} vs {reference:.6g}"
    return module, path, score, why


def check_deployable(task: Task) -> str:
    """Export ``task``'s freshly built model to a graph in memory, as `deploy_onnx` will export
    each packed model; returns the exporter that converts it.

    Raises:
        compressors.onnx_export.OnnxExportError: If it cannot be: inputs that are not one
            tensor, a tuple or a dict of tensors, a scored output that is not a tensor, or an op
            no exporter converts (naming the layer).
    """
    from compressors.onnx_export import check_exportable

    model = task.build_model().eval()
    return check_exportable(
        model, task.example_inputs(8), output=scored(task), more_inputs=other_inputs(task)
    )


#: Validation batches whose inputs' shapes `other_inputs` compares with the example's.
SHAPE_BATCHES = 4


def other_inputs(task: Task) -> list[Any]:
    """The inputs of the first `SHAPE_BATCHES` validation batches: where a collate pads each
    batch to its longest sequence, their lengths differ from the example's, and the exported
    graph takes any length (`compressors.onnx_export.export_onnx`'s ``more_inputs``)."""
    return list(islice(_inputs(task.val, []), SHAPE_BATCHES))


def scored(task: Task) -> Callable[[Any], torch.Tensor]:
    """``output(model_outputs) -> tensor``: the output ``task`` scores (as ``Data.forward``
    selects it)."""
    return partial(select_output, output=task.val.adapters.output)


def _inputs(data: Data, targets: list[Any]) -> Iterator[Any]:
    """The model's inputs of each batch of ``data`` (in order), keeping their targets."""
    for batch in data.batches(data.eval_batch_size):
        targets.append(batch.targets)
        yield batch.inputs


def _score(data: Data, outputs: torch.Tensor, targets: list[Any]) -> float:
    """``data``'s metric of ``outputs`` (a ``torchmetrics.Metric``, or a function of the whole
    split's outputs and targets)."""
    truth = None if not targets or targets[0] is None else cat_rows(targets)
    outputs = class_last(outputs, data.adapters.class_axis)  # scored as `Data.forward` gives
    metric = data.score
    if is_streaming_metric(metric):
        metric = metric.clone()
        metric.reset()
        metric.update(outputs, truth)
        value = metric.compute()
    else:
        value = metric(outputs, truth)
    return float(value.item() if isinstance(value, torch.Tensor) else value)
