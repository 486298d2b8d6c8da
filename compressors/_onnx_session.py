"""ONNX Runtime sessions as squeeze opens them: the options every session here gets, and what a
trial logs of them beside each latency it times in ONNX Runtime."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx
    import onnxruntime


def release_freed_memory() -> None:
    """Free what only reference cycles still hold (a garbage collection: the model the graph
    was exported from outlives its last name, torch's exporter having left it in cycles) and
    hand the heap's freed pages back to the system (glibc's ``malloc_trim``; nothing where the
    C library has none). Before the check's ONNX Runtime session (which dequantizes the graph's
    weights once, its own float copy), exporting and checking a 30 M-parameter MLP peaked at
    3.1x its bytes, 2.5x with this. The collection takes 0.2-1 s once torch's exporter is
    imported (a younger generation's frees nothing here)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # (another C library: musl, macOS, Windows)
        trim = None
    if trim is not None:
        trim(0)


def session_options(threads: int = 1) -> onnxruntime.SessionOptions:
    """The options of every session here: ``threads`` intra-op threads, one inter-op thread,
    sequential execution, every graph optimization on, warnings and errors logged only."""
    ort = require_ort()
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"The 'threads' parameter must be an int >= 1. Got {threads!r} instead.")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def session_settings(threads: int = 1, *, offline: str = "basic") -> dict[str, int | str]:
    """What `ort_session` sets, as a trial logs it beside each latency it times in ONNX
    Runtime: ``threads`` intra-op threads, one inter-op thread, sequential execution, and the
    graph optimisation: ``offline`` (`OnnxExport.optimization`) saved in the file, every level
    when the session loads it."""
    return {
        "ort.intra_op_threads": threads,
        "ort.inter_op_threads": 1,
        "ort.execution_mode": "sequential",
        "ort.optimization": f"{offline} offline, all at load",
    }


def require_ort():
    """``onnxruntime``, or an ImportError naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "ONNX Runtime checks need the 'onnx' extra: pip install -e \".[onnx]\" (installs "
            "onnx, onnxruntime and onnxscript)."
        ) from None
    return onnxruntime


def unrunnable(proto: onnx.ModelProto, batches: Iterable[Any], notes: list[str]) -> str | None:
    """Why ONNX Runtime cannot run the graph ``proto`` (its call recorded by
    `compressors._onnx_io.write_metadata`) on one of ``batches`` (model inputs, as the model is
    called), with the export's ``notes``; None when it runs them all."""
    from compressors._onnx_io import OrtModule, call_model, cannot_run

    options = session_options(1)
    options.log_severity_level = 4  # (its failure is reported below, not printed in red)
    session = require_ort().InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    module = OrtModule(session)
    for batch in batches:
        try:
            call_model(module, batch)
        except Exception as err:  # ONNX Runtime's own (InvalidArgument, Fail): a wrong graph
            if not type(err).__module__.startswith("onnxruntime"):
                raise
            return cannot_run(batch, err) + "".join(f"; {note}" for note in notes)
    return None
