"""The reference int8 graph a deploy bench sets squeeze's points beside: ONNX Runtime's own
static quantization (``onnxruntime.quantization.quantize_static``) of the baseline's graph, as
ONNX Runtime's documentation teaches it and as Olive's static int8 pass runs it: MinMax
calibration on training batches, QDQ format, int8 weights per channel and uint8 activations,
after ONNX Runtime's own pre-processing (``quant_pre_process``: shape inference and its basic
optimisations).

The calibrated graph is what a user gets from the baseline without squeeze; it is scored on the
test split in ONNX Runtime and timed against the baseline's graph in the same alternating rounds
as squeeze's points.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from _common import side_by_side

from compressors._onnx_io import ort_feeds
from compressors.onnx_export import OrtModule, ort_session
from experiments import evaluate

#: Training samples the reference graph is calibrated on.
CALIBRATION_SAMPLES = 512


@dataclass(frozen=True)
class Reference:
    """ONNX Runtime's static int8 graph of the baseline.

    Attributes:
        path: The ``.onnx`` file.
        size_bytes: Its bytes.
        test: Its test score (the task's metric, from ONNX Runtime's outputs).
        speed: ``{batch: (speed-up, baseline ms, its ms)}`` against the baseline's graph.
        ops: The nodes of the saved graph, by op type (``QuantizeLinear`` / ``DequantizeLinear``
            pairs that ONNX Runtime fuses into integer kernels when it loads them).
    """

    path: Path
    size_bytes: int
    test: float
    speed: dict[int, tuple[float, float, float]]
    ops: Counter


class _Calibration:
    """``onnxruntime.quantization.CalibrationDataReader``: the task's training batches as
    feeds of the graph's inputs, up to `CALIBRATION_SAMPLES` samples."""

    def __init__(self, module: OrtModule, task: Any, batch_size: int = 64) -> None:
        self.module = module
        self.batches = task.train.batches(batch_size, limit=CALIBRATION_SAMPLES)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        inputs = batch.inputs
        args = (
            inputs if isinstance(inputs, tuple) else () if isinstance(inputs, dict) else (inputs,)
        )
        kwargs = inputs if isinstance(inputs, dict) else {}
        return ort_feeds(self.module.input_names, self.module._graph_inputs, tuple(args), kwargs)


def quantize_baseline(baseline_graph: Path, task: Any, out: Path) -> Path:
    """Calibrate and quantize the baseline's graph with ONNX Runtime into ``out`` (MinMax on
    `CALIBRATION_SAMPLES` training samples, QDQ, int8 weights per channel, uint8 activations,
    after ``quant_pre_process``)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = _Calibration(OrtModule(ort_session(baseline_graph)), task)
    baseline_graph, out = Path(baseline_graph).resolve(), Path(out).resolve()
    prepared = out.with_name(f"{out.stem}-prepared.onnx")  # shapes inferred, as ORT advises
    # (in out's folder: both write temporary files, a large model's weights among them, into
    # the working directory)
    with contextlib.chdir(out.parent):
        try:
            quant_pre_process(str(baseline_graph), str(prepared))
        except Exception:  # (MiniLM's graph: "Incomplete symbolic shape inference")
            quant_pre_process(str(baseline_graph), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return out


def quantize_reference(
    baseline_graph: Path, task: Any, out: Path, baseline_module: Any, batches: tuple[int, ...]
) -> Reference:
    """Calibrate and quantize the baseline's graph with ONNX Runtime (`quantize_baseline`),
    score it on test and time it against ``baseline_module`` at ``batches``."""
    quantize_baseline(baseline_graph, task, out)
    module = OrtModule(ort_session(out, exact=False))  # (its QDQ pairs run as integer kernels)
    speed = {b: side_by_side(baseline_module, module, task.example_inputs(b)) for b in batches}
    ops = Counter(node.op_type for node in onnx.load(str(out)).graph.node)
    return Reference(out, out.stat().st_size, evaluate(module, task.test), speed, ops)
