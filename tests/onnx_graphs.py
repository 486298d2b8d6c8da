"""The graph ONNX Runtime runs: a saved ``.onnx`` as a session optimises it, for tests that
check which kernels a graph gets (integer convolutions, fused attention, no transposes)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def optimized_graph(path: Path, level: str = "ORT_ENABLE_ALL"):
    """``path``'s graph after ONNX Runtime's optimisation at ``level`` (a
    ``GraphOptimizationLevel`` name; the runtime's `ort_session` loads graphs at
    ``ORT_ENABLE_ALL``: the NHWC integer kernels), written beside it and read back."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(path.with_name(f"{path.stem}-{level}.onnx"))
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, level)
    options.log_severity_level = 3  # (errors only)
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


def optimized_ops(path: Path, level: str = "ORT_ENABLE_ALL") -> Counter:
    """The op types of `optimized_graph`, counted."""
    return Counter(node.op_type for node in optimized_graph(path, level).node)
