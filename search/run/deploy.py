"""Where latency is measured: torch (the default) or ONNX Runtime (``measure.runtime``).

With ``measure.runtime=onnxruntime`` each trial's packed file (and the baseline's, once) is
exported to ONNX (`compressors.onnx_export`), checked in ONNX Runtime against the torch model on
the whole validation split, and its latency and speed-up are timed in ONNX Runtime's CPU
provider with the sweep's threads: the runtime users deploy to, where eager PyTorch's ~20 us of
dispatch per forward no longer hides what compression removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from experiments import Task

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
            validation score of ONNX Runtime's outputs).
        path: The ``.onnx`` file.
        export: What the export made (ops, exporter, notes such as sparsity stored dense).
        check: How ONNX Runtime's outputs compared with the torch model's.
    """

    module: torch.nn.Module
    metrics: dict[str, float]
    path: Path
    export: OnnxExport
    check: OnnxCheck


def deploy_onnx(packed: Path, task: Task, out: Path, *, threads: int | None = None) -> Deployed:
    """Export the packed file ``packed`` of ``task``'s model to ``out`` and check it.

    Raises:
        OnnxMismatchError: If ONNX Runtime's outputs on the validation split are not within
            `compressors.onnx_export.check_onnx`'s tolerance of the torch model's.
        compressors.onnx_export.OnnxExportError: If the model cannot be exported.
    """
    from compressors.onnx_export import (
        OnnxExportError,
        OrtModule,
        check_onnx,
        export_onnx,
        ort_session,
    )
    from experiments import describe

    example = task.example_inputs(8)
    if not isinstance(example, torch.Tensor) or task.val.in_memory is None:
        raise OnnxExportError(
            f"task {task.name!r}: ONNX export takes a model called on one input tensor, checked "
            "on validation data held in memory (a Split); this task's model is called on "
            f"{describe(example)}"
            + ("" if task.val.in_memory is not None else " and its data is read batch by batch")
        )
    model = task.build_model()
    exported = export_onnx(packed, model, example, out)  # loads `model`
    check = check_onnx(out, model, task.val.x)
    if not check.agree:
        raise OnnxMismatchError(f"{out.name}: {check.message}")
    module = OrtModule(ort_session(out, threads=threads or torch.get_num_threads()))
    metrics = {
        "onnx_bytes": float(exported.size_bytes),
        "onnx_max_abs_diff": check.max_abs_diff,
        "val_acc_onnx": task.val.score(check.outputs, task.val.y),  # the check's own pass
    }
    return Deployed(module, metrics, out, exported, check)
