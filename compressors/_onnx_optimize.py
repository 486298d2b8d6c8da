"""ONNX Runtime's offline graph optimisation, saved into the shipped ``.onnx`` file (see
`compressors.onnx_export`).

The level is ONNX Runtime's *basic* one (``ORT_ENABLE_BASIC``): constant folding, redundant
node elimination and the fusions that give standard ONNX ops (Conv + BatchNormalization, Conv +
Add / Mul, Gemm + Transpose, ...). What it writes runs on any ONNX Runtime build and execution
provider, and on any CPU. The higher levels are left to the session that loads the file, on
the machine that runs it:

- *extended* writes ONNX Runtime's own contrib ops (``FusedConv``, ``FusedGemm``,
  ``MatMulNBits``, ...), which only the provider they were fused for runs; with the QDQ
  handling on, it fuses ``DequantizeLinear`` + ``MatMul`` into ``MatMulNBits``, whose default
  accuracy level quantizes activations (outputs no longer the file's model's); with it off,
  every ``DequantizeLinear`` of a weight is folded into a float32 initializer (the file 4-8x
  larger: the 4-bit zoo ResNet's graph went from 19.6 to 82.3 kB);
- *all* adds the NCHWc layout of the CPU it ran on (its block size follows the vector width:
  AVX2 and AVX-512 differ), so a file saved there is tied to that kind of CPU.

Constant folding and the transpose optimizer are left out. Constant folding would compute a
codebook's ``Gather`` (and, with the QDQ handling off, each ``DequantizeLinear``) into a float32
initializer: the file would no longer store the packed file's codes. The transpose optimizer
would store a transposed copy of a table that a ``Gather`` also reads as it is (a tied embedding
and output layer). onnxscript's optimizer has already folded the other constants, with the coded
tensors out of its reach (`compressors._onnx_graph.optimize_graph`). The QDQ handling stays on
(as in ONNX Runtime's default session).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: ``optimize`` choices of `compressors.onnx_export.export_onnx`.
OPTIMIZE_LEVELS = ("basic", "none")
#: ONNX Runtime's optimizers left out (see the module docstring).
DISABLED_OPTIMIZERS = ("ConstantFolding", "TransposeOptimizer")
#: The metadata key recording the offline optimisation a file went through.
OPTIMIZED_KEY = "squeeze.ort_optimization"


def save_optimized(path: Path, level: str) -> str | None:
    """Replace the ONNX file ``path`` by ONNX Runtime's offline optimisation of it at ``level``
    (``basic``; ``none`` leaves it as it is), recorded in its metadata. An optimisation whose
    initializers take more bytes than the file's (a tensor stored twice, or as float32) is not
    kept: returns a note saying so, else None."""
    if level == "none":
        return None
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        options.optimized_model_filepath = tmp
        ort.InferenceSession(
            str(path),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(DISABLED_OPTIMIZERS),
        )
        proto = onnx.load(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)
    before = _initializer_bytes(onnx.load(str(path), load_external_data=False))
    if _initializer_bytes(proto) > before:
        return (
            f"ONNX Runtime's {level} offline optimisation not kept: its initializers took "
            f"{_initializer_bytes(proto):,} bytes, the exported graph's {before:,}"
        )
    used = {node.domain or "" for node in proto.graph.node}
    for opset in list(proto.opset_import):
        if (opset.domain or "") not in used and opset.domain not in ("", "ai.onnx"):
            proto.opset_import.remove(opset)
    del proto.graph.value_info[:]
    props = {entry.key: entry.value for entry in proto.metadata_props}
    props[OPTIMIZED_KEY] = f"{level} (onnxruntime {ort.__version__}, offline)"
    onnx.helper.set_model_props(proto, props)
    onnx.save_model(proto, path)
    return None


def _initializer_bytes(proto) -> int:
    return sum(init.ByteSize() for init in proto.graph.initializer)
