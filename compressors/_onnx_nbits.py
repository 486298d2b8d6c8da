"""4-bit weights that run as 4-bit in ONNX Runtime: ORT's ``MatMulNBits`` kernels.

`compressors.onnx_export` writes a 4-bit Linear as ``DequantizeLinear`` (INT4 codes ``[N, K]``,
per-row scales, ``axis=0``) feeding a ``Gemm`` with ``transB=1``. ONNX Runtime 1.32's CPU
provider fuses ``DequantizeLinear`` + ``MatMul`` into ``MatMulNBits`` (int8 activations at its
accuracy level 4), but never ``DequantizeLinear`` + ``Gemm``: the exported graph runs float
kernels even with QDQ fusions on (checked on the digits MLP: ``FusedGemm``, no ``MatMulNBits``).
`nbits_graph` therefore writes the same values in the layout the fusion reads: the codes
transposed to ``[K, N]`` with per-column scales (``axis=1``), a ``MatMul`` and an ``Add`` of the
bias (in float, the same outputs as the Gemm). ORT's ``MatMulAddFusion`` would turn that
``MatMul`` + ``Add`` back into a ``Gemm`` before the QDQ fusion sees it, so `nbits_session`
disables it; ORT then writes ``MatMulNBits`` (``bits=4``, ``block_size=32``: it re-blocks
per-column scales along K itself, and absorbs the bias) for every such layer. Where ORT's
other fusions had fused the Gemm with its Relu, the Relu stays a node.

Outputs: at ORT's default accuracy level 4 (int8 activations) the trained digits MLP's logits
moved by 0.16 of 33 (0.5%), its validation accuracy not at all (0.9722 in both); accuracy level
1 (``session.qdq_matmulnbits_accuracy_level``: float activations, 4-bit weights) moved them by
8e-6. Speed (one thread, Xeon with AVX-512 VNNI, 2 loaded cores, sessions timed in alternating
rounds): 4-bit kernels pay off only where reading float weights costs more than quantizing
activations. The digits MLP (64-300-100-10, weights in cache) ran *slower* on them: batch 1
10.0 us against 7.8 (fp32 graph and exact 4-bit session alike), batch 32 72.8 us against 29.6
(accuracy level 1: 10.8 and 41.7 us). A 1024-4096-1024 MatMul stack (16 MB of float weights)
ran 4.7x faster at batch 1 (255 us against 1196; level 1: 600 us) and as fast at batch 32
(3.74 ms against 3.66-3.82). Whether the fused session is faster is therefore the model's and
batch's question: `search.run.deploy.deploy_onnx` keeps it on the validation score alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from compressors._onnx_session import session_options
from compressors._onnx_torch import require_onnx

if TYPE_CHECKING:
    import onnxruntime

#: ORT's fusion that would undo `nbits_graph`'s MatMul + Add before ``MatMulNBits`` is fused.
DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


def nbits_graph(onnx_path: str | Path, out: str | Path) -> int:
    """Write ``onnx_path`` to ``out`` with each ``Gemm`` (``transA=0``, ``transB=1``,
    ``alpha=beta=1``) whose weight is a per-row ``DequantizeLinear`` of INT4 / UINT4 codes read by
    nothing else rewritten as ``DequantizeLinear(axis=1)`` of the transposed codes, ``MatMul``
    and ``Add``; returns how many were rewritten (0: ``out`` is ``onnx_path``'s graph)."""
    onnx = require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    four_bit = {TensorProto.INT4, TensorProto.UINT4}
    nodes, created, moved = [], [], set()
    for node in graph.node:
        source = dq.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        source_attrs = (
            {}
            if source is None
            else {a.name: helper.get_attribute_value(a) for a in source.attribute}
        )
        codes = None if source is None else inits.get(source.input[0])
        if (
            source is None
            or codes is None
            or codes.data_type not in four_bit
            or len(codes.dims) != 2
            or source_attrs.get("axis", 1) != 0
            or source_attrs.get("block_size", 0)
            or readers.get(source.output[0]) != 1
            or readers.get(source.input[0]) != 1
            or (attrs.get("transA", 0), attrs.get("transB", 0)) != (0, 1)
            or (attrs.get("alpha", 1.0), attrs.get("beta", 1.0)) != (1.0, 1.0)
        ):
            nodes.append(node)
            continue
        values = numpy_helper.to_array(codes)
        codes.CopyFrom(numpy_helper.from_array(values.T.copy(), codes.name))
        moved.add(source.output[0])
        created.append(
            helper.make_node("DequantizeLinear", list(source.input), [source.output[0]], axis=1)
        )
        nodes.append(created[-1])
        product = node.output[0] if len(node.input) < 3 else f"{node.output[0]}_nbits_matmul"
        nodes.append(helper.make_node("MatMul", [node.input[0], source.output[0]], [product]))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]]))
    nodes = [n for n in nodes if n.output[0] not in moved or any(n is c for c in created)]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(out))
    return len(created)


def nbits_session(
    onnx_path: str | Path, *, threads: int = 1, optimized: str | Path | None = None
) -> onnxruntime.InferenceSession:
    """`compressors.onnx_export.ort_session` with ``exact=False`` (ORT's QDQ fusions on, so
    ``MatMulNBits`` where it fuses) and `DISABLED_OPTIMIZERS` off; ``optimized``: where ORT saves
    the graph it runs (to see what it fused)."""
    import onnxruntime as ort

    options = session_options(threads)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(
        str(onnx_path),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )


def fused_ops(onnx_path: str | Path, scratch: str | Path, *, threads: int = 1) -> list[str]:
    """The ops of the graph `nbits_session` runs for ``onnx_path`` (saved at ``scratch``)."""
    onnx = require_onnx()
    nbits_session(onnx_path, threads=threads, optimized=scratch)
    return [node.op_type for node in onnx.load(str(scratch)).graph.node]
